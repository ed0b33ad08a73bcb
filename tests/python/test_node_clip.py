"""The CLIP loaders (comfyui/tensorfleet_clip.py) end to end: ComfyUI's own nodes (the stand-in's
CLIPTextEncode, CLIPTextEncodeFlux, CLIPSetLastLayer, LoraLoader) on a CLIP from
CLIPLoaderTensorfleet / DualCLIPLoaderTensorfleet whose encoders run in a real cluster
(coordinator + 3 workers), compared bit for bit with `fleet run-local` on the same token ids
with ComfyUI's masking and post-processing; refusals by name; input declarations against
upstream's CLIPLoader / DualCLIPLoader plus DisTorch2's."""

import os

import pytest
import torch

from conftest_client import cluster, run_fleet  # noqa: F401 (fixture)
from safetensors_io import load_safetensors, save_safetensors
import text_encoder_reference as ref
from test_node import PKG, folder_paths, mm

import nodes as comfy_nodes  # noqa: E402  (comfy_standin)
from comfy_extras.nodes_flux import CLIPTextEncodeFlux  # noqa: E402

CLIPLoader = PKG.NODE_CLASS_MAPPINGS["CLIPLoaderTensorfleet"]
DualCLIPLoader = PKG.NODE_CLASS_MAPPINGS["DualCLIPLoaderTensorfleet"]
tf = __import__("sys").modules["tensorfleet_custom_node.tensorfleet_client"]

FILES = {
    "clip_l-tiny.safetensors": lambda: ref.clip_weights(dim=128, ffn=256, layers=3,
                                                        vocab=49408, seed=3),
    "t5xxl-tiny.safetensors": lambda: ref.t5_weights(dim=64, heads=4, head_dim=16, ffn=96,
                                                     layers=3, vocab=32128, seed=4),
    "umt5-tiny.safetensors": lambda: ref.t5_weights(umt5=True, dim=64, heads=4, head_dim=16,
                                                    ffn=80, layers=3, vocab=2000, seed=5),
    "flux-unet.safetensors": lambda: {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)},
}
WORDS = ("a photo of a small red cat sitting on a wooden table next to a window , soft light "
         "and long shadows").split()
LONG = " ".join(WORDS * 6)  # ~120 words: two CLIP chunks of 77


