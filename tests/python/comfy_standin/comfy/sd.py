"""Stand-in for comfy/sd.py: load_lora_for_models, what LoraLoader calls.

Upstream: comfy/sd.py. Maps the LoRA's keys onto the model (comfy.lora.model_lora_keys_unet on
model.model) and, when a CLIP is given, its text encoder (model_lora_keys_clip on
clip.cond_stage_model), converts the file's format (comfy.lora_convert.convert_lora), loads the
patches (comfy.lora.load_lora), adds them to a clone of the model at strength_model and a clone
of the CLIP at strength_clip (add_patches(patches, strength)), and logs "NOT LOADED <key>" for
each patch neither took. Returns (new model or None, new clip or None).
"""

import logging

from . import lora as comfy_lora
from . import lora_convert


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
