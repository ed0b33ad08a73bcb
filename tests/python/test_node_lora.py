"""ComfyUI's LoRA loaders in front of the Tensorfleet loader, against a real local cluster:
ComfyUI's own key mapping and adapters (the stand-in's comfy.lora / comfy.sd / nodes, written
from ComfyUI's) bind the LoRA to the MODEL, the node ships the patches once per patch set, and
every sampling step equals `fleet run-local --lora` with the same files and strengths bit for
bit: stacked loaders, every adapter kind, diffusers q/k/v offsets, a strength change, and the
unpatched MODEL beside the patched one."""

import os

import pytest
import torch

from conftest_client import cluster, run_fleet  # noqa: F401 (fixture)
from test_client_e2e import EXPERT, _bitwise_equal, _inputs, _model
from test_node import Loader, folder_paths, mm
from safetensors_io import load_safetensors, save_safetensors
import lora_files as lf
import nodes as comfy_nodes  # the stand-in's LoraLoader / LoraLoaderModelOnly


def _run_local(path, inputs, tmp_path, loras, tag):
    inp, out = tmp_path / ("%s-in.safetensors" % tag), tmp_path / ("%s-out.safetensors" % tag)
    save_safetensors(inputs, inp)
    args = []
    for lora, strength in loras:
        args += ["--lora", "%s:%r" % (lora, strength)]
    run_fleet("run-local", path, "--inputs", inp, "--out", out, *args)
    return load_safetensors(out)[0]["out"]


def _step(patcher, inputs, sigma=0.6):
    patcher.pre_run()
    base = patcher.model
    base.current_patcher = patcher
    s = torch.full((1,), sigma)
    return base.apply_model(inputs["x"], s, c_crossattn=inputs["context"], y=inputs["y"],
                            guidance=inputs["guidance"]), s


def _expected(path, inputs, tmp_path, loras, tag, sigma):
    ref = _run_local(path, dict(inputs, timestep=sigma), tmp_path, loras, tag)
    return inputs["x"] - ref.float() * sigma.view(1, 1, 1, 1)  # CONST.calculate_denoised


def _folders(cluster, tmp_path):
    """ComfyUI's diffusion_models folder is the cluster's model root; its loras folder a new one
    (returned)."""
    folder_paths.folder_names_and_paths["diffusion_models"] = ([cluster.model_root],
                                                               {".safetensors"})
    loras = tmp_path / "loras"
    loras.mkdir()
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], {".safetensors"})
    mm.interrupt_current_processing(False)
    return loras


@pytest.fixture
def flux(cluster, tmp_path):
    name, path = _model(cluster, "lora-node.safetensors", "--preset", "tiny", "--seed", 23,
                        "--dtype", "f32", "--guidance", "true")
    loras = _folders(cluster, tmp_path)
    base, _ = load_safetensors(path)
    files = {}
    for fmt, adapter, seed in [("kohya", "lora", 1), ("diffusers", "loha", 2),
                               ("native", "dora", 3), ("lycoris", "lokr", 4),
                               ("native", "diff", 5)]:
        fname = "%s-%s.safetensors" % (fmt, adapter)
        lf.write_lora(loras / fname, base, "flux", fmt=fmt, adapter=adapter, rank=4, alpha=2.0,
                      seed=seed, hidden_size=64)
        files[adapter] = fname
    inputs = _inputs(path, tmp_path, "--height", 8, "--width", 8, "--seed", 4)
    patcher = Loader().load_unet(name, coordinator=cluster.address, compute_device="cuda:0",
                                 expert_mode_allocations=EXPERT)[0]
    return dict(path=path, loras=loras, files=files, inputs=inputs, patcher=patcher)


