"""ComfyUI's text encoders (CLIP-L, T5-XXL, UMT5-XXL) on a Tensorfleet cluster.

`CLIPLoaderTensorfleet` and `DualCLIPLoaderTensorfleet` mirror ComfyUI-MultiGPU's
CLIPLoaderDisTorch2MultiGPU / DualCLIPLoaderDisTorch2MultiGPU input for input: ComfyUI's
CLIPLoader (clip_name, type) / DualCLIPLoader (clip_name1, clip_name2, type), then DisTorch2's
inputs (`device`: DisTorch2 takes over the core node's own device input for its device list,
virtual_vram_gb, donor_device, expert_mode_allocations, eject_models: False for CLIP loaders),
then ours (compute_dtype, keep_loaded, mode, coordinator). Each file is loaded as its own model
on the cluster with these settings.

The CLIP they return is ComfyUI's own comfy.sd.CLIP of the type, built as ComfyUI's
load_text_encoder_state_dicts builds it (same encoder and tokenizer classes) but on the meta
device: nothing is loaded locally. So ComfyUI's tokenizer, prompt weighting, chunking, special
tokens, CLIPSetLastLayer and encode path (CLIPTextEncode, CLIPTextEncodeFlux, WAN's text
encode) run unchanged. Only the compute of each inner SDClipModel is replaced: after ComfyUI's
token handling (process_tokens: the attention mask ends after the first end token; num_tokens),
the token ids go to the cluster with the attention mask when the encoder enables masks,
num_tokens for CLIP, and layer / layer_norm_hidden_state from the encoder's clip options; the
answer is post-processed as SDClipModel.forward does (zero_out_masked, projected or unprojected
pooled output, return_attention_masks).

Types: stable_diffusion (CLIP-L), sd3 (CLIP-L or T5-XXL; dual: CLIP-L + T5-XXL), mochi, ltxv,
pixart, chroma (T5-XXL), wan (UMT5-XXL), flux (dual: CLIP-L + T5-XXL). Other types, files of
another kind than the type needs (decided from the safetensors header before anything loads),
UMT5 GGUF files (their tokenizer lives in GGUF metadata), textual-inversion embeddings in a
prompt and layer "all" are refused by name. T5 GGUF files (llama.cpp's names, as city96's
t5-v1_1-xxl-encoder-*.gguf) are read like ComfyUI-GGUF's CLIP loader reads them: the cluster
translates the names the same way.

LoRA: LoraLoader's strength_clip patches sit on the CLIP's patcher under the cond_stage_model's
keys ("clip_l.transformer.text_model....weight", "t5xxl.transformer.encoder....weight"); each
encoder sends its own (the prefix stripped: the file's weight names) with PutPatches, as
diffusion models do (tensorfleet_patches, tensorfleet_model._Runner).
"""

import importlib
import logging
import numbers
import struct

from . import tensorfleet_model
from . import tensorfleet_nodes as nodes
from .tensorfleet_client import InvalidArgumentError, TensorfleetError

log = logging.getLogger("tensorfleet")

# ComfyUI's CLIPLoader / DualCLIPLoader type choices (nodes.py).
CLIP_LOADER_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv",
                     "pixart", "cosmos", "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2",
                     "qwen_image", "hunyuan_image"]
DUAL_CLIP_LOADER_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"]

FOLDER = "text_encoders"

# What a file is, from its tensor names.
KINDS = {
    "clip_l": "a CLIP-L text encoder",
    "clip_g": "a CLIP-G text encoder",
    "clip_h": "a CLIP-H text encoder",
    "clip_openclip": "a CLIP text encoder in OpenCLIP layout (transformer.resblocks.*)",
    "t5": "a T5 v1.1 encoder (T5-XXL)",
    "t5_old": "an original T5 encoder (non-gated, Cosmos' old T5-XXL)",
    "umt5": "a UMT5 encoder (UMT5-XXL)",
    "flux": "a Flux diffusion model",
    "wan": "a WAN diffusion model",
    "diffusion": "a diffusion model",
    "llm": "an LLM text encoder (Llama / Qwen / Gemma)",
    "unknown": "not a text encoder Tensorfleet knows",
}
# The ComfyUI encoder (its attribute in the cond_stage_model) each kind of file feeds.
_ROLE_KIND = {"clip_l": "clip_l", "t5xxl": "t5", "umt5xxl": "umt5"}
_CLIP_EOS = 49407


