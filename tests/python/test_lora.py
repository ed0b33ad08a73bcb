"""LoRA end to end: `fleet run-local MODEL --lora FILE[:STRENGTH]... [--dump-weights FILE]` on
small random Flux and WAN models, against the independent Python reference of ComfyUI's LoRA
arithmetic (lora_reference.py) and the Python model references (flux_reference.py,
wan_reference.py) run on the reference's patched weights.

* --dump-weights writes every weight of the model (names without the file prefix, patched, in
  the compute dtype): float32 patched weights equal the reference within 1e-5 of the weight's
  largest magnitude, and exactly for diff (at strength 1) and set_weight; unpatched weights are
  the model's bits.
* The model output with LoRAs equals the Python model on the reference's patched weights within
  2e-5 max-abs (float32).
* Bad LoRAs (nothing matches, a shape or rank that does not fit, a non-finite strength, GLoRA /
  OFT / BOFT / reshape_weight) make run-local exit non-zero naming what is wrong.
"""
import json
import re
import subprocess

import pytest
import torch

import flux_reference as fref
import lora_files as lf
import lora_reference as lr
import wan_reference as wref
from safetensors_io import load_safetensors, save_safetensors

REL = 1e-5        # patched float32 weights: max|got - want| <= REL * max|want|
TOLERANCE = 2e-5  # model outputs, max-abs, float32 (as test_flux.py / test_wan.py)
WAN_DIMS = dict(dim=128, ffn_dim=256, num_layers=2, text_dim=64)
FLUX_FORMATS = ("native", "native_ab", "bare", "kohya", "diffusers", "lycoris", "onetrainer")
WAN_FORMATS = ("native", "native_ab", "bare", "kohya", "diffusers")
ADAPTERS = ("lora", "dora", "loha", "lokr", "diff", "set")
# Strength per adapter: DoRA's strength != 1 branch here (== 1 in its own test), diff at 1 so
# the sum is exact, set at 0.3 (set ignores it).
STRENGTH = {"lora": 0.8, "dora": 0.6, "loha": 1.2, "lokr": -0.5, "diff": 1.0, "set": 0.3}
# Stored dtype of the LoRA tensors by format (the C++ upcasts them to float32).
LORA_DTYPE = {"native": torch.bfloat16, "kohya": torch.float16}


# ---------------------------------------------------------------------------------------------
# Models, inputs, running.

@pytest.fixture(scope="module")
def flux_model(gen_model):
    return gen_model("--preset", "tiny", "--seed", 21, "--dtype", "f32")


@pytest.fixture(scope="module")
def wan_models(tmp_path_factory):
    """{"t2v": path, "i2v": path}: small WAN models as test_wan.py writes them."""
    root = tmp_path_factory.mktemp("wan-lora")
    out = {}
    for variant, dims in (("t2v", WAN_DIMS),
                          ("i2v", dict(dim=128, ffn_dim=192, num_layers=2, text_dim=64))):
        path = root / ("wan-%s.safetensors" % variant)
        w = wref.random_weights(variant, seed=23, **dims)
        save_safetensors(w, path, {"config": json.dumps({"num_heads": 2})})
        out[variant] = path
    return out


def model_path(family, flux_model, wan_models, variant="t2v"):
    return flux_model if family == "flux" else wan_models[variant]


def base_weights(path):
    """The model's weights without the file prefix, and its metadata."""
    w, meta = load_safetensors(path)
    p = "model.diffusion_model."
    return {(k[len(p):] if k.startswith(p) else k): v for k, v in w.items()}, meta


def lora_flags(loras):
    flags = []
    for path, strength in loras:
        flags += ["--lora", str(path) if strength is None else "%s:%r" % (path, strength)]
    return flags


def run_local(fleet_bin, *args):
    return subprocess.run([str(fleet_bin), "run-local", *[str(a) for a in args]],
                          capture_output=True, text=True)


def checked(p):
    assert p.returncode == 0, "fleet run-local -> rc %d\n%s" % (p.returncode, p.stderr)
    return p


def dump(fleet_bin, tmp_path, model, loras):
    out = tmp_path / "dump.safetensors"
    checked(run_local(fleet_bin, model, *lora_flags(loras), "--dump-weights", out))
    return load_safetensors(out)[0]


def write(tmp_path, name, base, family, **kw):
    path = tmp_path / (name + ".safetensors")
    sd = lf.write_lora(path, base, family, **kw)
    return path, sd


def reference(base, family, loras, **kw):
    """lora_reference on [(lora dict, strength)], strength None meaning 1."""
    return lr.patched_weights(base, family, None, [(sd, 1.0 if s is None else s) for sd, s in loras],
                              **kw)


