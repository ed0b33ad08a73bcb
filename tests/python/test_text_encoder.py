"""Text encoders end to end: small random-weight CLIP, T5 and UMT5 models with the real key names
(text_encoder_reference), run by fleet-run-local against the independent float64 reference
(float32, per layer, within 2e-5 max-abs), and in a real cluster bit for bit as run-local in
every mode; long prompts (T5's 512 tokens, CLIP's 77-token chunks); bad input refused by name."""

import json
import os
import subprocess

import pytest
import torch

from conftest_client import cluster, cluster_binaries, run_fleet  # noqa: F401 (fixture)
from safetensors_io import load_safetensors, save_safetensors
import text_encoder_reference as ref

import tensorfleet_client as tf

TOLERANCE = 2e-5
CLIP_HEADS = 2  # 64-wide CLIP heads: the small model is 128 wide
MODELS = {
    "clip": lambda: ref.clip_weights(dim=128, ffn=256, layers=3, vocab=49408, seed=3),
    "t5": lambda: ref.t5_weights(dim=64, heads=4, head_dim=16, ffn=96, layers=3, vocab=32128,
                                 seed=4),
    "umt5": lambda: ref.t5_weights(umt5=True, dim=64, heads=4, head_dim=16, ffn=80, layers=3,
                                   vocab=2000, seed=5),
    "t5-relu": lambda: ref.t5_weights(dim=48, heads=3, head_dim=16, ffn=64, layers=2, vocab=300,
                                      gated=False, seed=6),
}


def _model(root, name):
    path = os.path.join(root, "te-%s.safetensors" % name)
    if not os.path.exists(path):
        save_safetensors(MODELS[name](), path)
    return path


def _tokens(name, batch, length, seed, pad_from=None):
    """Token ids as ComfyUI's tokenizers lay them out: CLIP start 49406 ... end 49407 padded
    with 49407; T5 ids ... end 1 padded with 0. pad_from[b] = where row b's padding starts."""
    g = torch.Generator().manual_seed(seed)
    vocab = {"clip": 49406, "t5": 32100, "umt5": 2000, "t5-relu": 300}[name]
    t = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        end = pad_from[b] if pad_from else length
        if name == "clip":
            t[b, 0] = 49406
            t[b, end - 1:] = 49407
        else:
            t[b, end - 1] = 1
            t[b, end:] = 0
        mask[b, end:] = 0
    return t, mask


def _run_local(model, inputs, tmp_path, *flags):
    save_safetensors(inputs, tmp_path / "in.safetensors")
    run_fleet("run-local", model, "--inputs", tmp_path / "in.safetensors", "--out",
              tmp_path / "out.safetensors", *flags)
    return load_safetensors(tmp_path / "out.safetensors")[0]


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _close(got, want, what):
    diff = float((got.to(torch.float64) - want).abs().max())
    assert diff <= TOLERANCE, "%s differs from the reference by %g" % (what, diff)
    return diff


CLIP_CASES = [  # (batch, length, pad_from, mask, num_tokens, layer, layer_norm)
    (1, 77, [9], False, False, None, True),
    (2, 77, [77, 20], False, True, None, True),
    (2, 77, [30, 5], True, True, -2, True),
    (1, 77, [12], False, False, -2, False),
    (1, 16, [16], False, False, 0, True),
]


@pytest.mark.parametrize("case", CLIP_CASES, ids=lambda c: "b%d-L%d-mask%d-nt%d-layer%s-norm%d" % (
    c[0], c[1], c[3], c[4], c[5], c[6]))
