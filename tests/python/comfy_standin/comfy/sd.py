"""Stand-in for comfy/sd.py: load_lora_for_models (what LoraLoader calls), the CLIP class and
CLIPType, load_clip.

Upstream: comfy/sd.py. Maps the LoRA's keys onto the model (comfy.lora.model_lora_keys_unet on
model.model) and, when a CLIP is given, its text encoder (model_lora_keys_clip on
clip.cond_stage_model), converts the file's format (comfy.lora_convert.convert_lora), loads the
patches (comfy.lora.load_lora), adds them to a clone of the model at strength_model and a clone
of the CLIP at strength_clip (add_patches(patches, strength)), and logs "NOT LOADED <key>" for
each patch neither took. Returns (new model or None, new clip or None).

CLIP (upstream's class CLIP): __init__(target, embedding_directory, no_init, tokenizer_data,
parameters, model_options) builds target.clip(**params) (dtype, device: model_options'
"initial_device", else the text encoder's initial device; model_options) and
target.tokenizer(embedding_directory, tokenizer_data), a ModelPatcher (is_clip, hook_mode
MinVram) on load_device / offload_device (model_options' or the text encoder's) and loads it at
once only when the initial device is the load device. clone shares the cond_stage_model and
tokenizer, clones the patcher, copies layer_idx, tokenizer_options, use_clip_schedule and
apply_hooks_to_conds. add_patches -> the patcher's; clip_layer sets layer_idx (CLIPSetLastLayer);
tokenize merges tokenizer_options; encode_from_tokens resets the clip options, sets
{"layer": layer_idx} when set and {"projected_pooled": False} for return_pooled="unprojected",
calls load_model (load_model_gpu on the patcher) and cond_stage_model.encode_token_weights,
returning cond, (cond, pooled) or {"cond", "pooled_output", + the extra outputs};
encode_from_tokens_scheduled (no hooks) wraps that as [[cond, {"pooled_output", ... add_dict}]]
with return_pooled "unprojected" when asked. The scheduled-hooks branch is left out (the
stand-in has no hooks: it raises). load_clip needs the local text encoder compute, which the
stand-in does not have: it raises.
"""

import enum
import logging

import comfy.hooks
import comfy.model_patcher
from . import lora as comfy_lora
from . import lora_convert
from . import model_management


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    key_map = {}
    if model is not None:
        key_map = comfy_lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy_lora.model_lora_keys_clip(clip.cond_stage_model, key_map)

    lora = lora_convert.convert_lora(lora)
    loaded = comfy_lora.load_lora(lora, key_map)

    new_model, taken = None, set()
    if model is not None:
        new_model = model.clone()
        taken.update(new_model.add_patches(loaded, strength_model))
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        taken.update(new_clip.add_patches(loaded, strength_clip))

    for k in loaded:
        if k not in taken:
            logging.warning("NOT LOADED {}".format(k))
    return (new_model, new_clip)


