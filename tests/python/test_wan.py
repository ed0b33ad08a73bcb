"""WAN 2.1 / 2.2 end to end: small random-weight models with the real key names (made by
wan_reference.random_weights), run by fleet-run-local against the independent Python reference
(float32, per block, within 2e-5 max-abs), and in a real cluster bit for bit as run-local in
every mode."""

import json
import os

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
    for name, state in states[1:-1]:  # the token stream after every block
        diff = float((traced[name + "/tokens"] - state["x"]).abs().max())
        assert diff <= TOLERANCE, "%s differs from the reference by %g" % (name, diff)
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
