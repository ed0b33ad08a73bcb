"""The ComfyUI MODEL the Tensorfleet loader returns.

A ModelPatcher around ComfyUI's own BaseModel of the model's family (model sampling, latent
format, conditioning all stay ComfyUI's), whose `diffusion_model` is a parameter-less proxy
that sends the step's inputs to the coordinator and returns its output:
- Flux (`TensorfleetFlux`): x, timestep, context, y, guidance; ComfyUI's Flux / FluxSchnell.
- WAN 2.1 / 2.2 (`TensorfleetWan`): x (with the I2V channels ComfyUI's WAN21 concatenated),
  timestep ([B], or [B, latent frames] for the 2.2 TI2V 5B), context and, for models with an
  image embedding, clip_fea; ComfyUI's WAN config (WAN21_T2V, WAN21_I2V, WAN22_T2V, ...) as
  ComfyUI itself would pick it for the file.
LoRA and other weight patches that ComfyUI's loaders put on the MODEL are sent to the
coordinator (tensorfleet_patches) and applied in the cluster where the weights live. Anything
the cluster cannot do yet (ControlNet residuals, reference latents, attention masks, hooked
patches, adapters such as OFT, transformer patches, ...) is refused with an error that names it;
nothing is dropped.

Loading: the coordinator decides what stays. A model that fits beside the models loaded is
loaded beside them; one that does not makes room by evicting other idle models, least recently
used first and only as far as needed (keep_loaded ones only when the load has eject_models),
and evicts nothing when even that would not make room. The node only reports it: what a load
will evict, from the coordinator's Plan (`plan_evictions`), and what the load cost. A model
that another load evicted is loaded again at its next step, with the cost logged.

Thread safety: ComfyUI runs one prompt at a time; the proxy's client serialises its requests.
"""

import collections
import hashlib
import json
import logging
import math
import os
import struct
import time
import types
import weakref

import torch

from . import tensorfleet_patches
from .tensorfleet_client import (CancelledError, NotFoundError, ResourceExhaustedError,
                                 TensorfleetError, UnimplementedError)

log = logging.getLogger("tensorfleet")

FLUX_CONSTANT_INPUTS = ("context", "y", "guidance")
WAN_CONSTANT_INPUTS = ("context", "clip_fea")
# Conditioning keys that only describe other keys (harmless when those are absent).
_INFORMATIONAL_KWARGS = {"ref_latents_method"}
# Extra conditioning the cluster does not take, by the name ComfyUI passes it under.
_REFUSED_KWARG_NAMES = {
    "ref_latents": "reference latents ('ref_latents', Flux Kontext / ReferenceLatent)",
    "attention_mask": "attention masks ('attention_mask')",
    "time_dim_concat": "latents concatenated along time ('time_dim_concat')",
    "reference_latent": "reference latents ('reference_latent', WAN reference image)",
    "crossattn_controlnet": "ControlNet cross-attention ('crossattn_controlnet')",
    "vace_context": "VACE controls ('vace_context', 'vace_strength')",
    "camera_conditions": "camera conditions ('camera_conditions', WAN Fun Camera)",
}


class UnsupportedConditioningError(RuntimeError):
    """A conditioning or model patch the Tensorfleet cluster does not support yet."""


# ------------------------------------------------------------------------ model description

def read_safetensors_header(path):
    """Returns {name: {"dtype", "shape"}} of a safetensors file (header only), or None."""
    read = read_safetensors_header_and_start(path)
    return None if read is None else read[0]