def _same_bits(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture(scope="module")
def te_root(cluster):
    root = cluster.model_root
    for name, make in FILES.items():
        path = os.path.join(root, name)
        if not os.path.exists(path):
            save_safetensors(make(), path)
    # T5 / UMT5 GGUFs with llama.cpp's names (all F32: the same model as the safetensors).
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit", "formats"))
    import ggml_oracle as go
    for source, gguf in (("t5xxl-tiny.safetensors", "t5xxl-tiny-F32.gguf"),
                         ("umt5-tiny.safetensors", "umt5-tiny-F32.gguf")):
        entries = [(ref.llama_cpp_name(k), 0, list(reversed(t.shape)),
                    t.to(torch.float32).numpy().tobytes())
                   for k, t in sorted(load_safetensors(os.path.join(root, source))[0].items())]
        go.write_gguf(os.path.join(root, gguf), [("general.architecture", go.T_STR, "t5encoder")],
                      entries)
    return root


@pytest.fixture
def te(te_root):
    folder_paths.folder_names_and_paths["text_encoders"] = (
        [te_root], folder_paths.supported_pt_extensions)
    mm.interrupt_current_processing(False)
    return te_root


def _opts(cluster):
    return dict(coordinator=cluster.address, compute_dtype="float32", device="cuda:0",
                virtual_vram_gb=0.0)


def _run_local(root, name, inputs, tmp_path, *flags):
    tag = "%s-%d" % (name, len(os.listdir(tmp_path)))
    src, dst = tmp_path / (tag + "-in.safetensors"), tmp_path / (tag + "-out.safetensors")
    save_safetensors(inputs, src)
    run_fleet("run-local", os.path.join(root, name), "--inputs", src, "--out", dst,
              "--dtype", "float32", *flags)
    return load_safetensors(dst)[0]


def _ids_and_mask(rows, end):
    """ComfyUI's process_tokens: ids [B, L], the mask (1 up to and including the first end
    token) and num_tokens."""
    ids = torch.tensor([[t for t, _ in r] for r in rows], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b in range(ids.shape[0]):
        hits = (ids[b] == end).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else ids.shape[1]
        mask[b, :stop] = 1
    return ids, mask, mask.sum(dim=1)


# ------------------------------------------------------------------------------- surface

def test_inputs_are_upstreams_then_distorch2s_then_ours(te):
    for ours, upstream in ((CLIPLoader, comfy_nodes.CLIPLoader),
                           (DualCLIPLoader, comfy_nodes.DualCLIPLoader)):
        mine, theirs = ours.INPUT_TYPES(), upstream.INPUT_TYPES()
        assert list(mine["required"]) == list(theirs["required"])
        for name, spec in theirs["required"].items():
            if name.startswith("clip_name"):  # ours lists the GGUF files too
                assert set(spec[0]) < set(mine["required"][name][0])
                assert "umt5-tiny-F32.gguf" in mine["required"][name][0]
            else:
                assert mine["required"][name] == spec
        assert list(theirs["optional"]) == ["device"]  # DisTorch2 takes this one over
        opt = mine["optional"]
        assert list(opt) == ["device", "virtual_vram_gb", "donor_device",
                             "expert_mode_allocations", "eject_models", "compute_dtype",
                             "keep_loaded", "mode", "coordinator"]
        assert opt["device"][0][:2] == ["cpu", "cuda:0"] and opt["device"][1]["default"] == "cuda:0"
        assert {k: opt["virtual_vram_gb"][1][k] for k in ("default", "min", "max", "step")} == \
            {"default": 4.0, "min": 0.0, "max": 128.0, "step": 0.1}
        assert opt["donor_device"][1]["default"] == "cpu"
        assert opt["expert_mode_allocations"][1]["default"] == ""
        assert opt["eject_models"][0] == "BOOLEAN" and opt["eject_models"][1]["default"] is False
        assert ours.RETURN_TYPES == ("CLIP",)
    assert PKG.NODE_DISPLAY_NAME_MAPPINGS["CLIPLoaderTensorfleet"] == "Load CLIP (Tensorfleet)"
    assert PKG.NODE_DISPLAY_NAME_MAPPINGS["DualCLIPLoaderTensorfleet"] == \
        "DualCLIPLoader (Tensorfleet)"


# --------------------------------------------------------------------------- encode paths

def test_wan_umt5_conditioning_equals_run_local_with_comfyuis_masking(cluster, te, tmp_path):
    clip = CLIPLoader().load_clip("umt5-tiny.safetensors", "wan", **_opts(cluster))[0]
    text = "a cat sitting on a mat , cinematic"
    (cond, extra), = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
    rows = clip.tokenize(text)["umt5xxl"]
    assert len(rows) == 1 and len(rows[0]) == 512  # UMT5's tokenizer pads to 512
    ids, mask, _ = _ids_and_mask(rows, end=1)
    assert int(mask.sum()) == len(text.split()) + 1
    out = _run_local(te, "umt5-tiny.safetensors", {"tokens": ids, "attention_mask": mask},
                     tmp_path)["out"]
    want = out * mask.unsqueeze(-1).float()  # zero_out_masked
    assert _same_bits(cond, want)
    assert torch.count_nonzero(cond[0, int(mask.sum()):]) == 0
    assert extra == {"pooled_output": None}
    # A weighted prompt: ComfyUI mixes each weighted token with the empty prompt's.
    (cond_w, _), = comfy_nodes.CLIPTextEncode().encode(clip, "a (cat:1.5) sitting")[0]
    rows = clip.tokenize("a (cat:1.5) sitting")["umt5xxl"]
    ids, mask, _ = _ids_and_mask(rows, end=1)
    empty = torch.tensor([[1] + [0] * 511])
    both = torch.cat([ids, empty])
    masks = torch.cat([mask, (empty == 1).long().cumsum(1).eq(0).long() + (empty == 1).long()])
    out = _run_local(te, "umt5-tiny.safetensors", {"tokens": both, "attention_mask": masks},
                     tmp_path)["out"] * masks.unsqueeze(-1).float()
    z, z_empty = out[0:1].clone(), out[1]
    z[0, 1] = (z[0, 1] - z_empty[1]) * 1.5 + z_empty[1]
    assert _same_bits(cond_w, z)


def test_flux_dual_clip_gives_t5_out_and_clip_l_pooled(cluster, te, tmp_path):
    # The files in either order, as ComfyUI's FluxClipModel.load_sd sorts them by their keys.
    clip = DualCLIPLoader().load_clip("t5xxl-tiny.safetensors", "clip_l-tiny.safetensors", "flux",
                                      **_opts(cluster))[0]
    (cond, extra), = CLIPTextEncodeFlux.execute(clip, "a red cat", "a small red cat on a table",
                                                3.5)[0]
    tokens = clip.tokenize("a red cat")
    t5_rows = clip.tokenize("a small red cat on a table")["t5xxl"]
    assert len(t5_rows[0]) == 256  # Flux's T5 tokenizer: min_length 256, no mask
    t5_ids = torch.tensor([[t for t, _ in r] for r in t5_rows])
    t5 = _run_local(te, "t5xxl-tiny.safetensors", {"tokens": t5_ids}, tmp_path)["out"]
    assert _same_bits(cond, t5)
    ids, _, num = _ids_and_mask(tokens["l"], end=49407)
    got = _run_local(te, "clip_l-tiny.safetensors", {"tokens": ids, "num_tokens": num}, tmp_path)
    assert _same_bits(extra["pooled_output"], got["pooled"][0:1])  # unprojected (Flux)
    assert extra["guidance"] == 3.5


def test_flux_dual_clip_takes_a_t5_gguf_with_llama_cpp_names(cluster, te):
    """city96's T5 GGUFs (llama.cpp names) work as ComfyUI-GGUF's DualCLIPLoaderGGUF reads
    them; all-F32, the conditioning is the safetensors T5's bit for bit."""
    texts = ("a red cat", "a small red cat on a table", 3.5)
    want = DualCLIPLoader().load_clip("clip_l-tiny.safetensors", "t5xxl-tiny.safetensors",
                                      "flux", **_opts(cluster))[0]
    got = DualCLIPLoader().load_clip("clip_l-tiny.safetensors", "t5xxl-tiny-F32.gguf", "flux",
                                     **_opts(cluster))[0]
    (a, extra_a), = CLIPTextEncodeFlux.execute(want, *texts)[0]
    (b, extra_b), = CLIPTextEncodeFlux.execute(got, *texts)[0]
    assert _same_bits(a, b) and _same_bits(extra_a["pooled_output"], extra_b["pooled_output"])


def test_clip_set_last_layer_gives_that_layers_state(cluster, te, tmp_path):
    clip = CLIPLoader().load_clip("clip_l-tiny.safetensors", "stable_diffusion",
                                  **_opts(cluster))[0]
    text = "a photo of a cat"
    ids, _, num = _ids_and_mask(clip.tokenize(text)["l"], end=49407)
    base = {"tokens": ids, "num_tokens": num}
    last = _run_local(te, "clip_l-tiny.safetensors", base, tmp_path)
    layer = _run_local(te, "clip_l-tiny.safetensors", base, tmp_path, "--layer", "-2")
    (cond, extra), = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
    assert _same_bits(cond, last["out"]) and _same_bits(extra["pooled_output"], last["pooled"])
    clip2 = comfy_nodes.CLIPSetLastLayer().set_last_layer(clip, -2)[0]
    (cond2, extra2), = comfy_nodes.CLIPTextEncode().encode(clip2, text)[0]
    assert _same_bits(cond2, layer["out"]) and not _same_bits(cond2, cond)
    assert _same_bits(extra2["pooled_output"], last["pooled"])  # pooled: the last layer's
    # The original CLIP is unchanged (CLIPSetLastLayer works on a clone).
    (again, _), = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
    assert _same_bits(again, cond)


def test_long_prompt_runs_in_77_token_chunks(cluster, te, tmp_path):
    clip = CLIPLoader().load_clip("clip_l-tiny.safetensors", "stable_diffusion",
                                  **_opts(cluster))[0]
    rows = clip.tokenize(LONG)["l"]
    assert len(rows) == 2 and all(len(r) == 77 for r in rows)
    ids, _, num = _ids_and_mask(rows, end=49407)
    want = _run_local(te, "clip_l-tiny.safetensors", {"tokens": ids, "num_tokens": num},
                      tmp_path)
    (cond, extra), = comfy_nodes.CLIPTextEncode().encode(clip, LONG)[0]
    assert cond.shape == (1, 154, 128)
    assert _same_bits(cond, torch.cat([want["out"][0:1], want["out"][1:2]], dim=1))
    assert _same_bits(extra["pooled_output"], want["pooled"][0:1])
    # T5 takes the long prompt in one row (no 77-token chunks), padded to 512 for WAN.
    wan = CLIPLoader().load_clip("umt5-tiny.safetensors", "wan", **_opts(cluster))[0]
    rows = wan.tokenize(LONG)["umt5xxl"]
    assert len(rows) == 1 and len(rows[0]) == 512
    (cond, _), = comfy_nodes.CLIPTextEncode().encode(wan, LONG)[0]
    assert cond.shape == (1, 512, 64)


def test_lora_strength_clip_equals_run_local_on_patched_weights(cluster, te, tmp_path):
    rank, alpha, strength = 4, 2.0, 0.7
    g = torch.Generator().manual_seed(9)
    lora = {}
    for i, part in ((1, "self_attn_q_proj"), (2, "mlp_fc1")):
        key = "lora_te_text_model_encoder_layers_%d_%s" % (i, part)
        out_dim = 256 if part == "mlp_fc1" else 128
        lora[key + ".lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * 0.1
        lora[key + ".lora_down.weight"] = torch.randn(rank, 128, generator=g) * 0.1
        lora[key + ".alpha"] = torch.tensor(alpha)
    loras = tmp_path / "loras"
    loras.mkdir()
    save_safetensors(lora, loras / "te.safetensors")
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)],
                                                    folder_paths.supported_pt_extensions)
    clip = CLIPLoader().load_clip("clip_l-tiny.safetensors", "stable_diffusion",
                                  **_opts(cluster))[0]
    _, patched = comfy_nodes.LoraLoader().load_lora(None, clip, "te.safetensors", 0.0, strength)
    assert len(patched.patcher.patches) == 2
    text = "a photo of a cat"
    (cond, extra), = comfy_nodes.CLIPTextEncode().encode(patched, text)[0]
    (plain, _), = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
    assert not _same_bits(cond, plain)
    # ComfyUI's arithmetic (comfy/weight_adapter/lora.py): w += (strength * alpha / rank) *
    # (up @ down), in float32 here.
    weights, _ = load_safetensors(os.path.join(te, "clip_l-tiny.safetensors"))
    for i, (part, name) in ((1, ("self_attn_q_proj", "self_attn.q_proj")),
                            (2, ("mlp_fc1", "mlp.fc1"))):
        key = "lora_te_text_model_encoder_layers_%d_%s" % (i, part)
        w = "text_model.encoder.layers.%d.%s.weight" % (i, name)
        diff = torch.mm(lora[key + ".lora_up.weight"], lora[key + ".lora_down.weight"])
        weights[w] = weights[w] + ((strength * (alpha / rank)) * diff).to(weights[w].dtype)
    save_safetensors(weights, os.path.join(te, "clip_l-patched.safetensors"))
    ids, _, num = _ids_and_mask(clip.tokenize(text)["l"], end=49407)
    want = _run_local(te, "clip_l-patched.safetensors", {"tokens": ids, "num_tokens": num},
                      tmp_path)
    diff = float((cond - want["out"]).abs().max())
    assert _same_bits(cond, want["out"]), "differs from run-local on patched weights by %g" % diff
    assert _same_bits(extra["pooled_output"], want["pooled"])