def file_kind(header):
    """The kind of a safetensors file (a KINDS key) from its tensor names, as ComfyUI's
    detect_te_model reads them, with UMT5 (relative_attention_bias in every block) told apart
    from T5 (block 0 only)."""
    keys = set(header)
    if "transformer.resblocks.0.ln_1.weight" in keys:
        return "clip_openclip"
    if "text_model.encoder.layers.30.mlp.fc1.weight" in keys:
        return "clip_g"
    if "text_model.encoder.layers.22.mlp.fc1.weight" in keys:
        return "clip_h"
    if "text_model.encoder.layers.0.mlp.fc1.weight" in keys:
        return "clip_l"
    if "encoder.block.0.layer.0.SelfAttention.k.weight" in keys:
        if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in keys:
            return "umt5"
        if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in keys:
            return "t5"
        return "t5_old"
    names = {k[len("model.diffusion_model."):] if k.startswith("model.diffusion_model.") else k
             for k in keys}
    if any(n.startswith("double_blocks.") for n in names):
        return "flux"
    if "patch_embedding.weight" in names or any(n.startswith("blocks.0.self_attn.") for n in names):
        return "wan"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "diffusion"
    if any(k.startswith("model.layers.0.") for k in keys):
        return "llm"
    return "unknown"


# --------------------------------------------------------------- ComfyUI's targets by type

def _m(name):
    return importlib.import_module(name)


def _t5_kwargs(info):
    """What ComfyUI's t5xxl_detect gives the T5 wrappers: dtype_t5 (and t5xxl_scaled_fp8)."""
    out = {}
    if info.get("dtype_t5") is not None:
        out["dtype_t5"] = info["dtype_t5"]
    if info.get("scaled_fp8") is not None:
        out["t5xxl_scaled_fp8"] = info["scaled_fp8"]
    return out


def _sd1(info):
    sd1 = _m("comfy.sd1_clip")
    return sd1.SD1ClipModel, sd1.SD1Tokenizer


def _sd3(clip_l, t5):
    def build(info):
        sd3 = _m("comfy.text_encoders.sd3_clip")
        kw = _t5_kwargs(info) if t5 else {}
        return sd3.sd3_clip(clip_l=clip_l, clip_g=False, t5=t5, **kw), sd3.SD3Tokenizer
    return build


def _t5_family(module, te, tokenizer):
    def build(info):
        m = _m("comfy.text_encoders." + module)
        return getattr(m, te)(**_t5_kwargs(info)), getattr(m, tokenizer)
    return build


def _wan(info):
    wan = _m("comfy.text_encoders.wan")
    return wan.te(**_t5_kwargs(info)), wan.WanT5Tokenizer


def _flux(info):
    flux = _m("comfy.text_encoders.flux")
    return flux.flux_clip(**_t5_kwargs(info)), flux.FluxTokenizer


# type -> {file kind: target builder} (CLIPLoader), as ComfyUI's load_text_encoder_state_dicts
# picks them for one file.
SINGLE = {
    "stable_diffusion": {"clip_l": _sd1},
    "sd3": {"clip_l": _sd3(True, False), "t5": _sd3(False, True)},
    "mochi": {"t5": _t5_family("genmo", "mochi_te", "MochiT5Tokenizer")},
    "ltxv": {"t5": _t5_family("lt", "ltxv_te", "LTXVT5Tokenizer")},
    "pixart": {"t5": _t5_family("pixart_t5", "pixart_te", "PixArtTokenizer")},
    "chroma": {"t5": _t5_family("pixart_t5", "pixart_te", "PixArtTokenizer")},
    "wan": {"umt5": _wan},
}
# type -> {sorted file kinds: target builder} (DualCLIPLoader).
DUAL = {
    "flux": {("clip_l", "t5"): _flux},
    "sd3": {("clip_l", "t5"): _sd3(True, True)},
}
NEEDS = {
    "stable_diffusion": "a CLIP-L text encoder (clip_l)",
    "sd3": "a CLIP-L text encoder (clip_l) or a T5-XXL encoder (t5xxl)",
    "mochi": "a T5-XXL encoder (t5xxl)", "ltxv": "a T5-XXL encoder (t5xxl)",
    "pixart": "a T5-XXL encoder (t5xxl)", "chroma": "a T5-XXL encoder (t5xxl)",
    "wan": "a UMT5-XXL encoder (umt5_xxl)",
}
DUAL_NEEDS = {"flux": "one CLIP-L text encoder (clip_l) and one T5-XXL encoder (t5xxl)",
              "sd3": "one CLIP-L text encoder (clip_l) and one T5-XXL encoder (t5xxl)"}


