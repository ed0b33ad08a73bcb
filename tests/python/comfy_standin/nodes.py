"""Stand-in for ComfyUI's nodes.py: the LoRA loader nodes (LoraLoader, LoraLoaderModelOnly).

Upstream: nodes.py. LoraLoader.load_lora returns its inputs unchanged when both strengths are
0; otherwise it reads folder_paths.get_full_path_or_raise("loras", lora_name) with
comfy.utils.load_torch_file(path, safe_load=True) (keeping the last file read, by path, for the
next call) and returns comfy.sd.load_lora_for_models(model, clip, lora, strength_model,
strength_clip). LoraLoaderModelOnly runs it with no CLIP and strength_clip 0. Input
declarations keep upstream's types and ranges (tooltips left out).
"""

import comfy.sd
import comfy.utils
import folder_paths

_STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}


class LoraLoader:
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"

    def __init__(self):
        self.loaded_lora = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "clip": ("CLIP",),
            "lora_name": (folder_paths.get_filename_list("loras"),),
            "strength_model": ("FLOAT", dict(_STRENGTH)),
            "strength_clip": ("FLOAT", dict(_STRENGTH)),
        }}

    def load_lora(self, model, clip, lora_name, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        if self.loaded_lora is not None and self.loaded_lora[0] == path:
            lora = self.loaded_lora[1]
        else:
            lora = comfy.utils.load_torch_file(path, safe_load=True)
            self.loaded_lora = (path, lora)
        return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


class LoraLoaderModelOnly(LoraLoader):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_lora_model_only"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (folder_paths.get_filename_list("loras"),),
            "strength_model": ("FLOAT", dict(_STRENGTH)),
        }}

    def load_lora_model_only(self, model, lora_name, strength_model):
        return (self.load_lora(model, None, lora_name, strength_model, 0)[0],)


NODE_CLASS_MAPPINGS = {"LoraLoader": LoraLoader, "LoraLoaderModelOnly": LoraLoaderModelOnly}