# ------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("args,message", [
    (("t5xxl-tiny.safetensors", "wan"),
     "'t5xxl-tiny.safetensors' is a T5 v1.1 encoder (T5-XXL); type 'wan' needs a UMT5-XXL "
     "encoder (umt5_xxl)"),
    (("umt5-tiny.safetensors", "stable_diffusion"),
     "'umt5-tiny.safetensors' is a UMT5 encoder (UMT5-XXL); type 'stable_diffusion' needs a "
     "CLIP-L text encoder"),
    (("flux-unet.safetensors", "stable_diffusion"),
     "'flux-unet.safetensors' is a Flux diffusion model; type 'stable_diffusion' needs"),
    (("clip_l-tiny.safetensors", "mochi"),
     "'clip_l-tiny.safetensors' is a CLIP-L text encoder; type 'mochi' needs a T5-XXL encoder"),
    (("umt5-tiny-F32.gguf", "wan"),
     "'umt5-tiny-F32.gguf' is a UMT5 GGUF file: its tokenizer is stored in GGUF metadata, "
     "which this loader cannot read yet"),
    (("t5xxl-tiny-F32.gguf", "wan"),
     "'t5xxl-tiny-F32.gguf' is a T5 v1.1 encoder (T5-XXL); type 'wan' needs a UMT5-XXL"),
    (("clip_l-tiny.safetensors", "stable_cascade"),
     "CLIPLoader type 'stable_cascade' is not supported by Tensorfleet yet"),
])
def test_clip_loader_refuses_by_name_before_loading(cluster, te, args, message):
    with tf.Client(cluster.address) as c:
        before = {m.name for m in c.list_models()}
    with pytest.raises(tf.InvalidArgumentError) as e:
        CLIPLoader().load_clip(*args, **_opts(cluster))
    assert message in str(e.value), str(e.value)
    with tf.Client(cluster.address) as c:
        assert {m.name for m in c.list_models()} == before  # nothing was loaded


