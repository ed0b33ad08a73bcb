"""Tests of the LoRA reference (lora_reference.py) and the LoRA file writers (lora_files.py)
themselves: no C++ needed. Run with /usr/bin/python3 -m pytest -q tests/python/test_lora_reference.py.
"""

import pytest
import torch

import lora_files as lf
import lora_reference as lr

H = 64  # the tiny Flux hidden width


@pytest.fixture(scope="module")
def flux():
    return lf.flux_weights(seed=1)


@pytest.fixture(scope="module")
def wan():
    return lf.wan_weights("t2v", seed=2)


@pytest.fixture(scope="module")
def wan_i2v():
    return lf.wan_weights("i2v", seed=3, dim=64, ffn_dim=96, num_layers=1, text_dim=32)


def patched(base, family, loras, **kw):
    return lr.patched_weights(base, family, H if family == "flux" else None, loras, **kw)


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# Key mapping.

def test_flux_key_map_literals(flux):
    m = lr.key_map(flux, "flux", H)
    T = lr.Target
    qkv, lin1 = "double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight"
    assert m["diffusion_model.double_blocks.0.img_attn.qkv"] == T(qkv, None, False)
    assert m["double_blocks.0.img_attn.qkv"] == T(qkv, None, False)
    assert m["lora_unet_double_blocks_0_img_attn_qkv"] == T(qkv, None, False)
    assert m["transformer.transformer_blocks.0.attn.to_q"] == T(qkv, (0, 0, H), False)
    assert m["transformer.transformer_blocks.0.attn.to_k"] == T(qkv, (0, H, H), False)
    assert m["transformer.transformer_blocks.0.attn.to_v"] == T(qkv, (0, 2 * H, H), False)
    assert m["transformer.transformer_blocks.1.attn.add_v_proj"] == \
        T("double_blocks.1.txt_attn.qkv.weight", (0, 2 * H, H), False)
    assert m["lycoris_transformer_blocks_0_attn_to_k"] == T(qkv, (0, H, H), False)
    assert m["lora_transformer_transformer_blocks_0_attn_to_k"] == T(qkv, (0, H, H), False)
    assert m["transformer.single_transformer_blocks.1.attn.to_v"] == T(lin1, (0, 2 * H, H), False)
    assert m["transformer.single_transformer_blocks.1.proj_mlp"] == T(lin1, (0, 3 * H, 4 * H), False)
    assert m["diffusion_model.single_blocks.1.linear1_qkv"] == T(lin1, (0, 0, 3 * H), False)
    assert m["transformer.single_transformer_blocks.1.proj_out"] == \
        T("single_blocks.1.linear2.weight", None, False)
    assert m["transformer.transformer_blocks.0.norm1.linear"] == \
        T("double_blocks.0.img_mod.lin.weight", None, False)
    assert m["transformer.transformer_blocks.0.ff.net.0.proj"] == \
        T("double_blocks.0.img_mlp.0.weight", None, False)
    assert m["transformer.transformer_blocks.0.attn.norm_added_k"] == \
        T("double_blocks.0.txt_attn.norm.key_norm.scale", None, False)
    assert m["transformer.proj_out"] == T("final_layer.linear.weight", None, False)
    assert m["transformer.x_embedder"] == T("img_in.weight", None, False)
    assert m["transformer.norm_out.linear"] == T("final_layer.adaLN_modulation.1.weight", None, True)
    # Names that are not .weight map as themselves (natively only); biases too.
    assert m["diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale"].weight == \
        "double_blocks.0.img_attn.norm.query_norm.scale"
    assert m["diffusion_model.img_in.bias"] == T("img_in.bias", None, False)
    assert "lora_unet_img_in_bias" not in m
    assert "transformer.transformer_blocks.5.attn.to_q" not in m  # no such block
    assert not any(k.startswith("transformer.blocks.") for k in m)