def test_clip_run_local_matches_the_reference_per_layer(cluster, tmp_path, case):
    batch, length, pad_from, use_mask, use_num_tokens, layer, norm = case
    model = _model(cluster.model_root, "clip")
    tokens, mask = _tokens("clip", batch, length, 11, pad_from)
    inputs = {"tokens": tokens}
    if use_mask:
        inputs["attention_mask"] = mask
    num_tokens = [p for p in pad_from] if use_num_tokens else None
    if num_tokens:
        inputs["num_tokens"] = torch.tensor(num_tokens)
    if not norm:
        inputs["layer_norm_hidden_state"] = torch.tensor([0])
    flags = ["--dtype", "float32", "--trace", tmp_path / "trace.safetensors"]
    if layer is not None:
        flags += ["--layer", str(layer)]
    got = _run_local(model, inputs, tmp_path, *flags)
    weights = load_safetensors(model)[0]
    out, pooled, projected, states = ref.clip_forward(
        weights, tokens, heads=CLIP_HEADS, attention_mask=mask if use_mask else None,
        num_tokens=num_tokens, layer=layer, layer_norm_hidden_state=norm)
    trace = load_safetensors(tmp_path / "trace.safetensors")[0]
    for i, state in enumerate(states):
        _close(trace["encoder.layers.%d/hidden" % i], state, "layer %d" % i)
    assert set(got) == {"out", "pooled", "pooled_projected"}
    assert got["out"].shape == (batch, length, 128) and got["out"].dtype == torch.float32
    _close(got["out"], out, "out")
    _close(got["pooled"], pooled, "pooled")
    _close(got["pooled_projected"], projected, "pooled_projected")


T5_CASES = [  # (model, batch, length, pad_from, mask, layer)
    ("t5", 1, 512, [200], False, None),  # Flux's T5: 512 tokens, no mask
    ("t5", 2, 40, [40, 17], True, None),
    ("umt5", 1, 512, [77], True, None),  # WAN's UMT5: 512 tokens, padding masked
    ("umt5", 2, 33, [33, 9], True, -2),
    ("t5-relu", 1, 20, [20], False, 0),
]


@pytest.mark.parametrize("case", T5_CASES, ids=lambda c: "%s-b%d-L%d-mask%d-layer%s" % (
    c[0], c[1], c[2], c[4], c[5]))
def test_t5_run_local_matches_the_reference_per_layer(cluster, tmp_path, case):
    name, batch, length, pad_from, use_mask, layer = case
    model = _model(cluster.model_root, name)
    tokens, mask = _tokens(name, batch, length, 12, pad_from)
    inputs = {"tokens": tokens}
    if use_mask:
        inputs["attention_mask"] = mask
    flags = ["--dtype", "float32", "--trace", tmp_path / "trace.safetensors"]
    if layer is not None:
        flags += ["--layer", str(layer)]
    got = _run_local(model, inputs, tmp_path, *flags)
    weights = load_safetensors(model)[0]
    out, states = ref.t5_forward(weights, tokens, attention_mask=mask if use_mask else None,
                                 layer=layer)
    trace = load_safetensors(tmp_path / "trace.safetensors")[0]
    worst = 0.0
    for i, state in enumerate(states):
        worst = max(worst, _close(trace["encoder.block.%d/hidden" % i], state, "block %d" % i))
    assert set(got) == {"out"}
    _close(got["out"], out, "out")
    print("%s: largest per-layer difference %.2e" % (case, worst))


def test_relative_buckets_follow_comfyui_at_the_bucket_edges():
    """The log-spaced buckets at distances 8..128 and beyond, both directions."""
    b = ref.relative_buckets(300)
    assert b[0, 0] == 0 and b[0, 7] == 16 + 7 and b[7, 0] == 7
    assert b[0, 8] == 16 + 8 and b[0, 299] == 31 and b[299, 0] == 15
    assert int(b[0, 16]) - 16 == int(b[16, 0]), "the buckets are symmetric in distance"


