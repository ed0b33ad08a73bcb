"""End to end: the Python client against a real local cluster (fleet-coordinator, workers cuda:0
and cuda:1 emulated on CPU, a cpu worker). A Flux test model's Forward through the client must
equal `fleet run-local` bit for bit, also over a sampling loop that reuses the cached context.

Skipped (with the reason) when FLEET_BUILD_DIR/bin lacks fleet-coordinator or fleet-worker.
"""

import os

import pytest
import torch

from conftest_client import cluster, run_fleet  # noqa: F401 (fixture)
from safetensors_io import load_safetensors, save_safetensors

import tensorfleet_client as tf

CONSTS = ["context", "y", "guidance"]
# Spread the blocks over all three workers so a step really crosses devices.
EXPERT = "cuda:0,30%;cuda:1,40%;cpu,30%"


def _model(cluster, name, *flags):
    path = os.path.join(cluster.model_root, name)
    if not os.path.exists(path):
        run_fleet("gen-model", *flags, path)
    return name, path


def _run_local(model_path, inputs, tmp_path, tag):
    inp = tmp_path / ("%s-in.safetensors" % tag)
    out = tmp_path / ("%s-out.safetensors" % tag)
    save_safetensors(inputs, inp)
    run_fleet("run-local", model_path, "--inputs", inp, "--out", out)
    return load_safetensors(out)[0]["out"]


def _inputs(model_path, tmp_path, *flags):
    p = tmp_path / "gen-inputs.safetensors"
    run_fleet("gen-inputs", model_path, *flags, p)
    return load_safetensors(p)[0]


def _bitwise_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype,preset", [("f32", "tiny"), ("bf16", "tiny"), ("f32", "small")])
def test_forward_equals_run_local(cluster, tmp_path, dtype, preset):
    name, path = _model(cluster, "%s-%s.safetensors" % (preset, dtype), "--preset", preset,
                        "--seed", 7, "--dtype", dtype)
    inputs = _inputs(path, tmp_path, "--batch", 2, "--height", 8, "--width", 10, "--seed", 3)
    want = _run_local(path, inputs, tmp_path, "ref")
    with tf.Client(cluster.address) as c:
        info = c.load_model(tf.ModelSpec(name, compute_device="cuda:0",
                                         expert_mode_allocations=EXPERT))
        assert info.family == "flux" and info.state == "ready"
        got = c.forward(info.name, inputs)["out"]
    assert _bitwise_equal(got, want)


def test_sampling_loop_reuses_the_cached_context(cluster, tmp_path):
    name, path = _model(cluster, "tiny-dev-loop.safetensors", "--preset", "tiny", "--seed", 11,
                        "--dtype", "f32", "--guidance", "true")
    inputs = _inputs(path, tmp_path, "--height", 12, "--width", 12, "--txt-len", 6, "--seed", 5)
    sigmas = [1.0, 0.8, 0.55, 0.3, 0.0]
    with tf.Client(cluster.address) as c:
        info = c.load_model(tf.ModelSpec(name, compute_device="cuda:0",
                                         expert_mode_allocations=EXPERT))
        x_remote = inputs["x"].clone()
        x_local = inputs["x"].clone()
        for step in range(len(sigmas) - 1):
            s, s_next = sigmas[step], sigmas[step + 1]
            t = torch.full((1,), s, dtype=torch.float32)
            step_inputs = dict(inputs, x=x_remote, timestep=t)
            out = c.forward(info.name, step_inputs, run_id="loop-1", constant_inputs=CONSTS,
                            end_run=step == len(sigmas) - 2)["out"]
            # the client sent the constants once and now omits them for this run
            assert ((info.name, "loop-1") in c._runs) == (step < len(sigmas) - 2)
            ref = _run_local(path, dict(inputs, x=x_local, timestep=t), tmp_path, "s%d" % step)
            assert _bitwise_equal(out, ref), "step %d differs from run-local" % step
            # Euler step of a flow model: x <- x + (s_next - s) * v
            x_remote = x_remote + (s_next - s) * out
            x_local = x_local + (s_next - s) * ref
        assert c.run_cache_misses == 0  # later steps really ran on the coordinator's cache


def test_coordinator_errors_reach_the_caller(cluster):
    with tf.Client(cluster.address) as c:
        with pytest.raises(tf.InvalidArgumentError) as e:
            c.plan(tf.ModelSpec("tiny-f32.safetensors", expert_mode_allocations="cuda:0,4xb;cpu,*"))
        assert "'cuda:0,4xb'" in str(e.value) and "unknown unit 'xb'" in str(e.value)
        with pytest.raises(tf.NotFoundError):
            c.load_model(tf.ModelSpec("no-such-model.safetensors"))
        with pytest.raises(tf.TensorfleetError):
            c.forward("never-loaded", {"x": torch.zeros(1, 16, 4, 4)})


def test_reconnect_after_coordinator_restart(cluster, tmp_path):
    name, path = _model(cluster, "tiny-f32.safetensors", "--preset", "tiny", "--seed", 7,
                        "--dtype", "f32")
    inputs = _inputs(path, tmp_path, "--seed", 9)
    want = _run_local(path, inputs, tmp_path, "ref")
    spec = tf.ModelSpec(name, compute_device="cuda:0", expert_mode_allocations=EXPERT)
    c = tf.Client(cluster.address, connect_timeout=20)
    try:
        c.load_model(spec)
        assert _bitwise_equal(c.forward("tiny-f32", inputs, run_id="r", constant_inputs=CONSTS)
                              ["out"], want)
        cluster.restart_coordinator()
        # Same client object: it notices the restart and says Hello again. A new coordinator
        # that has not loaded the model yet answers NotFound; load it again then.
        try:
            out = c.forward("tiny-f32", inputs, run_id="r", constant_inputs=CONSTS)["out"]
        except tf.NotFoundError:
            c.load_model(spec)
            out = c.forward("tiny-f32", inputs, run_id="r", constant_inputs=CONSTS)["out"]
        assert _bitwise_equal(out, want)
        assert c.reconnects >= 1
    finally:
        c.close()
