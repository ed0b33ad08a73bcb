"""Stand-in for comfy/text_encoders/flux.py: Flux's text encoder (CLIP-L + T5-XXL).

Upstream: comfy/text_encoders/flux.py. T5XXLTokenizer: no start token, no padding to max
length, min_length 256. FluxTokenizer tokenizes the prompt for both ("l" and "t5xxl").
FluxClipModel: clip_l is an SDClipModel returning the unprojected pooled output, t5xxl a
sd3_clip.T5XXLModel (dtype_t5 through pick_weight_dtype); encode_token_weights returns T5's
hidden states as the conditioning and CLIP-L's pooled output; load_sd sends a file with
text_model.encoder.layers.1.* to clip_l, anything else to t5xxl. flux_clip(dtype_t5,
t5xxl_scaled_fp8) makes the class with those fixed.
"""

import torch
from transformers import T5TokenizerFast

import comfy.model_management
import comfy.text_encoders.sd3_clip
from comfy import sd1_clip


class T5XXLTokenizer(sd1_clip.SDTokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(None, embedding_directory=embedding_directory, pad_with_end=False,
                         embedding_size=4096, embedding_key="t5xxl",
                         tokenizer_class=T5TokenizerFast, has_start_token=False,
                         pad_to_max_length=False, max_length=99999999, min_length=256,
                         tokenizer_data=tokenizer_data)


class FluxTokenizer:
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        self.clip_l = sd1_clip.SDTokenizer(embedding_directory=embedding_directory,
                                           tokenizer_data=tokenizer_data)
        self.t5xxl = T5XXLTokenizer(embedding_directory=embedding_directory,
                                    tokenizer_data=tokenizer_data)

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {"l": self.clip_l.tokenize_with_weights(text, return_word_ids, **kwargs),
                "t5xxl": self.t5xxl.tokenize_with_weights(text, return_word_ids, **kwargs)}

    def untokenize(self, token_weight_pair):
        return self.clip_l.untokenize(token_weight_pair)

    def state_dict(self):
        return {}


class FluxClipModel(torch.nn.Module):
    def __init__(self, dtype_t5=None, device="cpu", dtype=None, model_options={}):
        super().__init__()
        dtype_t5 = comfy.model_management.pick_weight_dtype(dtype_t5, dtype, device)
        self.clip_l = sd1_clip.SDClipModel(device=device, dtype=dtype,
                                           return_projected_pooled=False,
                                           model_options=model_options)
        self.t5xxl = comfy.text_encoders.sd3_clip.T5XXLModel(device=device, dtype=dtype_t5,
                                                             model_options=model_options)
        self.dtypes = set([dtype, dtype_t5])

    def set_clip_options(self, options):
        self.clip_l.set_clip_options(options)
        self.t5xxl.set_clip_options(options)

    def reset_clip_options(self):
        self.clip_l.reset_clip_options()
        self.t5xxl.reset_clip_options()

    def encode_token_weights(self, token_weight_pairs):
        t5_out, t5_pooled = self.t5xxl.encode_token_weights(token_weight_pairs["t5xxl"])
        l_out, l_pooled = self.clip_l.encode_token_weights(token_weight_pairs["l"])
        return t5_out, l_pooled

    def load_sd(self, sd):
        if "text_model.encoder.layers.1.mlp.fc1.weight" in sd:
            return self.clip_l.load_sd(sd)
        return self.t5xxl.load_sd(sd)


def flux_clip(dtype_t5=None, t5xxl_scaled_fp8=None):
    class FluxClipModel_(FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            if t5xxl_scaled_fp8 is not None and "t5xxl_scaled_fp8" not in model_options:
                model_options = model_options.copy()
                model_options["t5xxl_scaled_fp8"] = t5xxl_scaled_fp8
            super().__init__(dtype_t5=dtype_t5, device=device, dtype=dtype,
                             model_options=model_options)
    return FluxClipModel_
