"""Self-checks of the WAN 2.1 / 2.2 reference (wan_reference.py): key names and shapes of the
random test models against the real checkpoints' layout, output shapes, padding and crop,
batching, the per-frame timestep of the 2.2 5B model, and the patch embedding."""
import torch
import torch.nn.functional as F
import pytest

import wan_reference as ref

# The real checkpoints' key layout (ComfyUI's WanModel state dict, in its order), written with
# symbols: D width, F ffn width, CI / CO in / out channels, TXT text width. Blocks repeat the
# "blocks.0." rows for every layer; rows marked "i2v" exist only in the 2.1 I2V model.
LAYOUT = """
patch_embedding.weight              D,CI,1,2,2
patch_embedding.bias                D
text_embedding.0.weight             D,TXT
text_embedding.0.bias               D
text_embedding.2.weight             D,D
text_embedding.2.bias               D
time_embedding.0.weight             D,256
time_embedding.0.bias               D
time_embedding.2.weight             D,D
time_embedding.2.bias               D
time_projection.1.weight            6*D,D
time_projection.1.bias              6*D
blocks.0.modulation                 1,6,D
blocks.0.self_attn.q.weight         D,D
blocks.0.self_attn.q.bias           D
blocks.0.self_attn.k.weight         D,D
blocks.0.self_attn.k.bias           D
blocks.0.self_attn.v.weight         D,D
blocks.0.self_attn.v.bias           D
blocks.0.self_attn.o.weight         D,D
blocks.0.self_attn.o.bias           D
blocks.0.self_attn.norm_q.weight    D
blocks.0.self_attn.norm_k.weight    D
blocks.0.norm3.weight               D
blocks.0.norm3.bias                 D
blocks.0.cross_attn.q.weight        D,D
blocks.0.cross_attn.q.bias          D
blocks.0.cross_attn.k.weight        D,D
blocks.0.cross_attn.k.bias          D
blocks.0.cross_attn.v.weight        D,D
blocks.0.cross_attn.v.bias          D
blocks.0.cross_attn.o.weight        D,D
blocks.0.cross_attn.o.bias          D
blocks.0.cross_attn.norm_q.weight   D
blocks.0.cross_attn.norm_k.weight   D
blocks.0.cross_attn.k_img.weight    D,D       i2v
blocks.0.cross_attn.k_img.bias      D         i2v
blocks.0.cross_attn.v_img.weight    D,D       i2v
blocks.0.cross_attn.v_img.bias      D         i2v
blocks.0.cross_attn.norm_k_img.weight D       i2v
blocks.0.ffn.0.weight               F,D
blocks.0.ffn.0.bias                 F
blocks.0.ffn.2.weight               D,F
blocks.0.ffn.2.bias                 D
head.modulation                     1,2,D
head.head.weight                    4*CO,D
head.head.bias                      4*CO
img_emb.proj.0.weight               1280      i2v
img_emb.proj.0.bias                 1280      i2v
img_emb.proj.1.weight               1280,1280 i2v
img_emb.proj.1.bias                 1280      i2v
img_emb.proj.3.weight               D,1280    i2v
img_emb.proj.3.bias                 D         i2v
img_emb.proj.4.weight               D         i2v
img_emb.proj.4.bias                 D         i2v
"""

# The real models: variant, dims, and their key count.
REAL = {
    "wan21-1.3b": ("t2v", dict(D=1536, F=8960, CI=16, CO=16, TXT=4096), 30, 825),
    "wan21-14b": ("t2v", dict(D=5120, F=13824, CI=16, CO=16, TXT=4096), 40, 1095),
    "wan21-i2v-14b": ("i2v", dict(D=5120, F=13824, CI=36, CO=16, TXT=4096), 40, 1303),
    "wan22-5b": ("ti2v5b", dict(D=3072, F=14336, CI=48, CO=48, TXT=4096), 30, 825),
}
# A few shapes exactly as they appear in the real key lists.
REAL_SHAPES = {
    "wan21-1.3b": {"time_projection.1.weight": (9216, 1536),
                   "blocks.29.ffn.0.weight": (8960, 1536)},
    "wan21-14b": {"blocks.39.ffn.2.weight": (5120, 13824), "head.head.weight": (64, 5120)},
    "wan21-i2v-14b": {"patch_embedding.weight": (5120, 36, 1, 2, 2),
                      "img_emb.proj.3.weight": (5120, 1280),
                      "blocks.7.cross_attn.norm_k_img.weight": (5120,)},
    "wan22-5b": {"patch_embedding.weight": (3072, 48, 1, 2, 2), "head.head.weight": (192, 3072),
                 "blocks.0.ffn.0.weight": (14336, 3072)},
}