def test_wan_key_map_literals(wan, wan_i2v):
    m = lr.key_map(wan, "wan")
    T = lr.Target
    for k, v in {
        "diffusion_model.blocks.0.self_attn.q": "blocks.0.self_attn.q.weight",
        "blocks.1.cross_attn.o": "blocks.1.cross_attn.o.weight",
        "lora_unet_blocks_1_ffn_2": "blocks.1.ffn.2.weight",
        "transformer.blocks.0.attn1.to_q": "blocks.0.self_attn.q.weight",
        "transformer.blocks.1.attn1.to_out.0": "blocks.1.self_attn.o.weight",
        "transformer.blocks.0.attn2.to_v": "blocks.0.cross_attn.v.weight",
        "transformer.blocks.0.attn1.norm_k": "blocks.0.self_attn.norm_k.weight",
        "transformer.blocks.1.attn2.norm_q": "blocks.1.cross_attn.norm_q.weight",
        "transformer.blocks.0.ffn.net.0.proj": "blocks.0.ffn.0.weight",
        "transformer.blocks.0.ffn.net.2": "blocks.0.ffn.2.weight",
        "transformer.blocks.1.norm2": "blocks.1.norm3.weight",
        "transformer.condition_embedder.time_embedder.linear_1": "time_embedding.0.weight",
        "transformer.condition_embedder.time_embedder.linear_2": "time_embedding.2.weight",
        "transformer.condition_embedder.text_embedder.linear_1": "text_embedding.0.weight",
        "transformer.condition_embedder.text_embedder.linear_2": "text_embedding.2.weight",
        "transformer.condition_embedder.time_proj": "time_projection.1.weight",
        "transformer.proj_out": "head.head.weight",
        "transformer.patch_embedding": "patch_embedding.weight",
        "diffusion_model.blocks.1.modulation": "blocks.1.modulation",
        "diffusion_model.blocks.0.cross_attn.k.bias": "blocks.0.cross_attn.k.bias",
    }.items():
        assert m[k] == T(v, None, False), k
    assert "transformer.blocks.0.attn2.add_k_proj" not in m  # t2v: no image branch
    assert "lora_transformer_blocks_0_attn1_to_q" not in m  # Flux-only spellings
    mi = lr.key_map(wan_i2v, "wan")
    assert mi["transformer.blocks.0.attn2.add_k_proj"] == T("blocks.0.cross_attn.k_img.weight",
                                                            None, False)
    assert mi["transformer.blocks.0.attn2.add_v_proj"] == T("blocks.0.cross_attn.v_img.weight",
                                                            None, False)


# ---------------------------------------------------------------------------------------------
# Every format of the same LoRA patches the same weights with the same bits.

NATIVE_FORMATS = ("native", "native_ab", "bare", "kohya")
ADAPTERS = ("lora", "dora", "loha", "lokr", "diff", "set")


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_native_formats_agree(family, adapter, flux, wan):
    base = flux if family == "flux" else wan
    targets = lf.default_targets(base, family, "kohya", adapter)  # what every format can name
    results = [patched(base, family, [(lf.make_lora(base, family, fmt=f, adapter=adapter,
                                                    targets=targets, seed=4), 0.8)])
               for f in NATIVE_FORMATS]
    assert len(results[0]) >= len(targets)
    for r in results[1:]:
        assert_same(results[0], r)


@pytest.mark.parametrize("spelling", ["up_down", "ab", "_lora", ".lora"])
def test_lora_part_spellings_agree(spelling, flux):
    want = patched(flux, "flux", [(lf.make_lora(flux, "flux", seed=5), 1.0)])
    got = patched(flux, "flux", [(lf.make_lora(flux, "flux", seed=5, spelling=spelling), 1.0)])
    assert_same(want, got)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_flux_diffusers_spellings_agree_and_rename_like_native(adapter, flux):
    res = [patched(flux, "flux", [(lf.make_lora(flux, "flux", fmt=f, adapter=adapter, seed=6),
                                   1.3)]) for f in ("diffusers", "lycoris", "onetrainer")]
    assert_same(res[0], res[1])
    assert_same(res[0], res[2])
    renames = [("transformer_blocks.0.attn.to_out.0", "double_blocks.0.img_attn.proj"),
               ("transformer_blocks.1.ff_context.net.2", "double_blocks.1.txt_mlp.2"),
               ("single_transformer_blocks.1.proj_out", "single_blocks.1.linear2"),
               ("single_transformer_blocks.0.norm.linear", "single_blocks.0.modulation.lin"),
               ("x_embedder", "img_in"), ("proj_out", "final_layer.linear")]
    a = lf.make_lora(flux, "flux", fmt="diffusers", adapter=adapter, seed=7,
                     targets=[d for d, _ in renames])
    b = lf.make_lora(flux, "flux", fmt="native", adapter=adapter, seed=7,
                     targets=[n for _, n in renames])
    assert_same(patched(flux, "flux", [(a, 0.6)]), patched(flux, "flux", [(b, 0.6)]))


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_wan_diffusers_renames_like_native(adapter, wan):
    renames = [("blocks.0.attn1.to_q", "blocks.0.self_attn.q"),
               ("blocks.1.attn2.to_out.0", "blocks.1.cross_attn.o"),
               ("blocks.0.ffn.net.0.proj", "blocks.0.ffn.0"),
               ("condition_embedder.time_proj", "time_projection.1"),
               ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
               ("proj_out", "head.head"), ("patch_embedding", "patch_embedding")]
    if adapter in ("diff", "set"):
        renames += [("blocks.1.norm2", "blocks.1.norm3"),
                    ("blocks.0.attn2.norm_k", "blocks.0.cross_attn.norm_k")]
    a = lf.make_lora(wan, "wan", fmt="diffusers", adapter=adapter, seed=8,
                     targets=[d for d, _ in renames])
    b = lf.make_lora(wan, "wan", fmt="native", adapter=adapter, seed=8,
                     targets=[n for _, n in renames])
    got = patched(wan, "wan", [(a, 0.9)])
    assert_same(got, patched(wan, "wan", [(b, 0.9)]))
    if adapter == "diff":
        assert "blocks.1.norm3.bias" in got and "blocks.0.self_attn.q.bias" in got