def read_safetensors_header_and_start(path):
    """(header {name: {dtype, shape, data_offsets}}, byte offset of the data) of a safetensors
    file, or None when it is not readable as one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if n > 256 << 20:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    header.pop("__metadata__", None)
    return {k: v for k, v in header.items() if isinstance(v, dict)}, 8 + n


def _find_key(value, key):
    """Depth-first search for `key` in nested dicts/lists (plan_json layouts may nest config)."""
    if isinstance(value, dict):
        if key in value:
            return value[key]
        for v in value.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for v in value:
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "F8_E4M3": torch.bfloat16, "F8_E5M2": torch.bfloat16}
_NAMED_DTYPES = {"float32": torch.float32, "f32": torch.float32, "fp32": torch.float32,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "f16": torch.float16, "fp16": torch.float16}


def flux_weight_names(cfg):
    """The Flux checkpoint key names (no prefix) for a config, as in BFL/ComfyUI files."""
    names = ["img_in.weight", "img_in.bias", "txt_in.weight", "txt_in.bias"]
    mlp = ["in_layer.weight", "in_layer.bias", "out_layer.weight", "out_layer.bias"]
    embedders = ["time_in", "vector_in"] + (["guidance_in"] if cfg["guidance_embed"] else [])
    names += ["%s.%s" % (e, m) for e in embedders for m in mlp]
    for i in range(cfg["depth"]):
        for s in ("img", "txt"):
            for part in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2"):
                names += ["double_blocks.%d.%s_%s.%s" % (i, s, part, w) for w in ("weight", "bias")]
            names += ["double_blocks.%d.%s_attn.norm.%s.scale" % (i, s, n)
                      for n in ("query_norm", "key_norm")]
    for i in range(cfg["depth_single_blocks"]):
        for part in ("linear1", "linear2", "modulation.lin"):
            names += ["single_blocks.%d.%s.%s" % (i, part, w) for w in ("weight", "bias")]
        names += ["single_blocks.%d.norm.%s.scale" % (i, n) for n in ("query_norm", "key_norm")]
    names += ["final_layer.linear.weight", "final_layer.linear.bias",
              "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]
    return names


def describe_flux(info, spec_dtype, local_path):
    """Everything ComfyUI needs to know about the loaded model, from what the coordinator
    reported (ModelInfo.family, plan_json) and, when the file is readable here, its header.

    Returns a dict: guidance_embed, in_channels, out_channels, vec_in_dim, hidden_size, depth,
    depth_single_blocks, dtype (torch), weight_names (real key names, no prefix).
    """
    if info.family and info.family != "flux":
        raise TensorfleetError("Tensorfleet: model '%s' is a '%s' model; this loader builds Flux "
                               "models only" % (info.name, info.family), "LoadModel")
    plan = info.plan()
    header = read_safetensors_header(local_path) if local_path else None
    names = None
    prefix = ""
    if header:
        prefix = "model.diffusion_model." if any(
            k.startswith("model.diffusion_model.") for k in header) else ""
        names = [k[len(prefix):] for k in header if k.startswith(prefix)]

    def from_header(key):
        if not header:
            return None
        if key == "guidance_embed":
            return any(n.startswith("guidance_in.") for n in names)
        if key == "in_channels":
            w = header.get(prefix + "img_in.weight")
            return w["shape"][1] // 4 if w else None
        if key == "hidden_size":
            w = header.get(prefix + "img_in.weight")
            return w["shape"][0] if w else None
        if key == "out_channels":
            w = header.get(prefix + "final_layer.linear.weight")
            return w["shape"][0] // 4 if w else None
        if key == "vec_in_dim":
            w = header.get(prefix + "vector_in.in_layer.weight")
            return w["shape"][1] if w else None
        if key in ("depth", "depth_single_blocks"):
            stem = "double_blocks." if key == "depth" else "single_blocks."
            ids = {int(n.split(".")[1]) for n in names if n.startswith(stem)}
            return max(ids) + 1 if ids else 0
        return None

    cfg = {}
    defaults = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "hidden_size": 3072,
                "depth": 19, "depth_single_blocks": 38}
    for key in ("guidance_embed",) + tuple(defaults):
        value = _find_key(plan, key)
        if value is None:
            value = from_header(key)
        if value is None and key == "guidance_embed":
            raise TensorfleetError(
                "Tensorfleet: cannot tell whether '%s' is Flux dev or schnell: the coordinator's "
                "plan_json has no 'guidance_embed' and the file is not readable from ComfyUI "
                "(%s)" % (info.name, local_path or "no local path"), "LoadModel")
        cfg[key] = defaults.get(key) if value is None else value
    cfg["guidance_embed"] = bool(cfg["guidance_embed"])
    for key in defaults:
        cfg[key] = int(cfg[key])

    dtype = _NAMED_DTYPES.get(spec_dtype)
    if dtype is None:
        reported = _find_key(plan, "compute_dtype") or _find_key(plan, "dtype")
        dtype = _NAMED_DTYPES.get(str(reported).lower()) if reported else None
    if dtype is None and header and (prefix + "img_in.weight") in header:
        dtype = _SAFETENSORS_DTYPES.get(header[prefix + "img_in.weight"].get("dtype"))
    if dtype is None:
        dtype = torch.bfloat16
        log.warning("tensorfleet: compute dtype of '%s' unknown; assuming bfloat16", info.name)
    cfg["dtype"] = dtype
    cfg["weight_names"] = names if names else flux_weight_names(cfg)
    return cfg


# ComfyUI's WanModel model_type for the coordinator's: the 2.2 TI2V 5B is a "t2v" WanModel with
# 48 output channels, FLF2V an "i2v" one with img_emb.emb_pos (comfy/model_detection.py).
_COMFY_WAN_TYPES = {"t2v": "t2v", "ti2v": "t2v", "i2v": "i2v", "flf2v": "i2v"}
_WAN_INT_KEYS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim",
                 "freq_dim")
WAN_CLIP_DIM = 1280  # CLIP-H vision features, img_emb's input (WAN 2.1 I2V / FLF2V)
WAN_FLF_TOKENS = 514  # img_emb.emb_pos rows of WAN 2.1 FLF2V: two images of 257 tokens


def wan_weight_shapes(cfg):
    """{name: shape} of a WAN checkpoint for a config, as ComfyUI's WanModel names its state
    dict (no prefix): the stem, blocks.N, head and, with an image embedding, img_emb."""
    D, F = cfg["dim"], cfg["ffn_dim"]
    patch = list(cfg["patch_size"])
    shapes = {}

    def lin(name, o, i):
        shapes[name + ".weight"] = [o, i]
        shapes[name + ".bias"] = [o]

    shapes["patch_embedding.weight"] = [D, cfg["in_dim"]] + patch
    shapes["patch_embedding.bias"] = [D]
    lin("text_embedding.0", D, cfg["text_dim"])
    lin("text_embedding.2", D, D)
    lin("time_embedding.0", D, cfg["freq_dim"])
    lin("time_embedding.2", D, D)
    lin("time_projection.1", 6 * D, D)
    for i in range(cfg["num_layers"]):
        b = "blocks.%d." % i
        shapes[b + "modulation"] = [1, 6, D]
        for attn in ("self_attn", "cross_attn"):
            for n in "qkvo":
                lin(b + attn + "." + n, D, D)
            shapes[b + attn + ".norm_q.weight"] = [D]
            shapes[b + attn + ".norm_k.weight"] = [D]
        if cfg["i2v"]:
            lin(b + "cross_attn.k_img", D, D)
            lin(b + "cross_attn.v_img", D, D)
            shapes[b + "cross_attn.norm_k_img.weight"] = [D]
        shapes[b + "norm3.weight"] = [D]
        shapes[b + "norm3.bias"] = [D]
        lin(b + "ffn.0", F, D)
        lin(b + "ffn.2", D, F)
    shapes["head.modulation"] = [1, 2, D]
    lin("head.head", math.prod(patch) * cfg["out_dim"], D)
    if cfg["i2v"]:
        shapes["img_emb.proj.0.weight"] = [WAN_CLIP_DIM]
        shapes["img_emb.proj.0.bias"] = [WAN_CLIP_DIM]
        lin("img_emb.proj.1", WAN_CLIP_DIM, WAN_CLIP_DIM)
        lin("img_emb.proj.3", D, WAN_CLIP_DIM)
        shapes["img_emb.proj.4.weight"] = [D]
        shapes["img_emb.proj.4.bias"] = [D]
        if cfg.get("flf_pos_embed_token_number"):
            shapes["img_emb.emb_pos"] = [1, cfg["flf_pos_embed_token_number"], WAN_CLIP_DIM]
    return shapes


def _wan_config_from_header(header, prefix):
    """What the tensor shapes say about a WAN file (as comfy/model_detection.py reads them)."""
    def shape(name):
        t = header.get(prefix + name)
        return t["shape"] if t and isinstance(t.get("shape"), list) else None

    out = {}
    pe, head = shape("patch_embedding.weight"), shape("head.head.weight")
    if pe and len(pe) == 5:
        out.update(dim=pe[0], in_dim=pe[1], patch_size=pe[2:])
        out["num_heads"] = pe[0] // 128 if pe[0] % 128 == 0 else None
        if head:
            out["out_dim"] = head[0] // math.prod(pe[2:])
    for key, name, axis in (("ffn_dim", "blocks.0.ffn.0.weight", 0),
                            ("text_dim", "text_embedding.0.weight", 1),
                            ("freq_dim", "time_embedding.0.weight", 1)):
        s = shape(name)
        if s and len(s) == 2:
            out[key] = s[axis]
    ids = {int(k[len(prefix):].split(".")[1]) for k in header
           if k.startswith(prefix + "blocks.") and k[len(prefix):].split(".")[1].isdigit()}
    if ids:
        out["num_layers"] = max(ids) + 1
    out["i2v"] = (prefix + "img_emb.proj.0.weight") in header
    emb_pos = shape("img_emb.emb_pos")
    if emb_pos and len(emb_pos) == 3:
        out["flf_pos_embed_token_number"] = emb_pos[1]
    out["model_type"] = ("flf2v" if emb_pos else "i2v") if out["i2v"] else "t2v"
    return {k: v for k, v in out.items() if v is not None}


def describe_wan(info, spec_dtype, local_path):
    """Everything ComfyUI needs to know about a loaded WAN model: the coordinator's config
    (ModelInfo plan_json "config": model_type, dim, ffn_dim, num_heads, num_layers, in_dim,
    out_dim, text_dim, freq_dim, patch_size, i2v, eps), completed from the file header when the
    file is readable here.

    Returns a dict: those keys, comfy_model_type (ComfyUI's "t2v" / "i2v"),
    flf_pos_embed_token_number (FLF2V, else None), dtype (torch), weight_names (real key names,
    no prefix) and weight_shapes ({name: shape}).
    """
    if info.family and info.family != "wan":
        raise TensorfleetError("Tensorfleet: model '%s' is a '%s' model, not WAN"
                               % (info.name, info.family), "LoadModel")
    plan = info.plan()
    reported = plan.get("config") if isinstance(plan.get("config"), dict) else {}
    header = read_safetensors_header(local_path) if local_path else None
    prefix, from_header = "", {}
    if header:
        prefix = "model.diffusion_model." if any(
            k.startswith("model.diffusion_model.") for k in header) else ""
        from_header = _wan_config_from_header(header, prefix)

    cfg = {}
    for key in _WAN_INT_KEYS + ("patch_size", "i2v", "eps", "model_type"):
        value = reported.get(key)
        if value is None:
            value = from_header.get(key)
        cfg[key] = value
    defaults = {"patch_size": [1, 2, 2], "eps": 1e-6, "text_dim": 4096, "freq_dim": 256}
    for key, value in defaults.items():
        if cfg[key] is None:
            cfg[key] = value
    missing = [k for k in _WAN_INT_KEYS if cfg[k] is None]
    if missing:
        raise TensorfleetError(
            "Tensorfleet: cannot describe the WAN model '%s' to ComfyUI: the coordinator's "
            "plan_json has no %s in its 'config' and the file is not readable from ComfyUI (%s)"
            % (info.name, ", ".join(missing), local_path or "no local path"), "LoadModel")
    for key in _WAN_INT_KEYS:
        cfg[key] = int(cfg[key])
    cfg["patch_size"] = [int(p) for p in cfg["patch_size"]]
    cfg["eps"] = float(cfg["eps"])
    if cfg["i2v"] is None:
        cfg["i2v"] = cfg["model_type"] in ("i2v", "flf2v")
    cfg["i2v"] = bool(cfg["i2v"])
    if cfg["model_type"] is None:
        cfg["model_type"] = "i2v" if cfg["i2v"] else "t2v"
    comfy_type = _COMFY_WAN_TYPES.get(cfg["model_type"])
    if comfy_type is None:
        raise TensorfleetError("Tensorfleet: WAN model '%s' has model_type '%s'; the node knows "
                               "%s" % (info.name, cfg["model_type"],
                                       ", ".join(sorted(_COMFY_WAN_TYPES))), "LoadModel")
    cfg["comfy_model_type"] = comfy_type
    flf = from_header.get("flf_pos_embed_token_number")
    if flf is None and cfg["model_type"] == "flf2v":
        flf = WAN_FLF_TOKENS
    cfg["flf_pos_embed_token_number"] = flf

    dtype = _NAMED_DTYPES.get(spec_dtype)
    if dtype is None:
        named = _find_key(plan, "compute_dtype") or _find_key(plan, "dtype")
        dtype = _NAMED_DTYPES.get(str(named).lower()) if named else None
    probe = prefix + "blocks.0.self_attn.q.weight"
    if dtype is None and header and probe in header:
        dtype = _SAFETENSORS_DTYPES.get(header[probe].get("dtype"))
    if dtype is None:
        dtype = torch.bfloat16
        log.warning("tensorfleet: compute dtype of '%s' unknown; assuming bfloat16", info.name)
    cfg["dtype"] = dtype
    if header:
        cfg["weight_shapes"] = {k[len(prefix):]: list(v.get("shape", []))
                                for k, v in header.items() if k.startswith(prefix)}
    else:
        cfg["weight_shapes"] = wan_weight_shapes(cfg)
    cfg["weight_names"] = list(cfg["weight_shapes"])
    return cfg


# ------------------------------------------------------------------------------- the proxy

class _RemoteDiffusionModel(torch.nn.Module):
    """What every family's proxy shares: no parameters, a state dict of the real weight names as
    empty placeholders (so ComfyUI's LoRA and merge code bind to them and are refused at sampling
    time), and a weak link to the BaseModel it serves, to find the current patcher."""

    def __init__(self, runner, cfg):
        super().__init__()
        self.dtype = cfg["dtype"]
        self._runner = runner
        self._weight_names = list(cfg["weight_names"])
        self._placeholder = torch.empty(0, dtype=self.dtype)
        self._base = None  # weakref to the BaseModel (not a submodule: no cycle)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for n in self._weight_names:
            destination[prefix + n] = self._placeholder

    def attach(self, base_model):
        object.__setattr__(self, "_base", weakref.ref(base_model))

    def _patcher(self):
        base = self._base() if self._base is not None else None
        return getattr(base, "current_patcher", None) if base is not None else None


class TensorfleetFlux(_RemoteDiffusionModel):
    """ComfyUI's `diffusion_model` for a Flux model that runs on a Tensorfleet cluster.

    It has no parameters. Its state_dict lists the real weight names with empty placeholders so
    that ComfyUI's LoRA and model-merge code bind their patches to this model (instead of
    silently finding no matching keys); such patches are then refused at sampling time.
    """

    def __init__(self, runner, cfg):
        super().__init__(runner, cfg)
        self.patch_size = 2
        self.guidance_embed = cfg["guidance_embed"]
        self.vec_in_dim = cfg["vec_in_dim"]

    def forward(self, x, timestep, context=None, y=None, guidance=None, control=None,
                transformer_options={}, **kwargs):
        check_supported(control, transformer_options, kwargs, self._patcher())
        if context is None:
            raise UnsupportedConditioningError(
                "Tensorfleet: the Flux model got no text conditioning (context is None)")
        if y is None:  # as ComfyUI's Flux.forward: a missing pooled output is zeros
            y = torch.zeros((x.shape[0], self.vec_in_dim), dtype=x.dtype, device=x.device)
        inputs = {"x": x, "timestep": timestep.float(), "context": context, "y": y}
        if self.guidance_embed and guidance is not None:
            inputs["guidance"] = guidance
        out = self._runner.forward(inputs, self._patcher())
        return out.to(device=x.device)


# WanModel keyword arguments the cluster needs nothing from: WAN22's denoise_mask only gives
# ComfyUI's process_timestep the per-frame timesteps (already in `timestep`).
_WAN_INFORMATIONAL_KWARGS = _INFORMATIONAL_KWARGS | {"denoise_mask"}


class TensorfleetWan(_RemoteDiffusionModel):
    """ComfyUI's `diffusion_model` for a WAN 2.1 / 2.2 model that runs on a Tensorfleet cluster,
    called as ComfyUI's WanModel is: forward(x, timestep, context, clip_fea=None,
    time_dim_concat=None, transformer_options={}, **kwargs).

    x arrives with the I2V channels (mask and image latent) ComfyUI's WAN21.concat_cond made and
    BaseModel concatenated; timestep is [B] or, for the 2.2 TI2V 5B with a denoise mask,
    [B, latent frames] (WAN22.process_timestep), and goes as given. context and clip_fea are the
    run's constant inputs; clip_fea goes only to a model with an image embedding (img_emb), as
    WanModel uses it only there. Diffusion-model wrappers run around the step as WanModel runs
    them. No parameters: the state dict lists the real weight names as empty placeholders
    (LoRA binds, and is refused); `weight_shapes` has their shapes, and `patch_embedding.weight`
    is a meta tensor of the real shape, which WAN21.concat_cond reads.
    """

    def __init__(self, runner, cfg):
        super().__init__(runner, cfg)
        self.model_type = cfg["comfy_model_type"]
        self.patch_size = tuple(cfg["patch_size"])
        for key in _WAN_INT_KEYS:
            setattr(self, key, cfg[key])
        self.image_embedding = cfg["i2v"]
        self.ref_conv = None
        self.weight_shapes = dict(cfg["weight_shapes"])
        shape = [cfg["dim"], cfg["in_dim"]] + list(cfg["patch_size"])
        self.patch_embedding = types.SimpleNamespace(
            weight=torch.empty(shape, dtype=torch.float32, device="meta"))

    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None,
                transformer_options={}, **kwargs):
        wrappers = _diffusion_model_wrappers(transformer_options)
        if wrappers:
            import comfy.patcher_extension as pe  # noqa: PLC0415 - only inside ComfyUI
            return pe.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
                x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
        return self._forward(x, timestep, context, clip_fea, time_dim_concat,
                             transformer_options, **kwargs)

    def _forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None,
                 transformer_options={}, **kwargs):
        control = kwargs.pop("control", None)
        extra = dict(kwargs, time_dim_concat=time_dim_concat)
        check_supported(control, transformer_options, extra, self._patcher(),
                        informational=_WAN_INFORMATIONAL_KWARGS)
        if context is None:
            raise UnsupportedConditioningError(
                "Tensorfleet: the WAN model got no text conditioning (context is None)")
        inputs = {"x": x, "timestep": timestep.float(), "context": context}
        if clip_fea is not None and self.image_embedding:
            inputs["clip_fea"] = clip_fea
        out = self._runner.forward(inputs, self._patcher())
        return out.to(device=x.device)


def _diffusion_model_wrappers(transformer_options):
    """The DIFFUSION_MODEL wrappers in transformer_options (ComfyUI's patcher_extension), as
    WanModel.forward runs them."""
    if not ((transformer_options or {}).get("wrappers") or {}).get("diffusion_model"):
        return []
    try:
        import comfy.patcher_extension as pe  # noqa: PLC0415
        return pe.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL, transformer_options)
    except (ImportError, AttributeError):
        raise UnsupportedConditioningError(
            "Tensorfleet does not support diffusion-model wrappers on this ComfyUI (no "
            "comfy.patcher_extension.WrapperExecutor); it refuses rather than ignoring them")


def check_supported(control, transformer_options, kwargs, patcher,
                    informational=_INFORMATIONAL_KWARGS):
    """Raises UnsupportedConditioningError naming whatever the cluster cannot honour.
    `informational`: keyword arguments the model takes but needs nothing from."""
    problems = []
    if control is not None:
        problems.append("ControlNet residuals ('control': remove the Apply ControlNet node)")
    named = [k for k in _REFUSED_KWARG_NAMES if kwargs.get(k) is not None]
    problems += [_REFUSED_KWARG_NAMES[k] for k in named]
    if kwargs.get("vace_strength") is not None and "vace_context" not in named:
        problems.append(_REFUSED_KWARG_NAMES["vace_context"])
    for k, v in kwargs.items():
        if v is not None and k not in _REFUSED_KWARG_NAMES and k != "vace_strength" \
                and k not in informational:
            problems.append("conditioning '%s'" % k)
    to = transformer_options or {}
    for key in ("patches", "patches_replace"):
        named = sorted(n for n, v in (to.get(key) or {}).items() if v)
        if named:
            problems.append("model patches (transformer_options['%s']: %s)"
                            % (key, ", ".join(named)))
    if patcher is not None:
        try:  # LoRA patches run in the cluster; what it cannot apply is named here
            tensorfleet_patches.patch_set(getattr(patcher, "patches", None),
                                          getattr(patcher, "patches_uuid", None))
        except UnimplementedError as e:
            problems.append(e.message)
        if any(getattr(patcher, "hook_patches", {}) or {}):
            problems.append("hooked LoRA / weight patches on the model (hook_patches)")
    if problems:
        raise UnsupportedConditioningError(
            "Tensorfleet does not support %s yet; it refuses rather than ignoring it. Remove it "
            "from the workflow or use a locally loaded model." % "; ".join(problems))


class _Runner:
    """Sends a step to the coordinator: run caching, cancel, reload when the model is gone (the
    coordinator restarted, or another model's load pushed it out: then the reload's cost is
    logged and counted here)."""

    def __init__(self, client_for, address, spec, model_name,
                 constant_inputs=FLUX_CONSTANT_INPUTS,
                 patch_prefix=tensorfleet_patches.DIFFUSION_PREFIX,
                 patch_what="the diffusion model"):
        self._client_for = client_for
        self.address = address
        self.spec = spec
        self.model_name = model_name
        self.constant_inputs = tuple(constant_inputs)
        # Where the patcher's keys name this model's weights: "diffusion_model." for a MODEL,
        # "<encoder>.transformer." for one text encoder of a CLIP (tensorfleet_clip).
        self.patch_prefix = patch_prefix
        self.patch_what = patch_what
        self.reloads = 0            # times the model was loaded again at a step
        self.reload_seconds = 0.0   # time those loads took (the cost of a swap)
        # (client, patch set id) the coordinator was given, most recent last; the coordinator
        # keeps 4 sets per model, so remembering more than a few only costs a NotFound retry.
        self._patches_put = collections.OrderedDict()

    def forward(self, inputs, patcher=None):
        """One step; `patcher`'s weight patches (LoRA) go to the coordinator once per patch set
        (PutPatches) and the step names them. Returns the output "out"."""
        return self.forward_outputs(inputs, patcher)["out"]

    def forward_outputs(self, inputs, patcher=None):
        """forward, returning every output ({name: tensor}). A runner without constant inputs
        (a text encoder) sends no run id: there is nothing for the coordinator to keep."""
        import comfy.model_management as mm  # noqa: PLC0415 - only inside ComfyUI

        consts = [n for n in self.constant_inputs if n in inputs]
        run_id = run_id_for(self.model_name, {n: inputs[n] for n in consts}) \
            if self.constant_inputs else ""
        client = self._client_for(self.address)
        patches = self._patch_set(patcher)
        for attempt in (0, 1):
            try:
                if patches is not None and (client, patches.id) not in self._patches_put:
                    client.put_patches(self.model_name, patches.id, patches.groups,
                                       patches.tensors)
                    self._patches_put[(client, patches.id)] = True
                    while len(self._patches_put) > 16:
                        self._patches_put.popitem(last=False)
                out = client.forward(self.model_name, inputs, run_id=run_id,
                                     constant_inputs=consts,
                                     should_cancel=mm.processing_interrupted,
                                     patches=patches.id if patches is not None else "")
                return out
            except CancelledError:
                mm.throw_exception_if_processing_interrupted()
                raise mm.InterruptProcessingException()
            except NotFoundError:
                # The model is gone (reload it), or only its patch set (pushed out of the
                # coordinator's four per model): either way the set is put again.
                if attempt == 1:
                    raise
                self._patches_put.clear()
                if self.model_name not in {m.name for m in client.list_models()}:
                    self._reload(client, mm)
        raise AssertionError("unreachable")

    def _patch_set(self, patcher):
        """The patcher's weight patches on this model (keys under patch_prefix) as a
        tensorfleet_patches.PatchSet (None without any)."""
        if patcher is None:
            return None
        patches = getattr(patcher, "patches", None)
        if patches and self.patch_prefix != tensorfleet_patches.DIFFUSION_PREFIX:
            patches = {k: v for k, v in patches.items() if k.startswith(self.patch_prefix)}
        return tensorfleet_patches.patch_set(patches, getattr(patcher, "patches_uuid", None),
                                             self.patch_prefix, self.patch_what)

    def _reload(self, client, mm):
        """The coordinator restarted or evicted the model (another model's load needed its
        room): load it again, once, with the loader's spec. The coordinator makes room for it
        as for any load; what that evicts (per its plan) and what the load cost are logged."""
        log.info("tensorfleet: model '%s' is not loaded on the coordinator any more; loading it "
                 "again", self.model_name)
        try:
            evicts = planned_evictions(client, self.spec, self.model_name)
            start = time.monotonic()
            info = client.load_model(self.spec, name=self.model_name,
                                     should_cancel=mm.processing_interrupted)
        except CancelledError:
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException()
        seconds = time.monotonic() - start
        self.reloads += 1
        self.reload_seconds += seconds
        log.warning("tensorfleet: '%s' was not resident on the cluster (another model took its "
                    "room, or the coordinator restarted); loading it again cost %.2f s for %s%s",
                    self.model_name, seconds, format_bytes(info.bytes_total),
                    evicts_text(evicts))


def format_bytes(n):
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.2f %s" % (n, unit))
        n /= 1024
    return "%.2f TiB" % n


def default_model_name(path):
    """The name the coordinator gives a model loaded without one: the file's stem."""
    return os.path.splitext(os.path.basename(path))[0]


def plan_evictions(plan, spec, name=""):
    """The models a load of `spec` (under `name`, or the coordinator's default name) evicts
    first, least recently used first, from the coordinator's Plan of that spec (wire.Plan
    `evicts`). The model itself is left out: a Plan counts a copy of it already loaded as used
    (and possibly as evictable), while its load re-uses or replaces that copy."""
    own = name or default_model_name(spec.path)
    return [n for n in plan.evicts if n != own]


def planned_evictions(client, spec, name=""):
    """Asks the coordinator's Plan what a load of `spec` would evict (plan_evictions); None
    when the plan does not fit even so (ResourceExhausted: the load itself then says why)."""
    try:
        plan = client.plan(spec)
    except ResourceExhaustedError:
        return None
    return plan_evictions(plan, spec, name)


def evicts_text(evicts):
    """The end of a log line after a load: the models the coordinator's plan had it evict
    (empty when none, or unknown)."""
    if not evicts:
        return ""
    return ("; the coordinator's plan had it evict %s to make room (least recently used first)"
            % ", ".join("'%s'" % n for n in evicts))


def run_id_for(model_name, constants):
    """A sampling run's id: a hash of the model and the constant inputs' dtype, shape and bytes.
    Equal ids mean equal constants, so the coordinator may reuse its cache across steps (and
    across runs with the same conditioning); its LRU drops runs that are not used any more."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model_name.encode())
    for name in sorted(constants):
        t = constants[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(("|%s|%s|%s|" % (name, t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "comfy-" + h.hexdigest()


def build_model_patcher(client_for, address, spec, info, local_path):
    """Returns the ComfyUI MODEL (a ModelPatcher) for a model loaded on the coordinator, built
    by the ComfyUI half of its family (COMFY_BUILDERS; the cluster's families are in
    docs/models.md). A family the node cannot build for ComfyUI yet is refused by name."""
    build = COMFY_BUILDERS.get(info.family or "flux")
    if build is None:
        raise TensorfleetError(
            "Tensorfleet: model '%s' is a '%s' model; this node builds ComfyUI models for: %s"
            % (info.name, info.family, ", ".join(sorted(COMFY_BUILDERS))), "LoadModel")
    return build(client_for, address, spec, info, local_path)


def _build_flux_patcher(client_for, address, spec, info, local_path):
    """ComfyUI's own Flux BaseModel around a TensorfleetFlux proxy."""
    import comfy.model_base  # noqa: PLC0415
    import comfy.supported_models  # noqa: PLC0415

    cfg = describe_flux(info, spec.dtype, local_path)
    unet_config = {"image_model": "flux", "guidance_embed": cfg["guidance_embed"],
                   "in_channels": cfg["in_channels"], "out_channels": cfg["out_channels"],
                   "vec_in_dim": cfg["vec_in_dim"], "hidden_size": cfg["hidden_size"],
                   "patch_size": 2,
                   "depth": cfg["depth"], "depth_single_blocks": cfg["depth_single_blocks"],
                   "disable_unet_model_creation": True}
    config_cls = (comfy.supported_models.Flux if cfg["guidance_embed"]
                  else comfy.supported_models.FluxSchnell)
    model_config = config_cls(unet_config)
    model_config.set_inference_dtype(cfg["dtype"], None)
    proxy = TensorfleetFlux(_Runner(client_for, address, spec, info.name), cfg)
    model_type = (comfy.model_base.ModelType.FLUX if cfg["guidance_embed"]
                  else comfy.model_base.ModelType.FLOW)
    try:
        base = comfy.model_base.Flux(model_config, model_type=model_type, device=None,
                                     unet_model=lambda *a, **k: proxy)
    except TypeError as e:
        raise TensorfleetError("Tensorfleet needs a ComfyUI whose model_base.Flux accepts "
                               "unet_model= (2025 or newer): %s" % e, "LoadModel") from None
    return _patcher_for(base, proxy)


def _patcher_for(base, proxy):
    """The ModelPatcher around a BaseModel whose diffusion_model is `proxy`."""
    import comfy.model_management as mm  # noqa: PLC0415
    import comfy.model_patcher  # noqa: PLC0415

    base.diffusion_model = proxy
    proxy.attach(base)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    # Refuse weight patches (LoRA) when sampling starts rather than at the first step.
    try:
        from comfy.patcher_extension import CallbacksMP  # noqa: PLC0415
        patcher.add_callback(CallbacksMP.ON_PRE_RUN,
                             lambda p: check_supported(None, None, {}, p))
    except (ImportError, AttributeError):
        pass
    return patcher


def wan_unet_config(cfg):
    """The unet_config ComfyUI's model detection makes for this WAN model (comfy/
    model_detection.py), with model creation disabled: the proxy is the diffusion model."""
    unet_config = {"image_model": "wan2.1", "model_type": cfg["comfy_model_type"],
                   "dim": cfg["dim"], "in_dim": cfg["in_dim"], "out_dim": cfg["out_dim"],
                   "ffn_dim": cfg["ffn_dim"], "num_heads": cfg["num_heads"],
                   "num_layers": cfg["num_layers"], "text_dim": cfg["text_dim"],
                   "freq_dim": cfg["freq_dim"], "patch_size": tuple(cfg["patch_size"]),
                   "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
                   "eps": cfg["eps"], "disable_unet_model_creation": True}
    if cfg.get("flf_pos_embed_token_number"):
        unet_config["flf_pos_embed_token_number"] = cfg["flf_pos_embed_token_number"]
    return unet_config


def comfy_wan_config(unet_config):
    """ComfyUI's model config class for a WAN unet_config, chosen as ComfyUI chooses it: the
    first WAN class of comfy.supported_models.models that matches (WAN22_T2V for 48 output
    channels, WAN21_T2V for the other t2v models: WAN 2.1 T2V and both WAN 2.2 A14B experts,
    T2V and I2V; WAN21_I2V for i2v with 36 input channels; ...)."""
    import comfy.supported_models  # noqa: PLC0415

    for config_cls in comfy.supported_models.models:
        if getattr(config_cls, "unet_config", {}).get("image_model") == "wan2.1" and \
                config_cls.matches(unet_config):
            return config_cls
    return None


def _build_wan_patcher(client_for, address, spec, info, local_path):
    """ComfyUI's own WAN BaseModel (WAN21 / WAN22, from ComfyUI's matching config) around a
    TensorfleetWan proxy."""
    cfg = describe_wan(info, spec.dtype, local_path)
    unet_config = wan_unet_config(cfg)
    config_cls = comfy_wan_config(unet_config)
    if config_cls is None:
        raise TensorfleetError(
            "Tensorfleet: ComfyUI has no WAN model config for '%s' (model_type %s, in_dim %d, "
            "out_dim %d)" % (info.name, cfg["model_type"], cfg["in_dim"], cfg["out_dim"]),
            "LoadModel")
    model_config = config_cls(unet_config)
    model_config.set_inference_dtype(cfg["dtype"], None)
    proxy = TensorfleetWan(_Runner(client_for, address, spec, info.name, WAN_CONSTANT_INPUTS),
                           cfg)
    base = model_config.get_model({}, "", device=None)
    return _patcher_for(base, proxy)


# The ComfyUI half of each family: family name (as the coordinator reports it) -> builder of
# the ModelPatcher. Adding a family to the node is adding its builder here.
COMFY_BUILDERS = {"flux": _build_flux_patcher, "wan": _build_wan_patcher}
