"""Stand-in for comfy/text_encoders/t5.py: T5, the T5 / UMT5 encoder ComfyUI builds for t5xxl
and umt5xxl, with upstream's module tree and so its state-dict names: shared,
encoder.block.N.layer.0.{SelfAttention.{q,k,v,o,relative_attention_bias}, layer_norm},
encoder.block.N.layer.1.{DenseReluDense.{wi_0,wi_1,wo} (gated) or wi, layer_norm},
encoder.final_layer_norm; num_layers; get_input_embeddings.

Upstream: comfy/text_encoders/t5.py. relative_attention_bias is in block 0 only for T5
(config model_type "t5"), in every block for UMT5 ("umt5"). forward(input_ids,
attention_mask, embeds, num_tokens, intermediate_output, final_layer_norm_intermediate, dtype)
returns (final-normed last state, the chosen layer's state); the compute is left out here (the
Tensorfleet node replaces it); the modules can be built on the meta device.
"""

import torch


class T5LayerNorm(torch.nn.Module):
    def __init__(self, hidden_size, eps=1e-6, dtype=None, device=None, operations=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))


class T5DenseGatedActDense(torch.nn.Module):
    def __init__(self, model_dim, ff_dim, ff_activation, dtype, device, operations):
        super().__init__()
        self.wi_0 = operations.Linear(model_dim, ff_dim, bias=False, dtype=dtype, device=device)
        self.wi_1 = operations.Linear(model_dim, ff_dim, bias=False, dtype=dtype, device=device)
        self.wo = operations.Linear(ff_dim, model_dim, bias=False, dtype=dtype, device=device)


class T5DenseActDense(torch.nn.Module):
    def __init__(self, model_dim, ff_dim, ff_activation, dtype, device, operations):
        super().__init__()
        self.wi = operations.Linear(model_dim, ff_dim, bias=False, dtype=dtype, device=device)
        self.wo = operations.Linear(ff_dim, model_dim, bias=False, dtype=dtype, device=device)


class T5LayerFF(torch.nn.Module):
    def __init__(self, model_dim, ff_dim, ff_activation, gated_act, dtype, device, operations):
        super().__init__()
        cls = T5DenseGatedActDense if gated_act else T5DenseActDense
        self.DenseReluDense = cls(model_dim, ff_dim, ff_activation, dtype, device, operations)
        self.layer_norm = T5LayerNorm(model_dim, dtype=dtype, device=device)


class T5Attention(torch.nn.Module):
    def __init__(self, model_dim, inner_dim, num_heads, relative_attention_bias, dtype, device,
                 operations):
        super().__init__()
        self.q = operations.Linear(model_dim, inner_dim, bias=False, dtype=dtype, device=device)
        self.k = operations.Linear(model_dim, inner_dim, bias=False, dtype=dtype, device=device)
        self.v = operations.Linear(model_dim, inner_dim, bias=False, dtype=dtype, device=device)
        self.o = operations.Linear(inner_dim, model_dim, bias=False, dtype=dtype, device=device)
        self.num_heads = num_heads
        self.relative_attention_bias = None
        if relative_attention_bias:
            self.relative_attention_num_buckets = 32
            self.relative_attention_max_distance = 128
            self.relative_attention_bias = operations.Embedding(32, num_heads, device=device,
                                                                dtype=dtype)


class T5LayerSelfAttention(torch.nn.Module):
    def __init__(self, model_dim, inner_dim, ff_dim, num_heads, relative_attention_bias, dtype,
                 device, operations):
        super().__init__()
        self.SelfAttention = T5Attention(model_dim, inner_dim, num_heads,
                                         relative_attention_bias, dtype, device, operations)
        self.layer_norm = T5LayerNorm(model_dim, dtype=dtype, device=device)


class T5Block(torch.nn.Module):
    def __init__(self, model_dim, inner_dim, ff_dim, ff_activation, gated_act, num_heads,
                 relative_attention_bias, dtype, device, operations):
        super().__init__()
        self.layer = torch.nn.ModuleList([
            T5LayerSelfAttention(model_dim, inner_dim, ff_dim, num_heads,
                                 relative_attention_bias, dtype, device, operations),
            T5LayerFF(model_dim, ff_dim, ff_activation, gated_act, dtype, device, operations)])


class T5Stack(torch.nn.Module):
    def __init__(self, num_layers, model_dim, inner_dim, ff_dim, ff_activation, gated_act,
                 num_heads, relative_attention, dtype, device, operations):
        super().__init__()
        self.block = torch.nn.ModuleList([
            T5Block(model_dim, inner_dim, ff_dim, ff_activation, gated_act, num_heads,
                    relative_attention_bias=((not relative_attention) or (i == 0)), dtype=dtype,
                    device=device, operations=operations) for i in range(num_layers)])
        self.final_layer_norm = T5LayerNorm(model_dim, dtype=dtype, device=device)


class T5(torch.nn.Module):
    def __init__(self, config_dict, dtype, device, operations):
        super().__init__()
        self.num_layers = config_dict["num_layers"]
        model_dim = config_dict["d_model"]
        inner_dim = config_dict["d_kv"] * config_dict["num_heads"]
        self.encoder = T5Stack(self.num_layers, model_dim, inner_dim, config_dict["d_ff"],
                               config_dict["dense_act_fn"], config_dict["is_gated_act"],
                               config_dict["num_heads"], config_dict["model_type"] != "umt5",
                               dtype, device, operations)
        self.dtype = dtype
        self.shared = operations.Embedding(config_dict["vocab_size"], model_dim, device=device,
                                           dtype=dtype)

    def get_input_embeddings(self):
        return self.shared

    def forward(self, *args, **kwargs):
        raise NotImplementedError("the ComfyUI stand-in does not run text encoders locally")
