"""WAN 2.1 / 2.2 end to end: small random-weight models with the real key names (made by
wan_reference.random_weights), run by fleet-run-local against the independent Python reference
(float32, per block, within 2e-5 max-abs), and in a real cluster bit for bit as run-local in
every mode."""

import json
import os
import subprocess

import pytest
import torch

from conftest_client import cluster, cluster_binaries, run_fleet  # noqa: F401 (fixture)
from safetensors_io import load_safetensors, save_safetensors
import wan_reference as ref

import tensorfleet_client as tf

TOLERANCE = 2e-5
# Small models: 2 heads of 64 (RoPE axes 24, 20, 20), so the file's metadata `config` says
# num_heads as ComfyUI's WanModel keyword arguments would.
VARIANTS = {
    "t2v": dict(dim=128, ffn_dim=256, num_layers=3, text_dim=96),
    "i2v": dict(dim=128, ffn_dim=192, num_layers=2, text_dim=64),
    "ti2v5b": dict(dim=128, ffn_dim=256, num_layers=2, text_dim=64),
}
CASES = [  # (variant, batch, T, H, W, text tokens, per-frame timestep)
    ("t2v", 1, 3, 5, 7, 6, False),
    ("t2v", 2, 2, 4, 6, 40, False),
    ("i2v", 1, 2, 5, 4, 12, False),
    ("i2v", 2, 1, 4, 4, 3, False),
    ("ti2v5b", 1, 3, 4, 6, 9, True),
    ("ti2v5b", 2, 2, 3, 5, 17, False),
]


def _model(root, variant, prefix=""):
    path = os.path.join(root, "wan-%s%s.safetensors" % (variant, "-prefixed" if prefix else ""))
    if not os.path.exists(path):
        w = ref.random_weights(variant, seed=7, **VARIANTS[variant])
        config = {"num_heads": 2}
        if variant == "ti2v5b":
            config["model_type"] = "ti2v"
        save_safetensors({prefix + k: v for k, v in w.items()}, path,
                         {"config": json.dumps(config)})
    return path


def _inputs(path, variant, batch, t, h, w, text, per_frame, seed):
    g = torch.Generator().manual_seed(seed)
    cin = ref.VARIANT_CHANNELS[variant][0]
    x = {"x": torch.randn(batch, cin, t, h, w, generator=g),
         "context": torch.randn(batch, text, VARIANTS[variant]["text_dim"], generator=g)}
    if per_frame:
        x["timestep"] = torch.rand(batch, t, generator=g) * 1000
    else:
        x["timestep"] = torch.rand(batch, generator=g) * 1000
    if variant == "i2v":
        x["clip_fea"] = torch.randn(batch, 257, ref.CLIP_DIM, generator=g)
    save_safetensors(x, path)
    return x


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "%s-b%d-%dx%dx%d-L%d%s" % (
    c[0], c[1], c[2], c[3], c[4], c[5], "-perframe" if c[6] else ""))
def test_run_local_matches_the_reference_per_block(cluster, tmp_path, case):
    variant, batch, t, h, w, text, per_frame = case
    model = _model(cluster.model_root, variant)
    inputs = _inputs(tmp_path / "in.safetensors", variant, batch, t, h, w, text, per_frame, 3)
    out = tmp_path / "out.safetensors"
    trace = tmp_path / "trace.safetensors"
    run_fleet("run-local", model, "--inputs", tmp_path / "in.safetensors", "--out", out,
              "--dtype", "float32", "--trace", trace)
    weights = load_safetensors(model)[0]
    config = ref.config_from_weights(weights, {"num_heads": 2})
    want, states = ref.forward(weights, config, inputs["x"], inputs["timestep"],
                               inputs["context"], inputs.get("clip_fea"), collect=True)
    got = load_safetensors(out)[0]["out"]
    assert got.shape == want.shape == (batch, ref.VARIANT_CHANNELS[variant][1], t, h, w)
    traced = load_safetensors(trace)[0]
    worst = 0.0
    for name, state in states[1:-1]:  # the token stream after every block
        diff = float((traced[name + "/tokens"] - state["x"]).abs().max())
        assert diff <= TOLERANCE, "%s differs from the reference by %g" % (name, diff)
        worst = max(worst, diff)
    print("%s: largest per-block difference from the reference %.2e" % (case, worst))
    stem = dict(states[0][1])
    assert float((traced["stem/tokens"] - stem["x"]).abs().max()) <= TOLERANCE
    diff = float((got - want).abs().max())
    assert diff <= TOLERANCE, "out differs from the reference by %g" % diff


