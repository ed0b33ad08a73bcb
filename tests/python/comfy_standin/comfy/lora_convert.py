"""Stand-in for comfy/lora_convert.py: convert_lora, the file-level rewrites ComfyUI applies to
a LoRA state dict before mapping its keys.

Upstream: comfy/lora_convert.py. Three formats are recognised by a marker key:
- BFL's Flux control LoRAs (img_in.lora_A.weight and single_blocks.0.norm.key_norm.scale):
  every key gets "diffusion_model.", ".lora_B.bias" becomes ".diff_b", "_norm.scale" becomes
  "_norm.scale.set_weight", and diffusion_model.img_in.reshape_weight is added (img_in's new
  [out, in] shape);
- WAN Fun LoRAs (lora_unet__blocks_0_cross_attn_k.lora_down.weight): prefix "lora_unet__" ->
  "lora_unet_";
- USO LoRAs (single_blocks.37.processor.qkv_lora.up.weight and
  double_blocks.18.processor.qkv_lora2.up.weight): the processor's names -> Flux module names.
Anything else is returned as is.
"""

import torch

from . import utils


def convert_lora_bfl_control(sd):
    out = {}
    for k, v in sd.items():
        k_to = k.replace(".lora_B.bias", ".diff_b").replace("_norm.scale", "_norm.scale.set_weight")
        out["diffusion_model." + k_to] = v
    out["diffusion_model.img_in.reshape_weight"] = torch.tensor(
        [sd["img_in.lora_B.weight"].shape[0], sd["img_in.lora_A.weight"].shape[1]])
    return out


def convert_lora_wan_fun(sd):
    return utils.state_dict_prefix_replace(sd, {"lora_unet__": "lora_unet_"})


_USO_RENAMES = (
    (".down.weight", ".lora_down.weight"), (".up.weight", ".lora_up.weight"),
    (".qkv_lora2.", ".txt_attn.qkv."), (".qkv_lora1.", ".img_attn.qkv."),
    (".proj_lora1.", ".img_attn.proj."), (".proj_lora2.", ".txt_attn.proj."),
    (".qkv_lora.", ".linear1_qkv."), (".proj_lora.", ".linear2."), (".processor.", "."),
)


def convert_uso_lora(sd):
    out = {}
    for k, v in sd.items():
        for old, new in _USO_RENAMES:
            k = k.replace(old, new)
        out["diffusion_model." + k] = v
    return out


def convert_lora(sd):
    if "img_in.lora_A.weight" in sd and "single_blocks.0.norm.key_norm.scale" in sd:
        return convert_lora_bfl_control(sd)
    if "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in sd:
        return convert_lora_wan_fun(sd)
    if ("single_blocks.37.processor.qkv_lora.up.weight" in sd
            and "double_blocks.18.processor.qkv_lora2.up.weight" in sd):
        return convert_uso_lora(sd)
    return sd