def _blockdiag_lora(parts, rank, alpha):
    """A single LoRA (up, down, alpha) equal to LoRAs of equal rank on consecutive row slices."""
    ups = [u for u, _ in parts]
    up = torch.zeros(sum(u.shape[0] for u in ups), rank * len(parts))
    row = 0
    for i, u in enumerate(ups):
        up[row:row + u.shape[0], i * rank:(i + 1) * rank] = u
        row += u.shape[0]
    down = torch.cat([d for _, d in parts], dim=0)
    return up, down, torch.tensor(alpha * len(parts))


def test_diffusers_qkv_offsets_equal_a_fused_lora(flux):
    r, alpha = 4, 2.0
    qkv = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
           "transformer_blocks.0.attn.to_v"]
    txt = ["transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.add_k_proj",
           "transformer_blocks.1.attn.add_v_proj"]
    single = ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
              "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"]
    sq = ["single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_k",
          "single_transformer_blocks.1.attn.to_v"]
    d = lf.make_lora(flux, "flux", fmt="diffusers", rank=r, alpha=alpha, seed=9,
                     targets=qkv + txt + single + sq)

    def parts(names):
        return [(d["transformer.%s.lora_B.weight" % n], d["transformer.%s.lora_A.weight" % n])
                for n in names]
    fused = {}
    for names, native in ((qkv, "diffusion_model.double_blocks.0.img_attn.qkv"),
                          (txt, "diffusion_model.double_blocks.1.txt_attn.qkv"),
                          (sq, "diffusion_model.single_blocks.1.linear1_qkv")):
        up, down, a = _blockdiag_lora(parts(names), r, alpha)
        fused.update({native + ".lora_up.weight": up, native + ".lora_down.weight": down,
                      native + ".alpha": a})
    # proj_mlp has 4h rows: fuse it with the q/k/v parts via a block-diagonal up as well.
    up, down, _ = _blockdiag_lora(parts(single), r, alpha)
    n = "diffusion_model.single_blocks.0.linear1"
    fused.update({n + ".lora_up.weight": up, n + ".lora_down.weight": down,
                  n + ".alpha": torch.tensor(alpha * 4)})
    want = patched(flux, "flux", [(fused, 0.75)])
    got = patched(flux, "flux", [(d, 0.75)])
    assert set(want) == set(got) == {"double_blocks.0.img_attn.qkv.weight",
                                      "double_blocks.1.txt_attn.qkv.weight",
                                      "single_blocks.0.linear1.weight",
                                      "single_blocks.1.linear1.weight"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
        assert not torch.equal(got[k], flux[k])
    # single_blocks.1.linear1: only rows [0, 3h) are patched.
    k = "single_blocks.1.linear1.weight"
    assert torch.equal(got[k][3 * H:], flux[k][3 * H:])
    assert not torch.equal(got[k][:H], flux[k][:H])


def test_diffusers_qkv_diffs_equal_the_fused_diff_exactly(flux):
    qkv = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
           "transformer_blocks.0.attn.to_v"]
    d = lf.make_lora(flux, "flux", fmt="diffusers", adapter="diff", targets=qkv, seed=10)
    fused = {"diffusion_model.double_blocks.0.img_attn.qkv.diff": torch.cat(
        [d["transformer.%s.diff" % n] for n in qkv])}
    assert "transformer.transformer_blocks.0.attn.to_q.diff_b" not in d  # ComfyUI drops it
    assert_same(patched(flux, "flux", [(d, 0.7)]), patched(flux, "flux", [(fused, 0.7)]))


# ---------------------------------------------------------------------------------------------
# Strength, stacking, rounding, dtypes.

@pytest.mark.parametrize("adapter", ["lora", "dora", "loha", "lokr", "diff"])
def test_strength_zero_gives_the_base_back(adapter, flux, wan):
    for family, base in (("flux", flux), ("wan", wan)):
        fmt = "diffusers" if family == "flux" else "native"
        out = patched(base, family, [(lf.make_lora(base, family, fmt=fmt, adapter=adapter,
                                                   seed=11), 0.0)])
        assert out
        for k, v in out.items():
            assert torch.equal(v, base[k]), k