def close(got, want, rel=REL):
    return float((got.double() - want.double()).abs().max()) <= rel * float(want.abs().max())


def check_dump(got, base, want, exact=False, rel=REL):
    """got: the --dump-weights tensors; base: the model's; want: the reference's patched ones."""
    assert set(got) == set(base), sorted(set(got) ^ set(base))
    assert want, "the LoRA patches nothing"
    for name, b in base.items():
        g = got[name]
        assert g.dtype == b.dtype and g.shape == b.shape, name
        if name not in want:
            assert torch.equal(g, b), "%s is not patched but differs from the model" % name
        elif exact:
            assert torch.equal(g, want[name]), "%s: %g from the reference" % (
                name, float((g.double() - want[name].double()).abs().max()))
        else:
            assert close(g, want[name], rel), "%s: %g from the reference (max %g)" % (
                name, float((g.double() - want[name].double()).abs().max()),
                float(want[name].abs().max()))
            assert not torch.equal(want[name], b), name


# Flux inputs from `fleet gen-inputs`; WAN inputs as test_wan.py makes them.

def flux_inputs(gen_inputs, model):
    return gen_inputs(model, "--batch", 1, "--height", 6, "--width", 8, "--txt-len", 4, "--seed", 5)


def wan_inputs(path, variant="t2v"):
    g = torch.Generator().manual_seed(3)
    x = {"x": torch.randn(1, wref.VARIANT_CHANNELS[variant][0], 2, 4, 6, generator=g),
         "context": torch.randn(1, 5, WAN_DIMS["text_dim"], generator=g),
         "timestep": torch.rand(1, generator=g) * 1000}
    if variant == "i2v":
        x["clip_fea"] = torch.randn(1, 257, wref.CLIP_DIM, generator=g)
    save_safetensors(x, path)
    return x


def model_reference(family, weights, meta, inputs_path):
    x, _ = load_safetensors(inputs_path)
    if family == "flux":
        r = fref.FluxReference(weights, meta)
        out, _ = r.forward(x["x"], x["timestep"], x["context"], x["y"], x.get("guidance"),
                           guidance_dtype=x["guidance"].dtype if "guidance" in x else None)
        return out
    config = wref.config_from_weights(weights, {"num_heads": 2})
    return wref.forward(weights, config, x["x"], x["timestep"], x["context"], x.get("clip_fea"))


def run_out(fleet_bin, tmp_path, model, inputs, loras):
    out = tmp_path / "out.safetensors"
    checked(run_local(fleet_bin, model, "--inputs", inputs, "--out", out, *lora_flags(loras)))
    return load_safetensors(out)[0]["out"]


def max_abs(a, b):
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------------------------------------
# (a) --dump-weights: every format and adapter against the reference.

def test_dump_weights_without_lora_is_the_model(fleet_bin, flux_model, wan_models, tmp_path):
    for model in (flux_model, wan_models["t2v"]):
        base, _ = base_weights(model)
        got = dump(fleet_bin, tmp_path, model, [])
        assert set(got) == set(base)
        for k, v in base.items():
            assert torch.equal(got[k], v), k


DUMP_CASES = [("flux", f, a) for f in FLUX_FORMATS for a in ADAPTERS] + \
             [("wan", f, a) for f in WAN_FORMATS for a in ADAPTERS]


@pytest.mark.parametrize("family,fmt,adapter", DUMP_CASES, ids=lambda v: str(v))
def test_dump_weights_match_the_reference(family, fmt, adapter, fleet_bin, flux_model,
                                          wan_models, tmp_path):
    model = model_path(family, flux_model, wan_models)
    base, _ = base_weights(model)
    path, sd = write(tmp_path, "l", base, family, fmt=fmt, adapter=adapter, seed=51,
                     dtype=LORA_DTYPE.get(fmt, torch.float32))
    strength = STRENGTH[adapter]
    got = dump(fleet_bin, tmp_path, model, [(path, strength)])
    want = reference(base, family, [(sd, strength)])
    check_dump(got, base, want, exact=adapter in ("diff", "set"))


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_dora_at_strength_one(family, fleet_bin, flux_model, wan_models, tmp_path):
    model = model_path(family, flux_model, wan_models)
    base, _ = base_weights(model)
    fmt = "diffusers" if family == "flux" else "kohya"  # Flux: DoRA on q/k/v slices too
    for axis in ("output", "input"):
        path, sd = write(tmp_path, axis, base, family, fmt=fmt, adapter="dora", seed=52,
                         dora_axis=axis)
        got = dump(fleet_bin, tmp_path, model, [(path, 1.0)])
        check_dump(got, base, reference(base, family, [(sd, 1.0)]))


