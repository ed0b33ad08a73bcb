"""ComfyUI's scaled-fp8 checkpoints, both forms: the older (a `scaled_fp8` marker tensor, fp8
e4m3fn weights and a per-layer `scale_weight`) and the newer (per-layer `comfy_quant` JSON and
`weight_scale`). Made here from a random-weight Flux model, run by fleet-run-local close to the
unquantised model (the scales are applied), in a real cluster bit for bit as run-local and
resident at one byte per value; a scale of the wrong shape and the formats Tensorfleet cannot
expand are refused by name."""

import json
import os
import re
import struct
import subprocess

import numpy as np
import pytest
import torch

from conftest_client import cluster, cluster_binaries, run_fleet  # noqa: F401 (fixture)
from safetensors_io import load_safetensors

import tensorfleet_client as tf


def _e4m3_values():
    """The non-negative finite e4m3fn values, by code (0x00..0x7e)."""
    out = []
    for code in range(0x7f):
        e, m = code >> 3, code & 7
        out.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(out)


def _encode_e4m3(x):
    """float32 -> e4m3fn codes, nearest, ties to the even code (|x| <= 448 here)."""
    values = _e4m3_values()
    a = np.abs(x.astype(np.float64))
    hi = np.clip(np.searchsorted(values, a, side="left"), 1, len(values) - 1)
    lo = hi - 1
    below, above = a - values[lo], values[hi] - a
    code = np.where(below < above, lo, np.where(above < below, hi, np.where(lo % 2 == 0, lo, hi)))
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def _write(path, entries, metadata):
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _scaled(source, out, scale_values=1, form="scaled_fp8", quant_format="float8_e4m3fn"):
    """`source` (f32) as ComfyUI's scaled fp8: every 2-D weight w as e4m3fn(w / s) with
    s = max|w| / 448, in `<layer>.scale_weight` (`scale_values` copies of it) after a
    `scaled_fp8` marker (form "scaled_fp8"), or in `<layer>.weight_scale` (a 0-d tensor) beside
    `<layer>.comfy_quant` saying `quant_format` (form "comfy_quant")."""
    tensors, meta = load_safetensors(source)
    entries = [("scaled_fp8", "F8_E4M3", [0], b"")] if form == "scaled_fp8" else []
    for name, t in sorted(tensors.items()):
        x = t.to(torch.float32).numpy()
        if name.endswith(".weight") and x.ndim == 2:
            s = np.float32(max(float(np.abs(x).max()), 1e-12) / 448.0)
            layer = name[:-len(".weight")]
            entries.append((name, "F8_E4M3", x.shape, _encode_e4m3(x / s).tobytes()))
            if form == "scaled_fp8":
                entries.append((layer + ".scale_weight", "F32", [scale_values],
                                np.full(scale_values, s, np.float32).tobytes()))
            else:
                config = json.dumps({"format": quant_format}).encode()
                entries.append((layer + ".comfy_quant", "U8", [len(config)], config))
                entries.append((layer + ".weight_scale", "F32", [], s.tobytes()))
        else:
            entries.append((name, "F32", x.shape, np.ascontiguousarray(x).tobytes()))
    _write(out, entries, meta)
    return out


def _run_local(model, inputs, out):
    run_fleet("run-local", model, "--inputs", inputs, "--out", out)
    return load_safetensors(out)[0]["out"]