def test_set_ignores_strength(wan):
    sd = lf.make_lora(wan, "wan", adapter="set", seed=12)
    a = patched(wan, "wan", [(sd, 0.0)])
    assert_same(a, patched(wan, "wan", [(sd, 1.0)]))
    assert_same(a, patched(wan, "wan", [(sd, -2.5)]))
    assert torch.equal(a["blocks.0.self_attn.q.weight"],
                       sd["diffusion_model.blocks.0.self_attn.q.set_weight"])


def test_stacking_applies_in_order(flux):
    a = lf.make_lora(flux, "flux", fmt="native", adapter="dora", seed=13)
    b = lf.make_lora(flux, "flux", fmt="kohya", adapter="lora", seed=14)
    ab = patched(flux, "flux", [(a, 0.7), (b, -0.3)])
    ba = patched(flux, "flux", [(b, -0.3), (a, 0.7)])
    k = "double_blocks.0.img_attn.qkv.weight"  # patched by both
    assert not torch.equal(ab[k], ba[k])  # DoRA does not commute with a LoRA
    # Stacked on float32 weights == one after the other (rounding to float32 is exact).
    step = patched(flux, "flux", [(a, 0.7)], all_weights=True)
    two = patched(step, "flux", [(b, -0.3)], all_weights=True)
    for k2, v in ab.items():
        assert torch.equal(v, two[k2]), k2
    # Two plain LoRAs commute (up to float32 rounding).
    c = lf.make_lora(flux, "flux", fmt="native", adapter="lora", seed=15)
    x, y = patched(flux, "flux", [(b, 0.5), (c, 0.25)]), patched(flux, "flux", [(c, 0.25), (b, 0.5)])
    for k2 in x:
        torch.testing.assert_close(x[k2], y[k2], rtol=1e-6, atol=1e-7)


def test_bf16_weights_are_rounded_once_to_nearest():
    base = lf.flux_weights(seed=16, dtype=torch.bfloat16)
    a = lf.make_lora(base, "flux", fmt="diffusers", adapter="lora", seed=17)
    b = lf.make_lora(base, "flux", fmt="native", adapter="loha", seed=18)
    got = patched(base, "flux", [(a, 1.0), (b, 0.5)])
    f32 = patched({k: v.float() for k, v in base.items()}, "flux", [(a, 1.0), (b, 0.5)])
    for k, v in got.items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, f32[k].to(torch.bfloat16)), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_tensors_in_half_precision_are_upcast(dtype, wan):
    for adapter in ("lora", "dora", "lokr", "diff"):
        sd = lf.make_lora(wan, "wan", fmt="kohya", adapter=adapter, seed=19, dtype=dtype)
        assert all(v.dtype == dtype for v in sd.values())
        as_f32 = {k: v.float() for k, v in sd.items()}
        assert_same(patched(wan, "wan", [(sd, 0.8)]), patched(wan, "wan", [(as_f32, 0.8)]))