def _refuse(message):
    raise InvalidArgumentError("Tensorfleet CLIP loader: " + message, "LoadModel")


def _supported_text(table, needs):
    return ", ".join("%s (%s)" % (t, needs[t]) for t in table)


# -------------------------------------------------------------------------- file reading

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


# ComfyUI-GGUF's T5_SD_MAP: llama.cpp's T5 names -> ComfyUI's (each replacement in order).
_LLAMA_CPP_T5 = (("enc.", "encoder."), (".blk.", ".block."), ("token_embd", "shared"),
                 ("output_norm", "final_layer_norm"), ("attn_q", "layer.0.SelfAttention.q"),
                 ("attn_k", "layer.0.SelfAttention.k"), ("attn_v", "layer.0.SelfAttention.v"),
                 ("attn_o", "layer.0.SelfAttention.o"), ("attn_norm", "layer.0.layer_norm"),
                 ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
                 ("ffn_up", "layer.1.DenseReluDense.wi_1"),
                 ("ffn_down", "layer.1.DenseReluDense.wo"),
                 ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
                 ("ffn_norm", "layer.1.layer_norm"))

# GGUF metadata value types: fixed sizes, 8 = string, 9 = array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_MAX_COUNT = 1 << 24


def _read_gguf_names(path):
    """The tensor names of a GGUF file (llama.cpp's T5 names translated as ComfyUI-GGUF does),
    as a header-like {name: {}}, or None when it is not readable as GGUF."""
    def take(f, n):
        data = f.read(n)
        if len(data) != n:
            raise ValueError("truncated")
        return data

    def u32(f):
        return struct.unpack("<I", take(f, 4))[0]

    def u64(f):
        return struct.unpack("<Q", take(f, 8))[0]

    def string(f):
        n = u64(f)
        if n > 1 << 20:
            raise ValueError("string too long")
        return take(f, n).decode("utf-8", "replace")

    def skip(f, vtype):
        if vtype == 8:
            string(f)
        elif vtype == 9:
            inner, n = u32(f), u64(f)
            if n > _GGUF_MAX_COUNT:
                raise ValueError("array too long")
            if inner in _GGUF_SIZES:
                take(f, _GGUF_SIZES[inner] * n)
            else:
                for _ in range(n):
                    skip(f, inner)
        elif vtype in _GGUF_SIZES:
            take(f, _GGUF_SIZES[vtype])
        else:
            raise ValueError("unknown value type %d" % vtype)

    try:
        with open(path, "rb") as f:
            if take(f, 4) != b"GGUF" or u32(f) < 2:
                return None
            tensors, kvs = u64(f), u64(f)
            if tensors > _GGUF_MAX_COUNT or kvs > _GGUF_MAX_COUNT:
                return None
            for _ in range(kvs):
                string(f)
                skip(f, u32(f))
            names = []
            for _ in range(tensors):
                names.append(string(f))
                dims = u32(f)
                if dims > 8:
                    return None
                take(f, 8 * dims + 4 + 8)  # dims, type, offset
    except (OSError, ValueError, UnicodeError):
        return None
    if "enc.output_norm.weight" in names:
        translated = []
        for name in names:
            for old, new in _LLAMA_CPP_T5:
                name = name.replace(old, new)
            translated.append(name)
        names = translated
    return {n: {} for n in names}


