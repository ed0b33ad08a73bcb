#!/usr/bin/python3
"""An independent float32 reference of the WAN 2.1 / 2.2 video diffusion transformer
(ComfyUI's `WanModel`), written in plain python3-torch from the architecture description,
not from our C++. The C++ WAN path is compared against it block by block, so its arithmetic
choices are deliberate. Everything is computed in float32.

Arithmetic it fixes (D width, H heads, d = D/H head width, N video tokens, L text tokens):

* Input x [B,C,T,H,W] is padded *circularly* at the end of T, H, W up to multiples of the patch
  (1,2,2) (the first rows/columns are repeated), patch-embedded as a Conv3d with kernel = stride
  (done here as a GEMM on gathered patches, feature order (c, pt, ph, pw)), in float32; tokens in
  (t, h, w) row-major order. The output is unpatchified and cropped back to T, H, W.
* Time: 256-dim sinusoid of t (t already in [0, 1000]), float32, with
  f_k = pow(10000, -k/128) for k = 0..127 and the embedding = [cos(t f_k)..., sin(t f_k)...]
  (cosines first). e = time_embedding.2(SiLU(time_embedding.0(.))); e0 = time_projection.1(SiLU(e))
  viewed [.., 6, D]. Timestep [B]: e [B,D], e0 [B,6,D]. Timestep [B,S] (WAN 2.2 5B, one value per
  latent frame, S = T): the MLPs run on the S values, then every token takes the value of its
  frame (each value repeated N/S times along the token axis): e [B,N,D], e0 [B,N,6,D].
* Text: text_embedding.2(GELU_tanh(text_embedding.0(context))).
  I2V (2.1): img_emb on the CLIP-H features [B,257,1280]: LayerNorm (affine, eps 1e-5) ->
  Linear -> GELU (erf) -> Linear -> LayerNorm (affine, eps 1e-5); the result is *prepended* to the
  text, so the embedded context is [image tokens (257), text tokens]. A block's cross-attention
  splits it again by the clip token count. (An i2v model called without clip_fea attends with both
  its text and image branches over the whole text context, as ComfyUI does.)
* RoPE: ids (t, h, w) of each token on the patched grid (0-based integers), axes widths
  [d - 4(d//6), 2(d//6), 2(d//6)] (44, 42, 42 for d = 128), theta 10000. Per axis of width a:
  omega_j = 1 / theta^s_j with s = linspace(0, (a-2)/a, a/2) in float64, angle = id * omega
  (float64), cos / sin in float64, then rounded to float32. Applied to q, k laid out
  [B,N,H,d] rotating *adjacent pairs* (x[2j], x[2j+1]):
  y0 = cos x0 - sin x1, y1 = sin x0 + cos x1, in float32.
* Block i, with (m0..m5) = blocks.i.modulation [1,6,D] + e0 (shift, scale, gate for
  self-attention, then for the FFN):
    a = LN(x) * (1 + m1) + m0                  LN without affine, eps 1e-6
    q = RMS(self_attn.q(a)) * norm_q, k = RMS(self_attn.k(a)) * norm_k   RMS over all D, eps 1e-6
    v = self_attn.v(a); RoPE on q, k; softmax(q k^T / sqrt(d)) v per head; x = x + o(.) * m2
    c = norm3(x)                               LN *with* weight and bias, eps 1e-6
    cross: q = RMS(q(c)), k = RMS(k(text)), v = v(text), attention (no RoPE, no mask);
      i2v also attention of the same q over k_img/v_img of the image tokens (norm_k_img), the two
      attention outputs are summed before cross_attn.o; x = x + o(.)
    f = LN(x) * (1 + m4) + m3; x = x + ffn.2(GELU_tanh(ffn.0(f))) * m5
* Head: (shift, scale) = head.modulation [1,2,D] + e; head.head(LN(x) * (1 + scale) + shift)
  -> [B,N,pt*ph*pw*C_out] with feature order (pt, ph, pw, c), c fastest; unpatchify to
  [B,C_out,T,H,W] and crop.
* All Linears have biases. GELU_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
  GELU_erf(x) = 0.5 x (1 + erf(x / sqrt 2)), SiLU(x) = x sigmoid(x).

API: config_from_weights, forward (optionally collecting per-block states), the pieces stem /
block / head for feeding one block at a time, and random_weights for small test models with the
real checkpoint key names.
"""
import math

