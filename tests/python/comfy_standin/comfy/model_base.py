"""Stand-in for comfy/model_base.py: ModelType, BaseModel, Flux, WAN21 and WAN22 (the calls the
node uses).

Upstream: comfy/model_base.py. BaseModel.__init__ honours unet_config["disable_unet_model_creation"]
and otherwise builds `unet_model(**unet_config, device=..., operations=...)`; _apply_model
concatenates c_concat to the model input on dim 1, casts x/context/extra conds to the inference
dtype, makes the timestep float32, passes it through `process_timestep(t, x=x, **extra_conds)`
and calls `diffusion_model(xc, t, context=context, control=control, transformer_options=...,
**extra_conds)` then `calculate_denoised(sigma, output.float(), x)`. Flux.extra_conds adds
guidance (default 3.5) and ref_latents (Kontext) as upstream does.

WAN21 (model type FLOW) builds c_concat in concat_cond from the noise, concat_latent_image
(process_latent_in per 16 channels, resized to the noise) and concat_mask / denoise_mask (1 -
mask, 4 channels, mask first unless concat_mask_index), sized by the diffusion model's
`patch_embedding.weight.shape[1]`; its extra_conds add c_crossattn, clip_fea (the
clip_vision_output's penultimate_hidden_states), time_dim_concat and reference_latent. WAN22
(the 2.2 TI2V 5B) adds denoise_mask, and its process_timestep turns a denoise mask into one
timestep per latent frame. Upstream wraps extra_conds values in comfy.conds objects, which the
sampler batches; the stand-in returns the tensors themselves (what reaches apply_model for one
batch). The stand-in has no comfy.ldm: WAN21 passes unet_model=None, so a WAN model is built
with disable_unet_model_creation (which the node always sets).
"""

from enum import Enum

import torch

from . import model_management, model_sampling as ms, utils


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
        self.adm_channels = unet_config.get("adm_in_channels", None) or 0
        self.concat_keys = ()
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
        t = self.process_timestep(t, x=x, **extra_conds)
        transformer_options = transformer_options.copy()
        model_output = self.diffusion_model(xc, t, context=context, control=control,
                                            transformer_options=transformer_options,
                                            **extra_conds)
        return self.model_sampling.calculate_denoised(sigma, model_output.float(), x)

    def process_timestep(self, timestep, **kwargs):
        return timestep

    def encode_adm(self, **kwargs):
        return None

    def concat_cond(self, **kwargs):
        # Upstream builds it from self.concat_keys (inpainting models); no stand-in model has any.
        return None

    def extra_conds(self, **kwargs):
        out = {}
        concat_cond = self.concat_cond(**kwargs)
        if concat_cond is not None:
            out["c_concat"] = concat_cond
        adm = self.encode_adm(**kwargs)
        if adm is not None:
            out["y"] = adm
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is not None:
            out["c_crossattn"] = cross_attn
        cross_attn_cnet = kwargs.get("cross_attn_controlnet", None)
        if cross_attn_cnet is not None:
            out["crossattn_controlnet"] = cross_attn_cnet
        c_concat = kwargs.get("noise_concat", None)
        if c_concat is not None:
            out["c_concat"] = c_concat
        return out

    def get_dtype(self):
        return self.diffusion_model.dtype

    def get_dtype_inference(self):
        dtype = self.get_dtype()
        if self.manual_cast_dtype is not None:
            dtype = self.manual_cast_dtype
        return dtype

    def process_latent_in(self, latent):
        return self.latent_format.process_in(latent)

    def process_latent_out(self, latent):
        return self.latent_format.process_out(latent)


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


class WAN21(BaseModel):
    def __init__(self, model_config, model_type=ModelType.FLOW, image_to_video=False,
                 device=None):
        super().__init__(model_config, model_type, device=device, unet_model=None)
        self.image_to_video = image_to_video

    def concat_cond(self, **kwargs):
        noise = kwargs.get("noise", None)
        extra_channels = self.diffusion_model.patch_embedding.weight.shape[1] - noise.shape[1]
        if extra_channels == 0:
            return None
        image = kwargs.get("concat_latent_image", None)
        device = kwargs["device"]
        if image is None:
            shape_image = list(noise.shape)
            shape_image[1] = extra_channels
            image = torch.zeros(shape_image, dtype=noise.dtype, layout=noise.layout,
                                device=noise.device)
        else:
            latent_dim = self.latent_format.latent_channels
            image = utils.common_upscale(image.to(device), noise.shape[-1], noise.shape[-2],
                                         "bilinear", "center")
            for i in range(0, image.shape[1], latent_dim):
                image[:, i: i + latent_dim] = self.process_latent_in(image[:, i: i + latent_dim])
            image = utils.resize_to_batch_size(image, noise.shape[0])
        if extra_channels != image.shape[1] + 4:
            if not self.image_to_video or extra_channels == image.shape[1]:
                return image
        if image.shape[1] > (extra_channels - 4):
            image = image[:, :(extra_channels - 4)]
        mask = kwargs.get("concat_mask", kwargs.get("denoise_mask", None))
        if mask is None:
            mask = torch.zeros_like(noise)[:, :4]
        else:
            if mask.shape[1] != 4:
                mask = torch.mean(mask, dim=1, keepdim=True)
            mask = 1.0 - mask
            mask = utils.common_upscale(mask.to(device), noise.shape[-1], noise.shape[-2],
                                        "bilinear", "center")
            if mask.shape[-3] < noise.shape[-3]:
                mask = torch.nn.functional.pad(
                    mask, (0, 0, 0, 0, 0, noise.shape[-3] - mask.shape[-3]), mode="constant",
                    value=0)
            if mask.shape[1] == 1:
                mask = mask.repeat(1, 4, 1, 1, 1)
            mask = utils.resize_to_batch_size(mask, noise.shape[0])
        concat_mask_index = kwargs.get("concat_mask_index", 0)
        if concat_mask_index != 0:
            return torch.cat((image[:, :concat_mask_index], mask, image[:, concat_mask_index:]),
                             dim=1)
        return torch.cat((mask, image), dim=1)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is not None:
            out["c_crossattn"] = cross_attn
        clip_vision_output = kwargs.get("clip_vision_output", None)
        if clip_vision_output is not None:
            out["clip_fea"] = clip_vision_output.penultimate_hidden_states
        time_dim_concat = kwargs.get("time_dim_concat", None)
        if time_dim_concat is not None:
            out["time_dim_concat"] = self.process_latent_in(time_dim_concat)
        reference_latents = kwargs.get("reference_latents", None)
        if reference_latents is not None:
            out["reference_latent"] = self.process_latent_in(reference_latents[-1])[:, :, 0]
        return out


class WAN22(WAN21):
    def __init__(self, model_config, model_type=ModelType.FLOW, image_to_video=False,
                 device=None):
        super().__init__(model_config, model_type, image_to_video=image_to_video, device=device)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        denoise_mask = kwargs.get("denoise_mask", None)
        if denoise_mask is not None:
            out["denoise_mask"] = denoise_mask
        return out

    def process_timestep(self, timestep, x, denoise_mask=None, **kwargs):
        if denoise_mask is None:
            return timestep
        temp_ts = (torch.mean(denoise_mask[:, :, :, :, :], dim=(1, 3, 4), keepdim=True) *
                   timestep.view([timestep.shape[0]] + [1] * (denoise_mask.ndim - 1))
                   ).reshape(timestep.shape[0], -1)
        return temp_ts

    def scale_latent_inpaint(self, sigma, noise, latent_image, **kwargs):
        return latent_image