@pytest.mark.parametrize("form", ["scaled_fp8", "comfy_quant"])
def test_scaled_fp8_checkpoint_runs_scaled_and_bit_identical_in_a_cluster(cluster, tmp_path,
                                                                          form):
    source = os.path.join(cluster.model_root, "scaled-source-%s.safetensors" % form)
    run_fleet("gen-model", "--preset", "tiny", "--seed", 9, source)  # f32
    inputs = tmp_path / "in.safetensors"
    run_fleet("gen-inputs", source, "--height", 8, "--width", 8, "--seed", 4, inputs)
    scaled = _scaled(source, os.path.join(cluster.model_root, "scaled-%s.safetensors" % form),
                     form=form)
    base = _run_local(source, inputs, tmp_path / "base.safetensors")
    want = _run_local(scaled, inputs, tmp_path / "scaled.safetensors")
    # The scales are applied: close to the unquantised model (unscaled fp8 would be far off).
    rel = float(torch.linalg.norm(want - base) / torch.linalg.norm(base))
    assert rel < 0.1, rel
    with tf.Client(cluster.address) as c:
        for mode in ("stream", "pipeline"):
            info = c.load_model(tf.ModelSpec(os.path.basename(scaled), compute_device="cuda:0",
                                             expert_mode_allocations="cuda:0,30%;cuda:1,40%;cpu,30%",
                                             mode=mode, eject_models=False))
            assert info.bytes_total < os.path.getsize(source) / 3  # one byte per weight value
            got = c.forward(info.name, load_safetensors(inputs)[0])["out"]
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8),
                                                           want.view(torch.uint8)), mode
            c.unload_model(info.name)


def test_a_scale_of_the_wrong_shape_is_refused_by_name(cluster, tmp_path):
    source = os.path.join(cluster.model_root, "scaled-source2.safetensors")
    run_fleet("gen-model", "--preset", "tiny", "--seed", 9, source)
    bad = _scaled(source, os.path.join(cluster.model_root, "scaled-bad.safetensors"),
                  scale_values=2)
    fleet = os.path.join(cluster_binaries()[0], "fleet")
    r = subprocess.run([fleet, "run-local", bad, "--inputs", source, "--out",
                        str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and "scale_weight' must be one floating value" in r.stderr, r.stderr
    with tf.Client(cluster.address) as c:
        with pytest.raises(tf.TensorfleetError, match="scale_weight' must be one floating value"):
            c.load_model(tf.ModelSpec(os.path.basename(bad), compute_device="cuda:0",
                                      virtual_vram_gb=0, eject_models=False))


def _refused(cluster, tmp_path, path, message):
    fleet = os.path.join(cluster_binaries()[0], "fleet")
    r = subprocess.run([fleet, "run-local", path, "--inputs", path, "--out",
                        str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    with tf.Client(cluster.address) as c:
        with pytest.raises(tf.TensorfleetError, match=re.escape(message)):
            c.load_model(tf.ModelSpec(os.path.basename(path), compute_device="cuda:0",
                                      virtual_vram_gb=0, eject_models=False))


def test_comfy_quant_formats_it_cannot_expand_are_refused_by_name(cluster, tmp_path):
    source = os.path.join(cluster.model_root, "quant-source.safetensors")
    run_fleet("gen-model", "--preset", "tiny", "--seed", 9, source)
    # A layer that says nvfp4 over fp8 bytes and one scale: refused at load, naming the format.
    said = _scaled(source, os.path.join(cluster.model_root, "quant-said-nvfp4.safetensors"),
                   form="comfy_quant", quant_format="nvfp4")
    _refused(cluster, tmp_path, said, "in ComfyUI's quantised format 'nvfp4', which "
                                      "Tensorfleet cannot expand")
    # Real nvfp4 layers (packed U8 weights, block scales, a second scale): refused at layout.
    tensors, meta = load_safetensors(source)
    entries = []
    for name, t in sorted(tensors.items()):
        x = np.ascontiguousarray(t.to(torch.float32).numpy())
        if name == "img_in.weight":
            packed = np.zeros((x.shape[0], x.shape[1] // 2), np.uint8)
            entries.append((name, "U8", packed.shape, packed.tobytes()))
            blocks = np.ones((x.shape[0], x.shape[1] // 16), np.uint8)
            entries.append(("img_in.weight_scale", "F8_E4M3", blocks.shape, blocks.tobytes()))
            entries.append(("img_in.weight_scale_2", "F32", [], np.float32(1).tobytes()))
        else:
            entries.append((name, "F32", x.shape, x.tobytes()))
    nvfp4 = os.path.join(cluster.model_root, "quant-nvfp4.safetensors")
    _write(nvfp4, entries, meta)
    _refused(cluster, tmp_path, nvfp4, "layer 'img_in' is in ComfyUI's nvfp4 format")