@pytest.mark.parametrize("args,message", [
    (("clip_l-tiny.safetensors", "clip_l-tiny.safetensors", "flux"),
     "type 'flux' needs one CLIP-L text encoder (clip_l) and one T5-XXL encoder (t5xxl); "
     "'clip_l-tiny.safetensors' is a CLIP-L text encoder and 'clip_l-tiny.safetensors' is a "
     "CLIP-L text encoder"),
    (("umt5-tiny.safetensors", "clip_l-tiny.safetensors", "flux"),
     "'umt5-tiny.safetensors' is a UMT5 encoder (UMT5-XXL)"),
    (("clip_l-tiny.safetensors", "t5xxl-tiny.safetensors", "sdxl"),
     "DualCLIPLoader type 'sdxl' is not supported by Tensorfleet yet"),
    (("clip_l-tiny.safetensors", "umt5-tiny-F32.gguf", "flux"),
     "'umt5-tiny-F32.gguf' is a UMT5 GGUF file"),
])
def test_dual_clip_loader_refuses_by_name(cluster, te, args, message):
    with pytest.raises(tf.InvalidArgumentError) as e:
        DualCLIPLoader().load_clip(*args, **_opts(cluster))
    assert message in str(e.value), str(e.value)


def test_embeddings_and_layer_all_are_refused_by_name(cluster, te):
    clip = CLIPLoader().load_clip("clip_l-tiny.safetensors", "stable_diffusion",
                                  **_opts(cluster))[0]
    tokens = clip.tokenize("a cat")
    tokens["l"][0][2] = (torch.zeros(128), 1.0)  # what "embedding:NAME" puts in the tokens
    with pytest.raises(RuntimeError) as e:
        clip.encode_from_tokens_scheduled(tokens)
    assert "textual-inversion embedding" in str(e.value)
    encoder = clip.cond_stage_model.clip_l
    encoder.layer = "all"
    with pytest.raises(RuntimeError) as e:
        encoder.forward([[49406, 49407]])
    assert "output layer 'all'" in str(e.value)


def test_sd3_single_t5_and_the_clip_has_no_local_weights(cluster, te, tmp_path):
    clip = CLIPLoader().load_clip("t5xxl-tiny.safetensors", "sd3", **_opts(cluster))[0]
    assert all(p.device.type == "meta" for p in clip.cond_stage_model.t5xxl.transformer.parameters())
    (cond, extra), = comfy_nodes.CLIPTextEncode().encode(clip, "a cat")[0]
    rows = clip.tokenize("a cat")["t5xxl"]
    ids = torch.tensor([[t for t, _ in r] for r in rows])
    want = _run_local(te, "t5xxl-tiny.safetensors", {"tokens": ids}, tmp_path)["out"]
    assert _same_bits(cond, want) and cond.shape[1] == 77  # SD3's T5 tokenizer: min_length 77
    assert extra["pooled_output"].shape == (1, 768 + 1280)  # SD3ClipModel's zeros
