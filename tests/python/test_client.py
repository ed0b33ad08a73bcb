"""Client framing, errors, run caching, cancel, timeouts and reconnect, against JobPeer (a small
ROUTER speaking schemas/job.fbs in-process; see conftest_client.py)."""

import threading
import time

import numpy as np
import pytest
import torch

from conftest_client import JobPeer, peer  # noqa: F401  (fixture)

import tensorfleet_client as tf
from tensorfleet_client import wire


def _inputs(dtype=torch.float32, batch=1):
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(batch, 16, 4, 6, generator=g).to(dtype),
        "timestep": torch.full((batch,), 0.5, dtype=torch.float32),
        "context": torch.randn(batch, 3, 8, generator=g).to(dtype),
        "y": torch.randn(batch, 12, generator=g).to(dtype),
        "guidance": torch.full((batch,), 3.5).to(dtype),
    }


def _expected(inp):
    return (inp["x"].float() + inp["context"].float().numpy().sum(dtype=np.float32)
            + inp["y"].float().numpy().sum(dtype=np.float32))


def test_hello_is_first_and_version_is_checked(peer):
    c = tf.Client(peer.endpoint)
    info = c.connect()
    assert (info.major, info.minor, info.peer_name) == (1, 3, "coordinator")
    assert peer.requests[0] == ("Hello", {"major": 1, "peer": "fleet-client"})
    c.close()

    other = JobPeer(major=2)
    try:
        with pytest.raises(tf.VersionMismatchError, match=r"protocol 2\.3, this client 1\.0"):
            tf.Client(other.endpoint).connect()
    finally:
        other.stop()

    # fleet-coordinator itself refuses a foreign major with an Error reply
    refusing = JobPeer(refuse_hello="peer speaks protocol 1.0, this side 2.0 (major versions "
                                    "must be equal: upgrade the older side)")
    try:
        with pytest.raises(tf.FailedPreconditionError, match="refused Hello: peer speaks"):
            tf.Client(refusing.endpoint).list_models()
    finally:
        refusing.stop()


def test_load_plan_list_and_spec_fields(peer):
    with tf.Client(peer.endpoint) as c:
        spec = tf.ModelSpec("flux/dev.safetensors", compute_device="cuda:1", virtual_vram_gb=6.5,
                            donor_device="cuda:0,cpu", expert_mode_allocations="",
                            eject_models=False, keep_loaded=False, mode="pipeline",
                            dtype="bfloat16")
        plan = c.plan(spec)
        assert plan.expert_string == "cuda:0,*" and plan.text
        info = c.load_model(spec)
        assert (info.name, info.family, info.state) == ("dev", "flux", "ready")
        assert info.plan()["config"]["guidance_embed"] is True
        assert [m.name for m in c.list_models()] == ["dev"]
    kinds = [k for k, _ in peer.requests]
    assert kinds == ["Hello", "Plan", "LoadModel", "ListModels"]
    sent = peer.requests[2][1]
    assert sent == {"path": "flux/dev.safetensors", "compute_device": "cuda:1",
                    "virtual_vram_gb": 6.5, "donor_device": "cuda:0,cpu", "expert": "",
                    "eject_models": False, "keep_loaded": False, "mode": 2, "dtype": 3,
                    "weight_dtype": "default", "dequant_dtype": "default"}


def test_plan_says_what_a_load_would_evict(peer):
    """PlanResponse.evicts: the models a load of the spec would evict first to make room, least
    recently used first; empty (and no evicts line in the text) when it fits."""
    with tf.Client(peer.endpoint) as c:
        spec = tf.ModelSpec("b.safetensors")
        assert c.plan(spec).evicts == []
        c.load_model(tf.ModelSpec("a.safetensors"))
        c.load_model(tf.ModelSpec("z.safetensors"))
        peer.plan_evicts = ["z", "a"]
        plan = c.plan(spec)
        assert plan.evicts == ["z", "a"]
        assert "loading it evicts (least recently used first): z, a" in plan.text
        c.load_model(spec)
        assert [m.name for m in c.list_models()] == ["b"]
        assert c.plan(spec).evicts == []  # nothing of those is loaded any more


def test_errors_carry_the_coordinators_text(peer):
    with tf.Client(peer.endpoint) as c:
        with pytest.raises(tf.InvalidArgumentError) as e:
            c.plan(tf.ModelSpec("dev.safetensors", expert_mode_allocations="cuda:0,1tb;cpu,*"))
        assert str(e.value) == ("expert_mode_allocations: unknown unit 'tb' in token "
                                "'cuda:0,1tb' at byte 7")
        assert e.value.request == "Plan" and e.value.code == "InvalidArgument"
        with pytest.raises(tf.NotFoundError, match="model file 'missing.st' not found"):
            c.load_model(tf.ModelSpec("missing.st"))
        with pytest.raises(tf.NotFoundError, match="model 'nope' is not loaded"):
            c.forward("nope", _inputs())
        # bad arguments are refused before anything is sent
        with pytest.raises(tf.InvalidArgumentError, match="mode 'fast' is not one of"):
            c.plan(tf.ModelSpec("dev.safetensors", mode="fast"))
        with pytest.raises(tf.InvalidArgumentError, match="numpy dtype complex64"):
            c.forward("dev", {"x": np.zeros(2, np.complex64)})
        with pytest.raises(tf.InvalidArgumentError, match=r"constant input\(s\) \['pe'\]"):
            c.forward("dev", _inputs(), run_id="r", constant_inputs=["pe"])