def _read_tensor(path, header, start, name):
    """One uint8 tensor of the file (ComfyUI's spiece_model: the tokenizer a UMT5 file
    carries), or None."""
    import torch  # noqa: PLC0415

    entry = header.get(name)
    if not entry or entry.get("dtype") != "U8":
        return None
    a, b = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + a)
        data = f.read(b - a)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _describe(name):
    """{name, path, header, kind, ...} of a text-encoder file from ComfyUI's folder."""
    import folder_paths  # noqa: PLC0415 - ComfyUI module
    import torch  # noqa: PLC0415

    try:
        path = folder_paths.get_full_path(FOLDER, name)
    except Exception:  # noqa: BLE001 - some versions raise for unknown names
        path = None
    gguf = name.lower().endswith(".gguf")
    if gguf:
        header = _read_gguf_names(path) if path else None
        read = None if header is None else (header, 0)
    else:
        read = tensorfleet_model.read_safetensors_header_and_start(path) if path else None
    if read is None:
        _refuse("cannot read '%s' as a %s file in ComfyUI's %s folder (%s); the loader reads its "
                "header to tell what kind of text encoder it is"
                % (name, "GGUF" if gguf else "safetensors", FOLDER, path or "not found"))
    header, start = read
    info = {"name": name, "path": path, "header": header, "start": start,
            "kind": file_kind(_unprefixed(header))}
    if gguf and info["kind"] == "umt5":
        _refuse("'%s' is a UMT5 GGUF file: its tokenizer is stored in GGUF metadata, which this "
                "loader cannot read yet (the cluster runs the file); use the .safetensors UMT5 "
                "(umt5_xxl_fp8_e4m3fn_scaled.safetensors) with this loader" % name)
    norm = header.get("encoder.final_layer_norm.weight")
    if norm is not None:
        info["dtype_t5"] = getattr(torch, _ST_DTYPES.get(norm.get("dtype"), "float32"))
    if "scaled_fp8" in header:
        info["scaled_fp8"] = getattr(torch, _ST_DTYPES.get(header["scaled_fp8"].get("dtype"),
                                                           "float8_e4m3fn"))
    info["has_projection"] = "text_projection.weight" in header
    return info


_PROBES = ("text_model.encoder.layers.0.mlp.fc1.weight",
           "encoder.block.0.layer.0.SelfAttention.k.weight")


def _unprefixed(header):
    """The header with a container prefix (e.g. "text_encoders.t5xxl.transformer.", which the
    cluster strips too) taken off the names, when the file has one."""
    for key in header:
        for probe in _PROBES:
            if key.endswith(probe) and key != probe:
                prefix = key[:-len(probe)]
                return {k[len(prefix):] if k.startswith(prefix) else k: v
                        for k, v in header.items()}
    return header


def _kind_text(info):
    return "'%s' is %s" % (info["name"], KINDS[info["kind"]])


# ------------------------------------------------------------------------- the CLIP object

class _ClipState:
    """Shared by a CLIP and its clones (they share the cond_stage_model): the patcher whose
    patches the encoders apply, set by CLIP.load_model as ComfyUI's patches the weights there."""

    def __init__(self):
        self.patcher = None
        self.prefixes = ()


class _Binding:
    """What one inner encoder needs to run on the cluster."""

    def __init__(self, runner, info, prefix, state):
        self.runner = runner
        self.info = info
        self.prefix = prefix
        self.state = state
        self.is_clip = info["kind"] == "clip_l"