def test_prefixed_names_load_the_same_model(cluster, tmp_path):
    plain = _model(cluster.model_root, "t2v")
    prefixed = _model(cluster.model_root, "t2v", prefix="model.diffusion_model.")
    _inputs(tmp_path / "in.safetensors", "t2v", 1, 2, 4, 4, 5, False, 1)
    a = run_fleet("run-local", plain, "--inputs", tmp_path / "in.safetensors", "--out",
                  tmp_path / "a.safetensors")
    b = run_fleet("run-local", prefixed, "--inputs", tmp_path / "in.safetensors", "--out",
                  tmp_path / "b.safetensors")
    del a, b
    assert _same_bits(load_safetensors(tmp_path / "a.safetensors")[0]["out"],
                      load_safetensors(tmp_path / "b.safetensors")[0]["out"])


@pytest.mark.parametrize("variant", ["t2v", "i2v", "ti2v5b"])
def test_every_mode_is_bit_identical_to_run_local(cluster, tmp_path, variant):
    model = _model(cluster.model_root, variant)
    per_frame = variant == "ti2v5b"
    x = _inputs(tmp_path / "in.safetensors", variant, 2, 3, 4, 6, 7, per_frame, 5)
    for dtype in ("bfloat16", "float32"):
        run_fleet("run-local", model, "--inputs", tmp_path / "in.safetensors", "--out",
                  tmp_path / "want.safetensors", "--dtype", dtype)
        want = load_safetensors(tmp_path / "want.safetensors")[0]["out"]
        with tf.Client(cluster.address) as c:
            for mode in ("stream", "pipeline", "auto"):
                info = c.load_model(tf.ModelSpec(
                    os.path.basename(model), compute_device="cuda:0", mode=mode, dtype=dtype,
                    expert_mode_allocations="cuda:0,30%;cuda:1,40%;cpu,30%",
                    eject_models=False))
                assert info.family == "wan"
                got = c.forward(info.name, x)["out"]
                assert _same_bits(got, want), "%s %s in %s mode" % (variant, dtype, mode)
                c.unload_model(info.name)


