#!/usr/bin/python3
"""Small LoRA files for tests: every key format and adapter type ComfyUI reads, for Flux and WAN
models with the real weight names (see lora_reference.py for the mapping and arithmetic).

    sd = make_lora(base, "flux", fmt="diffusers", adapter="dora", rank=4, alpha=2.0, seed=1)
    write_lora(path, base, "wan", fmt="kohya", adapter="loha", dtype=torch.bfloat16)

Formats (the module key prefix; `name` is a module name in that format's own namespace):
  native      diffusion_model.<name>  with .lora_up.weight / .lora_down.weight
  native_ab   diffusion_model.<name>  with .lora_B.weight / .lora_A.weight
  bare        <name>                  with .lora_up.weight / .lora_down.weight
  kohya       lora_unet_<name, "." -> "_">
  diffusers   transformer.<diffusers name>  with .lora_B.weight / .lora_A.weight
  lycoris, onetrainer (Flux only): lycoris_<diffusers name_>, lora_transformer_<diffusers name_>
Adapters: lora, lora_mid (LoCon with a Tucker mid; 4-D conv weights only: our models have none,
so use it on a standalone 4-D weight), dora (LoRA + dora_scale), loha, lokr, diff (with diff_b on
the bias where the module's target is a whole .weight with a bias), set (set_weight).

Deltas are sized to `rel` (default 0.05) times the standard deviation of the weight (slice)
they patch, at strength 1, so outputs change visibly and stay finite. Every target's tensors
come from their own generator (seed, index), so the same targets in the same order give the
same tensors in every format.
"""
import math

import torch

import lora_reference as lr
from safetensors_io import save_safetensors

FORMATS = ("native", "native_ab", "bare", "kohya", "diffusers", "lycoris", "onetrainer")
ADAPTERS = ("lora", "lora_mid", "dora", "loha", "lokr", "diff", "set")
LOKR_FORMS = ("w2ab", "w1ab", "both", "full")

_SPELLINGS = {"up_down": (".lora_up.weight", ".lora_down.weight"),
              "ab": (".lora_B.weight", ".lora_A.weight"),
              "_lora": ("_lora.up.weight", "_lora.down.weight"),
              ".lora": (".lora.up.weight", ".lora.down.weight")}


# ---------------------------------------------------------------------------------------------
# Base models.

def flux_weights(hidden=64, heads=2, depth=2, depth_single=2, context=64, vec=32, latent=16,
                 mlp_ratio=4, guidance=True, seed=0, dtype=torch.float32):
    """A random Flux model {name: tensor} with the real names and `fleet gen-model`'s shapes
    (tiny preset by default): linear weights N(0, 1/fan_in), biases N(0, 0.02^2), norm gains
    1 + N(0, 0.1^2). Not the same numbers as gen-model."""
    g = torch.Generator().manual_seed(seed)
    d, head, mlp, feat = hidden, hidden // heads, mlp_ratio * hidden, latent * 4
    out = {}

    def linear(name, o, i):
        out[name + ".weight"] = torch.randn(o, i, generator=g) / math.sqrt(i)
        out[name + ".bias"] = torch.randn(o, generator=g) * 0.02

    def gain(name):
        out[name] = 1.0 + 0.1 * torch.randn(head, generator=g)

    linear("img_in", d, feat)
    linear("time_in.in_layer", d, 256)
    linear("time_in.out_layer", d, d)
    linear("vector_in.in_layer", d, vec)
    linear("vector_in.out_layer", d, d)
    if guidance:
        linear("guidance_in.in_layer", d, 256)
        linear("guidance_in.out_layer", d, d)
    linear("txt_in", d, context)
    for i in range(depth):
        for s in ("img", "txt"):
            p = "double_blocks.%d.%s" % (i, s)
            linear(p + "_mod.lin", 6 * d, d)
            linear(p + "_attn.qkv", 3 * d, d)
            gain(p + "_attn.norm.query_norm.scale")
            gain(p + "_attn.norm.key_norm.scale")
            linear(p + "_attn.proj", d, d)
            linear(p + "_mlp.0", mlp, d)
            linear(p + "_mlp.2", d, mlp)
    for i in range(depth_single):
        p = "single_blocks.%d." % i
        linear(p + "linear1", 3 * d + mlp, d)
        linear(p + "linear2", d, d + mlp)
        gain(p + "norm.query_norm.scale")
        gain(p + "norm.key_norm.scale")
        linear(p + "modulation.lin", 3 * d, d)
    linear("final_layer.linear", feat, d)
    linear("final_layer.adaLN_modulation.1", 2 * d, d)
    return {k: v.to(dtype) for k, v in out.items()}


