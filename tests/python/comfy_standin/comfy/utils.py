"""Stand-in for comfy/utils.py: the progress bar nodes drive, and the latent resizing WAN's
conditioning uses.

Upstream: comfy/utils.py (PROGRESS_BAR_HOOK, set_progress_bar_global_hook, ProgressBar with
update_absolute / update; the hook is called as hook(current, total, preview, node_id=...)).
ComfyUI's server installs the hook; tests install their own to see what a node reports.
common_upscale (4-D, and 5-D [B, C, T, H, W] resized frame by frame; crop "center" or "disabled";
torch interpolate modes only: upstream also has bislerp and lanczos) and resize_to_batch_size
behave as upstream.

For LoRA loading: load_torch_file (safetensors through the tests' own reader,
tests/python/safetensors_io.py, since Debian has no safetensors package; other files through
torch.load, weights_only when safe_load, unwrapping a "state_dict" entry or a lone entry as
upstream), state_dict_prefix_replace, swap_scale_shift, and flux_to_diffusers (the diffusers
Flux names -> ComfyUI's, with (key, (dim, start, length)) slices of the fused qkv / linear1
weights and a (key, None, swap_scale_shift) entry for norm_out).
"""

import importlib.util
import math
import os

import torch

PROGRESS_BAR_ENABLED = True
PROGRESS_BAR_HOOK = None


def set_progress_bar_enabled(enabled):
    global PROGRESS_BAR_ENABLED
    PROGRESS_BAR_ENABLED = enabled


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        if value > self.total:
            value = self.total
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)


def resize_to_batch_size(tensor, batch_size):
    in_batch_size = tensor.shape[0]
    if in_batch_size == batch_size:
        return tensor
    if batch_size <= 1:
        return tensor[:batch_size]
    output = torch.empty([batch_size] + list(tensor.shape)[1:], dtype=tensor.dtype,
                         device=tensor.device)
    if batch_size < in_batch_size:
        scale = (in_batch_size - 1) / (batch_size - 1)
        for i in range(batch_size):
            output[i] = tensor[min(round(i * scale), in_batch_size - 1)]
    else:
        scale = in_batch_size / batch_size
        for i in range(batch_size):
            output[i] = tensor[min(math.floor((i + 0.5) * scale), in_batch_size - 1)]
    return output


def common_upscale(samples, width, height, upscale_method, crop):
    orig_shape = tuple(samples.shape)
    if len(orig_shape) > 4:
        samples = samples.reshape(samples.shape[0], samples.shape[1], -1, samples.shape[-2],
                                  samples.shape[-1])
        samples = samples.movedim(2, 1)
        samples = samples.reshape(-1, orig_shape[1], orig_shape[-2], orig_shape[-1])
    if crop == "center":
        old_width = samples.shape[-1]
        old_height = samples.shape[-2]
        old_aspect = old_width / old_height
        new_aspect = width / height
        x = 0
        y = 0
        if old_aspect > new_aspect:
            x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
        s = samples.narrow(-2, y, old_height - y * 2).narrow(-1, x, old_width - x * 2)
    else:
        s = samples
    if upscale_method in ("bislerp", "lanczos"):
        raise NotImplementedError("stand-in: common_upscale has torch's interpolate modes only")
    out = torch.nn.functional.interpolate(s, size=(height, width), mode=upscale_method)
    if len(orig_shape) == 4:
        return out
    out = out.reshape((orig_shape[0], -1, orig_shape[1]) + (height, width))
    return out.movedim(2, 1).reshape(orig_shape[:-2] + (height, width))


# ------------------------------------------------------------------------ state dict helpers

def _safetensors_reader():
    try:
        import safetensors_io  # noqa: PLC0415 - tests/python on sys.path (conftest)
    except ImportError:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir,
                            "safetensors_io.py")
        spec = importlib.util.spec_from_file_location("safetensors_io", path)
        safetensors_io = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(safetensors_io)
    return safetensors_io.load_safetensors


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    device = torch.device("cpu") if device is None else torch.device(device)
    metadata = None
    if ckpt.lower().endswith((".safetensors", ".sft")):
        sd, metadata = _safetensors_reader()(ckpt)
        sd = {k: v.to(device) for k, v in sd.items()}
    else:
        # Upstream loads unsafely (its own pickle module) only where torch lacks weights_only.
        loaded = torch.load(ckpt, map_location=device, weights_only=True)
        if "state_dict" in loaded:
            sd = loaded["state_dict"]
        elif len(loaded) == 1 and isinstance(next(iter(loaded.values())), dict):
            sd = next(iter(loaded.values()))
        else:
            sd = loaded
    if return_metadata:
        return sd, metadata
    return sd