import torch

PREFIX = "model.diffusion_model."
CLIP_DIM = 1280


# ---------------------------------------------------------------------------------------------
# Primitives (float32).

def layer_norm(x, eps, weight=None, bias=None):
    mu = x.mean(dim=-1, keepdim=True)
    xc = x - mu
    y = xc * torch.rsqrt((xc * xc).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm(x, gain, eps):
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * gain


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def silu(x):
    return x * torch.sigmoid(x)


def attention(q, k, v, heads):
    """q [B,Lq,H*d], k/v [B,Lk,H*d] -> softmax(q k^T / sqrt(d)) v per head, [B,Lq,H*d]."""
    b, lq, width = q.shape
    d = width // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    p = torch.softmax((q @ k.transpose(-1, -2)) * d ** -0.5, dim=-1)
    return (p @ v).transpose(1, 2).reshape(b, lq, width)


def sinusoid(t, dim=256):
    """[S] values -> [S, dim] float32: cos(t f_k) for all k, then sin(t f_k);
    f_k = pow(10000, -k/half)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float32) / half)
    ang = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def rope_axes(head_dim):
    s = head_dim // 6
    return [head_dim - 4 * s, 2 * s, 2 * s]


def rope_tables(grid, head_dim, theta=10000.0):
    """cos, sin [N, head_dim/2] float32 for the (t, h, w) ids of a (tn, hn, wn) token grid."""
    tn, hn, wn = grid
    ids = torch.stack(torch.meshgrid(torch.arange(tn), torch.arange(hn), torch.arange(wn),
                                     indexing="ij"), dim=-1).reshape(-1, 3).to(torch.float64)
    angles = []
    for axis, width in enumerate(rope_axes(head_dim)):
        s = torch.linspace(0, (width - 2) / width, steps=width // 2, dtype=torch.float64)
        angles.append(ids[:, axis:axis + 1] * (1.0 / theta ** s)[None, :])
    ang = torch.cat(angles, dim=1)
    return torch.cos(ang).to(torch.float32), torch.sin(ang).to(torch.float32)


def apply_rope(x, cos, sin):
    """x [B,N,H,d]; rotates adjacent pairs (x[2j], x[2j+1]) by the angles cos/sin [N, d/2]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([c * x0 - s * x1, s * x0 + c * x1], dim=-1).flatten(-2)


def pad_circular(x, patch):
    """Pads dims 2.. of x at their end to multiples of patch by repeating their first entries."""
    for dim, p in zip(range(2, x.ndim), patch):
        r = (-x.shape[dim]) % p
        if r:
            x = torch.cat([x, x.narrow(dim, 0, r)], dim=dim)
    return x


def expand_tokens(e, n):
    """e [B,S,...] -> per token [B,n,...]: S == 1 stays (broadcast), else each of the S values is
    repeated n/S times (rounded up and cut to n when S does not divide n)."""
    s = e.shape[1]
    if s == 1 or s == n:
        return e
    r = n // s
    return torch.repeat_interleave(e, r if r * s == n else r + 1, dim=1)[:, :n]


# ---------------------------------------------------------------------------------------------
# Model.

def plain(weights):
    """The weights without ComfyUI's `model.diffusion_model.` prefix, as float32."""
    n = len(PREFIX)
    return {(k[n:] if k.startswith(PREFIX) else k): v.to(torch.float32) for k, v in weights.items()}


def config_from_weights(weights, overrides=None):
    """ComfyUI WanModel keyword arguments derived from the weight shapes (num_heads = dim // 128,
    eps 1e-6); `overrides` (e.g. {"num_heads": 2}) replaces any of them."""
    w = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in weights.items()}
    pe = w["patch_embedding.weight"]
    dim = w["head.modulation"].shape[-1]
    patch = tuple(pe.shape[2:])
    cfg = {
        "model_type": "i2v" if "img_emb.proj.0.bias" in w else "t2v",
        "patch_size": patch,
        "in_dim": pe.shape[1],
        "dim": dim,
        "ffn_dim": w["blocks.0.ffn.0.weight"].shape[0],
        "freq_dim": w["time_embedding.0.weight"].shape[1],
        "text_dim": w["text_embedding.0.weight"].shape[1],
        "out_dim": w["head.head.weight"].shape[0] // math.prod(patch),
        "num_heads": dim // 128,
        "num_layers": len({k.split(".")[1] for k in w if k.startswith("blocks.")}),
        "eps": 1e-6,
    }
    cfg.update(overrides or {})
    cfg["patch_size"] = tuple(cfg["patch_size"])
    if cfg["num_heads"] < 1 or cfg["dim"] % cfg["num_heads"]:
        raise ValueError(f"num_heads {cfg['num_heads']} does not divide dim {cfg['dim']}; "
                         "pass overrides={'num_heads': ...}")
    return cfg