def wan_weights(variant="t2v", seed=0, dtype=torch.float32, **dims):
    """A random WAN model (wan_reference.random_weights) with small default sizes: dim 128,
    ffn 256, 2 layers, text 64 (`dims` overrides them)."""
    import wan_reference  # noqa: PLC0415
    kw = dict(dim=128, ffn_dim=256, num_layers=2, text_dim=64)
    kw.update(dims)
    w = wan_reference.random_weights(variant, seed=seed, **kw)
    return {k: v.to(dtype) for k, v in w.items()}


# ---------------------------------------------------------------------------------------------
# Module names.

def _strip(name):
    return name[:-len(".weight")] if name.endswith(".weight") else name


def module_prefix(fmt, name):
    """The LoRA key prefix of module `name` (in the format's namespace) in format `fmt`."""
    name = _strip(name)
    if fmt in ("native", "native_ab"):
        return "diffusion_model." + name
    if fmt == "bare":
        return name
    if fmt == "kohya":
        return "lora_unet_" + name.replace(".", "_")
    if fmt == "diffusers":
        return "transformer." + name
    if fmt == "lycoris":
        return "lycoris_" + name.replace(".", "_")
    if fmt == "onetrainer":
        return "lora_transformer_" + name.replace(".", "_")
    raise ValueError("format %r: expected one of %s" % (fmt, ", ".join(FORMATS)))


def resolve(base, family, fmt, name, hidden_size=None):
    """The lora_reference.Target module `name` of format `fmt` patches in model `base`."""
    if family == "flux" and hidden_size is None:
        hidden_size = base["img_in.weight"].shape[0]
    kmap = lr.key_map(base.keys(), family, hidden_size)
    prefix = module_prefix(fmt, name)
    if prefix not in kmap:
        raise ValueError("module %r (%s) names no weight of this %s model" % (name, prefix, family))
    return kmap[prefix]


def default_targets(base, family, fmt, adapter="lora"):
    """A handful of module names (in the format's namespace; those the model has) covering
    blocks, the stem and the head; for diffusers Flux the fused q/k/v and linear1 offsets and norm_out's swapped halves;
    for diff and set also 1-D norm gains (and WAN's modulation where the format can name it)."""
    full = adapter in ("diff", "set")
    diffusers = fmt in ("diffusers", "lycoris", "onetrainer")
    if adapter == "lora_mid":
        names = [_strip(n) for n, t in sorted(base.items()) if t.dim() == 4]
        if not names:
            raise ValueError("lora_mid needs 4-D conv weights; this %s model has none" % family)
        return names
    if family == "flux":
        if diffusers:
            t = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                 "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
                 "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.ff.net.0.proj",
                 "transformer_blocks.1.norm1.linear", "transformer_blocks.1.ff_context.net.2",
                 "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_v",
                 "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_out",
                 "x_embedder", "proj_out", "norm_out.linear"]
            if full:
                t.append("transformer_blocks.0.attn.norm_q")
        else:
            t = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj",
                 "double_blocks.1.img_mlp.0", "double_blocks.1.txt_mod.lin",
                 "single_blocks.0.linear1", "single_blocks.1.linear2", "img_in",
                 "final_layer.linear"]
            if fmt in ("native", "native_ab"):
                t.append("single_blocks.1.linear1_qkv")
            if full and fmt != "kohya":
                t.append("double_blocks.0.img_attn.norm.query_norm.scale")
    elif family == "wan":
        i2v = "blocks.0.cross_attn.k_img.weight" in base
        if diffusers:
            if fmt != "diffusers":
                raise ValueError("format %r is Flux only" % fmt)
            t = ["blocks.0.attn1.to_q", "blocks.0.attn1.to_out.0", "blocks.0.attn2.to_k",
                 "blocks.1.ffn.net.0.proj", "blocks.1.ffn.net.2", "condition_embedder.time_proj",
                 "condition_embedder.text_embedder.linear_1",
                 "condition_embedder.time_embedder.linear_2", "proj_out", "patch_embedding"]
            if i2v:
                t.append("blocks.0.attn2.add_k_proj")
            if full:
                t += ["blocks.0.norm2", "blocks.1.attn1.norm_q"]
        else:
            t = ["blocks.0.self_attn.q", "blocks.0.self_attn.o", "blocks.0.cross_attn.k",
                 "blocks.1.ffn.0", "blocks.1.ffn.2", "patch_embedding", "head.head",
                 "time_projection.1", "text_embedding.0"]
            if i2v:
                t.append("blocks.0.cross_attn.v_img")
            if full:
                t += ["blocks.0.norm3", "blocks.1.self_attn.norm_k"]
                if fmt != "kohya":
                    t.append("blocks.1.modulation")
    else:
        raise ValueError("family %r: expected flux or wan" % (family,))
    # Models with fewer blocks: only the modules the model has.
    kmap = lr.key_map(base.keys(), family, base["img_in.weight"].shape[0] if family == "flux"
                      else None)
    return [n for n in t if module_prefix(fmt, n) in kmap]