class CLIP:
    def __init__(self, target=None, embedding_directory=None, no_init=False, tokenizer_data={},
                 parameters=0, model_options={}):
        if no_init:
            return
        params = target.params.copy()
        clip = target.clip
        tokenizer = target.tokenizer
        load_device = model_options.get("load_device", model_management.text_encoder_device())
        offload_device = model_options.get("offload_device",
                                           model_management.text_encoder_offload_device())
        dtype = model_options.get("dtype", None)
        if dtype is None:
            dtype = model_management.text_encoder_dtype(load_device)
        params["dtype"] = dtype
        params["device"] = model_options.get(
            "initial_device", model_management.text_encoder_initial_device(
                load_device, offload_device, parameters * model_management.dtype_size(dtype)))
        params["model_options"] = model_options
        self.cond_stage_model = clip(**(params))
        self.tokenizer = tokenizer(embedding_directory=embedding_directory,
                                   tokenizer_data=tokenizer_data)
        self.patcher = comfy.model_patcher.ModelPatcher(self.cond_stage_model,
                                                        load_device=load_device,
                                                        offload_device=offload_device)
        self.patcher.hook_mode = comfy.hooks.EnumHookMode.MinVram
        self.patcher.is_clip = True
        self.apply_hooks_to_conds = None
        if params["device"] == load_device:
            model_management.load_models_gpu([self.patcher], force_full_load=True)
        self.layer_idx = None
        self.use_clip_schedule = False
        self.tokenizer_options = {}

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        n.layer_idx = self.layer_idx
        n.tokenizer_options = self.tokenizer_options.copy()
        n.use_clip_schedule = self.use_clip_schedule
        n.apply_hooks_to_conds = self.apply_hooks_to_conds
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def set_tokenizer_option(self, option_name, value):
        self.tokenizer_options[option_name] = value

    def clip_layer(self, layer_idx):
        self.layer_idx = layer_idx

    def tokenize(self, text, return_word_ids=False, **kwargs):
        tokenizer_options = kwargs.get("tokenizer_options", {})
        if len(self.tokenizer_options) > 0:
            tokenizer_options = {**self.tokenizer_options, **tokenizer_options}
        if len(tokenizer_options) > 0:
            kwargs["tokenizer_options"] = tokenizer_options
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def add_hooks_to_dict(self, pooled_dict):
        if self.apply_hooks_to_conds:
            pooled_dict["hooks"] = self.apply_hooks_to_conds
        return pooled_dict

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict={},
                                     show_pbar=True):
        all_cond_pooled = []
        all_hooks = self.patcher.forced_hooks
        if all_hooks is None or not self.use_clip_schedule:
            return_pooled = "unprojected" if unprojected else True
            pooled_dict = self.encode_from_tokens(tokens, return_pooled=return_pooled,
                                                  return_dict=True)
            cond = pooled_dict.pop("cond")
            pooled_dict.update(add_dict)
            all_cond_pooled.append([cond, pooled_dict])
        else:
            raise NotImplementedError("the stand-in has no CLIP hook scheduling")
        return all_cond_pooled

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.cond_stage_model.reset_clip_options()
        if self.layer_idx is not None:
            self.cond_stage_model.set_clip_options({"layer": self.layer_idx})
        if return_pooled == "unprojected":
            self.cond_stage_model.set_clip_options({"projected_pooled": False})
        self.load_model()
        o = self.cond_stage_model.encode_token_weights(tokens)
        cond, pooled = o[:2]
        if return_dict:
            out = {"cond": cond, "pooled_output": pooled}
            if len(o) > 2:
                for k in o[2]:
                    out[k] = o[2][k]
            self.add_hooks_to_dict(out)
            return out
        if return_pooled:
            return cond, pooled
        return cond

    def encode(self, text):
        return self.encode_from_tokens(self.tokenize(text))

    def load_sd(self, sd, full_model=False):
        if full_model:
            return self.cond_stage_model.load_state_dict(sd, strict=False)
        return self.cond_stage_model.load_sd(sd)

    def get_sd(self):
        sd_clip = self.cond_stage_model.state_dict()
        sd_clip.update(self.tokenizer.state_dict())
        return sd_clip

    def load_model(self):
        model_management.load_model_gpu(self.patcher)
        return self.patcher


class CLIPType(enum.Enum):
    STABLE_DIFFUSION = 1
    STABLE_CASCADE = 2
    SD3 = 3
    STABLE_AUDIO = 4
    HUNYUAN_DIT = 5
    FLUX = 6
    MOCHI = 7
    LTXV = 8
    HUNYUAN_VIDEO = 9
    PIXART = 10
    COSMOS = 11
    LUMINA2 = 12
    WAN = 13
    HIDREAM = 14
    CHROMA = 15
    ACE = 16
    OMNIGEN2 = 17
    QWEN_IMAGE = 18
    HUNYUAN_IMAGE = 19


def load_clip(ckpt_paths, embedding_directory=None, clip_type=CLIPType.STABLE_DIFFUSION,
              model_options={}):
    raise NotImplementedError("the ComfyUI stand-in does not run text encoders locally")
