"""Stand-in for comfy/clip_model.py: CLIPTextModel, the CLIP text transformer ComfyUI builds
for clip_l (and clip_g), with upstream's module tree and so its state-dict names:
text_model.embeddings.{token,position}_embedding, text_model.encoder.layers.N.{layer_norm1,
self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}, text_model.final_layer_norm,
text_projection; num_layers; get_input_embeddings.

Upstream: comfy/clip_model.py. Its forward(input_tokens, attention_mask, embeds, num_tokens,
intermediate_output, final_layer_norm_intermediate, dtype) returns (last hidden state after the
final norm, the chosen layer's state (final-normed when final_layer_norm_intermediate), the
projected pooled output, the pooled output at num_tokens - 1 or the first end token). The
compute is left out here (no text encoder runs locally in the tests: the Tensorfleet node
replaces it); the modules can be built on the meta device, as the node builds them.
"""

import torch


class CLIPAttention(torch.nn.Module):
    def __init__(self, embed_dim, heads, dtype, device, operations):
        super().__init__()
        self.heads = heads
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, n, operations.Linear(embed_dim, embed_dim, bias=True, dtype=dtype,
                                               device=device))


class CLIPMLP(torch.nn.Module):
    def __init__(self, embed_dim, intermediate_size, activation, dtype, device, operations):
        super().__init__()
        self.fc1 = operations.Linear(embed_dim, intermediate_size, bias=True, dtype=dtype,
                                     device=device)
        self.fc2 = operations.Linear(intermediate_size, embed_dim, bias=True, dtype=dtype,
                                     device=device)


class CLIPLayer(torch.nn.Module):
    def __init__(self, embed_dim, heads, intermediate_size, activation, dtype, device, operations):
        super().__init__()
        self.layer_norm1 = operations.LayerNorm(embed_dim, dtype=dtype, device=device)
        self.self_attn = CLIPAttention(embed_dim, heads, dtype, device, operations)
        self.layer_norm2 = operations.LayerNorm(embed_dim, dtype=dtype, device=device)
        self.mlp = CLIPMLP(embed_dim, intermediate_size, activation, dtype, device, operations)


class CLIPEncoder(torch.nn.Module):
    def __init__(self, num_layers, embed_dim, heads, intermediate_size, activation, dtype, device,
                 operations):
        super().__init__()
        self.layers = torch.nn.ModuleList([
            CLIPLayer(embed_dim, heads, intermediate_size, activation, dtype, device, operations)
            for _ in range(num_layers)])


class CLIPEmbeddings(torch.nn.Module):
    def __init__(self, embed_dim, vocab_size=49408, num_positions=77, dtype=None, device=None,
                 operations=None):
        super().__init__()
        self.token_embedding = operations.Embedding(vocab_size, embed_dim, dtype=dtype,
                                                    device=device)
        self.position_embedding = operations.Embedding(num_positions, embed_dim, dtype=dtype,
                                                       device=device)


class CLIPTextModel_(torch.nn.Module):
    def __init__(self, config_dict, dtype, device, operations):
        num_layers = config_dict["num_hidden_layers"]
        embed_dim = config_dict["hidden_size"]
        heads = config_dict["num_attention_heads"]
        intermediate_size = config_dict["intermediate_size"]
        intermediate_activation = config_dict["hidden_act"]
        num_positions = config_dict["max_position_embeddings"]
        self.eos_token_id = config_dict["eos_token_id"]
        super().__init__()
        self.embeddings = CLIPEmbeddings(embed_dim, num_positions=num_positions, dtype=dtype,
                                         device=device, operations=operations)
        self.encoder = CLIPEncoder(num_layers, embed_dim, heads, intermediate_size,
                                   intermediate_activation, dtype, device, operations)
        self.final_layer_norm = operations.LayerNorm(embed_dim, dtype=dtype, device=device)


class CLIPTextModel(torch.nn.Module):
    def __init__(self, config_dict, dtype, device, operations):
        super().__init__()
        self.num_layers = config_dict["num_hidden_layers"]
        self.text_model = CLIPTextModel_(config_dict, dtype, device, operations)
        embed_dim = config_dict["hidden_size"]
        self.text_projection = operations.Linear(embed_dim, embed_dim, bias=False, dtype=dtype,
                                                 device=device)
        self.dtype = dtype

    def get_input_embeddings(self):
        return self.text_model.embeddings.token_embedding

    def forward(self, *args, **kwargs):
        raise NotImplementedError("the ComfyUI stand-in does not run text encoders locally")