def test_diff_at_other_strengths_and_no_strength_means_one(fleet_bin, flux_model, tmp_path):
    base, _ = base_weights(flux_model)
    path, sd = write(tmp_path, "d", base, "flux", fmt="diffusers", adapter="diff", seed=53)
    check_dump(dump(fleet_bin, tmp_path, flux_model, [(path, -0.7)]), base,
               reference(base, "flux", [(sd, -0.7)]))
    check_dump(dump(fleet_bin, tmp_path, flux_model, [(path, None)]), base,
               reference(base, "flux", [(sd, 1.0)]), exact=True)


@pytest.mark.parametrize("adapter", ["lora", "dora", "loha", "lokr", "diff"])
def test_strength_zero_gives_the_model_back(adapter, fleet_bin, flux_model, tmp_path):
    base, _ = base_weights(flux_model)
    path, _ = write(tmp_path, "z", base, "flux", fmt="diffusers", adapter=adapter, seed=54)
    got = dump(fleet_bin, tmp_path, flux_model, [(path, 0.0)])
    assert set(got) == set(base)
    for k, v in base.items():
        assert torch.equal(got[k], v), k


def test_wan_i2v_image_branch_from_diffusers_names(fleet_bin, wan_models, tmp_path):
    model = wan_models["i2v"]
    base, _ = base_weights(model)
    path, sd = write(tmp_path, "i", base, "wan", fmt="diffusers", adapter="lora", seed=55,
                     targets=["blocks.0.attn2.add_k_proj", "blocks.1.attn2.add_v_proj",
                              "blocks.1.attn2.to_out.0"])
    want = reference(base, "wan", [(sd, 0.9)])
    assert set(want) == {"blocks.0.cross_attn.k_img.weight", "blocks.1.cross_attn.v_img.weight",
                         "blocks.1.cross_attn.o.weight"}
    check_dump(dump(fleet_bin, tmp_path, model, [(path, 0.9)]), base, want)


def test_prefixed_model_file(fleet_bin, gen_model, tmp_path):
    """A model whose file names carry model.diffusion_model.: the LoRA maps onto the names
    without it, and the dump names them without it."""
    model = gen_model("--preset", "tiny", "--seed", 21, "--dtype", "f32",
                      "--prefix", "model.diffusion_model.")
    base, _ = base_weights(model)
    path, sd = write(tmp_path, "p", base, "flux", fmt="native", adapter="lora", seed=56)
    check_dump(dump(fleet_bin, tmp_path, model, [(path, None)]), base,
               reference(base, "flux", [(sd, None)]))


def test_bf16_model_weights_rounded_once(fleet_bin, gen_model, tmp_path):
    """A bf16 model: patched in float32 and rounded once to bf16, so within one bf16 step of the
    reference (float32 sums in another order may round the other way) and mostly equal."""
    model = gen_model("--preset", "tiny", "--seed", 22, "--dtype", "bf16")
    base, _ = base_weights(model)
    a, sa = write(tmp_path, "a", base, "flux", fmt="diffusers", adapter="lora", seed=57)
    b, sb = write(tmp_path, "b", base, "flux", fmt="native", adapter="dora", seed=58)
    got = dump(fleet_bin, tmp_path, model, [(a, 0.8), (b, 0.5)])
    want = reference(base, "flux", [(sa, 0.8), (sb, 0.5)])
    assert set(got) == set(base)
    same = total = 0
    for k, v in base.items():
        assert got[k].dtype == torch.bfloat16, k
        if k not in want:
            assert torch.equal(got[k], v), k
            continue
        g, w = got[k].double(), want[k].double()
        step = w.abs().clamp(min=1e-30) * 2.0 ** -7
        assert bool(((g - w).abs() <= step * 1.0001).all()), k
        same += int((g == w).sum())
        total += w.numel()
    assert same >= 0.99 * total, "%d of %d patched values differ" % (total - same, total)


# ---------------------------------------------------------------------------------------------
# (b) Model outputs with LoRAs against the Python models on the reference's weights.

OUTPUT_CASES = [("flux", "diffusers", "lora"), ("flux", "native", "dora"),
                ("flux", "kohya", "loha"), ("flux", "diffusers", "lokr"),
                ("flux", "native", "diff"), ("flux", "diffusers", "set"),
                ("wan", "native", "lora"), ("wan", "diffusers", "dora"),
                ("wan", "kohya", "lokr"), ("wan", "native_ab", "loha"),
                ("wan", "diffusers", "diff"), ("wan", "native", "set")]


