"""The loaders against a real local cluster (fleet-coordinator + workers cuda:0, cuda:1 emulated
on CPU, and cpu; from FLEET_BUILD_DIR): device lists from the coordinator's control API and the
static fallback, a device the cluster lacks (accepted in the editor, refused when run, named),
load progress on ComfyUI's progress bar, ComfyUI's Cancel during a load (the model ends unloaded
and nothing stays resident on any worker), and the plan picture."""

import json
import time
import urllib.request

import numpy as np
import pytest

from conftest_client import cluster, run_fleet  # noqa: F401  (fixture)
from test_node import NO_CONTROL, PKG, Loader, folder_paths, mm, progress_seen, tf  # noqa: F401
from test_workflow_convert import _widget_names
import execution  # noqa: E402  (comfy_standin, on sys.path once test_node is imported)

nodes = PKG.tensorfleet_nodes
image_mod = PKG.tensorfleet_plan_image


@pytest.fixture
def control(cluster, monkeypatch):
    monkeypatch.setenv("TENSORFLEET_CONTROL", cluster.http)
    nodes._device_cache.clear()
    folder_paths.folder_names_and_paths["diffusion_models"] = ([cluster.model_root],
                                                               {".safetensors"})
    mm.interrupt_current_processing(False)
    yield cluster
    nodes._device_cache.clear()


def _model(cluster, name, *flags):
    import os  # noqa: PLC0415
    if not os.path.exists(os.path.join(cluster.model_root, name)):
        run_fleet("gen-model", *flags, os.path.join(cluster.model_root, name))
    return name


def _workers(cluster, since=None):
    """GET /v2/workers; with `since` (time.monotonic()), once every worker's last heartbeat
    (which carries its residency) came after that moment."""
    while True:
        asked = time.monotonic()
        with urllib.request.urlopen("http://%s/v2/workers" % cluster.http, timeout=5) as r:
            workers = json.load(r)["workers"]
        if since is None or all(w["last_seen_seconds"] < asked - since for w in workers):
            return workers
        assert asked - since < 60, "no heartbeat from every worker within a minute"
        time.sleep(0.1)


def test_device_lists_are_the_clusters(control):
    for cls in PKG.NODE_CLASS_MAPPINGS.values():
        opt = cls.INPUT_TYPES()["optional"]
        device = "device" if "device" in opt else "compute_device"  # CLIP loaders: `device`
        assert opt[device][0] == ["cpu", "cuda:0", "cuda:1"]
        assert opt[device][1]["default"] == "cuda:0"
        assert opt["donor_device"][0] == ["cpu", "cuda:0", "cuda:1"]


def test_device_lists_fall_back_to_the_static_list(control, monkeypatch):
    monkeypatch.setenv("TENSORFLEET_CONTROL", NO_CONTROL)
    nodes._device_cache.clear()
    opt = Loader.INPUT_TYPES()["optional"]
    assert opt["compute_device"][0] == ["cpu"] + ["cuda:%d" % i for i in range(16)]
    assert opt["compute_device"][1]["default"] == "cuda:0"


def test_a_device_the_cluster_lacks_loads_in_the_editor_and_fails_when_run(control):
    name = _model(control, "devices.safetensors", "--preset", "tiny")
    saved = dict(zip(_widget_names(Loader), [name, "default", "cuda:7", 2.0, "cuda:9", "",
                                             True, "default", True, "auto", control.address]))
    # ComfyUI's validation accepts it (VALIDATE_INPUTS takes the device inputs) ...
    assert execution.validate_inputs(Loader, saved) == []
    # ... but a value outside any other list is still refused, and an empty device too.
    assert execution.validate_inputs(Loader, dict(saved, mode="fast"))[0]["type"] == \
        "value_not_in_list"
    assert "compute_device must be a device name" in \
        execution.validate_inputs(Loader, dict(saved, compute_device=""))[0]["details"]
    with pytest.raises(tf.InvalidArgumentError) as e:
        Loader().load_unet(**saved)
    assert "compute_device 'cuda:7' is not a device of the Tensorfleet cluster" in str(e.value)
    assert "the cluster has cpu, cuda:0, cuda:1" in str(e.value)
    with pytest.raises(tf.InvalidArgumentError) as e:
        Loader().load_unet(**dict(saved, compute_device="cuda:1"))
    assert "donor_device 'cuda:9'" in str(e.value)