def test_no_alpha_means_scale_one(wan):
    sd = lf.make_lora(wan, "wan", alpha=None, targets=["blocks.0.self_attn.q"], seed=20)
    assert not any(k.endswith(".alpha") for k in sd)
    p = "diffusion_model.blocks.0.self_attn.q"
    want = wan["blocks.0.self_attn.q.weight"] + 0.5 * (sd[p + ".lora_up.weight"]
                                                      @ sd[p + ".lora_down.weight"])
    got = patched(wan, "wan", [(sd, 0.5)])["blocks.0.self_attn.q.weight"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The arithmetic of each adapter against hand-written formulas (float64).

def test_lora_alpha_over_rank_on_a_5d_conv(wan):
    sd = lf.make_lora(wan, "wan", targets=["patch_embedding"], rank=3, alpha=1.5, seed=21)
    up = sd["diffusion_model.patch_embedding.lora_up.weight"].double()
    down = sd["diffusion_model.patch_embedding.lora_down.weight"].double()
    assert up.shape == (128, 3, 1, 1, 1) and down.shape == (3, 16, 1, 2, 2)
    w = wan["patch_embedding.weight"].double()
    want = w + 0.8 * (1.5 / 3) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    got = patched(wan, "wan", [(sd, 0.8)])["patch_embedding.weight"]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def _dora_by_hand(w, delta, m, strength, output_axis):
    """DoRA as ComfyUI computes it, written out in float64 on a 2-D weight."""
    eps = torch.finfo(torch.float32).eps
    calc = w + delta
    if output_axis:  # per row: the norm of the ORIGINAL weight
        norm = torch.stack([w[i].norm() for i in range(w.shape[0])]).reshape(-1, 1)
    else:  # per column: the norm of weight + delta
        norm = torch.stack([calc[:, j].norm() for j in range(w.shape[1])]).reshape(1, -1)
    calc = calc * (m / (norm + eps))
    return calc if strength == 1.0 else w + strength * (calc - w)


@pytest.mark.parametrize("output_axis", [True, False])
@pytest.mark.parametrize("strength", [1.0, 0.5, -1.25])
def test_dora_against_a_hand_example(output_axis, strength):
    w = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]])
    up = torch.tensor([[0.5], [-1.5]])
    down = torch.tensor([[2.0, 0.25, -1.0]])
    m = torch.tensor([[2.5], [0.75]]) if output_axis else torch.tensor([[1.5, 0.5, 2.0]])
    sd = {"x.lora_up.weight": up, "x.lora_down.weight": down, "x.alpha": torch.tensor(0.5),
          "x.dora_scale": m}
    got = lr.apply_module(w, sd, "x", strength)
    delta = 0.5 * (up.double() @ down.double())  # alpha / rank = 0.5; strength is not in it
    want = _dora_by_hand(w.double(), delta, m.double(), strength, output_axis)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    if output_axis and strength == 1.0:
        # ComfyUI's quirk: rows get norm m * |w + delta| / |w|, not m.
        rows = got.double().norm(dim=1)
        expect = m.double().flatten() * (w.double() + delta).norm(dim=1) / w.double().norm(dim=1)
        torch.testing.assert_close(rows, expect, rtol=1e-6, atol=1e-6)
        assert (rows - m.double().flatten()).abs().max() > 0.1


def test_dora_on_an_offset_slice_uses_the_slice(flux):
    sd = lf.make_lora(flux, "flux", fmt="diffusers", adapter="dora",
                      targets=["transformer_blocks.0.attn.to_k"], seed=22, dora_axis="input")
    p = "transformer.transformer_blocks.0.attn.to_k"
    assert sd[p + ".dora_scale"].shape == (1, H)
    w = flux["double_blocks.0.img_attn.qkv.weight"]
    got = patched(flux, "flux", [(sd, 0.6)])["double_blocks.0.img_attn.qkv.weight"]
    delta = (2.0 / 4) * (sd[p + ".lora_B.weight"].double() @ sd[p + ".lora_A.weight"].double())
    want = _dora_by_hand(w[H:2 * H].double(), delta, sd[p + ".dora_scale"].double(), 0.6, False)
    torch.testing.assert_close(got[H:2 * H].double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[:H], w[:H]) and torch.equal(got[2 * H:], w[2 * H:])


def test_loha_against_the_formula():
    g = torch.Generator().manual_seed(23)
    w = torch.randn(6, 10, generator=g)
    sd = {"m.hada_w1_a": torch.randn(6, 3, generator=g), "m.hada_w1_b": torch.randn(3, 10, generator=g),
          "m.hada_w2_a": torch.randn(6, 3, generator=g), "m.hada_w2_b": torch.randn(3, 10, generator=g),
          "m.alpha": torch.tensor(1.5)}
    d = {k: v.double() for k, v in sd.items()}
    want = w.double() + 0.7 * 0.5 * ((d["m.hada_w1_a"] @ d["m.hada_w1_b"])
                                     * (d["m.hada_w2_a"] @ d["m.hada_w2_b"]))
    torch.testing.assert_close(lr.apply_module(w, sd, "m", 0.7).double(), want, rtol=0, atol=1e-5)


def _cp(t, wb, wa):
    """einsum 'i j k l, j r, i p -> p r k l' written as loops."""
    out = torch.zeros(wa.shape[1], wb.shape[1], t.shape[2], t.shape[3], dtype=torch.float64)
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            out += wa[i][:, None, None, None] * wb[j][None, :, None, None] * t[i, j][None, None]
    return out


def test_loha_cp_form_on_a_4d_conv():
    g = torch.Generator().manual_seed(24)
    w = torch.randn(5, 4, 3, 3, generator=g)
    r = 2
    sd = {"m.hada_w1_a": torch.randn(r, 5, generator=g), "m.hada_w1_b": torch.randn(r, 4, generator=g),
          "m.hada_w2_a": torch.randn(r, 5, generator=g), "m.hada_w2_b": torch.randn(r, 4, generator=g),
          "m.hada_t1": torch.randn(r, r, 3, 3, generator=g), "m.hada_t2": torch.randn(r, r, 3, 3, generator=g)}
    d = {k: v.double() for k, v in sd.items()}
    m1 = _cp(d["m.hada_t1"], d["m.hada_w1_b"], d["m.hada_w1_a"])
    m2 = _cp(d["m.hada_t2"], d["m.hada_w2_b"], d["m.hada_w2_a"])
    want = w.double() + 1.0 * (m1 * m2)  # no alpha: scale 1
    torch.testing.assert_close(lr.apply_module(w, sd, "m").double(), want, rtol=0, atol=1e-5)


