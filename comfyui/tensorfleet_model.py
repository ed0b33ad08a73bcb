"""The ComfyUI MODEL the Tensorfleet loader returns.

A ModelPatcher around ComfyUI's own Flux BaseModel (model sampling, latent format, conditioning
all stay ComfyUI's), whose `diffusion_model` is `TensorfleetFlux`: a parameter-less module that
sends (x, timestep, context, y, guidance) to the coordinator and returns its output. Anything the
cluster cannot do yet (ControlNet residuals, reference latents, attention masks, LoRA / weight
patches, transformer patches) is refused with an error that names it; nothing is dropped.

Thread safety: ComfyUI runs one prompt at a time; the proxy's client serialises its requests.
"""

import hashlib
import json
import logging
import struct
import weakref

import torch

from .tensorfleet_client import (CancelledError, NotFoundError, TensorfleetError)

log = logging.getLogger("tensorfleet")

FLUX_CONSTANT_INPUTS = ("context", "y", "guidance")
# Conditioning keys that only describe other keys (harmless when those are absent).
_INFORMATIONAL_KWARGS = {"ref_latents_method"}


class UnsupportedConditioningError(RuntimeError):
    """A conditioning or model patch the Tensorfleet cluster does not support yet."""


# ------------------------------------------------------------------------ model description

def read_safetensors_header(path):
    """Returns {name: {"dtype", "shape"}} of a safetensors file (header only), or None."""
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
    header.pop("__metadata__", None)
    return {k: v for k, v in header.items() if isinstance(v, dict)}


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


# ------------------------------------------------------------------------------- the proxy

class TensorfleetFlux(torch.nn.Module):
    """ComfyUI's `diffusion_model` for a Flux model that runs on a Tensorfleet cluster.

    It has no parameters. Its state_dict lists the real weight names with empty placeholders so
    that ComfyUI's LoRA and model-merge code bind their patches to this model (instead of
    silently finding no matching keys); such patches are then refused at sampling time.
    """

    def __init__(self, runner, cfg):
        super().__init__()
        self.dtype = cfg["dtype"]
        self.patch_size = 2
        self.guidance_embed = cfg["guidance_embed"]
        self.vec_in_dim = cfg["vec_in_dim"]
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
        out = self._runner.forward(inputs)
        return out.to(device=x.device)


def check_supported(control, transformer_options, kwargs, patcher):
    """Raises UnsupportedConditioningError naming whatever the cluster cannot honour."""
    problems = []
    if control is not None:
        problems.append("ControlNet residuals ('control': remove the Apply ControlNet node)")
    if kwargs.get("ref_latents") is not None:
        problems.append("reference latents ('ref_latents', Flux Kontext / ReferenceLatent)")
    if kwargs.get("attention_mask") is not None:
        problems.append("attention masks ('attention_mask')")
    for k, v in kwargs.items():
        if v is not None and k not in ("ref_latents", "attention_mask") \
                and k not in _INFORMATIONAL_KWARGS:
            problems.append("conditioning '%s'" % k)
    to = transformer_options or {}
    for key in ("patches", "patches_replace"):
        named = sorted(n for n, v in (to.get(key) or {}).items() if v)
        if named:
            problems.append("model patches (transformer_options['%s']: %s)"
                            % (key, ", ".join(named)))
    if patcher is not None:
        weights = sorted(getattr(patcher, "patches", {}) or {})
        if weights:
            problems.append("LoRA / weight patches on the model (%d weights, e.g. '%s')"
                            % (len(weights), weights[0]))
        if any(getattr(patcher, "hook_patches", {}) or {}):
            problems.append("hooked LoRA / weight patches on the model (hook_patches)")
    if problems:
        raise UnsupportedConditioningError(
            "Tensorfleet does not support %s yet; it refuses rather than ignoring it. Remove it "
            "from the workflow or use a locally loaded model." % "; ".join(problems))


class _Runner:
    """Sends a step to the coordinator: run caching, cancel, reload after a restart."""

    def __init__(self, client_for, address, spec, model_name):
        self._client_for = client_for
        self.address = address
        self.spec = spec
        self.model_name = model_name

    def forward(self, inputs):
        import comfy.model_management as mm  # noqa: PLC0415 - only inside ComfyUI

        consts = [n for n in FLUX_CONSTANT_INPUTS if n in inputs]
        run_id = run_id_for(self.model_name, {n: inputs[n] for n in consts})
        client = self._client_for(self.address)
        for attempt in (0, 1):
            try:
                out = client.forward(self.model_name, inputs, run_id=run_id,
                                     constant_inputs=consts,
                                     should_cancel=mm.processing_interrupted)
                return out["out"]
            except CancelledError:
                mm.throw_exception_if_processing_interrupted()
                raise mm.InterruptProcessingException()
            except NotFoundError:
                if attempt == 1:
                    raise
                # The coordinator restarted or unloaded the model: load it again, once.
                log.info("tensorfleet: model '%s' not loaded on the coordinator; loading it "
                         "again", self.model_name)
                client.load_model(self.spec, name=self.model_name)
        raise AssertionError("unreachable")


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
    import comfy.model_management as mm  # noqa: PLC0415
    import comfy.model_patcher  # noqa: PLC0415
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


# The ComfyUI half of each family: family name (as the coordinator reports it) -> builder of
# the ModelPatcher. Adding a family to the node is adding its builder here.
COMFY_BUILDERS = {"flux": _build_flux_patcher}