def test_load_progress_on_comfys_bar_and_cancel_leaves_nothing(control, progress_seen):
    name = _model(control, "progress.safetensors", "--preset", "small", "--double", "6",
                  "--single", "12")
    kw = dict(coordinator=control.address, expert_mode_allocations="cuda:0,40%;cuda:1,30%;cpu,30%",
              keep_loaded=False)
    # ComfyUI's Cancel before the load starts: the load request is cancelled on the coordinator.
    mm.interrupt_current_processing(True)
    with pytest.raises(mm.InterruptProcessingException):
        Loader().load_unet(name, **kw)
    client = nodes.client_for(control.address)
    assert client.list_models() == []
    for w in _workers(control, since=time.monotonic()):
        assert (w["device"], w["resident_bytes"], w["models"]) == (w["device"], 0, [])
    # Loading again works, and drives the progress bar up to the model's bytes.
    Loader().load_unet(name, **kw)
    info = next(m for m in client.list_models() if m.path == name)
    assert info.state == "ready" and info.bytes_total > 0
    assert progress_seen and progress_seen[-1] == (info.bytes_total, info.bytes_total)
    assert all(t == info.bytes_total for _, t in progress_seen)
    values = [v for v, _ in progress_seen]
    assert values == sorted(values)
    assert sum(w["resident_bytes"] for w in _workers(control, since=time.monotonic())) > 0
    client.unload_model(info.name)
    assert all(w["resident_bytes"] == 0 for w in _workers(control, since=time.monotonic()))


def test_plan_node_pictures_the_placement(control, tmp_path):
    name = _model(control, "plan.safetensors", "--preset", "small")
    plan_node = PKG.NODE_CLASS_MAPPINGS["TensorfleetPlan"]
    assert plan_node.RETURN_TYPES == ("STRING", "STRING", "IMAGE")
    out = plan_node().plan(name, coordinator=control.address, mode="pipeline",
                           expert_mode_allocations="cuda:0,30%;cuda:1,40%;cpu,30%")
    text, expert, image = out["result"]
    assert out["ui"]["text"] == [text] and "cuda:1" in text and expert
    assert image.dtype.is_floating_point and image.shape[0] == 1 and image.shape[3] == 3
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    pixels = image[0].numpy()
    (tmp_path / "plan.png").write_bytes(image_mod.png_bytes(pixels))  # to look at it
    plan = nodes.client_for(control.address).plan(tf.ModelSpec(
        name, mode="pipeline", expert_mode_allocations="cuda:0,30%;cuda:1,40%;cpu,30%")).plan()
    ranges = plan["schedule"]["ranges"]
    assert len({r["holder"] for r in ranges}) == 3
    flat = pixels.reshape(-1, 3)

    def has(color):
        return bool(np.all(np.isclose(flat, np.array(color, np.float32), atol=1e-6),
                           axis=1).any())
    # One colour per range, and the pipelined boundaries are marked.
    for k in range(min(len(ranges), len(image_mod.PALETTE))):
        assert has(image_mod.PALETTE[k]), "range %d is not drawn" % k
    assert any(r["site"] == "pipeline" for r in ranges) and has(image_mod.MARK)


def test_loader_logs_the_plans_notes_and_plans_for_the_workflows_size(control, caplog):
    import logging  # noqa: PLC0415

    name = _model(control, "notes.safetensors", "--preset", "tiny")
    with caplog.at_level(logging.INFO, logger="tensorfleet"):
        Loader().load_unet(name, coordinator=control.address, compute_device="cuda:0",
                           expert_mode_allocations="cuda:0,4kb;cuda:1,4kb", eject_models=False,
                           keep_loaded=False)
    # DisTorch2's log line for a GPU-only string, from the plan's notes.
    assert "GPU-ONLY MODE: Distributed remaining" in caplog.text
    assert "across 2 GPUs (no CPU fallback)" in caplog.text
    client = nodes.client_for(control.address)
    client.unload_model(name.rsplit(".", 1)[0])

    def activation_bytes(**sizes):
        spec = tf.ModelSpec(name, compute_device="cuda:0", virtual_vram_gb=0, **sizes)
        return client.plan(spec).plan()["headroom"]["activation_bytes"]

    default = activation_bytes()
    small = activation_bytes(width=256, height=256)
    assert 0 < small < default == activation_bytes(width=1024, height=1024)
    assert activation_bytes(width=256, height=256, batch=2) == 2 * small
    with pytest.raises(tf.InvalidArgumentError, match="width 70000 is outside"):
        activation_bytes(width=70000)


def test_weight_dtype_keeps_the_floating_weights_as_fp8(control):
    import os  # noqa: PLC0415

    name = _model(control, "weight-dtype.safetensors", "--preset", "tiny")  # f32 weights
    size = os.path.getsize(os.path.join(control.model_root, name))
    client = nodes.client_for(control.address)
    loaded = {}
    for weight_dtype in ("default", "fp8_e4m3fn"):
        Loader().load_unet(name, weight_dtype=weight_dtype, coordinator=control.address,
                           compute_device="cuda:0", virtual_vram_gb=0, eject_models=False)
        model = next(m for m in client.list_models() if m.path == name)
        loaded[weight_dtype] = model.bytes_total
        client.unload_model(model.name)
    assert loaded["default"] > size * 0.9   # f32 as stored
    assert loaded["fp8_e4m3fn"] < size / 3  # one byte per value
