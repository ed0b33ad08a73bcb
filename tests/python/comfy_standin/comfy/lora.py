"""Stand-in for comfy/lora.py: how ComfyUI maps a LoRA file onto a model (model_lora_keys_unet,
model_lora_keys_clip) and turns it into weight patches (load_lora).

Upstream: comfy/lora.py. model_lora_keys_unet maps, for every state-dict key under
"diffusion_model.": "lora_unet_<name with . -> _>" and "<name>" (without ".weight") to a
.weight key, and the key itself for other keys; for a comfy.model_base.Flux it adds the
diffusers names of comfy.utils.flux_to_diffusers as "transformer.<name>",
"lycoris_<name_>" and "lora_transformer_<name_>" (values: a key, a (key, (dim, start, length))
slice of a fused weight, or (key, None, swap_scale_shift) for norm_out), and
"<...>.linear1_qkv" -> (the single block's linear1.weight, (0, 0, 3 * hidden_size)). Like
upstream, key_map defaults to one shared dict: pass your own.

load_lora(lora, to_load): for each LoRA module name x in to_load (mapping it to a model key or
(key, offset[, function])): <x>.alpha (as a float) and <x>.dora_scale, then every adapter class
of comfy.weight_adapter.adapters in order (a later match replaces an earlier one), then
<x>.w_norm / <x>.b_norm and <x>.diff / <x>.diff_b as ("diff", (tensor,)) on the key and its
".bias", and <x>.set_weight as ("set", (tensor,)); LoRA keys nothing consumed are logged
("lora key not loaded: ...").

Left out: calculate_weight and the weight arithmetic (the cluster applies patches), the SD1/SDXL
UNet diffusers mapping (comfy.utils.unet_to_diffusers: empty for a config without
num_res_blocks, as Flux's and WAN's), the mappings of model classes the stand-in does not have
(SD3, AuraFlow, HunyuanVideo, QwenImage, ...). model_lora_keys_clip maps, from the CLIP's
cond_stage_model state dict: "text_encoders.<key without .weight>" for every weight; for
clip_l's layers (LORA_CLIP_MAP) "lora_te_text_model_encoder_layers_N_<part>", "lora_te1_..."
and diffusers' "text_encoder.text_model.encoder.layers.N.<part>"; for t5xxl's weights
"lora_te{1,2,3}_<name with _>" (the index after the CLIPs present, OneTrainer); and
"lora_te1_text_projection". Left out: the clip_g / clip_h / HunyuanDiT keys.
"""

import logging

from . import model_base, utils, weight_adapter

DIFFUSION_PREFIX = "diffusion_model."


def load_lora(lora, to_load, log_missing=True):
    patch_dict = {}
    loaded_keys = set()
    for x, target in to_load.items():
        alpha = None
        if x + ".alpha" in lora:
            alpha = lora[x + ".alpha"].item()
            loaded_keys.add(x + ".alpha")
        dora_scale = None
        if x + ".dora_scale" in lora:
            dora_scale = lora[x + ".dora_scale"]
            loaded_keys.add(x + ".dora_scale")

        for adapter_cls in weight_adapter.adapters:
            adapter = adapter_cls.load(x, lora, alpha, dora_scale, loaded_keys)
            if adapter is not None:
                patch_dict[target] = adapter
                loaded_keys.update(adapter.loaded_keys)

        # Upstream slices ".weight" off the target to name its bias (a tuple target included).
        bias_target = "{}.bias".format(target[:-len(".weight")])
        w_norm = lora.get(x + ".w_norm", None)
        if w_norm is not None:
            loaded_keys.add(x + ".w_norm")
            patch_dict[target] = ("diff", (w_norm,))
            b_norm = lora.get(x + ".b_norm", None)
            if b_norm is not None:
                loaded_keys.add(x + ".b_norm")
                patch_dict[bias_target] = ("diff", (b_norm,))

        diff = lora.get(x + ".diff", None)
        if diff is not None:
            patch_dict[target] = ("diff", (diff,))
            loaded_keys.add(x + ".diff")
        diff_b = lora.get(x + ".diff_b", None)
        if diff_b is not None:
            patch_dict[bias_target] = ("diff", (diff_b,))
            loaded_keys.add(x + ".diff_b")
        set_weight = lora.get(x + ".set_weight", None)
        if set_weight is not None:
            patch_dict[target] = ("set", (set_weight,))
            loaded_keys.add(x + ".set_weight")

    if log_missing:
        for k in lora.keys():
            if k not in loaded_keys:
                logging.warning("lora key not loaded: {}".format(k))
    return patch_dict


LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def model_lora_keys_clip(model, key_map={}):
    sdk = model.state_dict().keys()
    for k in sdk:
        if k.endswith(".weight"):
            key_map["text_encoders.{}".format(k[:-len(".weight")])] = k

    text_model_lora_key = "lora_te_text_model_encoder_layers_{}_{}"
    clip_l_present = False
    clip_g_present = False
    for b in range(32):
        for c in LORA_CLIP_MAP:
            k = "clip_l.transformer.text_model.encoder.layers.{}.{}.weight".format(b, c)
            if k in sdk:
                key_map[text_model_lora_key.format(b, LORA_CLIP_MAP[c])] = k
                key_map["lora_te1_text_model_encoder_layers_{}_{}".format(
                    b, LORA_CLIP_MAP[c])] = k
                clip_l_present = True
                key_map["text_encoder.text_model.encoder.layers.{}.{}".format(b, c)] = k
            k = "clip_g.transformer.text_model.encoder.layers.{}.{}.weight".format(b, c)
            if k in sdk:
                clip_g_present = True

    for k in sdk:
        if k.endswith(".weight") and k.startswith("t5xxl.transformer."):
            l_key = k[len("t5xxl.transformer."):-len(".weight")]
            t5_index = 1
            if clip_g_present:
                t5_index += 1
            if clip_l_present:
                t5_index += 1
                if t5_index == 2:
                    key_map["lora_te{}_{}".format(t5_index, l_key.replace(".", "_"))] = k
                    t5_index += 1
            key_map["lora_te{}_{}".format(t5_index, l_key.replace(".", "_"))] = k

    k = "clip_l.transformer.text_projection.weight"
    if k in sdk:
        key_map["lora_te1_text_projection"] = k
    return key_map


def model_lora_keys_unet(model, key_map={}):
    sdk = model.state_dict().keys()
    for k in sdk:
        if not k.startswith(DIFFUSION_PREFIX):
            continue
        if k.endswith(".weight"):
            name = k[len(DIFFUSION_PREFIX):-len(".weight")]
            key_map["lora_unet_" + name.replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k
        else:
            key_map[k] = k

    if isinstance(model, model_base.Flux):
        unet_config = model.model_config.unet_config
        diffusers = utils.flux_to_diffusers(unet_config, output_prefix=DIFFUSION_PREFIX)
        for k, to in diffusers.items():
            if not k.endswith(".weight"):
                continue
            name = k[:-len(".weight")]
            key_map["transformer." + name] = to
            key_map["lycoris_" + name.replace(".", "_")] = to
            key_map["lora_transformer_" + name.replace(".", "_")] = to
        hidden_size = unet_config.get("hidden_size", 0)
        for k in sdk:
            if k.endswith(".weight") and ".linear1." in k:
                key_map[k.replace(".linear1.weight", ".linear1_qkv")] = (
                    k, (0, 0, hidden_size * 3))
    return key_map