SMALL = dict(dim=64, ffn_dim=96, num_layers=2, text_dim=32)
HEADS = {"num_heads": 2}  # head width 32: RoPE axes [12, 10, 10]


def expected_keys(variant, dims, layers):
    rows = [line.split() for line in LAYOUT.strip().splitlines()]
    rows = [r[:2] for r in rows if len(r) == 2 or variant == "i2v"]

    def shape(s):
        return tuple(int(eval(item, {}, dims)) for item in s.split(","))
    out = []
    block = [(n, s) for n, s in rows if n.startswith("blocks.0.")]
    for n, s in rows:
        if n == block[0][0]:
            out += [(bn.replace("blocks.0.", f"blocks.{i}.", 1), shape(bs))
                    for i in range(layers) for bn, bs in block]
        elif not n.startswith("blocks."):
            out.append((n, shape(s)))
    return out


def model(variant, seed=0):
    w = ref.random_weights(variant, seed=seed, **SMALL)
    return w, ref.config_from_weights(w, HEADS)


def inputs(cfg, batch, length, t=3, h=5, w=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_dim"], t, h, w, generator=g)
    ts = torch.rand(batch, generator=g) * 1000
    ctx = torch.randn(batch, length, cfg["text_dim"], generator=g)
    clip = torch.randn(batch, 257, 1280, generator=g) if cfg["model_type"] == "i2v" else None
    return x, ts, ctx, clip


@pytest.mark.parametrize("name", sorted(REAL))
def test_layout_matches_real_models(name):
    variant, dims, layers, count = REAL[name]
    keys = dict(expected_keys(variant, dims, layers))
    assert len(keys) == count
    for k, s in REAL_SHAPES[name].items():
        assert keys[k] == s


@pytest.mark.parametrize("variant", ["t2v", "i2v", "ti2v5b"])
def test_random_weights_have_real_keys(variant):
    w = ref.random_weights(variant, seed=0, **SMALL)
    cin, cout = {"t2v": (16, 16), "i2v": (36, 16), "ti2v5b": (48, 48)}[variant]
    dims = dict(D=SMALL["dim"], F=SMALL["ffn_dim"], CI=cin, CO=cout, TXT=SMALL["text_dim"])
    assert [(k, tuple(v.shape)) for k, v in w.items()] == expected_keys(variant, dims, 2)
    assert all(v.dtype == torch.float32 for v in w.values())


def test_config_from_weights():
    w = ref.random_weights("i2v", dim=256, ffn_dim=128, num_layers=3, text_dim=32)
    cfg = ref.config_from_weights({ref.PREFIX + k: v for k, v in w.items()})
    assert cfg["model_type"] == "i2v" and cfg["num_heads"] == 2 and cfg["num_layers"] == 3
    assert (cfg["dim"], cfg["ffn_dim"], cfg["in_dim"], cfg["out_dim"]) == (256, 128, 36, 16)
    assert (cfg["text_dim"], cfg["freq_dim"], cfg["patch_size"], cfg["eps"]) == \
        (32, 256, (1, 2, 2), 1e-6)
    cfg = ref.config_from_weights(ref.random_weights("ti2v5b", **SMALL), {"num_heads": 4})
    assert cfg["model_type"] == "t2v" and cfg["num_heads"] == 4 and cfg["out_dim"] == 48
    assert ref.rope_axes(128) == [44, 42, 42]


@pytest.mark.parametrize("variant", ["t2v", "i2v", "ti2v5b"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("length", [3, 40])
def test_forward_shapes_and_states(variant, batch, length):
    w, cfg = model(variant)
    x, ts, ctx, clip = inputs(cfg, batch, length)
    out, states = ref.forward(w, cfg, x, ts, ctx, clip_fea=clip, collect=True)
    assert out.shape == (batch, cfg["out_dim"], 3, 5, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() < 100
    assert [n for n, _ in states] == ["stem", "blocks.0", "blocks.1", "head"]
    stem = states[0][1]
    n, d = 3 * 3 * 4, cfg["dim"]
    assert stem["x"].shape == (batch, n, d)
    assert stem["e"].shape == (batch, d) and stem["e0"].shape == (batch, 6, d)
    assert stem["context"].shape == (batch, length + (257 if clip is not None else 0), d)
    assert all(s["x"].shape == (batch, n, d) for _, s in states[1:-1])
    assert torch.equal(states[-1][1]["out"], out)
    if batch == 2:  # samples are independent
        for b in range(2):
            one = ref.forward(w, cfg, x[b:b + 1], ts[b:b + 1], ctx[b:b + 1],
                              clip_fea=None if clip is None else clip[b:b + 1])
            torch.testing.assert_close(one, out[b:b + 1], rtol=0, atol=1e-5)


def test_unpatchify_order_and_crop():
    w, cfg = model("t2v")
    x, ts, ctx, _ = inputs(cfg, 1, 4)
    out, states = ref.forward(w, cfg, x, ts, ctx, collect=True)
    tokens, c = states[-1][1]["x"], cfg["out_dim"]  # [1, 3*3*4, 4*C], grid (3, 3, 4)
    for t, i, j, ph, pw, ch in [(0, 0, 0, 0, 0, 0), (2, 1, 3, 1, 0, 5), (1, 2, 2, 0, 1, 15)]:
        tok = (t * 3 + i) * 4 + j
        assert out[0, ch, t, 2 * i + ph, 2 * j + pw] == tokens[0, tok, (ph * 2 + pw) * c + ch]


@pytest.mark.parametrize("variant", ["t2v", "i2v", "ti2v5b"])
def test_stem_equals_conv3d(variant):
    w, cfg = model(variant)
    x, ts, ctx, clip = inputs(cfg, 2, 5)
    _, states = ref.forward(w, cfg, x, ts, ctx, clip_fea=clip, collect=True)
    xp = F.pad(x, (0, 1, 0, 1, 0, 0), mode="circular")  # W 7 -> 8, H 5 -> 6
    conv = F.conv3d(xp, w["patch_embedding.weight"], w["patch_embedding.bias"], stride=(1, 2, 2))
    torch.testing.assert_close(states[0][1]["x"], conv.flatten(2).transpose(1, 2),
                               rtol=0, atol=1e-5)


def test_timestep_changes_output():
    w, cfg = model("t2v")
    x, ts, ctx, _ = inputs(cfg, 1, 6)
    a = ref.forward(w, cfg, x, ts, ctx)
    b = ref.forward(w, cfg, x, ts + 50.0, ctx)
    assert (a - b).abs().max() > 1e-2


def test_5b_per_frame_timestep():
    w, cfg = model("ti2v5b")
    x, ts, ctx, _ = inputs(cfg, 2, 6)
    base, sb = ref.forward(w, cfg, x, ts, ctx, collect=True)
    same, ss = ref.forward(w, cfg, x, ts[:, None].expand(2, 3), ctx, collect=True)
    torch.testing.assert_close(same, base, rtol=0, atol=1e-5)
    n, d = 36, cfg["dim"]
    assert ss[0][1]["e"].shape == (2, n, d) and ss[0][1]["e0"].shape == (2, n, 6, d)
    # Distinct frame values: every token of frame f carries the e0 of timestep t_f.
    frames = torch.tensor([[900.0, 500.0, 10.0], [1.0, 2.0, 3.0]])
    _, st = ref.forward(w, cfg, x, frames, ctx, collect=True)
    for f in range(3):
        _, sf = ref.forward(w, cfg, x, frames[:, f], ctx, collect=True)
        per_tok = st[0][1]["e0"][:, f * 12:(f + 1) * 12]
        torch.testing.assert_close(per_tok, sf[0][1]["e0"][:, None].expand_as(per_tok),
                                   rtol=0, atol=1e-5)


def test_i2v_image_tokens_lead_the_context():
    w, cfg = model("i2v")
    x, ts, ctx, clip = inputs(cfg, 1, 6)
    a, sa = ref.forward(w, cfg, x, ts, ctx, clip_fea=clip, collect=True)
    other = torch.randn(clip.shape, generator=torch.Generator().manual_seed(7))
    b, sb = ref.forward(w, cfg, x, ts, ctx, clip_fea=other, collect=True)
    ca, cb = sa[0][1]["context"], sb[0][1]["context"]
    assert torch.equal(ca[:, 257:], cb[:, 257:]) and not torch.equal(ca[:, :257], cb[:, :257])
    assert (a - b).abs().max() > 1e-3