def test_lora_mid_tucker_on_a_4d_conv():
    """LoCon's mid: ComfyUI's mm/reshape/transpose equals the Tucker product
    sum_{m,n} up[i,m] mid[m,n,k,l] down[n,j]; the writer's lora_mid on a standalone conv."""
    g = torch.Generator().manual_seed(25)
    base = {"conv.weight": torch.randn(8, 6, 3, 3, generator=g) / 7}
    sd = lf.make_lora(base, "flux", adapter="lora_mid", rank=4, alpha=3.0, seed=26, hidden_size=0)
    p = "diffusion_model.conv"
    assert sd[p + ".lora_mid.weight"].shape == (4, 4, 3, 3)
    up = sd[p + ".lora_up.weight"].double().flatten(1)
    down = sd[p + ".lora_down.weight"].double().flatten(1)
    mid = sd[p + ".lora_mid.weight"].double()
    tucker = torch.einsum("mnkl,im,nj->ijkl", mid, up, down)
    want = base["conv.weight"].double() + 0.9 * (3.0 / 4) * tucker
    got = lr.patched_weights(base, "flux", 0, [(sd, 0.9)])["conv.weight"]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    delta = (got - base["conv.weight"]).std() / base["conv.weight"].std()
    assert 0.01 < float(delta) < 0.2


@pytest.mark.parametrize("form,dim", [("w2ab", 2), ("w1ab", 1), ("both", 2), ("full", None)])
def test_lokr_kron_shapes_and_alpha(form, dim):
    g = torch.Generator().manual_seed(27)
    w = torch.randn(6, 8, generator=g)
    sd = {"k.alpha": torch.tensor(4.0)}
    if form in ("w1ab", "both"):
        sd.update({"k.lokr_w1_a": torch.randn(2, 1, generator=g), "k.lokr_w1_b": torch.randn(1, 2, generator=g)})
    else:
        sd["k.lokr_w1"] = torch.randn(2, 2, generator=g)
    if form in ("w2ab", "both"):
        sd.update({"k.lokr_w2_a": torch.randn(3, 2, generator=g), "k.lokr_w2_b": torch.randn(2, 4, generator=g)})
    else:
        sd["k.lokr_w2"] = torch.randn(3, 4, generator=g)
    d = {k: v.double() for k, v in sd.items()}
    w1 = d["k.lokr_w1"] if "k.lokr_w1" in d else d["k.lokr_w1_a"] @ d["k.lokr_w1_b"]
    w2 = d["k.lokr_w2"] if "k.lokr_w2" in d else d["k.lokr_w2_a"] @ d["k.lokr_w2_b"]
    kron = torch.zeros(6, 8, dtype=torch.float64)
    for a in range(2):
        for b in range(2):
            kron[a * 3:(a + 1) * 3, b * 4:(b + 1) * 4] = w1[a, b] * w2
    scale = 4.0 / dim if dim else 1.0  # the rank of the factorised half (w2's when both)
    got = lr.apply_module(w, sd, "k", 0.5)
    torch.testing.assert_close(got.double(), w.double() + 0.5 * scale * kron, rtol=0, atol=1e-5)


def test_lokr_alpha_zero_is_zero_not_one():
    """ComfyUI tests `alpha is not None`: alpha 0 scales the patch to nothing."""
    g = torch.Generator().manual_seed(28)
    w = torch.randn(6, 8, generator=g)
    sd = {"k.lokr_w1": torch.randn(2, 2, generator=g), "k.lokr_w2_a": torch.randn(3, 2, generator=g),
          "k.lokr_w2_b": torch.randn(2, 4, generator=g), "k.alpha": torch.tensor(0.0)}
    assert torch.equal(lr.apply_module(w, sd, "k"), w)


