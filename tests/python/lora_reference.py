#!/usr/bin/python3
"""An independent float32 reference of ComfyUI's LoRA arithmetic (comfy/lora.py load_lora,
model_lora_keys_unet, calculate_weight; comfy/weight_adapter/{lora,loha,lokr,base}.py), written
from their description, for the families Tensorfleet runs (Flux, WAN). The C++ patches
(fleet::models::ApplyPatches, fleet run-local --lora / --dump-weights) are compared against it.

    patched_weights(base, family, hidden_size, [(lora_state_dict, strength), ...])

Key mapping (a LoRA "module" is a key prefix; its parts are "<module>.lora_up.weight",
"<module>.alpha", ...). A module names a target weight, optionally an offset (dim, start, length)
into a fused weight, optionally "swap" (diffusers' norm_out.linear stores (scale, shift) where
Flux stores (shift, scale): ComfyUI's swap_scale_shift swaps the two halves of the *patch* along
dim 0 before adding it):

* native   diffusion_model.<name without .weight>, and the bare <name without .weight>
           (names not ending in .weight, e.g. WAN's blocks.0.modulation, map as themselves);
* kohya    lora_unet_<name without .weight, "." -> "_"> (only names ending in .weight);
* Flux diffusers: transformer.<diffusers name> (also lycoris_<name_> and lora_transformer_<name_>)
           from ComfyUI's flux_to_diffusers: attn.to_q/to_k/to_v -> img_attn.qkv rows
           [0,h) [h,2h) [2h,3h), attn.add_q_proj/... -> txt_attn.qkv, single blocks' attn.to_q/k/v
           and proj_mlp -> linear1 rows [0,h) [h,2h) [2h,3h) [3h,7h); and the renames;
           also diffusion_model.single_blocks.N.linear1_qkv -> linear1 rows [0, 3h);
* WAN diffusers (our extension; names of diffusers' WAN conversion): transformer.blocks.N.attn1.*
           -> self_attn.*, attn2.* -> cross_attn.*, norm2 -> norm3, ... (WAN_DIFFUSERS below).
Modules for a text encoder (lora_te*, text_encoders.*, text_encoder(_2).*) are ignored.

Arithmetic: each patched weight is a float32 copy of the base weight; the patches of every LoRA
are applied in order (LoRA files in the order given; within one file the patches of a weight
never overlap, so their order does not matter); an offset patch applies to
weight.narrow(dim, start, length); the result is rounded to nearest into the base dtype.
Op for op as ComfyUI (float32, same op order), so on the CPU it gives ComfyUI's bits.

Where ComfyUI only logs and carries on, this reference raises LoraError (the C++ refuses too):
no module matched, a patch whose shape does not fit its weight, an up/down rank mismatch, parts
missing, a non-finite strength or alpha, two modules of one file patching overlapping parts of
a weight, diff_b on a module whose target is an offset/swapped slice (ComfyUI silently drops
it). GLoRA, OFT, BOFT and reshape_weight raise UnsupportedAdapter naming them.
"""
import math
from collections import namedtuple

import torch

__all__ = ["LoraError", "UnsupportedAdapter", "Target", "Patch", "key_map", "match_lora",
           "apply_patch", "apply_module", "patched_weights", "swap_halves"]


class LoraError(ValueError):
    """A LoRA the reference (and the C++) refuses."""


class UnsupportedAdapter(LoraError):
    """An adapter ComfyUI knows but Tensorfleet refuses (GLoRA, OFT, BOFT, reshape_weight)."""


# weight: model weight name (no file prefix); offset: None or (dim, start, length);
# swap: swap the patch's halves along dim 0 (diffusers norm_out.linear).
Target = namedtuple("Target", "weight offset swap")

# kind: "lora" | "loha" | "lokr" | "diff" | "set"; tensors: part name -> tensor;
# alpha: float or None; dora_scale: tensor or None; module: the file's key prefix.
Patch = namedtuple("Patch", "module kind tensors alpha dora_scale target")


# ---------------------------------------------------------------------------------------------
# Key mapping.

def _stem(name):
    return name[:-len(".weight")] if name.endswith(".weight") else name