def linear(w, name, x):
    return x @ w[name + ".weight"].t() + w[name + ".bias"]


def stem(w, cfg, x, timestep, context, clip_fea=None):
    """Patch embedding, time and text embeddings, RoPE tables (w: weights from plain(), as for
    block and head). Returns a dict:
    x [B,N,D]; e [B,D] or [B,N,D]; e0 [B,6,D] or [B,N,6,D]; context [B,(257+)L,D];
    context_img_len (int or None); cos, sin [N, d/2]; grid (tn, hn, wn); size (T, H, W)."""
    B, C, T, H, W = x.shape
    pt, ph, pw = cfg["patch_size"]
    D = cfg["dim"]
    xp = pad_circular(x.to(torch.float32), cfg["patch_size"])
    tn, hn, wn = xp.shape[2] // pt, xp.shape[3] // ph, xp.shape[4] // pw
    patches = xp.reshape(B, C, tn, pt, hn, ph, wn, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    patches = patches.reshape(B, tn * hn * wn, C * pt * ph * pw)
    kernel = w["patch_embedding.weight"].reshape(D, -1)
    tokens = patches @ kernel.t() + w["patch_embedding.bias"]
    n = tokens.shape[1]

    t = timestep.to(torch.float32)
    t = t.reshape(B, -1)  # [B, S]: S = 1 for one timestep per sample, else per frame / token
    emb = sinusoid(t.flatten(), cfg["freq_dim"])
    e = linear(w, "time_embedding.2", silu(linear(w, "time_embedding.0", emb)))
    e0 = linear(w, "time_projection.1", silu(e))
    e = e.reshape(B, -1, D)
    e0 = e0.reshape(B, -1, 6, D)
    if e.shape[1] == 1:
        e, e0 = e[:, 0], e0[:, 0]
    else:
        e, e0 = expand_tokens(e, n), expand_tokens(e0, n)

    ctx = linear(w, "text_embedding.2",
                 gelu_tanh(linear(w, "text_embedding.0", context.to(torch.float32))))
    img_len = None
    if clip_fea is not None:
        if cfg["model_type"] == "i2v":
            h = clip_fea.to(torch.float32)
            h = layer_norm(h, 1e-5, w["img_emb.proj.0.weight"], w["img_emb.proj.0.bias"])
            h = linear(w, "img_emb.proj.3", gelu_erf(linear(w, "img_emb.proj.1", h)))
            h = layer_norm(h, 1e-5, w["img_emb.proj.4.weight"], w["img_emb.proj.4.bias"])
            ctx = torch.cat([h, ctx], dim=1)
        img_len = clip_fea.shape[-2]

    cos, sin = rope_tables((tn, hn, wn), D // cfg["num_heads"])
    return {"x": tokens, "e": e, "e0": e0, "context": ctx, "context_img_len": img_len,
            "cos": cos, "sin": sin, "grid": (tn, hn, wn), "size": (T, H, W)}


def block(w, cfg, i, x, e0, context, cos, sin, context_img_len=None):
    """blocks.i on x [B,N,D]; e0 [B,6,D] or [B,N,6,D]. Returns the new x."""
    p = f"blocks.{i}."
    heads, eps = cfg["num_heads"], cfg["eps"]
    B, N, D = x.shape
    if e0.ndim == 3:
        e0 = e0[:, None]
    m = (w[p + "modulation"][None] + e0).unbind(2)  # six [B,1|N,D]

    a = layer_norm(x, eps) * (1 + m[1]) + m[0]
    q = rms_norm(linear(w, p + "self_attn.q", a), w[p + "self_attn.norm_q.weight"], eps)
    k = rms_norm(linear(w, p + "self_attn.k", a), w[p + "self_attn.norm_k.weight"], eps)
    v = linear(w, p + "self_attn.v", a)
    q = apply_rope(q.reshape(B, N, heads, -1), cos, sin).reshape(B, N, D)
    k = apply_rope(k.reshape(B, N, heads, -1), cos, sin).reshape(B, N, D)
    x = x + linear(w, p + "self_attn.o", attention(q, k, v, heads)) * m[2]

    c = layer_norm(x, eps, w[p + "norm3.weight"], w[p + "norm3.bias"])
    q = rms_norm(linear(w, p + "cross_attn.q", c), w[p + "cross_attn.norm_q.weight"], eps)
    if cfg["model_type"] == "i2v":
        img, txt = context[:, :context_img_len], context[:, context_img_len:]
    else:
        img, txt = None, context
    k = rms_norm(linear(w, p + "cross_attn.k", txt), w[p + "cross_attn.norm_k.weight"], eps)
    y = attention(q, k, linear(w, p + "cross_attn.v", txt), heads)
    if img is not None:
        k = rms_norm(linear(w, p + "cross_attn.k_img", img),
                     w[p + "cross_attn.norm_k_img.weight"], eps)
        y = y + attention(q, k, linear(w, p + "cross_attn.v_img", img), heads)
    x = x + linear(w, p + "cross_attn.o", y)

    f = layer_norm(x, eps) * (1 + m[4]) + m[3]
    return x + linear(w, p + "ffn.2", gelu_tanh(linear(w, p + "ffn.0", f))) * m[5]


def head(w, cfg, x, e, grid, size):
    """Head on x [B,N,D] with e [B,D] or [B,N,D]; returns (tokens [B,N,P*C], out [B,C,T,H,W])."""
    if e.ndim == 2:
        e = e[:, None]
    mod = w["head.modulation"][None] + e[:, :, None]  # [B,1|N,2,D]
    shift, scale = mod.unbind(2)
    tokens = linear(w, "head.head", layer_norm(x, cfg["eps"]) * (1 + scale) + shift)
    B, C = x.shape[0], cfg["out_dim"]
    (tn, hn, wn), (pt, ph, pw) = grid, cfg["patch_size"]
    out = tokens.reshape(B, tn, hn, wn, pt, ph, pw, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
    out = out.reshape(B, C, tn * pt, hn * ph, wn * pw)
    T, H, W = size
    return tokens, out[:, :, :T, :H, :W]


def forward(weights, config, x, timestep, context, clip_fea=None, collect=False):
    """WanModel forward: x [B,C,T,H,W], timestep [B] (or [B,T_latent]), context [B,L,text_dim],
    clip_fea [B,257,1280] (2.1 I2V). Returns out [B,C_out,T,H,W], or with collect=True
    (out, states): [("stem", {...}), ("blocks.0", {"x"}), ..., ("head", {"x", "out"})]."""
    w = plain(weights)
    s = stem(w, config, x, timestep, context, clip_fea)
    states = [("stem", {k: s[k] for k in ("x", "e", "e0", "context", "cos", "sin")})]
    h = s["x"]
    for i in range(config["num_layers"]):
        h = block(w, config, i, h, s["e0"], s["context"], s["cos"], s["sin"],
                  s["context_img_len"])
        states.append((f"blocks.{i}", {"x": h}))
    tokens, out = head(w, config, h, s["e"], s["grid"], s["size"])
    states.append(("head", {"x": tokens, "out": out}))
    return (out, states) if collect else out


# ---------------------------------------------------------------------------------------------
# Small random models with the real key names (ComfyUI's module order).

def weight_specs(variant, dim, ffn_dim, num_layers, in_dim, out_dim, text_dim, freq_dim=256,
                 patch=(1, 2, 2)):
    """[(name, shape, kind)] for a model; kind: linear weight 'w', bias 'b', norm gain 'g',
    norm bias 'nb', modulation 'm'."""
    specs = []

    def lin(name, o, i):
        specs.extend([(name + ".weight", (o, i), "w"), (name + ".bias", (o,), "b")])

    def norm(name, n, bias=False):
        specs.append((name + ".weight", (n,), "g"))
        if bias:
            specs.append((name + ".bias", (n,), "nb"))

    D = dim
    specs += [("patch_embedding.weight", (D, in_dim, *patch), "w"),
              ("patch_embedding.bias", (D,), "b")]
    lin("text_embedding.0", D, text_dim)
    lin("text_embedding.2", D, D)
    lin("time_embedding.0", D, freq_dim)
    lin("time_embedding.2", D, D)
    lin("time_projection.1", 6 * D, D)
    for i in range(num_layers):
        p = f"blocks.{i}."
        specs.append((p + "modulation", (1, 6, D), "m"))
        for n in "qkvo":
            lin(p + "self_attn." + n, D, D)
        norm(p + "self_attn.norm_q", D)
        norm(p + "self_attn.norm_k", D)
        norm(p + "norm3", D, bias=True)
        for n in "qkvo":
            lin(p + "cross_attn." + n, D, D)
        norm(p + "cross_attn.norm_q", D)
        norm(p + "cross_attn.norm_k", D)
        if variant == "i2v":
            lin(p + "cross_attn.k_img", D, D)
            lin(p + "cross_attn.v_img", D, D)
            norm(p + "cross_attn.norm_k_img", D)
        lin(p + "ffn.0", ffn_dim, D)
        lin(p + "ffn.2", D, ffn_dim)
    specs.append(("head.modulation", (1, 2, D), "m"))
    lin("head.head", math.prod(patch) * out_dim, D)
    if variant == "i2v":
        norm("img_emb.proj.0", CLIP_DIM, bias=True)
        lin("img_emb.proj.1", CLIP_DIM, CLIP_DIM)
        lin("img_emb.proj.3", D, CLIP_DIM)
        norm("img_emb.proj.4", D, bias=True)
    return specs


VARIANT_CHANNELS = {"t2v": (16, 16), "i2v": (36, 16), "ti2v5b": (48, 48)}


def random_weights(variant, *, dim, ffn_dim, num_layers, num_heads_dim_hint=None, in_dim=None,
                   out_dim=None, text_dim=4096, seed=0):
    """A random float32 model of `variant` ("t2v": 2.1 1.3B/14B and the 2.2 A14B experts, "i2v":
    2.1 I2V 14B, "ti2v5b": 2.2 TI2V 5B) with the real key names and scaled shapes. Linear weights
    are N(0, 1/fan_in), biases N(0, 0.02^2), norm gains 1 + N(0, 0.1^2), norm biases and
    modulations N(0, 0.1^2), which keeps activations O(1). num_heads_dim_hint is accepted for
    symmetry only: no weight shape depends on the head count (pass num_heads to
    config_from_weights)."""
    del num_heads_dim_hint
    cin, cout = VARIANT_CHANNELS[variant]
    in_dim = cin if in_dim is None else in_dim
    out_dim = cout if out_dim is None else out_dim
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, kind in weight_specs(variant, dim, ffn_dim, num_layers, in_dim, out_dim,
                                          text_dim):
        r = torch.randn(shape, generator=gen, dtype=torch.float32)
        if kind == "w":
            r = r / math.sqrt(math.prod(shape[1:]))
        elif kind == "b":
            r = r * 0.02
        elif kind == "g":
            r = 1.0 + 0.1 * r
        else:
            r = r * 0.1
        out[name] = r
    return out