@pytest.mark.parametrize("family,fmt,adapter", OUTPUT_CASES, ids=lambda v: str(v))
def test_output_matches_the_python_model(family, fmt, adapter, fleet_bin, flux_model, wan_models,
                                         gen_inputs, tmp_path):
    model = model_path(family, flux_model, wan_models)
    base, meta = base_weights(model)
    if family == "flux":
        inputs = flux_inputs(gen_inputs, model)
    else:
        inputs = tmp_path / "in.safetensors"
        wan_inputs(inputs)
    path, sd = write(tmp_path, "l", base, family, fmt=fmt, adapter=adapter, seed=61)
    strength = STRENGTH[adapter]
    got = run_out(fleet_bin, tmp_path, model, inputs, [(path, strength)])
    weights = reference(base, family, [(sd, strength)], all_weights=True)
    want = model_reference(family, weights, meta, inputs)
    plain = model_reference(family, base, meta, inputs)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert max_abs(got, want) < TOLERANCE, max_abs(got, want)
    assert max_abs(want, plain) > 50 * TOLERANCE  # the LoRA is visible in the output


def test_wan_i2v_output_with_lora(fleet_bin, wan_models, tmp_path):
    model = wan_models["i2v"]
    base, meta = base_weights(model)
    inputs = tmp_path / "in.safetensors"
    wan_inputs(inputs, "i2v")
    path, sd = write(tmp_path, "l", base, "wan", fmt="diffusers", adapter="lora", seed=62)
    got = run_out(fleet_bin, tmp_path, model, inputs, [(path, 1.0)])
    want = model_reference("wan", reference(base, "wan", [(sd, 1.0)], all_weights=True), meta,
                           inputs)
    assert max_abs(got, want) < TOLERANCE


# ---------------------------------------------------------------------------------------------
# (c) Stacked LoRAs.

STACKS = {
    # DoRA first, then a LoRA / LoHa on some of the same weights (for Flux on q/k/v slices of
    # double_blocks.0.img_attn.qkv): the order matters.
    "flux": (("native", "dora"), ("diffusers", "lora")),
    "wan": (("kohya", "dora"), ("diffusers", "loha")),
}


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_two_loras_stacked(family, fleet_bin, flux_model, wan_models, gen_inputs, tmp_path):
    model = model_path(family, flux_model, wan_models)
    base, meta = base_weights(model)
    (fa, aa), (fb, ab) = STACKS[family]
    a, sa = write(tmp_path, "a", base, family, fmt=fa, adapter=aa, seed=71)
    b, sb = write(tmp_path, "b", base, family, fmt=fb, adapter=ab, seed=72)
    stack = [(a, 0.7), (b, -0.3)]
    want = reference(base, family, [(sa, 0.7), (sb, -0.3)])
    check_dump(dump(fleet_bin, tmp_path, model, stack), base, want)
    # The other order is another model (DoRA does not commute), also as the reference says.
    swapped = reference(base, family, [(sb, -0.3), (sa, 0.7)])
    assert any(not close(swapped[k], want[k], 1e-4) for k in want)
    check_dump(dump(fleet_bin, tmp_path, model, stack[::-1]), base, swapped)
    if family == "flux":
        inputs = flux_inputs(gen_inputs, model)
    else:
        inputs = tmp_path / "in.safetensors"
        wan_inputs(inputs)
    got = run_out(fleet_bin, tmp_path, model, inputs, stack)
    expected = model_reference(family, reference(base, family, [(sa, 0.7), (sb, -0.3)],
                                                 all_weights=True), meta, inputs)
    assert max_abs(got, expected) < TOLERANCE


def test_the_same_lora_twice_adds_up(fleet_bin, wan_models, tmp_path):
    model = wan_models["t2v"]
    base, _ = base_weights(model)
    a, sa = write(tmp_path, "a", base, "wan", fmt="native", adapter="lora", seed=73)
    got = dump(fleet_bin, tmp_path, model, [(a, 0.7), (a, -0.3)])
    check_dump(got, base, reference(base, "wan", [(sa, 0.7), (sa, -0.3)]))


# ---------------------------------------------------------------------------------------------
# (d) Bad LoRAs and arguments: non-zero exit, the message says what.

@pytest.fixture
def flux_run(fleet_bin, flux_model, gen_inputs, tmp_path):
    """flux_run(lora_arg) -> CompletedProcess of run-local with inputs, out and --lora ARG."""
    inputs = flux_inputs(gen_inputs, flux_model)

    def run(*lora_args):
        flags = []
        for arg in lora_args:
            flags += ["--lora", arg]
        return run_local(fleet_bin, flux_model, "--inputs", inputs, "--out",
                         tmp_path / "o.safetensors", *flags)
    return run


