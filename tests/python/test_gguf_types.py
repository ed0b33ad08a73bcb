"""GGUF models of every type ggml can dequantise, made with ggml itself (libggml-base.so from the
npm package @node-llama-cpp/linux-x64, through tests/unit/formats/ggml_oracle.py) from a
random-weight Flux model with the real key names: each is loaded in a real cluster, kept
resident as stored, and a Forward equals `fleet run-local` bit for bit; a subset in every mode.
Also reports how far Q8_0, Q6_K and Q4_K outputs are from the unquantised model's (relative L2).

Skipped, with the reason, when ggml's library is not installed (scripts/bootstrap installs it
with npm when Node.js is there)."""

import os
import sys

import numpy as np
import pytest
import torch

from conftest_client import REPO, cluster, run_fleet  # noqa: F401 (fixture)
from safetensors_io import load_safetensors, save_safetensors

import tensorfleet_client as tf

sys.path.insert(0, os.path.join(REPO, "tests", "unit", "formats"))
import ggml_oracle as go  # noqa: E402

# Every block type with a to_float in ggml (ggml_oracle.TYPES less the plain ones).
BLOCK_TYPES = {name: gid for gid, (name, _) in go.TYPES.items() if gid not in (0, 1, 30)}
EVERY_MODE = ["Q8_0", "Q4_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "TQ2_0", "MXFP4"]
EXPERT = "cuda:0,30%;cuda:1,40%;cpu,30%"


@pytest.fixture(scope="module")
def ggml():
    if not os.path.exists(os.path.join(REPO, go.LIB)):
        pytest.skip("SKIPPED: ggml's library %s is not installed (npm ci, needs Node.js >= 20)"
                    % go.LIB)
    return go.Ggml(REPO)


@pytest.fixture(scope="module")
def source(cluster, tmp_path_factory):
    """The small Flux preset in f32 (every matrix row a multiple of 256 values but img_in's),
    and inputs for it."""
    d = tmp_path_factory.mktemp("gguf-types")
    path = d / "source.safetensors"
    run_fleet("gen-model", "--preset", "small", "--single", 2, "--dtype", "f32", "--seed", 5, path)
    inputs = d / "inputs.safetensors"
    run_fleet("gen-inputs", path, "--height", 8, "--width", 8, "--txt-len", 16, "--seed", 2,
              inputs)
    return path, inputs, d


def _quantize(ggml, source, gid, out):
    """`source` as GGUF with every 2-D weight whose rows are whole blocks in type `gid` (the
    importance matrix ggml needs for some types: the mean square of each column), the rest
    F32, and the source's `config` metadata."""
    tensors, meta = load_safetensors(source)
    block = ggml.lib.ggml_blck_size(gid)
    needs_imatrix = ggml.lib.ggml_quantize_requires_imatrix(gid) or \
        go.TYPES[gid][0] in go.IMATRIX_TYPES
    quantised, entries = 0, []
    for name, t in sorted(tensors.items()):
        x = t.to(torch.float32).numpy()
        ne = list(reversed(x.shape))
        if name.endswith(".weight") and x.ndim == 2 and x.shape[1] % block == 0:
            imatrix = (x * x).mean(axis=0) + 1e-6 if needs_imatrix else None
            data = ggml.quantize(gid, x, x.shape[0], x.shape[1], imatrix)
            entries.append((name, gid, ne, data))
            quantised += 1
        else:
            entries.append((name, 0, ne, np.ascontiguousarray(x).tobytes()))
    kv = [("general.architecture", go.T_STR, "flux")]
    if "config" in meta:
        kv.append(("config", go.T_STR, meta["config"]))
    go.write_gguf(str(out), kv, entries)
    assert quantised > 0
    return out


def _run_local(model, inputs, out, dtype=None, dequant_dtype="default"):
    run_fleet("run-local", model, "--inputs", inputs, "--out", out, "--dequant-dtype",
              dequant_dtype, *(["--dtype", dtype] if dtype else []))
    return load_safetensors(out)[0]["out"]


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture(scope="module")
def models(ggml, source, cluster):
    path, _, _ = source
    out = {}
    for name, gid in BLOCK_TYPES.items():
        out[name] = _quantize(ggml, path, gid, os.path.join(cluster.model_root,
                                                            "types-%s.gguf" % name))
    return out


def test_every_type_runs_in_a_cluster_bit_identical_to_run_local(cluster, source, models):
    _, inputs, d = source
    x = load_safetensors(inputs)[0]
    with tf.Client(cluster.address) as c:
        for name, path in models.items():
            want = _run_local(path, inputs, d / ("ref-%s.safetensors" % name))
            info = c.load_model(tf.ModelSpec(os.path.basename(path), compute_device="cuda:0",
                                             expert_mode_allocations=EXPERT, mode="stream",
                                             eject_models=False))
            # Resident as stored: the cluster holds no more than the file.
            assert info.bytes_total <= os.path.getsize(path), name
            got = c.forward(info.name, x)["out"]
            assert _same_bits(got, want), "%s differs from run-local" % name
            c.unload_model(info.name)


@pytest.mark.parametrize("qtype", EVERY_MODE)
def test_subset_in_every_mode(cluster, source, models, qtype):
    _, inputs, d = source
    path = models[qtype]
    x = load_safetensors(inputs)[0]
    want = _run_local(path, inputs, d / ("ref-modes-%s.safetensors" % qtype))
    with tf.Client(cluster.address) as c:
        for mode in ("stream", "pipeline", "auto"):
            info = c.load_model(tf.ModelSpec(os.path.basename(path), compute_device="cuda:0",
                                             expert_mode_allocations=EXPERT, mode=mode,
                                             eject_models=False))
            got = c.forward(info.name, x)["out"]
            assert _same_bits(got, want), "%s in %s mode differs from run-local" % (qtype, mode)
            c.unload_model(info.name)


def test_dequant_dtype_expands_through_that_dtype_in_every_mode(cluster, source, models):
    """ComfyUI-GGUF's dequant_dtype: float16 under a bf16 compute rounds twice (f32 -> f16 ->
    bf16), so it differs from the default; the cluster matches run-local with the same input."""
    _, inputs, d = source
    path = models["Q4_K"]
    x = load_safetensors(inputs)[0]
    default = _run_local(path, inputs, d / "dq-default.safetensors")
    want = _run_local(path, inputs, d / "dq-f16.safetensors", dequant_dtype="float16")
    assert want.dtype == torch.bfloat16 and not _same_bits(want, default)
    same = _run_local(path, inputs, d / "dq-target.safetensors", dequant_dtype="target")
    assert _same_bits(same, default)  # target is the compute dtype
    with tf.Client(cluster.address) as c:
        for mode in ("stream", "pipeline"):
            info = c.load_model(tf.ModelSpec(os.path.basename(path), compute_device="cuda:0",
                                             expert_mode_allocations=EXPERT, mode=mode,
                                             eject_models=False, dequant_dtype="float16"))
            got = c.forward(info.name, x)["out"]
            assert _same_bits(got, want), "dequant_dtype float16 in %s mode" % mode
            c.unload_model(info.name)
        with pytest.raises(tf.InvalidArgumentError, match="dequant_dtype 'fp8' is not one of"):
            c.load_model(tf.ModelSpec(os.path.basename(path), dequant_dtype="fp8"))


def test_quantisation_error_against_the_unquantised_model(source, models, capsys):
    """Relative L2 of the output against the unquantised model's, all computing in f32 (the
    quantisation alone) and all in bf16 (what users run; bf16 rounding dominates Q8_0 there)."""
    path, inputs, d = source
    errors = {}
    for dtype in ("float32", "bfloat16"):
        base = _run_local(path, inputs, d / ("base-%s.safetensors" % dtype), dtype)
        base = base.to(torch.float32)
        for qtype in ("Q8_0", "Q6_K", "Q4_K"):
            got = _run_local(models[qtype], inputs, d / ("l2-%s-%s.safetensors" % (qtype, dtype)),
                             dtype).to(torch.float32)
            errors[(qtype, dtype)] = float(torch.linalg.norm(got - base) / torch.linalg.norm(base))
    with capsys.disabled():
        print("\nrelative L2 of the output against the unquantised model's: " +
              ", ".join("%s in %s %.5f" % (q, dt, e) for (q, dt), e in errors.items()))
    # More bits, closer: a quantiser or dequantiser mixing up blocks would break the order.
    f32 = [errors[(q, "float32")] for q in ("Q8_0", "Q6_K", "Q4_K")]
    assert f32[0] < f32[1] < f32[2] < 0.2, f32