def _flux_diffusers(names, h):
    """{diffusers module name: Target} for the weights present (ComfyUI's flux_to_diffusers,
    .weight entries only, as model_lora_keys_unet uses them)."""
    out = {}
    doubles = sorted({int(n.split(".")[1]) for n in names if n.startswith("double_blocks.")})
    singles = sorted({int(n.split(".")[1]) for n in names if n.startswith("single_blocks.")})
    for i in doubles:
        src, dst = "transformer_blocks.%d." % i, "double_blocks.%d." % i
        for j, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"),
                                        ("to_v", "add_v_proj"))):
            out[src + "attn." + img] = Target(dst + "img_attn.qkv.weight", (0, j * h, h), False)
            out[src + "attn." + txt] = Target(dst + "txt_attn.qkv.weight", (0, j * h, h), False)
        for a, b in (("attn.to_out.0", "img_attn.proj.weight"),
                     ("norm1.linear", "img_mod.lin.weight"),
                     ("norm1_context.linear", "txt_mod.lin.weight"),
                     ("attn.to_add_out", "txt_attn.proj.weight"),
                     ("ff.net.0.proj", "img_mlp.0.weight"),
                     ("ff.net.2", "img_mlp.2.weight"),
                     ("ff_context.net.0.proj", "txt_mlp.0.weight"),
                     ("ff_context.net.2", "txt_mlp.2.weight"),
                     ("attn.norm_q", "img_attn.norm.query_norm.scale"),
                     ("attn.norm_k", "img_attn.norm.key_norm.scale"),
                     ("attn.norm_added_q", "txt_attn.norm.query_norm.scale"),
                     ("attn.norm_added_k", "txt_attn.norm.key_norm.scale")):
            out[src + a] = Target(dst + b, None, False)
    for i in singles:
        src, dst = "single_transformer_blocks.%d." % i, "single_blocks.%d." % i
        for j, n in enumerate(("to_q", "to_k", "to_v")):
            out[src + "attn." + n] = Target(dst + "linear1.weight", (0, j * h, h), False)
        out[src + "proj_mlp"] = Target(dst + "linear1.weight", (0, 3 * h, 4 * h), False)
        for a, b in (("norm.linear", "modulation.lin.weight"), ("proj_out", "linear2.weight"),
                     ("attn.norm_q", "norm.query_norm.scale"),
                     ("attn.norm_k", "norm.key_norm.scale")):
            out[src + a] = Target(dst + b, None, False)
    for a, b in (("proj_out", "final_layer.linear.weight"), ("x_embedder", "img_in.weight"),
                 ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer.weight"),
                 ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer.weight"),
                 ("context_embedder", "txt_in.weight"),
                 ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer.weight"),
                 ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer.weight"),
                 ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer.weight"),
                 ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer.weight"),
                 ("controlnet_x_embedder", "pos_embed_input.weight")):
        out[a] = Target(b, None, False)
    out["norm_out.linear"] = Target("final_layer.adaLN_modulation.1.weight", None, True)
    return {k: t for k, t in out.items() if t.weight in names}


# Diffusers' WAN names (its conversion script's renames; diffusers' norm2 is WAN's norm3).
WAN_DIFFUSERS_BLOCK = (
    ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"), ("attn1.norm_q", "self_attn.norm_q"),
    ("attn1.norm_k", "self_attn.norm_k"),
    ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"), ("attn2.to_v", "cross_attn.v"),
    ("attn2.to_out.0", "cross_attn.o"), ("attn2.add_k_proj", "cross_attn.k_img"),
    ("attn2.add_v_proj", "cross_attn.v_img"), ("attn2.norm_q", "cross_attn.norm_q"),
    ("attn2.norm_k", "cross_attn.norm_k"),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("norm2", "norm3"))
WAN_DIFFUSERS_TOP = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("proj_out", "head.head"), ("patch_embedding", "patch_embedding"))


def _wan_diffusers(names):
    out = {}
    blocks = sorted({int(n.split(".")[1]) for n in names if n.startswith("blocks.")})
    for i in blocks:
        for a, b in WAN_DIFFUSERS_BLOCK:
            out["blocks.%d.%s" % (i, a)] = Target("blocks.%d.%s.weight" % (i, b), None, False)
    for a, b in WAN_DIFFUSERS_TOP:
        out[a] = Target(b + ".weight", None, False)
    return {k: t for k, t in out.items() if t.weight in names}


