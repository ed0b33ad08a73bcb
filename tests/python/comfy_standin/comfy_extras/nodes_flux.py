"""Stand-in for comfy_extras/nodes_flux.py: CLIPTextEncodeFlux.

Upstream: comfy_extras/nodes_flux.py, a comfy_api io.ComfyNode (node_id "CLIPTextEncodeFlux",
category "advanced/conditioning/flux") with inputs clip (CLIP), clip_l and t5xxl (multiline
dynamic-prompt strings) and guidance (FLOAT 3.5, 0.0 .. 100.0, step 0.1). execute tokenizes
clip_l with the CLIP, replaces the "t5xxl" tokens by those of the t5xxl text, and returns
clip.encode_from_tokens_scheduled(tokens, add_dict={"guidance": guidance}). Here the schema is
written as INPUT_TYPES (same names, order and ranges) and execute returns the output tuple.
"""


class CLIPTextEncodeFlux:
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "execute"
    CATEGORY = "advanced/conditioning/flux"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP",),
            "clip_l": ("STRING", {"multiline": True, "dynamicPrompts": True}),
            "t5xxl": ("STRING", {"multiline": True, "dynamicPrompts": True}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}),
        }}

    @classmethod
    def execute(cls, clip, clip_l, t5xxl, guidance):
        tokens = clip.tokenize(clip_l)
        tokens["t5xxl"] = clip.tokenize(t5xxl)["t5xxl"]
        return (clip.encode_from_tokens_scheduled(tokens, add_dict={"guidance": guidance}),)

    encode = execute


NODE_CLASS_MAPPINGS = {"CLIPTextEncodeFlux": CLIPTextEncodeFlux}
