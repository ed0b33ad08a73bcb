"""ComfyUI's weight patches (what LoraLoader put on the MODEL) as a Tensorfleet patch set.

ComfyUI's LoRA loaders map a LoRA file's keys onto the model's state dict with ComfyUI's own
code (comfy.lora.model_lora_keys_unet, load_lora) and store, per weight key, a list of patches
(strength, adapter or ("diff" | "set", tensors), strength_model, offset, function) on the
ModelPatcher (add_patches). The cluster applies them where the weights live with the same
arithmetic (docs/models.md, "LoRA and weight patches"). This module turns that list into what
the coordinator's PutPatches takes: groups of modules of one strength, each module naming its
parts among a dict of tensors, in ComfyUI's stacking order.
"""
import collections
import hashlib
import threading

from .tensorfleet_client import PatchModule, UnimplementedError

DIFFUSION_PREFIX = "diffusion_model."

# Adapter parts by ComfyUI's weights tuple position (comfy/weight_adapter/*.py), as the part
# suffixes the cluster reads; None: a position that is not a tensor part.
_ADAPTER_PARTS = {
    "lora": (".lora_up.weight", ".lora_down.weight", ".alpha", ".lora_mid.weight",
             ".dora_scale", "reshape"),
    "loha": (".hada_w1_a", ".hada_w1_b", ".alpha", ".hada_w2_a", ".hada_w2_b", ".hada_t1",
             ".hada_t2", ".dora_scale"),
    "lokr": (".lokr_w1", ".lokr_w2", ".alpha", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a",
             ".lokr_w2_b", ".lokr_t2", ".dora_scale"),
}


class PatchSet:
    """`id` (stable for unchanged patches), `groups` [(strength, [PatchModule])] and `tensors`
    {key: tensor}, ready for Client.put_patches."""

    def __init__(self, patch_id, groups, tensors):
        self.id = patch_id
        self.groups = groups
        self.tensors = tensors


class _TupleAdapter:
    """An older ComfyUI's ("lora", weights) patch, read like a weight_adapter adapter."""

    def __init__(self, name, weights):
        self.name = name
        self.weights = weights


def _refuse(key, what):
    raise UnimplementedError("Tensorfleet cannot apply the patch on '%s': %s" % (key, what),
                             "PutPatches")


def _parts(key, value):
    """{part suffix: tensor or float} of one ComfyUI patch value."""
    import torch  # noqa: PLC0415 - ComfyUI has it

    name = getattr(value, "name", None)
    weights = getattr(value, "weights", None)
    if name is not None and weights is not None:  # a comfy.weight_adapter adapter
        layout = _ADAPTER_PARTS.get(name)
        if layout is None:
            _refuse(key, "a %s adapter (Tensorfleet applies LoRA, LoCon, DoRA, LoHa, LoKr and "
                         "full diffs)" % name.upper())
        parts = {}
        for suffix, item in zip(layout, weights):
            if item is None:
                continue
            if suffix == "reshape":
                _refuse(key, "a LoRA that reshapes its weight (reshape_weight)")
            if suffix == ".alpha":
                item = torch.tensor(float(item), dtype=torch.float64)
            parts[suffix] = item
        return parts
    if isinstance(value, list):
        _refuse(key, "a nested patch list")
    if len(value) == 1:
        kind, payload = "diff", value
    else:
        kind, payload = value[0], value[1]
    if kind in _ADAPTER_PARTS or kind in ("glora", "oft", "boft"):
        # ComfyUI before comfy.weight_adapter (early 2025) kept adapters as (kind, weights).
        return _parts(key, _TupleAdapter(kind, payload))
    if kind == "diff":
        if len(payload) > 1 and isinstance(payload[1], dict) and payload[1].get("pad_weight"):
            _refuse(key, "a diff that pads the weight to another shape")
        return {".diff": payload[0]}
    if kind == "set":
        return {".set_weight": payload[0]}
    _refuse(key, "a '%s' patch" % kind)


# Conversions by ComfyUI patches_uuid, most recent last: the sampling pre-run check and every
# step ask for the same patches, and WAN 2.2's two experts alternate. Few: each keeps its LoRA's
# tensors alive.
_CACHE_SIZE = 4
_cache = collections.OrderedDict()
_cache_lock = threading.Lock()


def patch_set(patches, patches_uuid=None, prefix=DIFFUSION_PREFIX, what="the diffusion model"):
    """patches_to_set, converted once per (`patches_uuid`, `prefix`) (each time when there is no
    uuid)."""
    if not patches or patches_uuid is None:
        return patches_to_set(patches, patches_uuid, prefix, what)
    key = (patches_uuid, prefix)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    result = patches_to_set(patches, patches_uuid, prefix, what)
    with _cache_lock:
        _cache[key] = result
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return result


def patches_to_set(patches, patches_uuid=None, prefix=DIFFUSION_PREFIX,
                   what="the diffusion model"):
    """The PatchSet of a ModelPatcher's `patches` ({key: [(strength_patch, value,
    strength_model, offset, function), ...]}), or None when there are none. Keys must be
    `prefix` + the weight's name in the model file: the diffusion model's
    ("diffusion_model.<weight>"), or a text encoder's (a CLIP patcher's
    "clip_l.transformer.<weight>", `what` naming it in errors). Raises UnimplementedError naming the key for
    what the cluster does not apply (GLoRA, OFT, BOFT, reshape_weight, strength_model other than
    1, a function other than diffusers' swap_scale_shift, model_as_lora)."""
    if not patches:
        return None
    import torch  # noqa: PLC0415 - ComfyUI has it

    groups = {}   # (position in the key's list, strength) -> [PatchModule], first seen first
    tensors = {}
    digest = hashlib.blake2b(digest_size=12)
    n = 0
    for key in sorted(patches):
        if not key.startswith(prefix):
            _refuse(key, "not a weight of %s" % what)
        target = key[len(prefix):]
        for position, patch in enumerate(patches[key]):
            strength, value, strength_model, offset, function = (tuple(patch) + (None,) * 5)[:5]
            if strength_model not in (None, 1.0):
                _refuse(key, "strength_model %r (a model merge's scaling)" % strength_model)
            swap = False
            if function is not None:
                if getattr(function, "__name__", "") != "swap_scale_shift":
                    _refuse(key, "a patch function %r" % getattr(function, "__name__", function))
                swap = True
            tag = "p%d" % n
            n += 1
            parts = _parts(key, value)
            keys = []
            for suffix, t in parts.items():
                tensors[tag + suffix] = t.detach().cpu().contiguous()
                keys.append(tag + suffix)
            module = PatchModule(prefix=tag, target=target, keys=keys,
                                 offset=tuple(offset) if offset is not None else None,
                                 swap_halves=swap)
            groups.setdefault((position, float(strength)), []).append(module)
            digest.update(("%s|%d|%r|%r|%s|" % (key, position, float(strength), offset,
                                                swap)).encode())
            for suffix, t in sorted(parts.items()):
                digest.update(("%s%s%s" % (suffix, tuple(t.shape), t.dtype)).encode())
                if patches_uuid is None:  # no patcher id: the bytes themselves
                    digest.update(tensors[tag + suffix].view(-1).view(torch.uint8).numpy())
    if patches_uuid is not None:
        digest.update(str(patches_uuid).encode())
    ordered = sorted(groups.items(), key=lambda item: item[0][0])  # stable: first seen first
    return PatchSet("comfy-" + digest.hexdigest(),
                    [(strength, modules) for (_, strength), modules in ordered], tensors)