def key_map(names, family, hidden_size=None):
    """{LoRA module prefix: Target} for a model of `family` ("flux" or "wan") whose weights are
    `names` (no file prefix). hidden_size places Flux's diffusers q/k/v patches."""
    names = set(names)
    if family not in ("flux", "wan"):
        raise LoraError("family %r: expected flux or wan" % (family,))
    m = {}
    for n in sorted(names):
        t = Target(n, None, False)
        m["diffusion_model." + _stem(n)] = t
        m[_stem(n)] = t
        if n.endswith(".weight"):
            m["lora_unet_" + _stem(n).replace(".", "_")] = t
    if family == "flux":
        h = hidden_size
        if h is None:
            h = 0
        for n in sorted(names):
            if n.startswith("single_blocks.") and n.endswith(".linear1.weight"):
                m["diffusion_model." + n.replace(".linear1.weight", ".linear1_qkv")] = \
                    Target(n, (0, 0, 3 * h), False)
        for k, t in _flux_diffusers(names, h).items():
            m["transformer." + k] = t
            m["lycoris_" + k.replace(".", "_")] = t
            m["lora_transformer_" + k.replace(".", "_")] = t
    else:
        for k, t in _wan_diffusers(names).items():
            m["transformer." + k] = t
    return m


def _is_text_encoder(key):
    return key.startswith(("lora_te", "text_encoders.", "text_encoder.", "text_encoder_2."))


# ---------------------------------------------------------------------------------------------
# Reading one module (ComfyUI's load_lora and the adapters' load).

# (up, down, mid) spellings, in ComfyUI's order of preference.
_LORA_SPELLINGS = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B", ".lora_A", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
)
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _need(sd, key, module, used):
    if key not in sd:
        raise LoraError("LoRA module %s: %s is missing" % (module, key))
    used.add(key)
    return sd[key]