# ---------------------------------------------------------------------------------------------
# Writers.

def _divisor(n, most=4):
    """The largest divisor of n that is at most `most` (1 when n is prime and > most)."""
    for d in range(min(most, n), 0, -1):
        if n % d == 0:
            return d
    return 1


def _spelling(fmt, spelling):
    if spelling is None:
        spelling = "up_down" if fmt in ("native", "bare", "kohya") else "ab"
    return _SPELLINGS[spelling]


def _module_tensors(adapter, w, g, *, rank, alpha, rel, index, dora_axis, lokr_form):
    """{part suffix: float32 tensor} of one module patching weight (slice) w (float32)."""
    std = float(w.std()) if w.numel() > 1 else 0.0
    sigma = rel * (std if std > 0 else 0.02)
    shape = tuple(w.shape)
    out, inf = shape[0], math.prod(shape[1:])
    r = rank

    def randn(*s, scale=1.0):
        return torch.randn(*s, generator=g) * scale

    if adapter in ("diff", "set"):
        d = randn(*shape, scale=sigma)
        return {".diff": d} if adapter == "diff" else {".set_weight": w + d}
    if w.dim() < 2:
        raise ValueError("adapter %s needs a weight of 2 or more dimensions, got %s"
                         % (adapter, list(shape)))
    parts = {}
    if adapter in ("lora", "dora", "lora_mid"):
        a_eff = alpha / r if alpha is not None else 1.0
        if adapter == "lora_mid":
            if w.dim() != 4:
                raise ValueError("lora_mid needs a 4-D conv weight, got %s" % list(shape))
            s = (sigma / (a_eff * r)) ** (1.0 / 3.0)
            parts["up"] = randn(out, r, 1, 1, scale=s)
            parts["down"] = randn(r, shape[1], 1, 1, scale=s)
            parts[".lora_mid.weight"] = randn(r, r, shape[2], shape[3], scale=s)
        else:
            s = math.sqrt(sigma / (a_eff * math.sqrt(r)))
            ones = (1,) * (w.dim() - 2)
            parts["up"] = randn(out, r, *ones, scale=s)
            parts["down"] = randn(r, *shape[1:], scale=s)
        if adapter == "dora":
            axis = dora_axis or ("output" if index % 2 == 0 else "input")
            if axis == "output":
                norm = w.reshape(out, -1).norm(dim=1).reshape(out, *(1,) * (w.dim() - 1))
            else:
                norm = w.transpose(0, 1).reshape(shape[1], -1).norm(dim=1) \
                    .reshape(1, shape[1], *(1,) * (w.dim() - 2))
            parts[".dora_scale"] = norm * (1.0 + 0.05 * randn(*norm.shape))
    elif adapter == "loha":
        a_eff = alpha / r if alpha is not None else 1.0
        s = (sigma / (a_eff * r)) ** 0.25
        parts.update({".hada_w1_a": randn(out, r, scale=s), ".hada_w1_b": randn(r, inf, scale=s),
                      ".hada_w2_a": randn(out, r, scale=s), ".hada_w2_b": randn(r, inf, scale=s)})
    elif adapter == "lokr":
        form = lokr_form or LOKR_FORMS[index % len(LOKR_FORMS)]
        a, b = _divisor(out), _divisor(inf)
        c, d = out // a, inf // b
        r1, r2 = max(1, min(r, a, b)), max(1, min(r, c, d))
        dim = {"w2ab": r2, "both": r2, "w1ab": r1, "full": None}[form]
        a_eff = alpha / dim if alpha is not None and dim is not None else 1.0
        # |w1| ~ 1, |w2| ~ sigma / a_eff, so the kron product is ~ sigma after alpha.
        if form in ("w1ab", "both"):
            s1 = r1 ** -0.25
            parts[".lokr_w1_a"] = randn(a, r1, scale=s1)
            parts[".lokr_w1_b"] = randn(r1, b, scale=s1)
        else:
            parts[".lokr_w1"] = randn(a, b)
        if form in ("w2ab", "both"):
            s2 = math.sqrt(sigma / a_eff / math.sqrt(r2))
            parts[".lokr_w2_a"] = randn(c, r2, scale=s2)
            parts[".lokr_w2_b"] = randn(r2, d, scale=s2)
        else:
            parts[".lokr_w2"] = randn(c, d, scale=sigma / a_eff)
    else:
        raise ValueError("adapter %r: expected one of %s" % (adapter, ", ".join(ADAPTERS)))
    return parts