class _RemoteEncoder:
    """Mixed into an SDClipModel (by class swap): forward runs on the cluster. Everything else
    (encode_token_weights, set_clip_options, gen_empty_tokens, ...) stays ComfyUI's."""

    def forward(self, tokens):
        import torch  # noqa: PLC0415

        b = self._tensorfleet
        ids, attention_mask, num_tokens = _process_tokens(self, tokens, b)
        inputs = {"tokens": ids}
        if self.enable_attention_masks:
            inputs["attention_mask"] = attention_mask
        if b.is_clip:
            inputs["num_tokens"] = torch.tensor(num_tokens, dtype=torch.long)
        if self.layer == "hidden":
            inputs["layer"] = torch.tensor([int(self.layer_idx)], dtype=torch.long)
            inputs["layer_norm_hidden_state"] = torch.tensor(
                [1 if self.layer_norm_hidden_state else 0], dtype=torch.long)
        elif self.layer != "last":
            raise tensorfleet_model.UnsupportedConditioningError(
                "Tensorfleet does not support the text encoder output layer '%s' (of '%s') "
                "yet; it returns the last hidden state or one layer's (CLIPSetLastLayer)"
                % (self.layer, b.info["name"]))
        outputs = b.runner.forward_outputs(inputs, b.state.patcher)
        z = torch.as_tensor(outputs["out"]).float()
        if self.zero_out_masked:
            z *= attention_mask.unsqueeze(-1).float()
        pooled = None
        if b.is_clip:
            if not self.return_projected_pooled:
                pooled = torch.as_tensor(outputs["pooled"]).float()
            elif "pooled_projected" in outputs:
                pooled = torch.as_tensor(outputs["pooled_projected"]).float()
            else:
                raise tensorfleet_model.UnsupportedConditioningError(
                    "Tensorfleet: '%s' has no text_projection.weight, and this encoder returns "
                    "the projected pooled output" % b.info["name"])
        if self.return_attention_masks:
            return z, pooled, {"attention_mask": attention_mask}
        return z, pooled


def _process_tokens(encoder, tokens, binding):
    """ComfyUI's SDClipModel.process_tokens for integer tokens: [B, L] ids, the attention mask
    (1 up to and including the first end token, or before the first pad token when the encoder
    has no end token; 0 after) and num_tokens (its sum per row). Anything else in the tokens
    (textual-inversion embeddings, image embeds) is refused by name."""
    import torch  # noqa: PLC0415

    end = encoder.special_tokens.get("end", None)
    cmp_token = encoder.special_tokens.get("pad", -1) if end is None else end
    rows, masks, counts = [], [], []
    for x in tokens:
        row, mask, eos = [], [], False
        for y in x:
            if not isinstance(y, numbers.Integral):
                if torch.is_tensor(y):
                    what = "a textual-inversion embedding (embedding:NAME in the prompt)"
                elif isinstance(y, dict):
                    what = "an embedding of type '%s'" % y.get("type", "?")
                else:
                    what = "a non-integer token %r" % (y,)
                raise tensorfleet_model.UnsupportedConditioningError(
                    "Tensorfleet does not support %s in a prompt for '%s' yet: the cluster "
                    "takes token ids only. Remove it from the prompt." % (what,
                                                                          binding.info["name"]))
            mask.append(0 if eos else 1)
            token = int(y)
            row.append(token)
            if not eos and token == cmp_token:
                if end is None:
                    mask[-1] = 0
                eos = True
        rows.append(row)
        masks.append(mask)
        counts.append(sum(mask))
    if len({len(r) for r in rows}) > 1:
        raise tensorfleet_model.UnsupportedConditioningError(
            "Tensorfleet: the token rows for '%s' differ in length (%s)"
            % (binding.info["name"], sorted({len(r) for r in rows})))
    return (torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long), counts)


_encoder_classes = {}
_clip_class_cache = []


def _remote_class(cls):
    sub = _encoder_classes.get(cls)
    if sub is None:
        sub = type("Tensorfleet" + cls.__name__, (_RemoteEncoder, cls), {})
        _encoder_classes[cls] = sub
    return sub


def clip_class():
    """comfy.sd.CLIP with the weights on the cluster: load_model does not move weights (there
    are none here) but hands the clone's patches to the encoders, clone keeps the class, and
    the state dict is not available."""
    if _clip_class_cache:
        return _clip_class_cache[0]
    import comfy.sd  # noqa: PLC0415 - ComfyUI module

    class TensorfleetCLIP(comfy.sd.CLIP):
        def clone(self):
            n = super().clone()
            n.__class__ = type(self)
            n.tensorfleet = self.tensorfleet
            return n

        def load_model(self):
            state = self.tensorfleet
            problems = []
            if getattr(self, "use_clip_schedule", False) and \
                    getattr(self.patcher, "forced_hooks", None) is not None:
                problems.append("scheduled CLIP hooks (use_clip_schedule)")
            if any(getattr(self.patcher, "hook_patches", {}) or {}):
                problems.append("hooked LoRA / weight patches on the CLIP (hook_patches)")
            stray = sorted(k for k in (getattr(self.patcher, "patches", None) or {})
                           if not any(k.startswith(p) for p in state.prefixes))
            if stray:
                problems.append("weight patches outside the text encoders' weights (%s)"
                                % ", ".join(stray[:3]))
            if problems:
                raise tensorfleet_model.UnsupportedConditioningError(
                    "Tensorfleet does not support %s yet; it refuses rather than ignoring it."
                    % "; ".join(problems))
            state.patcher = self.patcher
            return self.patcher

        def get_sd(self):
            raise TensorfleetError("Tensorfleet: this CLIP's weights live on the cluster; "
                                   "there is no state dict to save here", "LoadModel")

    _clip_class_cache.append(TensorfleetCLIP)
    return TensorfleetCLIP