def test_malformed_reply_is_a_protocol_error(peer):
    with tf.Client(peer.endpoint) as c:
        c.load_model(tf.ModelSpec("garbage.safetensors"))
        with pytest.raises(tf.ProtocolError, match="file identifier"):
            c.forward("garbage", _inputs())
    with pytest.raises(tf.ProtocolError, match="too short"):
        wire.parse_response(b"abc")
    with pytest.raises(tf.ProtocolError):
        wire.parse_response(b"\x10\x00\x00\x00FJRS" + b"\xff" * 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_torch_round_trip(peer, dtype):
    with tf.Client(peer.endpoint) as c:
        c.load_model(tf.ModelSpec("dev.safetensors"))
        inp = _inputs(dtype, batch=2)
        out = c.forward("dev", inp)["out"]
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert torch.equal(out, _expected(inp))
        fwd = peer.requests[-1][1]
        want = {torch.float32: 1, torch.bfloat16: 3, torch.float16: 2}  # wire DType values
        assert fwd["dtypes"]["x"] == want[dtype] and fwd["dtypes"]["timestep"] == 1


def test_forward_numpy_round_trip(peer):
    with tf.Client(peer.endpoint) as c:
        c.load_model(tf.ModelSpec("dev.safetensors"))
        inp = {k: v.numpy() for k, v in _inputs().items()}
        inp["x"] = np.asfortranarray(inp["x"])  # non-contiguous input is made contiguous
        out = c.forward("dev", inp)["out"]
        assert isinstance(out, np.ndarray) and out.flags.writeable
        ref = _expected({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inp.items()})
        assert np.array_equal(out, ref.numpy())


def test_run_cache_sends_constants_once_and_recovers_from_a_miss(peer):
    consts = ["context", "y", "guidance"]
    with tf.Client(peer.endpoint) as c:
        c.load_model(tf.ModelSpec("dev.safetensors"))
        inp = _inputs()
        outs = []
        for step in range(4):
            inp["x"] = inp["x"] * 0.5
            inp["timestep"] = torch.full((1,), 1.0 - step / 4)
            if step == 2:
                peer.runs.clear()  # the coordinator lost the run (evicted or restarted)
            outs.append(c.forward("dev", inp, run_id="run-a", constant_inputs=consts,
                                  end_run=step == 3)["out"])
            assert torch.equal(outs[-1], _expected(inp))
        fwds = [d for k, d in peer.requests if k == "Forward"]
        full = ["context", "guidance", "timestep", "x", "y"]
        assert [f["inputs"] for f in fwds] == [full, ["timestep", "x"], ["timestep", "x"], full,
                                              ["timestep", "x"]]
        assert all(f["consts"] == consts and f["run_id"] == "run-a" for f in fwds)
        assert fwds[-1]["end_run"] and "run-a" not in peer.runs
        assert c.run_cache_misses == 1
        # after end_run the next step of that run id starts a new run: all inputs again
        c.forward("dev", inp, run_id="run-a", constant_inputs=consts)
        assert [d for k, d in peer.requests if k == "Forward"][-1]["inputs"] == full


def test_timeout_is_deadline_exceeded_and_the_client_recovers(peer):
    with tf.Client(peer.endpoint) as c:
        c.load_model(tf.ModelSpec("silent.safetensors"))
        c.load_model(tf.ModelSpec("dev.safetensors"))
        t0 = time.monotonic()
        with pytest.raises(tf.DeadlineExceededError, match=r"no reply to Forward from .* within"):
            c.forward("silent", _inputs(), timeout=0.3)
        assert time.monotonic() - t0 < 10
        assert torch.equal(c.forward("dev", _inputs())["out"], _expected(_inputs()))


def test_no_coordinator_is_unavailable_with_a_hint():
    p = JobPeer()
    endpoint = p.endpoint
    p.stop()
    c = tf.Client(endpoint, connect_timeout=0.5)
    with pytest.raises(tf.UnavailableError, match="is fleet-coordinator running"):
        c.list_models()


def test_cancel_aborts_the_in_flight_forward(peer):
    with tf.Client(peer.endpoint) as c:
        flag = threading.Event()
        threading.Timer(0.2, flag.set).start()
        with pytest.raises(tf.CancelledError, match="Forward cancelled"):
            c.forward("slow", _inputs(), should_cancel=flag.is_set)
        fwd_id = None
        kinds = [k for k, _ in peer.requests]
        assert kinds[-2:] == ["Forward", "Cancel"]
        fwd_id = peer.requests[-1][1]["target"]
        assert fwd_id > 0
        # the Cancel's Ack arrives later and is dropped; the connection keeps working
        c.load_model(tf.ModelSpec("dev.safetensors"))
        assert torch.equal(c.forward("dev", _inputs())["out"], _expected(_inputs()))


def test_reconnect_after_coordinator_restart(peer):
    c = tf.Client(peer.endpoint, connect_timeout=5)
    c.load_model(tf.ModelSpec("dev.safetensors"))
    inp = _inputs()
    consts = ["context", "y", "guidance"]
    c.forward("dev", inp, run_id="r", constant_inputs=consts)
    port = peer.port
    peer.stop()
    time.sleep(0.3)
    fresh = JobPeer(port=port)
    try:
        fresh.models["dev"] = "dev.safetensors"  # the model is loaded again after the restart
        out = c.forward("dev", inp, run_id="r", constant_inputs=consts)["out"]
        assert torch.equal(out, _expected(inp))
        kinds = [k for k, _ in fresh.requests]
        assert kinds[0] == "Hello" and "NoHello" not in kinds
        # a new connection resends the run's constants
        assert fresh.requests[-1][1]["inputs"] == ["context", "guidance", "timestep", "x", "y"]
        assert c.reconnects >= 1
    finally:
        c.close()
        fresh.stop()