def test_lokr_4d_w2_and_cp_t2():
    g = torch.Generator().manual_seed(29)
    w = torch.randn(8, 6, 3, 3, generator=g)
    w1 = torch.randn(2, 3, generator=g)
    w2 = torch.randn(4, 2, 3, 3, generator=g)
    got = lr.apply_module(w, {"k.lokr_w1": w1, "k.lokr_w2": w2}, "k")
    kron = torch.zeros(8, 6, 3, 3, dtype=torch.float64)
    for a in range(2):
        for b in range(3):
            kron[a * 4:(a + 1) * 4, b * 2:(b + 1) * 2] = w1[a, b].double() * w2.double()
    torch.testing.assert_close(got.double(), w.double() + kron, rtol=0, atol=1e-5)
    # CP form of w2 (lokr_t2): alpha / w2_b rows.
    sd = {"k.lokr_w1": w1, "k.lokr_w2_a": torch.randn(2, 4, generator=g),
          "k.lokr_w2_b": torch.randn(2, 2, generator=g), "k.lokr_t2": torch.randn(2, 2, 3, 3, generator=g),
          "k.alpha": torch.tensor(1.0)}
    w2 = _cp(sd["k.lokr_t2"].double(), sd["k.lokr_w2_b"].double(), sd["k.lokr_w2_a"].double())
    for a in range(2):
        for b in range(3):
            kron[a * 4:(a + 1) * 4, b * 2:(b + 1) * 2] = w1[a, b].double() * w2
    got = lr.apply_module(w, sd, "k", 2.0)
    torch.testing.assert_close(got.double(), w.double() + 2.0 * 0.5 * kron, rtol=0, atol=1e-5)


def test_norm_out_patch_halves_are_swapped(flux):
    sd = lf.make_lora(flux, "flux", fmt="diffusers", adapter="diff", targets=["norm_out.linear"],
                      seed=30)
    d = sd["transformer.norm_out.linear.diff"]
    k = "final_layer.adaLN_modulation.1.weight"
    got = patched(flux, "flux", [(sd, 1.0)])[k]
    assert torch.equal(got[:H], flux[k][:H] + d[H:])
    assert torch.equal(got[H:], flux[k][H:] + d[:H])
    # set_weight is not swapped.
    s = {"transformer.norm_out.linear.set_weight": d}
    assert torch.equal(patched(flux, "flux", [(s, 1.0)])[k], d)


def test_diff_b_patches_the_bias(wan):
    sd = lf.make_lora(wan, "wan", adapter="diff", targets=["blocks.0.norm3", "head.head"], seed=31)
    got = patched(wan, "wan", [(sd, 0.5)])
    assert set(got) == {"blocks.0.norm3.weight", "blocks.0.norm3.bias", "head.head.weight",
                        "head.head.bias"}
    want = wan["head.head.bias"] + 0.5 * sd["diffusion_model.head.head.diff_b"]
    assert torch.equal(got["head.head.bias"], want)


def test_later_parts_replace_the_adapter(wan):
    """ComfyUI's precedence within one module: diff replaces the adapter, set_weight replaces
    both (one patch per weight)."""
    sd = lf.make_lora(wan, "wan", targets=["blocks.0.self_attn.q"], seed=32)
    p = "diffusion_model.blocks.0.self_attn.q"
    d = torch.full((128, 128), 0.01)
    k = "blocks.0.self_attn.q.weight"
    assert torch.equal(patched(wan, "wan", [({**sd, p + ".diff": d}, 1.0)])[k], wan[k] + d)
    s = torch.ones(128, 128)
    assert torch.equal(patched(wan, "wan", [({**sd, p + ".diff": d, p + ".set_weight": s}, 1.0)])[k], s)


def test_text_encoder_keys_are_ignored(flux):
    sd = lf.make_lora(flux, "flux", seed=33)
    te = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)}
    assert_same(patched(flux, "flux", [(sd, 1.0)]), patched(flux, "flux", [({**sd, **te}, 1.0)]))
    _, unmatched = lr.match_lora({**sd, **te, "lora_unet_nothing.alpha": torch.tensor(1.0)},
                                 lr.key_map(flux, "flux", H))
    assert unmatched == ["lora_unet_nothing.alpha"]


# ---------------------------------------------------------------------------------------------
# Refusals.

@pytest.mark.parametrize("parts,name", [
    ({".a1.weight": (4, 64), ".a2.weight": (64, 4), ".b1.weight": (4, 64), ".b2.weight": (64, 4)},
     "GLoRA"),
    ({".oft_blocks": (4, 16, 16)}, "OFT"),
    ({".oft_blocks": (2, 4, 16, 16)}, "BOFT"),
    ({".lora_up.weight": (64, 4), ".lora_down.weight": (4, 64), ".reshape_weight": (2,)},
     "reshape_weight"),
])
def test_unsupported_adapters_are_refused_by_name(parts, name, flux):
    x = "diffusion_model.double_blocks.0.img_attn.proj"
    sd = {x + k: torch.zeros(s) for k, s in parts.items()}
    with pytest.raises(lr.UnsupportedAdapter, match=name):
        patched(flux, "flux", [(sd, 1.0)])


