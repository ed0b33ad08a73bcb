"""Stand-in for comfy/model_base.py: ModelType, BaseModel and Flux (the calls the node uses).

Upstream: comfy/model_base.py. BaseModel.__init__ honours unet_config["disable_unet_model_creation"]
and otherwise builds `unet_model(**unet_config, device=..., operations=...)`; _apply_model casts
x/context/extra conds to the inference dtype, makes the timestep float32 and calls
`diffusion_model(xc, t, context=context, control=control, transformer_options=..., **extra_conds)`
then `calculate_denoised(sigma, output.float(), x)`. Flux.extra_conds adds guidance (default 3.5)
and ref_latents (Kontext) as upstream does.
"""

from enum import Enum

import torch

from . import model_management, model_sampling as ms


class ModelType(Enum):
    EPS = 1
    V_PREDICTION = 2
    FLOW = 6
    FLUX = 8


def model_sampling(model_config, model_type):
    if model_type == ModelType.FLUX:
        c, s = ms.CONST, ms.ModelSamplingFlux
    elif model_type == ModelType.FLOW:
        c, s = ms.CONST, ms.ModelSamplingDiscreteFlow
    else:
        raise NotImplementedError("stand-in: only FLUX and FLOW model types")

    class ModelSampling(s, c):
        pass

    return ModelSampling(model_config)


def convert_tensor(extra, dtype, device):
    if hasattr(extra, "dtype"):
        if extra.dtype != torch.int and extra.dtype != torch.long:
            extra = model_management.cast_to_device(extra, device, dtype)
        else:
            extra = model_management.cast_to_device(extra, device, None)
    return extra


class BaseModel(torch.nn.Module):
    def __init__(self, model_config, model_type=ModelType.EPS, device=None, unet_model=None):
        super().__init__()
        unet_config = model_config.unet_config
        self.latent_format = model_config.latent_format
        self.model_config = model_config
        self.manual_cast_dtype = model_config.manual_cast_dtype
        self.device = device
        self.current_patcher = None
        if not unet_config.get("disable_unet_model_creation", False):
            self.diffusion_model = unet_model(**unet_config, device=device, operations=None)
            self.diffusion_model.requires_grad_(False)
            self.diffusion_model.eval()
        self.model_type = model_type
        self.model_sampling = model_sampling(model_config, model_type)
        self.memory_usage_factor = model_config.memory_usage_factor

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None,
                    transformer_options={}, **kwargs):
        return self._apply_model(x, t, c_concat, c_crossattn, control, transformer_options,
                                 **kwargs)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None,
                     transformer_options={}, **kwargs):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc] + [c_concat.to(xc.device, xc.dtype)], dim=1)
        context = c_crossattn
        dtype = self.get_dtype_inference()
        xc = xc.to(dtype)
        device = xc.device
        t = self.model_sampling.timestep(t).float()
        if context is not None:
            context = model_management.cast_to_device(context, device, dtype)
        extra_conds = {}
        for o in kwargs:
            extra = kwargs[o]
            if hasattr(extra, "dtype"):
                extra = convert_tensor(extra, dtype, device)
            elif isinstance(extra, list):
                extra = [convert_tensor(ext, dtype, device) for ext in extra]
            extra_conds[o] = extra
        transformer_options = transformer_options.copy()
        model_output = self.diffusion_model(xc, t, context=context, control=control,
                                            transformer_options=transformer_options,
                                            **extra_conds)
        return self.model_sampling.calculate_denoised(sigma, model_output.float(), x)

    def get_dtype(self):
        return self.diffusion_model.dtype

    def get_dtype_inference(self):
        dtype = self.get_dtype()
        if self.manual_cast_dtype is not None:
            dtype = self.manual_cast_dtype
        return dtype

    def process_latent_in(self, latent):
        return self.latent_format.process_in(latent)


class Flux(BaseModel):
    def __init__(self, model_config, model_type=ModelType.FLUX, device=None, unet_model=None):
        super().__init__(model_config, model_type, device=device, unet_model=unet_model)
        self.memory_usage_factor_conds = ("ref_latents",)

    def extra_conds(self, **kwargs):
        out = {}
        pooled = kwargs.get("pooled_output", None)
        if pooled is not None:
            out["y"] = pooled
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is not None:
            out["c_crossattn"] = cross_attn
        guidance = kwargs.get("guidance", 3.5)
        if guidance is not None:
            out["guidance"] = torch.FloatTensor([guidance])
        ref_latents = kwargs.get("reference_latents", None)
        if ref_latents is not None:
            out["ref_latents"] = [self.process_latent_in(lat) for lat in ref_latents]
        return out