@pytest.mark.parametrize("name", ["clip", "t5", "umt5"])
def test_every_mode_is_bit_identical_to_run_local(cluster, tmp_path, name):
    model = _model(cluster.model_root, name)
    length = 77 if name == "clip" else 64
    tokens, mask = _tokens(name, 2, length, 21, [length, length // 3])
    x = {"tokens": tokens}
    if name == "umt5":
        x["attention_mask"] = mask
    if name == "clip":
        x["num_tokens"] = torch.tensor([length, length // 3])
    for dtype in ("bfloat16", "float32"):
        want = _run_local(model, x, tmp_path, "--dtype", dtype)
        with tf.Client(cluster.address) as c:
            for mode in ("stream", "pipeline", "auto"):
                info = c.load_model(tf.ModelSpec(
                    os.path.basename(model), compute_device="cuda:0", mode=mode, dtype=dtype,
                    expert_mode_allocations="cuda:0,30%;cuda:1,40%;cpu,*",
                    eject_models=False))
                assert info.family == "text-encoder"
                got = c.forward(info.name, x)
                assert set(got) == set(want), (set(got), set(want))
                for k in want:
                    assert _same_bits(torch.as_tensor(got[k]), want[k]), \
                        "%s %s in %s mode: %s" % (name, dtype, mode, k)
                # The layer input travels like any other (CLIPSetLastLayer).
                got = c.forward(info.name, dict(x, layer=torch.tensor([-2])))
                assert not _same_bits(torch.as_tensor(got["out"]), want["out"])
                c.unload_model(info.name)


def test_the_embedding_is_pinned_to_the_compute_device(cluster):
    model = _model(cluster.model_root, "umt5")
    with tf.Client(cluster.address) as c:
        plan = c.plan(tf.ModelSpec(os.path.basename(model), compute_device="cuda:1",
                                   expert_mode_allocations="cuda:0,*;cuda:1,0%;cpu,*"))
    devices = {d["id"]: d["units"] for d in plan.plan()["devices"]}
    assert devices["cuda:1"] == ["shared"], "even at 0% the compute device holds the embedding"
    assert "encoder.block.0" in devices["cuda:0"] + devices["cpu"]


def _fails(model, inputs, tmp_path, *flags):
    save_safetensors(inputs, tmp_path / "in.safetensors")
    fleet = os.path.join(cluster_binaries()[0], "fleet")
    r = subprocess.run([fleet, "run-local", str(model), "--inputs",
                        str(tmp_path / "in.safetensors"), "--out",
                        str(tmp_path / "out.safetensors")] + [str(f) for f in flags],
                       capture_output=True, text=True)
    assert r.returncode != 0
    return r.stderr


@pytest.mark.parametrize("name,inputs,flags,message", [
    ("clip", dict(tokens=torch.tensor([[49406, 49408, 49407]])), [],
     "state 'tokens' holds id 49408 at [0, 1], outside the vocabulary of 49408 tokens"),
    ("t5", dict(tokens=torch.tensor([[5, -1, 1]])), [], "holds id -1 at [0, 1]"),
    ("t5", dict(tokens=torch.zeros(0, 4, dtype=torch.long)), [],
     "state 'tokens' has shape [0, 4]"),
    ("t5", dict(tokens=torch.zeros(1, 4)), [], "and dtype float32, expected int64"),
    ("clip", dict(tokens=torch.zeros(1, 78, dtype=torch.long)), [],
     "78 tokens, more than CLIP's 77 positions"),
    ("umt5", dict(tokens=torch.zeros(2, 5, dtype=torch.long),
                  attention_mask=torch.ones(2, 4, dtype=torch.long)), [],
     "state 'attention_mask' has shape [2, 4], expected [2, 5]"),
    ("t5", dict(tokens=torch.zeros(1, 5, dtype=torch.long)), ["--layer", "3"],
     "state 'layer' is 3, outside the model's 3 layers"),
    ("clip", dict(tokens=torch.zeros(1, 5, dtype=torch.long), num_tokens=torch.tensor([6])), [],
     "state 'num_tokens' holds a count outside 1..5"),
])
def test_bad_inputs_are_refused_naming_the_input(cluster, tmp_path, name, inputs, flags, message):
    stderr = _fails(_model(cluster.model_root, name), inputs, tmp_path, *flags)
    assert message in stderr, stderr


@pytest.mark.parametrize("damage,message", [
    (lambda w: w.pop("encoder.block.1.layer.0.SelfAttention.k.weight"),
     "encoder.block.1.layer.0.SelfAttention.k.weight"),
    (lambda w: w.__setitem__("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                             torch.zeros(16, 4)), "has 16 buckets, expected 32"),
    (lambda w: w.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight"),
     "encoder.block.1.layer.1.DenseReluDense.wo.weight"),
])
def test_a_broken_t5_file_is_refused_naming_the_tensor(cluster, tmp_path, damage, message):
    w = MODELS["t5"]()
    damage(w)
    path = tmp_path / "broken.safetensors"
    save_safetensors(w, path)
    stderr = _fails(path, dict(tokens=torch.zeros(1, 4, dtype=torch.long)), tmp_path)
    assert message in stderr, stderr


def test_a_metadata_config_that_contradicts_the_tensors_is_refused(cluster, tmp_path):
    path = tmp_path / "t5-says-umt5.safetensors"
    save_safetensors(MODELS["t5"](), path, {"config": json.dumps({"model_type": "umt5"})})
    stderr = _fails(path, dict(tokens=torch.zeros(1, 4, dtype=torch.long)), tmp_path)
    assert "model_type \"umt5\" contradicts the tensors" in stderr, stderr


def test_inspect_shows_units_config_and_pins(cluster):
    out = run_fleet("inspect", _model(cluster.model_root, "umt5"))
    assert "text-encoder" in out and "umt5" in out
    assert "encoder.block.2" in out and "shared" in out


def test_prefixed_files_run_in_the_cluster_as_run_local(cluster, tmp_path):
    """A container prefix (ComfyUI's checkpoints save `text_encoders.t5xxl.transformer.`) is
    stripped the same way in one process and on the workers."""
    w = MODELS["t5"]()
    path = os.path.join(cluster.model_root, "te-t5-prefixed.safetensors")
    save_safetensors({"text_encoders.t5xxl.transformer." + k: v for k, v in w.items()}, path)
    x = {"tokens": _tokens("t5", 1, 9, 31)[0]}
    want = _run_local(model=path, inputs=x, tmp_path=tmp_path)
    plain = _run_local(_model(cluster.model_root, "t5"), x, tmp_path)
    assert _same_bits(want["out"], plain["out"])
    with tf.Client(cluster.address) as c:
        for mode in ("stream", "pipeline"):
            info = c.load_model(tf.ModelSpec(
                os.path.basename(path), compute_device="cuda:0", mode=mode,
                expert_mode_allocations="cuda:0,30%;cuda:1,40%;cpu,*", eject_models=False))
            assert _same_bits(torch.as_tensor(c.forward(info.name, x)["out"]), want["out"]), mode
            c.unload_model(info.name)


@pytest.mark.parametrize("name", ["t5", "umt5"])
def test_gguf_t5_with_llama_cpp_names_runs_as_comfyui_gguf_reads_it(cluster, tmp_path, name):
    """A T5 / UMT5 GGUF as llama.cpp's converter writes one (enc.blk.N.attn_q, token_embd, ...;
    general.architecture t5encoder): the names are translated as ComfyUI-GGUF's CLIP loader
    does. All-F32 it computes exactly what the safetensors file computes; with its 2-D weights
    in Q8_0 (quantised by ggml itself) the cluster is bit-identical to run-local."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit", "formats"))
    import ggml_oracle as go
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    if not os.path.exists(os.path.join(repo, go.LIB)):
        pytest.skip("SKIPPED: ggml's library %s is not installed (npm ci)" % go.LIB)
    ggml = go.Ggml(repo)
    source = _model(cluster.model_root, name)
    tensors = load_safetensors(source)[0]
    tokens, mask = _tokens(name, 2, 24, 41, [24, 10])
    x = {"tokens": tokens}
    if name == "umt5":
        x["attention_mask"] = mask
    want = _run_local(source, x, tmp_path, "--dtype", "float32")["out"]
    for quantise in (False, True):
        entries = []
        for key, t in sorted(tensors.items()):
            a = t.to(torch.float32).numpy()
            ne = list(reversed(a.shape))
            if quantise and a.ndim == 2 and a.shape[1] % 32 == 0:
                entries.append((ref.llama_cpp_name(key), 8, ne, ggml.quantize(8, a, a.shape[0],
                                                                              a.shape[1])))
            else:
                entries.append((ref.llama_cpp_name(key), 0, ne, a.tobytes()))
        assert any(e[0] == "enc.blk.0.attn_rel_b.weight" for e in entries)
        path = os.path.join(cluster.model_root, "%s-%s.gguf" % (name, "Q8_0" if quantise else "F32"))
        go.write_gguf(path, [("general.architecture", go.T_STR, "t5encoder")], entries)
        out = run_fleet("inspect", path)
        assert "text-encoder" in out and ('"model_type":"%s"' % name) in out, out
        local = _run_local(path, x, tmp_path, "--dtype", "float32")["out"]
        if not quantise:
            assert _same_bits(local, want), "an all-F32 GGUF is the same model"
            continue
        rel = float(torch.linalg.norm(local - want) / torch.linalg.norm(want))
        assert rel < 0.05, rel  # Q8_0 is close to the model
        with tf.Client(cluster.address) as c:
            for mode in ("stream", "pipeline"):
                info = c.load_model(tf.ModelSpec(
                    os.path.basename(path), compute_device="cuda:0", mode=mode, dtype="float32",
                    expert_mode_allocations="cuda:0,30%;cuda:1,40%;cpu,*", eject_models=False))
                assert info.bytes_total <= os.path.getsize(path)  # resident as stored
                got = c.forward(info.name, x)["out"]
                assert _same_bits(torch.as_tensor(got), local), mode
                c.unload_model(info.name)


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory):
    """A cluster whose devices hold 64 MiB each: a text encoder with a 31 MB embedding and a
    WAN model planned for a 256 x 256 x 17 video do not fit on cuda:0 together."""
    import conftest_client
    import shutil
    _, missing = cluster_binaries()
    if missing:
        pytest.skip("end-to-end tests need %s (build them first)" % ", ".join(missing))
    root = str(tmp_path_factory.mktemp("te-small"))
    c = conftest_client.Cluster(root, capacity="64mb")
    yield c
    c.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_a_text_encoder_and_a_diffusion_model_share_the_cluster_like_any_models(small_cluster,
                                                                               tmp_path):
    """Capacity and eviction treat a text encoder as a model like any other: loading a WAN model
    that does not fit beside it evicts it (least recently used, eject_models), and with
    eject_models off a text encoder kept loaded stays and the load is refused."""
    import wan_reference
    c = small_cluster
    t5 = os.path.join(c.model_root, "t5-wide-vocab.safetensors")
    save_safetensors(ref.t5_weights(dim=64, heads=4, head_dim=16, ffn=96, layers=2,
                                    vocab=120000, seed=8), t5)
    wan = os.path.join(c.model_root, "wan-small.safetensors")
    save_safetensors(wan_reference.random_weights("t2v", dim=128, ffn_dim=256, num_layers=3,
                                                  text_dim=96, seed=7), wan,
                     {"config": json.dumps({"num_heads": 2})})
    everything_on_cuda0 = dict(compute_device="cuda:0", expert_mode_allocations="cuda:0,*")
    tokens = {"tokens": torch.randint(0, 120000, (1, 16))}

    def ready(client):
        return [m.name for m in client.list_models() if m.state == "ready"]

    with tf.Client(c.address) as client:
        encoder = client.load_model(tf.ModelSpec(os.path.basename(t5), **everything_on_cuda0))
        want = client.forward(encoder.name, tokens)["out"]
        with pytest.raises(tf.ResourceExhaustedError):
            client.load_model(tf.ModelSpec(os.path.basename(wan), eject_models=False, width=256,
                                           height=256, frames=17, **everything_on_cuda0))
        assert ready(client) == [encoder.name]
        video = client.load_model(tf.ModelSpec(os.path.basename(wan), width=256, height=256,
                                               frames=17, **everything_on_cuda0))
        assert ready(client) == [video.name], "the encoder was evicted"
        x = {"x": torch.randn(1, 16, 2, 4, 4), "timestep": torch.tensor([500.0]),
             "context": torch.randn(1, 5, 96)}
        assert client.forward(video.name, x)["out"].shape == (1, 16, 2, 4, 4)
        # And back: the encoder (29.6 MiB + 20.9 MiB of activations) fits beside the idle WAN
        # model's weights, so nothing is evicted, and it computes what it computed before.
        encoder = client.load_model(tf.ModelSpec(os.path.basename(t5), **everything_on_cuda0))
        assert sorted(ready(client)) == sorted([encoder.name, video.name])
        assert _same_bits(torch.as_tensor(client.forward(encoder.name, tokens)["out"]),
                          torch.as_tensor(want))


@pytest.mark.parametrize("name", ["clip", "t5", "umt5"])
def test_scaled_fp8_text_encoders_run_scaled_and_bit_identical_in_a_cluster(cluster, tmp_path,
                                                                             name):
    """ComfyUI's scaled-fp8 text encoders (t5xxl_fp8_e4m3fn_scaled, umt5_xxl_fp8_e4m3fn_scaled):
    e4m3fn weights with a `scale_weight` per layer after a `scaled_fp8` marker. run-local is
    close to the float model (the scales are applied) and the cluster equals it bit for bit."""
    from test_scaled_fp8 import _scaled
    source = _model(cluster.model_root, name)
    path = os.path.join(cluster.model_root, "te-%s-fp8-scaled.safetensors" % name)
    _scaled(source, path)
    length = 77 if name == "clip" else 40
    x = {"tokens": _tokens(name, 1, length, 51)[0]}
    base = _run_local(source, x, tmp_path, "--dtype", "float32")["out"]
    want = _run_local(path, x, tmp_path, "--dtype", "float32")["out"]
    rel = float(torch.linalg.norm(want - base) / torch.linalg.norm(base))
    assert 0 < rel < 0.1, rel
    with tf.Client(cluster.address) as c:
        info = c.load_model(tf.ModelSpec(
            os.path.basename(path), compute_device="cuda:0", mode="pipeline", dtype="float32",
            expert_mode_allocations="cuda:0,30%;cuda:1,40%;cpu,*", eject_models=False))
        assert _same_bits(torch.as_tensor(c.forward(info.name, x)["out"]), want)
        c.unload_model(info.name)


def test_a_restarted_coordinator_reloads_what_its_predecessor_left_on_the_workers(tmp_path):
    """The coordinator restarts while the workers keep the blocks it had loaded: the new one
    evicts what none of its models owns before it loads, so loading the same model again
    succeeds (it failed with AlreadyExists) and computes what it computed before."""
    import conftest_client
    import shutil
    import signal
    _, missing = cluster_binaries()
    if missing:
        pytest.skip("end-to-end tests need %s (build them first)" % ", ".join(missing))
    root = str(tmp_path / "models")
    os.makedirs(root)
    c = conftest_client.Cluster(root)
    try:
        path = _model(root, "t5")
        x = {"tokens": _tokens("t5", 1, 12, 61)[0]}
        spec = tf.ModelSpec(os.path.basename(path), compute_device="cuda:0", mode="pipeline",
                            expert_mode_allocations="cuda:0,30%;cuda:1,40%;cpu,*")
        with tf.Client(c.address) as client:
            name = client.load_model(spec).name
            want = torch.as_tensor(client.forward(name, x)["out"])
        c.coordinator.send_signal(signal.SIGKILL)
        c.coordinator.wait(10)
        c.start_coordinator(port=c.port)  # the workers stay, with the blocks
        c.wait_ready()
        with tf.Client(c.address) as client:
            assert client.list_models() == []
            assert client.load_model(spec).name == name
            assert _same_bits(torch.as_tensor(client.forward(name, x)["out"]), want)
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