def test_gguf_wan_runs_quantised_in_a_cluster_as_run_local(cluster, tmp_path):
    """A WAN GGUF as ComfyUI-GGUF's tools write one: 2-D weights in Q8_0 (by ggml itself), the
    rest F32, patch_embedding.weight a 5-D tensor (fix_5d_tensors.py), the config as metadata."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit", "formats"))
    import ggml_oracle as go
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    if not os.path.exists(os.path.join(repo, go.LIB)):
        pytest.skip("SKIPPED: ggml's library %s is not installed (npm ci)" % go.LIB)
    ggml = go.Ggml(repo)
    source = _model(cluster.model_root, "t2v")
    tensors, meta = load_safetensors(source)
    entries, quantised = [], 0
    for name, t in sorted(tensors.items()):
        x = t.to(torch.float32).numpy()
        ne = list(reversed(x.shape))
        if x.ndim == 2 and x.shape[1] % 32 == 0:
            entries.append((name, 8, ne, ggml.quantize(8, x, x.shape[0], x.shape[1])))  # Q8_0
            quantised += 1
        else:
            entries.append((name, 0, ne, x.tobytes()))
    assert quantised > 0 and any(len(e[2]) == 5 for e in entries)
    path = os.path.join(cluster.model_root, "wan-t2v-Q8_0.gguf")
    go.write_gguf(path, [("general.architecture", go.T_STR, "wan"),
                         ("config", go.T_STR, meta["config"])], entries)
    x = _inputs(tmp_path / "in.safetensors", "t2v", 1, 3, 4, 6, 5, False, 8)
    run_fleet("run-local", path, "--inputs", tmp_path / "in.safetensors", "--out",
              tmp_path / "want.safetensors")
    want = load_safetensors(tmp_path / "want.safetensors")[0]["out"]
    run_fleet("run-local", source, "--inputs", tmp_path / "in.safetensors", "--out",
              tmp_path / "base.safetensors", "--dtype", "bfloat16")
    base = load_safetensors(tmp_path / "base.safetensors")[0]["out"]
    rel = float(torch.linalg.norm(want.float() - base.float()) / torch.linalg.norm(base.float()))
    assert want.dtype == torch.bfloat16 and rel < 0.05, rel  # Q8_0 is close to the model
    with tf.Client(cluster.address) as c:
        for mode in ("stream", "pipeline"):
            info = c.load_model(tf.ModelSpec(os.path.basename(path), compute_device="cuda:0",
                                             mode=mode, eject_models=False,
                                             expert_mode_allocations="cuda:0,30%;cuda:1,40%;cpu,*"))
            # Resident as stored: no more than the file.
            assert info.family == "wan" and info.bytes_total <= os.path.getsize(path)
            got = c.forward(info.name, x)["out"]
            assert _same_bits(got, want), mode
            c.unload_model(info.name)


@pytest.mark.parametrize("damage,message", [
    (lambda w: w.pop("blocks.1.ffn.0.bias"), "blocks.1.ffn.0.bias"),
    (lambda w: w.__setitem__("blocks.0.self_attn.q.weight", torch.zeros(128, 96)),
     "blocks.0.self_attn.q.weight"),
    (lambda w: w.__setitem__("head.modulation", torch.zeros(1, 3, 128)), "head.modulation"),
])
def test_a_broken_wan_file_is_refused_naming_the_tensor(cluster, tmp_path, damage, message):
    w = ref.random_weights("t2v", seed=1, **VARIANTS["t2v"])
    damage(w)
    path = tmp_path / "broken.safetensors"
    save_safetensors(w, path, {"config": json.dumps({"num_heads": 2})})
    _inputs(tmp_path / "in.safetensors", "t2v", 1, 2, 4, 4, 5, False, 1)
    fleet = os.path.join(cluster_binaries()[0], "fleet")
    r = subprocess.run([fleet, "run-local", str(path), "--inputs", str(tmp_path / "in.safetensors"),
                        "--out", str(tmp_path / "out.safetensors")], capture_output=True, text=True)
    assert r.returncode != 0 and message in r.stderr, r.stderr


@pytest.mark.parametrize("inputs,message", [
    (dict(x=torch.zeros(1, 17, 2, 4, 4)), "state 'x' has shape [1, 17, 2, 4, 4]"),
    (dict(timestep=torch.zeros(1, 5)), "state 'timestep' has 5 values per sample"),
    (dict(timestep=torch.zeros(2)), "state 'timestep' has shape [2]"),
    (dict(context=torch.zeros(1, 5, 95)), "state 'context' has shape [1, 5, 95]"),
    (dict(x=torch.zeros(1, 16, 0, 4, 4)), "state 'x'"),
])
def test_wan_inputs_that_do_not_fit_are_refused_naming_the_input(cluster, tmp_path, inputs,
                                                                 message):
    model = _model(cluster.model_root, "t2v")
    x = {"x": torch.zeros(1, 16, 3, 4, 4), "timestep": torch.zeros(1),
         "context": torch.zeros(1, 5, VARIANTS["t2v"]["text_dim"])}
    x.update(inputs)
    save_safetensors(x, tmp_path / "in.safetensors")
    fleet = os.path.join(cluster_binaries()[0], "fleet")
    r = subprocess.run([fleet, "run-local", model, "--inputs", str(tmp_path / "in.safetensors"),
                        "--out", str(tmp_path / "out.safetensors")], capture_output=True, text=True)
    assert r.returncode != 0 and message in r.stderr, r.stderr