def state_dict_prefix_replace(state_dict, replace_prefix, filter_keys=False):
    """Renames keys starting with each prefix to start with its replacement instead; with
    filter_keys only the renamed keys are returned (in a new dict), else state_dict is changed
    in place and returned. The renamed entries are popped from state_dict either way."""
    out = {} if filter_keys else state_dict
    for old, new in replace_prefix.items():
        for k in [k for k in state_dict.keys() if k.startswith(old)]:
            out[new + k[len(old):]] = state_dict.pop(k)
    return out


def swap_scale_shift(weight):
    """diffusers stores the final AdaLN modulation as (scale, shift), ComfyUI as (shift, scale):
    swaps the two halves along dim 0."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# diffusers name -> ComfyUI name within a Flux double block / single block, and outside blocks.
_FLUX_DOUBLE = {
    "attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
_FLUX_DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_FLUX_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale",
                      "attn.norm_k.weight": "norm.key_norm.scale"}
_FLUX_BASIC = {
    "proj_out": "final_layer.linear", "x_embedder": "img_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "context_embedder": "txt_in",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "controlnet_x_embedder": "pos_embed_input",
}


def flux_to_diffusers(mmdit_config, output_prefix=""):
    """{diffusers Flux key: ComfyUI key}; a value is a key, (key, (dim, start, length)) for a
    slice of a fused weight, or (key, None, function) for a weight diffusers stores transformed
    (norm_out: swap_scale_shift)."""
    depth = mmdit_config.get("depth", 0)
    depth_single = mmdit_config.get("depth_single_blocks", 0)
    h = mmdit_config.get("hidden_size", 0)
    key_map = {}
    for i in range(depth):
        src = "transformer_blocks.{}.".format(i)
        dst = "{}double_blocks.{}.".format(output_prefix, i)
        for end in ("weight", "bias"):
            for stream, names in (("img_attn", ("to_q", "to_k", "to_v")),
                                  ("txt_attn", ("add_q_proj", "add_k_proj", "add_v_proj"))):
                qkv = "{}{}.qkv.{}".format(dst, stream, end)
                for j, name in enumerate(names):
                    key_map["{}attn.{}.{}".format(src, name, end)] = (qkv, (0, j * h, h))
        for d_name, c_name in _FLUX_DOUBLE.items():
            for end in ("weight", "bias"):
                key_map["{}{}.{}".format(src, d_name, end)] = "{}{}.{}".format(dst, c_name, end)
        for d_name, c_name in _FLUX_DOUBLE_NORMS.items():
            key_map[src + d_name] = dst + c_name
    for i in range(depth_single):
        src = "single_transformer_blocks.{}.".format(i)
        dst = "{}single_blocks.{}.".format(output_prefix, i)
        for end in ("weight", "bias"):
            fused = "{}linear1.{}".format(dst, end)
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                key_map["{}attn.{}.{}".format(src, name, end)] = (fused, (0, j * h, h))
            key_map["{}proj_mlp.{}".format(src, end)] = (fused, (0, 3 * h, 4 * h))
        for d_name, c_name in _FLUX_SINGLE.items():
            for end in ("weight", "bias"):
                key_map["{}{}.{}".format(src, d_name, end)] = "{}{}.{}".format(dst, c_name, end)
        for d_name, c_name in _FLUX_SINGLE_NORMS.items():
            key_map[src + d_name] = dst + c_name
    for d_name, c_name in _FLUX_BASIC.items():
        for end in ("weight", "bias"):
            key_map["{}.{}".format(d_name, end)] = "{}{}.{}".format(output_prefix, c_name, end)
    for end in ("weight", "bias"):
        key_map["norm_out.linear.{}".format(end)] = (
            "{}final_layer.adaLN_modulation.1.{}".format(output_prefix, end), None,
            swap_scale_shift)
    return key_map