def test_a_lora_for_another_model_matches_nothing(flux, wan):
    sd = lf.make_lora(wan, "wan", seed=34)
    with pytest.raises(lr.LoraError, match=r"0 of %d keys matched" % len(sd)) as e:
        patched(flux, "flux", [(sd, 1.0)])
    assert "blocks.0" in str(e.value)


@pytest.mark.parametrize("change,message", [
    (lambda sd, p: sd.__setitem__(p + ".lora_up.weight", torch.zeros(65, 4)),
     "double_blocks.0.img_attn.proj.weight"),
    (lambda sd, p: sd.__setitem__(p + ".lora_down.weight", torch.zeros(3, 64)), "different ranks"),
    (lambda sd, p: sd.pop(p + ".lora_down.weight"), "lora_down.weight is missing"),
    (lambda sd, p: sd.__setitem__(p + ".alpha", torch.tensor(float("inf"))), "not finite"),
])
def test_broken_modules_are_refused(change, message, flux):
    sd = lf.make_lora(flux, "flux", targets=["double_blocks.0.img_attn.proj"], seed=35)
    change(sd, "diffusion_model.double_blocks.0.img_attn.proj")
    with pytest.raises(lr.LoraError, match=message):
        patched(flux, "flux", [(sd, 1.0)])


def test_shape_mismatches_name_the_weight(flux, wan):
    sd = {"transformer.transformer_blocks.0.attn.to_k.diff": torch.zeros(3 * H, H)}
    with pytest.raises(lr.LoraError, match=r"double_blocks\.0\.img_attn\.qkv\.weight"):
        patched(flux, "flux", [(sd, 1.0)])
    sd = lf.make_lora(wan, "wan", adapter="loha", targets=["blocks.1.ffn.0"], seed=36)
    sd["diffusion_model.blocks.1.ffn.0.hada_w2_a"] = torch.zeros(255, 4)
    with pytest.raises(lr.LoraError, match=r"blocks\.1\.ffn\.0\.weight"):
        patched(wan, "wan", [(sd, 1.0)])


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_strengths_are_refused(strength, wan):
    with pytest.raises(lr.LoraError, match="not finite"):
        patched(wan, "wan", [(lf.make_lora(wan, "wan", seed=37), strength)])


def test_two_modules_on_one_weight_and_diff_b_on_a_slice_are_refused(flux):
    a = lf.make_lora(flux, "flux", fmt="native", targets=["img_in"], seed=38)
    b = lf.make_lora(flux, "flux", fmt="kohya", targets=["img_in"], seed=39)
    with pytest.raises(lr.LoraError, match="both patch img_in.weight"):
        patched(flux, "flux", [({**a, **b}, 1.0)])
    sd = {"transformer.transformer_blocks.0.attn.to_q.diff_b": torch.zeros(H)}
    with pytest.raises(lr.LoraError, match="diff_b"):
        patched(flux, "flux", [(sd, 1.0)])


# ---------------------------------------------------------------------------------------------
# The writer: every default file matches fully and changes its weights visibly, finitely.

@pytest.mark.parametrize("family", ["flux", "wan"])
def test_written_files_match_fully_and_change_weights_visibly(family, flux, wan, wan_i2v, tmp_path):
    from safetensors_io import load_safetensors
    bases = [flux] if family == "flux" else [wan, wan_i2v]
    fmts = lf.FORMATS if family == "flux" else ("native", "native_ab", "bare", "kohya", "diffusers")
    for base in bases:
        kmap = lr.key_map(base, family, H if family == "flux" else None)
        for fmt in fmts:
            for adapter in ADAPTERS:
                path = tmp_path / ("%s-%s.safetensors" % (fmt, adapter))
                sd = lf.write_lora(path, base, family, fmt=fmt, adapter=adapter, seed=40,
                                   dtype=torch.bfloat16)
                back, _ = load_safetensors(path)
                assert_same(back, sd)
                _, unmatched = lr.match_lora(sd, kmap)
                assert unmatched == [], (fmt, adapter, unmatched)
                out = patched(base, family, [(sd, 1.0)])
                assert len(out) >= 7, (fmt, adapter)
                for k, v in out.items():
                    assert torch.isfinite(v).all()
                    delta = float((v - base[k]).abs().max() / base[k].abs().max())
                    assert 0.005 < delta < 0.5, (fmt, adapter, k, delta)
    if family == "wan":
        sd = lf.make_lora(wan_i2v, "wan", fmt="diffusers", seed=41)
        assert "blocks.0.cross_attn.k_img.weight" in patched(wan_i2v, "wan", [(sd, 1.0)])