def _read_module(sd, x, target, used):
    """The patches of module x (a list: the weight's, and diff_b's on the bias), marking the
    keys it reads in `used`. ComfyUI's precedence: every adapter class is tried in turn (LoRA,
    LoHa, LoKr, then GLoRA, OFT, BOFT) and a later one replaces an earlier; then w_norm, diff
    and set_weight each replace what was there."""
    def has(s):
        return x + s in sd
    for part, name in ((".a1.weight", "GLoRA"), (".oft_blocks", "OFT/BOFT"),
                       (".reshape_weight", "reshape_weight")):
        if has(part):
            if part == ".oft_blocks":
                name = "BOFT" if sd[x + part].dim() == 4 else "OFT"
            raise UnsupportedAdapter("LoRA module %s: %s is not supported (%s%s)"
                                     % (x, name, x, part))
    alpha = None
    if has(".alpha"):
        used.add(x + ".alpha")
        alpha = float(sd[x + ".alpha"].item())
        if not math.isfinite(alpha):
            raise LoraError("LoRA module %s: alpha %r is not finite" % (x, alpha))
    dora = None
    if has(".dora_scale"):
        used.add(x + ".dora_scale")
        dora = sd[x + ".dora_scale"]
    weight_patch = None
    for up, down, mid in _LORA_SPELLINGS:
        if has(up):
            t = {"up": _need(sd, x + up, x, used), "down": _need(sd, x + down, x, used)}
            if mid is not None and has(mid):
                t["mid"] = _need(sd, x + mid, x, used)
            weight_patch = Patch(x, "lora", t, alpha, dora, target)
            break
    if has(".hada_w1_a"):
        t = {n: _need(sd, "%s.%s" % (x, n), x, used) for n in _LOHA[:4]}
        if has(".hada_t1") or has(".hada_t2"):
            t["hada_t1"] = _need(sd, x + ".hada_t1", x, used)
            t["hada_t2"] = _need(sd, x + ".hada_t2", x, used)
        weight_patch = Patch(x, "loha", t, alpha, dora, target)
    if any(has("." + n) for n in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
        t = {}
        for n in _LOKR:
            if has("." + n):
                t[n] = _need(sd, "%s.%s" % (x, n), x, used)
        if "lokr_w1" not in t and not ("lokr_w1_a" in t and "lokr_w1_b" in t):
            raise LoraError("LoRA module %s: LoKr needs lokr_w1 or lokr_w1_a and lokr_w1_b" % x)
        if "lokr_w2" not in t and not ("lokr_w2_a" in t and "lokr_w2_b" in t):
            raise LoraError("LoRA module %s: LoKr needs lokr_w2 or lokr_w2_a and lokr_w2_b" % x)
        weight_patch = Patch(x, "lokr", t, alpha, dora, target)
    bias_patch = None
    if has(".w_norm"):
        weight_patch = Patch(x, "diff", {"diff": _need(sd, x + ".w_norm", x, used)}, None, None,
                             target)
        if has(".b_norm"):
            bias_patch = _need(sd, x + ".b_norm", x, used)
    if has(".diff"):
        weight_patch = Patch(x, "diff", {"diff": _need(sd, x + ".diff", x, used)}, None, None,
                             target)
    if has(".diff_b"):
        bias_patch = _need(sd, x + ".diff_b", x, used)
    if has(".set_weight"):
        weight_patch = Patch(x, "set", {"set": _need(sd, x + ".set_weight", x, used)}, None,
                             None, target)
    patches = [weight_patch] if weight_patch is not None else []
    if bias_patch is not None:
        if target.offset is not None or target.swap or not target.weight.endswith(".weight"):
            raise LoraError("LoRA module %s: diff_b on %s%s has no bias to patch (ComfyUI drops "
                            "it)" % (x, target.weight, " slice %s" % (target.offset,)
                                     if target.offset else ""))
        bias = Target(target.weight[:-len(".weight")] + ".bias", None, False)
        patches.append(Patch(x, "diff", {"diff": bias_patch}, None, None, bias))
    return patches


def match_lora(lora_sd, kmap):
    """(patches, unmatched_keys): the patches of a LoRA state dict under key map `kmap`
    (from key_map), in the file's module order, and the keys no module used (text-encoder
    keys are neither). Raises LoraError when no module matched, naming some keys."""
    used = set()
    patches = []
    # The modules: every prefix of a key, ending before a "." or "_", that the map knows (all
    # part names start with one of them), as ComfyUI tries every prefix of its map.
    modules = []
    seen = set()
    for key in sorted(lora_sd):
        for cut in range(len(key) - 1, 0, -1):
            if key[cut] not in "._":
                continue
            p = key[:cut]
            if p in kmap and p not in seen:
                seen.add(p)
                modules.append(p)
    for x in modules:
        patches.extend(_read_module(lora_sd, x, kmap[x], used))
    unmatched = [k for k in sorted(lora_sd) if k not in used and not _is_text_encoder(k)]
    if not patches:
        model_keys = [k for k in sorted(lora_sd) if not _is_text_encoder(k)]
        raise LoraError("LoRA matches no weight of the model: 0 of %d keys matched (e.g. %s)"
                        % (len(model_keys), ", ".join(model_keys[:3]) or "none"))
    # One patch per weight region per file.
    by_weight = {}
    for p in patches:
        for q in by_weight.get(p.target.weight, []):
            if _overlap(p.target.offset, q.target.offset):
                raise LoraError("LoRA modules %s and %s both patch %s" % (
                    q.module, p.module, p.target.weight))
        by_weight.setdefault(p.target.weight, []).append(p)
    return patches, unmatched


def _overlap(a, b):
    if a is None or b is None or a[0] != b[0]:
        return True
    return a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


# ---------------------------------------------------------------------------------------------
# Arithmetic (ComfyUI's calculate_weight and the adapters' calculate_weight), in place on a
# float32 view.

def swap_halves(t):
    """ComfyUI's swap_scale_shift: the two halves of t along dim 0, swapped."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _f32(t):
    return t.to(torch.float32)


def _check_rows(diff_shape0, numel, w, p):
    if diff_shape0 != w.shape[0] or numel != w.numel():
        raise LoraError("LoRA module %s: its %s patch has %d rows and %d values, %s%s has shape "
                        "%s" % (p.module, p.kind, diff_shape0, numel, p.target.weight,
                                " slice %s" % (p.target.offset,) if p.target.offset else "",
                                list(w.shape)))


def _weight_decompose(dora_scale, w, diff, alpha, strength, fn):
    """ComfyUI's weight_decompose (DoRA), in place on w."""
    dora_scale = _f32(dora_scale)
    diff *= alpha
    calc = w + fn(diff)
    if dora_scale.shape[0] == calc.shape[0]:
        # The output axis: the norm of the ORIGINAL weight, not of weight + diff.
        norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True) \
            .reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True) \
            .reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    norm = norm + torch.finfo(w.dtype).eps
    calc *= (dora_scale / norm)
    if strength != 1.0:
        calc -= w
        w += strength * calc
    else:
        w[:] = calc
    return w


