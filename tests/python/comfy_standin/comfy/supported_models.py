"""Stand-in for comfy/supported_models.py: the Flux (dev), FluxSchnell and WAN configs (upstream).

WAN (upstream's classes and values): WAN21_T2V (image_model wan2.1, model_type t2v: WAN 2.1 T2V
and the WAN 2.2 A14B experts, T2V and I2V alike; shift 8.0, latent Wan21, memory_usage_factor
dim / 2222, model_base.WAN21), WAN21_I2V (model_type i2v, in_dim 36: WAN 2.1 I2V and FLF2V;
WAN21 with image_to_video), WAN21_FunControl2V (i2v, in_dim 48) and WAN22_T2V (t2v, out_dim 48:
the WAN 2.2 TI2V 5B; latent Wan22, model_base.WAN22 with image_to_video). `models` keeps
upstream's relative order, which decides the match.
"""

import torch

from . import latent_formats, model_base, supported_models_base


class Flux(supported_models_base.BASE):
    unet_config = {"image_model": "flux", "guidance_embed": True}
    sampling_settings = {}
    unet_extra_config = {}
    latent_format = latent_formats.Flux
    memory_usage_factor = 2.8
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    vae_key_prefix = ["vae."]
    text_encoder_key_prefix = ["text_encoders."]

    def get_model(self, state_dict, prefix="", device=None):
        return model_base.Flux(self, device=device)


class FluxSchnell(Flux):
    unet_config = {"image_model": "flux", "guidance_embed": False}
    sampling_settings = {"multiplier": 1.0, "shift": 1.0}

    def get_model(self, state_dict, prefix="", device=None):
        return model_base.Flux(self, model_type=model_base.ModelType.FLOW, device=device)


class WAN21_T2V(supported_models_base.BASE):
    unet_config = {"image_model": "wan2.1", "model_type": "t2v"}
    sampling_settings = {"shift": 8.0}
    unet_extra_config = {}
    latent_format = latent_formats.Wan21
    memory_usage_factor = 0.9
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    vae_key_prefix = ["vae."]
    text_encoder_key_prefix = ["text_encoders."]

    def __init__(self, unet_config):
        super().__init__(unet_config)
        self.memory_usage_factor = self.unet_config.get("dim", 2000) / 2222

    def get_model(self, state_dict, prefix="", device=None):
        return model_base.WAN21(self, device=device)


class WAN21_I2V(WAN21_T2V):
    unet_config = {"image_model": "wan2.1", "model_type": "i2v", "in_dim": 36}

    def get_model(self, state_dict, prefix="", device=None):
        return model_base.WAN21(self, image_to_video=True, device=device)


class WAN21_FunControl2V(WAN21_T2V):
    unet_config = {"image_model": "wan2.1", "model_type": "i2v", "in_dim": 48}

    def get_model(self, state_dict, prefix="", device=None):
        return model_base.WAN21(self, image_to_video=False, device=device)


class WAN22_T2V(WAN21_T2V):
    unet_config = {"image_model": "wan2.1", "model_type": "t2v", "out_dim": 48}
    latent_format = latent_formats.Wan22

    def get_model(self, state_dict, prefix="", device=None):
        return model_base.WAN22(self, image_to_video=True, device=device)


models = [Flux, FluxSchnell, WAN22_T2V, WAN21_T2V, WAN21_I2V, WAN21_FunControl2V]
