"""LoRA in a real cluster (fleet-coordinator, two emulated GPU workers and a cpu worker): a
Forward with LoRAs is bit-identical to `fleet run-local --lora` with the same files and
strengths in every mode; changing strengths or LoRAs, or dropping them, needs no reload and gives
exactly run-local's bits (the loaded weights are never modified); a bad LoRA is refused naming
what is wrong and the model keeps working with its previous patches."""

import os

import pytest
import torch

from conftest_client import cluster, cluster_binaries, run_fleet  # noqa: F401 (fixture)
import lora_files as lf
from safetensors_io import load_safetensors, save_safetensors
import wan_reference as wref

import tensorfleet_client as tf

ALLOCATION = "cuda:0,30%;cuda:1,40%;cpu,30%"
WAN_DIMS = dict(dim=128, ffn_dim=256, num_layers=3, text_dim=96)


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _flux(root, tmp_path):
    """A tiny random Flux in the model root, two LoRAs for it (kohya LoRA, diffusers LoHa into
    the fused qkv weights), and inputs."""
    path = os.path.join(root, "lora-flux.safetensors")
    run_fleet("gen-model", "--preset", "tiny", "--seed", 31, "--dtype", "bf16", path)
    run_fleet("gen-inputs", path, "--batch", 1, "--height", 16, "--width", 16, "--txt-len", 5,
              "--seed", 3, tmp_path / "in.safetensors")
    base, _ = load_safetensors(path)
    return path, base, 64


def _wan(root, tmp_path):
    path = os.path.join(root, "lora-wan.safetensors")
    base = wref.random_weights("t2v", seed=11, **WAN_DIMS)
    save_safetensors(base, path, {"config": '{"num_heads": 2}'})
    g = torch.Generator().manual_seed(4)
    x = {"x": torch.randn(1, 16, 2, 4, 6, generator=g),
         "context": torch.randn(1, 7, WAN_DIMS["text_dim"], generator=g),
         "timestep": torch.rand(1, generator=g) * 1000}
    save_safetensors(x, tmp_path / "in.safetensors")
    return path, base, None


def _loras(root, family, base, hidden):
    os.makedirs(os.path.join(root, "loras"), exist_ok=True)
    a = "loras/%s-kohya-lora.safetensors" % family
    b = "loras/%s-diffusers-loha.safetensors" % family
    lf.write_lora(os.path.join(root, a), base, family, fmt="kohya", adapter="lora", rank=4,
                  alpha=2.0, seed=1, dtype=torch.bfloat16, hidden_size=hidden)
    lf.write_lora(os.path.join(root, b), base, family, fmt="diffusers", adapter="loha", rank=2,
                  alpha=1.0, seed=2, hidden_size=hidden)
    return a, b


def _run_local(root, model, tmp_path, loras, dtype):
    out = tmp_path / "want.safetensors"
    args = []
    for path, strength in loras:
        args += ["--lora", "%s:%r" % (os.path.join(root, path), strength)]
    run_fleet("run-local", model, "--inputs", tmp_path / "in.safetensors", "--out", out,
              "--dtype", dtype, *args)
    return load_safetensors(out)[0]["out"]


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_loras_in_every_mode_are_bit_identical_to_run_local(cluster, tmp_path, family):
    root = cluster.model_root
    model, base, hidden = (_flux if family == "flux" else _wan)(root, tmp_path)
    a, b = _loras(root, family, base, hidden)
    x, _ = load_safetensors(tmp_path / "in.safetensors")
    combos = [[(a, 0.7), (b, -0.3)], [(a, 1.0)], [(a, 0.25), (b, 0.5)]]
    for dtype in ("bfloat16", "float32"):
        want = {i: _run_local(root, model, tmp_path, c, dtype) for i, c in enumerate(combos)}
        plain = _run_local(root, model, tmp_path, [], dtype)
        assert not _same_bits(want[0], plain), "the LoRAs must change the output"
        with tf.Client(cluster.address) as c:
            for mode in ("stream", "pipeline"):
                info = c.load_model(tf.ModelSpec(
                    os.path.basename(model), compute_device="cuda:0", mode=mode, dtype=dtype,
                    expert_mode_allocations=ALLOCATION, eject_models=False))
                # Stacks and strengths change from step to step without a reload; the plain
                # model comes back bit for bit.
                for i in (0, 1, 2, 0):
                    got = c.forward(info.name, x, loras=combos[i])["out"]
                    assert _same_bits(got, want[i]), "%s %s %s combo %d" % (family, dtype, mode, i)
                got = c.forward(info.name, x)["out"]
                assert _same_bits(got, plain), "%s %s %s without LoRA" % (family, dtype, mode)
                assert [m.name for m in c.list_models()] == [info.name]
                c.unload_model(info.name)


def test_a_bad_lora_is_refused_and_the_model_keeps_working(cluster, tmp_path):
    root = cluster.model_root
    model, base, hidden = _flux(root, tmp_path)
    a, _ = _loras(root, "flux", base, hidden)
    x, _ = load_safetensors(tmp_path / "in.safetensors")
    want = _run_local(root, model, tmp_path, [(a, 0.5)], "float32")
    # A LoRA for another model (WAN keys on a Flux model) and one whose rank does not fit.
    wan = wref.random_weights("t2v", seed=1, **WAN_DIMS)
    lf.write_lora(os.path.join(root, "loras/wan-only.safetensors"), wan, "wan", fmt="native")
    sd = lf.make_lora(base, "flux", fmt="native", adapter="lora", rank=4, seed=5)
    down = next(k for k in sd if k.endswith(".lora_down.weight"))
    sd[down] = sd[down][:3]
    save_safetensors(sd, os.path.join(root, "loras/bad-rank.safetensors"))
    with tf.Client(cluster.address) as c:
        info = c.load_model(tf.ModelSpec(os.path.basename(model), compute_device="cuda:0",
                                         mode="stream", dtype="float32",
                                         expert_mode_allocations=ALLOCATION, eject_models=False))
        assert _same_bits(c.forward(info.name, x, loras=[(a, 0.5)])["out"], want)
        for loras, words in [
                ([("loras/wan-only.safetensors", 1.0)], ["0 of", "diffusion_model.blocks", "match"]),
                ([("loras/bad-rank.safetensors", 1.0)], ["different ranks", down[:-len(".lora_down.weight")]]),
                ([("loras/missing.safetensors", 1.0)], ["missing.safetensors", "not found"]),
                ([("../outside.safetensors", 1.0)], [".."])]:
            with pytest.raises(tf.TensorfleetError) as e:
                c.forward(info.name, x, loras=loras)
            for w in words:
                assert w in e.value.message, (loras, e.value.message)
        with pytest.raises(tf.InvalidArgumentError):
            c.forward(info.name, x, loras=[(a, float("nan"))])
        assert _same_bits(c.forward(info.name, x, loras=[(a, 0.5)])["out"], want)
        c.unload_model(info.name)