def make_lora(base, family, fmt="native", adapter="lora", *, rank=4, alpha=2.0, seed=0,
              dtype=torch.float32, targets=None, rel=0.05, hidden_size=None, spelling=None,
              dora_axis=None, lokr_form=None, bias=True):
    """A LoRA state dict {key: tensor} for model `base` ({name: tensor}, no file prefix).

    fmt: one of FORMATS; adapter: one of ADAPTERS; targets: module names in the format's
    namespace (default: default_targets); rank, alpha (None: no .alpha key; scale 1); dtype of
    every stored tensor; rel: the size of each delta relative to its weight's std; spelling of
    the LoRA parts ("up_down", "ab", "_lora", ".lora"; default by format); dora_axis ("output",
    "input"; default alternating by target, output first); lokr_form (one of LOKR_FORMS;
    default cycling by target); bias: also write diff_b for adapter "diff"."""
    if adapter not in ADAPTERS:
        raise ValueError("adapter %r: expected one of %s" % (adapter, ", ".join(ADAPTERS)))
    if targets is None:
        targets = default_targets(base, family, fmt, adapter)
    up_name, down_name = _spelling(fmt, spelling)
    sd = {}
    for index, name in enumerate(targets):
        t = resolve(base, family, fmt, name, hidden_size)
        w = base[t.weight].to(torch.float32)
        if t.offset is not None:
            w = w.narrow(*t.offset)
        g = torch.Generator().manual_seed(seed * 100003 + index)
        parts = _module_tensors(adapter, w, g, rank=rank, alpha=alpha, rel=rel, index=index,
                                dora_axis=dora_axis, lokr_form=lokr_form)
        prefix = module_prefix(fmt, name)
        if adapter == "lora_mid" and up_name != ".lora_up.weight":
            raise ValueError("lora_mid needs the lora_up/lora_down spelling")
        for part, v in parts.items():
            key = prefix + {"up": up_name, "down": down_name}.get(part, part)
            sd[key] = v.to(dtype)
        if adapter in ("lora", "lora_mid", "dora", "loha", "lokr") and alpha is not None:
            sd[prefix + ".alpha"] = torch.tensor(float(alpha)).to(dtype)
        if adapter == "diff" and bias and t.offset is None and not t.swap \
                and t.weight.endswith(".weight"):
            b = t.weight[:-len(".weight")] + ".bias"
            if b in base:
                bstd = float(base[b].float().std()) or 0.02
                sd[prefix + ".diff_b"] = (torch.randn(base[b].shape, generator=g)
                                          * rel * bstd).to(dtype)
    return sd


def write_lora(path, base, family, **kw):
    """make_lora(base, family, **kw) written to `path` as safetensors; returns the dict."""
    sd = make_lora(base, family, **kw)
    save_safetensors(sd, path)
    return sd
