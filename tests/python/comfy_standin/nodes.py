"""Stand-in for ComfyUI's nodes.py: the LoRA loader nodes (LoraLoader, LoraLoaderModelOnly) and
the text-encoder nodes (CLIPLoader, DualCLIPLoader, CLIPTextEncode, CLIPSetLastLayer).

Upstream: nodes.py. LoraLoader.load_lora returns its inputs unchanged when both strengths are
0; otherwise it reads folder_paths.get_full_path_or_raise("loras", lora_name) with
comfy.utils.load_torch_file(path, safe_load=True) (keeping the last file read, by path, for the
next call) and returns comfy.sd.load_lora_for_models(model, clip, lora, strength_model,
strength_clip). LoraLoaderModelOnly runs it with no CLIP and strength_clip 0.
CLIPLoader (clip_name from "text_encoders", type, optional device default/cpu) and
DualCLIPLoader (clip_name1, clip_name2, type, optional device) call comfy.sd.load_clip with the
CLIPType named by the type (upper case); the stand-in's load_clip cannot run text encoders.
CLIPTextEncode: clip.tokenize(text) then clip.encode_from_tokens_scheduled(tokens).
CLIPSetLastLayer: a clone of the CLIP with clip_layer(stop_at_clip_layer) (-1 .. -24).
Input declarations keep upstream's types, choices, order and ranges (tooltips left out).
"""

import torch

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


class CLIPTextEncode:
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                             "clip": ("CLIP",)}}

    def encode(self, clip, text):
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None")
        tokens = clip.tokenize(text)
        return (clip.encode_from_tokens_scheduled(tokens),)


class CLIPSetLastLayer:
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "set_last_layer"
    CATEGORY = "conditioning"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",),
                             "stop_at_clip_layer": ("INT", {"default": -1, "min": -24, "max": -1,
                                                            "step": 1})}}

    def set_last_layer(self, clip, stop_at_clip_layer):
        clip = clip.clone()
        clip.clip_layer(stop_at_clip_layer)
        return (clip,)


CLIP_LOADER_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv",
                     "pixart", "cosmos", "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2",
                     "qwen_image", "hunyuan_image"]


class CLIPLoader:
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),),
                             "type": (list(CLIP_LOADER_TYPES),)},
                "optional": {"device": (["default", "cpu"], {"advanced": True})}}

    def load_clip(self, clip_name, type="stable_diffusion", device="default"):  # noqa: A002
        clip_type = getattr(comfy.sd.CLIPType, type.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)
        model_options = {}
        if device == "cpu":
            model_options["load_device"] = model_options["offload_device"] = torch.device("cpu")
        clip_path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        clip = comfy.sd.load_clip(ckpt_paths=[clip_path],
                                  embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                  clip_type=clip_type, model_options=model_options)
        return (clip,)


class DualCLIPLoader:
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"

    @classmethod
    def INPUT_TYPES(cls):
        names = folder_paths.get_filename_list("text_encoders")
        return {"required": {"clip_name1": (names,), "clip_name2": (names,),
                             "type": (["sdxl", "sd3", "flux", "hunyuan_video", "hidream",
                                       "hunyuan_image"],)},
                "optional": {"device": (["default", "cpu"], {"advanced": True})}}

    def load_clip(self, clip_name1, clip_name2, type, device="default"):  # noqa: A002
        clip_type = getattr(comfy.sd.CLIPType, type.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)
        clip_path1 = folder_paths.get_full_path_or_raise("text_encoders", clip_name1)
        clip_path2 = folder_paths.get_full_path_or_raise("text_encoders", clip_name2)
        model_options = {}
        if device == "cpu":
            model_options["load_device"] = model_options["offload_device"] = torch.device("cpu")
        clip = comfy.sd.load_clip(ckpt_paths=[clip_path1, clip_path2],
                                  embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                  clip_type=clip_type, model_options=model_options)
        return (clip,)


NODE_CLASS_MAPPINGS = {"LoraLoader": LoraLoader, "LoraLoaderModelOnly": LoraLoaderModelOnly,
                       "CLIPTextEncode": CLIPTextEncode, "CLIPSetLastLayer": CLIPSetLastLayer,
                       "CLIPLoader": CLIPLoader, "DualCLIPLoader": DualCLIPLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"CLIPLoader": "Load CLIP", "DualCLIPLoader": "DualCLIPLoader",
                              "CLIPTextEncode": "CLIP Text Encode (Prompt)",
                              "CLIPSetLastLayer": "CLIP Set Last Layer"}
