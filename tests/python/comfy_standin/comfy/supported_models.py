"""Stand-in for comfy/supported_models.py: Flux (dev) and FluxSchnell configs (upstream)."""

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