def refused(p, *needles):
    """p exited non-zero and its stderr holds every needle (a tuple: any one of them),
    case-insensitively."""
    assert p.returncode != 0, "run-local accepted it:\n%s" % p.stderr
    for n in needles:
        alternatives = n if isinstance(n, tuple) else (n,)
        assert any(a.lower() in p.stderr.lower() for a in alternatives), \
            "%r not in:\n%s" % (n, p.stderr)


def test_a_lora_that_matches_nothing(flux_run, wan_models, tmp_path):
    wan, _ = base_weights(wan_models["t2v"])
    path, _ = write(tmp_path, "wan", wan, "wan", fmt="native", adapter="lora", seed=81)
    p = flux_run(str(path))
    refused(p, "diffusion_model.blocks.")  # names some of the modules that did not match
    # How many matched: none ("0 of 9 matched", "no module ... matches").
    assert re.search(r"\b0 of \d+|\bno (module|key)s?\b", p.stderr), p.stderr


def test_a_shape_mismatch_names_the_weight(flux_run, flux_model, tmp_path):
    x = "diffusion_model.double_blocks.0.img_attn.proj"
    sd = {x + ".lora_up.weight": torch.randn(65, 4), x + ".lora_down.weight": torch.randn(4, 64)}
    save_safetensors(sd, tmp_path / "s.safetensors")
    refused(flux_run(str(tmp_path / "s.safetensors")), "double_blocks.0.img_attn.proj")
    # A diffusers q slice of the wrong height: the fused weight (or the module) is named.
    y = "transformer.transformer_blocks.1.attn.to_k"
    sd = {y + ".lora_B.weight": torch.randn(128, 4), y + ".lora_A.weight": torch.randn(4, 64)}
    save_safetensors(sd, tmp_path / "q.safetensors")
    p = flux_run(str(tmp_path / "q.safetensors"))
    assert p.returncode != 0
    assert "double_blocks.1.img_attn.qkv" in p.stderr or y in p.stderr, p.stderr


def test_a_rank_mismatch_is_refused(flux_run, tmp_path):
    x = "lora_unet_single_blocks_1_linear2"
    sd = {x + ".lora_up.weight": torch.randn(64, 4), x + ".lora_down.weight": torch.randn(3, 320)}
    save_safetensors(sd, tmp_path / "r.safetensors")
    p = flux_run(str(tmp_path / "r.safetensors"))
    assert p.returncode != 0
    assert "single_blocks.1.linear2" in p.stderr or x in p.stderr, p.stderr


@pytest.mark.parametrize("strength", ["nan", "inf", "-inf"])
def test_a_non_finite_strength_is_refused(strength, flux_run, flux_model, tmp_path):
    base, _ = base_weights(flux_model)
    path, _ = write(tmp_path, "f", base, "flux", seed=82)
    # Refused as a strength (not read as part of the file name).
    refused(flux_run("%s:%s" % (path, strength)), ("finite", "strength"))


def test_a_missing_lora_file_is_named(flux_run, tmp_path):
    refused(flux_run(str(tmp_path / "no-such-lora.safetensors")), "no-such-lora.safetensors")


@pytest.mark.parametrize("parts,name", [
    ({".a1.weight": (4, 64), ".a2.weight": (64, 4), ".b1.weight": (4, 64), ".b2.weight": (64, 4)},
     "GLoRA"),
    ({".oft_blocks": (4, 16, 16)}, "OFT"),
    ({".oft_blocks": (2, 4, 16, 16)}, "BOFT"),
    ({".lora_up.weight": (64, 4), ".lora_down.weight": (4, 64), ".reshape_weight": (2,)},
     "reshape"),
], ids=["glora", "oft", "boft", "reshape_weight"])
def test_unsupported_adapters_are_refused_by_name(parts, name, flux_run, tmp_path):
    x = "diffusion_model.double_blocks.0.img_attn.proj"
    sd = {x + k: torch.randn(s) * 0.01 for k, s in parts.items()}
    if name == "reshape":
        sd[x + ".reshape_weight"] = torch.tensor([64, 64])
    save_safetensors(sd, tmp_path / "u.safetensors")
    with pytest.raises(lr.UnsupportedAdapter):  # the reference refuses it too
        lr.patched_weights(lf.flux_weights(), "flux", None, [(sd, 1.0)])
    refused(flux_run(str(tmp_path / "u.safetensors")), name)