def build_clip(target, infos, loaded):
    """ComfyUI's CLIP for `target` ((clip class, tokenizer class)) on the meta device, each
    inner encoder bound to the cluster model of its file. infos: file descriptions; loaded:
    {file name: (address, spec, ModelInfo)}."""
    import folder_paths  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import comfy.sd1_clip  # noqa: PLC0415

    clip_cls, tokenizer_cls = target
    tokenizer_data = {}
    for info in infos:
        if info["kind"] == "umt5" and "spiece_model" in info["header"]:
            tokenizer_data["spiece_model"] = _read_tensor(info["path"], info["header"],
                                                          info["start"], "spiece_model")

    class _Target:
        pass

    t = _Target()
    t.params = {}
    t.clip = clip_cls
    t.tokenizer = tokenizer_cls
    try:
        embeddings = folder_paths.get_folder_paths("embeddings")
    except Exception:  # noqa: BLE001
        embeddings = None
    cpu = torch.device("cpu")
    model_options = {"initial_device": torch.device("meta"), "load_device": cpu,
                     "offload_device": cpu}
    clip = clip_class()(t, embedding_directory=embeddings, tokenizer_data=tokenizer_data,
                        model_options=model_options)
    state = _ClipState()
    clip.tensorfleet = state
    by_kind = {info["kind"]: info for info in infos}
    prefixes = []
    for name, module in clip.cond_stage_model.named_modules():
        if not isinstance(module, comfy.sd1_clip.SDClipModel) or not name:
            continue
        role = name.rsplit(".", 1)[-1]
        kind = _ROLE_KIND.get(role)
        info = by_kind.get(kind)
        if info is None:
            raise TensorfleetError("Tensorfleet: ComfyUI's text encoder '%s' has no file among "
                                   "%s" % (name, [i["name"] for i in infos]), "LoadModel")
        address, spec, model_info = loaded[info["name"]]
        prefix = name + ".transformer."
        runner = tensorfleet_model._Runner(nodes.client_for, address, spec, model_info.name,
                                           constant_inputs=(), patch_prefix=prefix,
                                           patch_what="the text encoder '%s'" % name)
        module.__class__ = _remote_class(type(module))
        module._tensorfleet = _Binding(runner, info, prefix, state)
        prefixes.append(prefix)
    state.prefixes = tuple(prefixes)
    return clip


# -------------------------------------------------------------------------- the loaders

def _clip_distorch_inputs():
    """DisTorch2's inputs as its CLIP loaders have them: `device` (the core node's own device
    input, taken over for the device list) first, eject_models False."""
    upstream = nodes._distorch_inputs()
    out = {"device": upstream.pop("compute_device")}
    out.update(upstream)
    out["eject_models"] = ("BOOLEAN", dict(upstream["eject_models"][1], default=False))
    return out