def test_lora_loaders_in_front_of_the_loader_equal_run_local(flux, tmp_path):
    loras, files, inputs, path = flux["loras"], flux["files"], flux["inputs"], flux["path"]
    only = comfy_nodes.LoraLoaderModelOnly()
    a = only.load_lora_model_only(flux["patcher"], files["lora"], 0.7)[0]
    ab = only.load_lora_model_only(a, files["loha"], -0.4)[0]
    got, sigma = _step(ab, inputs)
    want = _expected(path, inputs, tmp_path,
                     [(loras / files["lora"], 0.7), (loras / files["loha"], -0.4)], "ab", sigma)
    assert _bitwise_equal(got, want), "two stacked LoRAs (kohya LoRA, diffusers LoHa)"
    # Every other adapter kind through LoraLoader (clip None, as a model-only workflow wires it).
    for i, kind in enumerate(("dora", "lokr", "diff")):
        patched = comfy_nodes.LoraLoader().load_lora(flux["patcher"], None, files[kind], 0.9,
                                                     1.0)[0]
        got, sigma = _step(patched, inputs)
        want = _expected(path, inputs, tmp_path, [(loras / files[kind], 0.9)], kind, sigma)
        assert _bitwise_equal(got, want), kind
    # A strength change is a new patch set; the unpatched MODEL still gives the plain model.
    a2 = only.load_lora_model_only(flux["patcher"], files["lora"], 0.2)[0]
    got, sigma = _step(a2, inputs)
    want = _expected(path, inputs, tmp_path, [(loras / files["lora"], 0.2)], "a2", sigma)
    assert _bitwise_equal(got, want), "strength 0.2"
    got, sigma = _step(flux["patcher"], inputs)
    assert _bitwise_equal(got, _expected(path, inputs, tmp_path, [], "plain", sigma))


def test_unchanged_patches_are_sent_once_and_again_when_the_coordinator_lost_them(flux):
    patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(
        flux["patcher"], flux["files"]["lora"], 0.5)[0]
    runner = patched.model.diffusion_model._runner
    before = len(runner._patches_put)
    first, _ = _step(patched, flux["inputs"])
    for _ in range(2):
        again, _ = _step(patched, flux["inputs"])
        assert _bitwise_equal(again, first)
    assert len(runner._patches_put) == before + 1
    # Four other strengths push the set out of the coordinator's four per model; the next step
    # with it is answered NotFound, and the node puts it again and gets the same bits.
    for s in (0.11, 0.12, 0.13, 0.14):
        _step(comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(
            flux["patcher"], flux["files"]["lora"], s)[0], flux["inputs"])
    got, _ = _step(patched, flux["inputs"])
    assert _bitwise_equal(got, first)
    assert runner.reloads == 0


def test_wan_lora_loaders_equal_run_local(cluster, tmp_path):
    """WAN 2.1 T2V through the node with a kohya LoRA (musubi-tuner's names) stacked on a native
    one with bias diffs (the lightning LoRAs' form): each step equals run-local --lora."""
    from test_node_wan import REF_SIZES, _write_model, rand  # noqa: PLC0415

    loras = _folders(cluster, tmp_path)
    name = _write_model(cluster.model_root, "lora-node-wan.safetensors", "t2v", 13,
                        **REF_SIZES["t2v"])
    path = os.path.join(cluster.model_root, name)
    base_weights, _ = load_safetensors(path)
    lf.write_lora(loras / "wan-kohya.safetensors", base_weights, "wan", fmt="kohya",
                  adapter="lora", rank=4, alpha=4.0, seed=6, dtype=torch.bfloat16)
    lf.write_lora(loras / "wan-diff.safetensors", base_weights, "wan", fmt="native",
                  adapter="diff", seed=7)
    patcher = Loader().load_unet(name, coordinator=cluster.address, compute_dtype="float32",
                                 compute_device="cuda:0", virtual_vram_gb=0,
                                 expert_mode_allocations="cuda:0,50%;cuda:1,50%")[0]
    only = comfy_nodes.LoraLoaderModelOnly()
    patched = only.load_lora_model_only(
        only.load_lora_model_only(patcher, "wan-kohya.safetensors", 0.8)[0],
        "wan-diff.safetensors", 0.5)[0]
    patched.pre_run()
    model = patched.model
    model.current_patcher = patched
    x, context = rand(1, 16, 2, 4, 6, seed=8), rand(1, 7, REF_SIZES["t2v"]["text_dim"], seed=9)
    for sigma in (0.9, 0.4):
        s = torch.full((1,), sigma)
        got = model.apply_model(x, s, c_crossattn=context)
        out = _run_local(path, {"x": x, "timestep": s * 1000, "context": context}, tmp_path,
                         [(loras / "wan-kohya.safetensors", 0.8),
                          (loras / "wan-diff.safetensors", 0.5)], "wan%g" % sigma)
        assert _bitwise_equal(got, x - out * sigma), "sigma %g" % sigma
    plain = _run_local(path, {"x": x, "timestep": s * 1000, "context": context}, tmp_path, [],
                       "wan-plain")
    assert not _bitwise_equal(got, x - plain * sigma), "the LoRAs must change the step"