def _finish(w, p, diff, alpha, strength, fn):
    if p.dora_scale is not None:
        return _weight_decompose(p.dora_scale, w, diff, alpha, strength, fn)
    w += fn((strength * alpha) * diff)
    return w


def apply_patch(w, p, strength):
    """Applies patch p at `strength` in place to w (float32; already narrowed to the target's
    offset). Returns w."""
    if w.dtype != torch.float32:
        raise TypeError("apply_patch works on float32 weights")
    if not math.isfinite(strength):
        raise LoraError("strength %r is not finite" % (strength,))
    fn = swap_halves if p.target.swap else (lambda t: t)
    t = p.tensors
    if p.kind == "diff":
        d = t["diff"]
        if tuple(d.shape) != tuple(w.shape):
            raise LoraError("LoRA module %s: diff of shape %s does not fit %s of shape %s"
                            % (p.module, list(d.shape), p.target.weight, list(w.shape)))
        if strength != 0.0:
            w += fn(strength * _f32(d))
        return w
    if p.kind == "set":
        s = t["set"]
        if tuple(s.shape) != tuple(w.shape):
            raise LoraError("LoRA module %s: set_weight of shape %s does not fit %s of shape %s"
                            % (p.module, list(s.shape), p.target.weight, list(w.shape)))
        w.copy_(s)
        return w
    if p.kind == "lora":
        up, down = _f32(t["up"]), _f32(t["down"])
        if up.dim() < 2 or down.dim() < 2 or up.flatten(1).shape[1] != down.shape[0]:
            raise LoraError("LoRA module %s: up %s and down %s have different ranks (%s)"
                            % (p.module, list(up.shape), list(down.shape), p.target.weight))
        alpha = p.alpha / down.shape[0] if p.alpha is not None else 1.0
        if "mid" in t:
            mid = _f32(t["mid"])
            if mid.dim() != 4 or mid.shape[1] != down.shape[0] or mid.shape[0] != down.shape[0]:
                raise LoraError("LoRA module %s: lora_mid %s does not fit down %s"
                                % (p.module, list(mid.shape), list(down.shape)))
            shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            try:
                down = torch.mm(down.transpose(0, 1).flatten(start_dim=1),
                                mid.transpose(0, 1).flatten(start_dim=1)) \
                    .reshape(shape).transpose(0, 1)
            except RuntimeError as e:
                raise LoraError("LoRA module %s: lora_mid %s does not fit down %s (%s)"
                                % (p.module, list(mid.shape), list(t["down"].shape), e)) from None
        diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1))
        _check_rows(diff.shape[0], diff.numel(), w, p)
        return _finish(w, p, diff.reshape(w.shape), alpha, strength, fn)
    if p.kind == "loha":
        w1a, w1b, w2a, w2b = (_f32(t[n]) for n in _LOHA[:4])
        alpha = p.alpha / w1b.shape[0] if p.alpha is not None else 1.0
        try:
            if "hada_t1" in t:
                eq = "i j k l, j r, i p -> p r k l"
                m1 = torch.einsum(eq, _f32(t["hada_t1"]), w1b, w1a)
                m2 = torch.einsum(eq, _f32(t["hada_t2"]), w2b, w2a)
            else:
                m1, m2 = torch.mm(w1a, w1b), torch.mm(w2a, w2b)
            diff = m1 * m2
        except RuntimeError as e:
            raise LoraError("LoRA module %s: LoHa parts do not fit together (%s): %s"
                            % (p.module, p.target.weight, e)) from None
        _check_rows(diff.shape[0], diff.numel(), w, p)
        return _finish(w, p, diff.reshape(w.shape), alpha, strength, fn)
    if p.kind == "lokr":
        dim = None
        try:
            if "lokr_w1" in t:
                w1 = _f32(t["lokr_w1"])
            else:
                dim = t["lokr_w1_b"].shape[0]
                w1 = torch.mm(_f32(t["lokr_w1_a"]), _f32(t["lokr_w1_b"]))
            if "lokr_w2" in t:
                w2 = _f32(t["lokr_w2"])
            else:
                dim = t["lokr_w2_b"].shape[0]
                if "lokr_t2" in t:
                    w2 = torch.einsum("i j k l, j r, i p -> p r k l", _f32(t["lokr_t2"]),
                                      _f32(t["lokr_w2_b"]), _f32(t["lokr_w2_a"]))
                else:
                    w2 = torch.mm(_f32(t["lokr_w2_a"]), _f32(t["lokr_w2_b"]))
            if w2.dim() == 4:
                w1 = w1.unsqueeze(2).unsqueeze(2)
            diff = torch.kron(w1.contiguous(), w2.contiguous())  # (torch 1.13's kron needs it)
        except RuntimeError as e:
            raise LoraError("LoRA module %s: LoKr parts do not fit together (%s): %s"
                            % (p.module, p.target.weight, e)) from None
        alpha = p.alpha / dim if p.alpha is not None and dim is not None else 1.0
        _check_rows(diff.shape[0], diff.numel(), w, p)
        return _finish(w, p, diff.reshape(w.shape), alpha, strength, fn)
    raise LoraError("unknown patch kind %r" % (p.kind,))