def _validate(device=None, donor_device=None):
    for name, value in (("device", device), ("donor_device", donor_device)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            return "%s must be a device name such as cuda:0 or cpu, got %r" % (name, value)
    return True


def _load_files(infos, device, coordinator, **inputs):
    loaded = {}
    for info in infos:
        if info["name"] in loaded:
            continue
        address, spec, model_info = nodes.load_on_cluster(
            info["name"], coordinator, compute_device=device, **inputs)
        if model_info.family and model_info.family != "text-encoder":
            _refuse("the cluster loaded '%s' as a '%s' model, not a text encoder"
                    % (info["name"], model_info.family))
        loaded[info["name"]] = (address, spec, model_info)
    return loaded


def load_clip(names, clip_type, dual, device="cuda:0", coordinator=None, **inputs):
    """The loaders' work: describe the files, pick ComfyUI's target for the type, load the
    files on the cluster, build the CLIP."""
    infos = [_describe(n) for n in names]
    if dual:
        table = DUAL.get(clip_type)
        if table is None:
            _refuse("DualCLIPLoader type '%s' is not supported by Tensorfleet yet; it supports "
                    "%s" % (clip_type, _supported_text(DUAL, DUAL_NEEDS)))
        key = tuple(sorted(i["kind"] for i in infos))
        build = table.get(key)
        if build is None:
            _refuse("type '%s' needs %s; %s" % (clip_type, DUAL_NEEDS[clip_type],
                                                " and ".join(_kind_text(i) for i in infos)))
    else:
        table = SINGLE.get(clip_type)
        if table is None:
            _refuse("CLIPLoader type '%s' is not supported by Tensorfleet yet; it supports %s"
                    % (clip_type, _supported_text(SINGLE, NEEDS)))
        build = table.get(infos[0]["kind"])
        if build is None:
            _refuse("%s; type '%s' needs %s" % (_kind_text(infos[0]), clip_type,
                                                NEEDS[clip_type]))
    t5 = next((i for i in infos if i["kind"] in ("t5", "umt5")), {})
    target = build(t5)
    loaded = _load_files(infos, device, coordinator, **inputs)
    clip = build_clip(target, infos, loaded)
    return (clip,)


class CLIPLoaderTensorfleet:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_name": (nodes._model_files(folder=FOLDER),),
                "type": (CLIP_LOADER_TYPES,),
            },
            "optional": dict(_clip_distorch_inputs(), **nodes._extra_inputs(sizes=False)),
        }

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = nodes.CATEGORY
    DESCRIPTION = ("Loads a text encoder (CLIP-L, T5-XXL, UMT5-XXL) on a Tensorfleet cluster and "
                   "returns ComfyUI's CLIP for the type: tokenizing and prompt weighting stay in "
                   "ComfyUI, the encoder runs on the cluster.\n\nstable_diffusion: clip-l\n"
                   "sd3: clip-l or t5 xxl\nmochi, ltxv, pixart, chroma: t5 xxl\nwan: umt5 xxl")

    @classmethod
    def VALIDATE_INPUTS(cls, device=None, donor_device=None):
        return _validate(device, donor_device)

    def load_clip(self, clip_name, type="stable_diffusion", device="cuda:0", **inputs):  # noqa: A002
        return load_clip([clip_name], type, False, device, **inputs)


class DualCLIPLoaderTensorfleet:
    @classmethod
    def INPUT_TYPES(cls):
        names = nodes._model_files(folder=FOLDER)
        return {
            "required": {
                "clip_name1": (names,),
                "clip_name2": (names,),
                "type": (DUAL_CLIP_LOADER_TYPES,),
            },
            "optional": dict(_clip_distorch_inputs(), **nodes._extra_inputs(sizes=False)),
        }

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = nodes.CATEGORY
    DESCRIPTION = ("Loads two text encoders on a Tensorfleet cluster and returns ComfyUI's CLIP "
                   "for the type.\n\nflux: clip-l, t5 xxl\nsd3: clip-l, t5 xxl")

    @classmethod
    def VALIDATE_INPUTS(cls, device=None, donor_device=None):
        return _validate(device, donor_device)

    def load_clip(self, clip_name1, clip_name2, type, device="cuda:0", **inputs):  # noqa: A002
        return load_clip([clip_name1, clip_name2], type, True, device, **inputs)


NODE_CLASS_MAPPINGS = {
    "CLIPLoaderTensorfleet": CLIPLoaderTensorfleet,
    "DualCLIPLoaderTensorfleet": DualCLIPLoaderTensorfleet,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CLIPLoaderTensorfleet": "Load CLIP (Tensorfleet)",
    "DualCLIPLoaderTensorfleet": "DualCLIPLoader (Tensorfleet)",
}