def _narrow(w, offset):
    return w if offset is None else w.narrow(offset[0], offset[1], offset[2])


def apply_module(weight, lora_sd, module, strength=1.0, offset=None, swap=False):
    """One module of a LoRA state dict applied to a standalone weight (any shape, e.g. a 4-D
    conv weight no model of ours has): `weight` with the module's patch at `strength` on its
    `offset` slice, computed in float32 and rounded to weight's dtype."""
    target = Target("weight", offset, swap)
    patches = _read_module(lora_sd, module, target, set())
    patches = [p for p in patches if p.target.weight == "weight"]
    if not patches:
        raise LoraError("no patch for module %s" % module)
    w = weight.to(torch.float32, copy=True)
    apply_patch(_narrow(w, offset), patches[0], float(strength))
    return w.to(weight.dtype)


def patched_weights(base, family, hidden_size, loras, all_weights=False):
    """The model weights `base` ({name: tensor}, no file prefix) with LoRAs applied.

    loras: [(lora_state_dict, strength)], applied in order (stacked). hidden_size: Flux's hidden
    width for the diffusers offsets (None: img_in.weight's rows). Returns {name: tensor} in the
    base weight's dtype for the weights some patch touches, or with all_weights=True for every
    weight (untouched ones are the base tensors themselves)."""
    if family == "flux" and hidden_size is None:
        hidden_size = base["img_in.weight"].shape[0]
    kmap = key_map(base.keys(), family, hidden_size)
    work = {}
    for sd, strength in loras:
        strength = float(strength)
        if not math.isfinite(strength):
            raise LoraError("strength %r is not finite" % (strength,))
        patches, _ = match_lora(sd, kmap)
        for p in patches:
            if p.target.weight not in base:
                raise LoraError("LoRA module %s patches %s, which the model does not have"
                                % (p.module, p.target.weight))
            if p.target.weight not in work:
                work[p.target.weight] = base[p.target.weight].to(torch.float32, copy=True)
            w = work[p.target.weight]
            off = p.target.offset
            if off is not None and (off[0] >= w.dim() or off[1] + off[2] > w.shape[off[0]]):
                raise LoraError("LoRA module %s: offset %s is outside %s of shape %s"
                                % (p.module, off, p.target.weight, list(w.shape)))
            apply_patch(_narrow(w, off), p, strength)
    out = {k: v.to(base[k].dtype) for k, v in work.items()}
    if all_weights:
        return {k: out.get(k, v) for k, v in base.items()}
    return out
