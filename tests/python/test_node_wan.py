"""WAN 2.1 / 2.2 through the ComfyUI node: the loader builds ComfyUI's own WAN model (the config
class, BaseModel, latent format and model sampling ComfyUI picks for the file) around a
parameter-less proxy, I2V conditioning (c_concat, clip_vision_output) and the TI2V 5B's per-frame
timesteps pass through, what the cluster cannot do is refused by name; against a WAN-speaking
JobPeer (no binaries needed) and against a real cluster (the steps equal the independent Python
reference; the two experts of a WAN 2.2 workflow stay loaded together when they fit, and swap,
with the cost logged, when they do not)."""

import json
import logging
import os
import re
import shutil
import time

import numpy as np
import pytest
import torch

import conftest_client
from conftest_client import JobPeer, _s, cluster, cluster_binaries, g  # noqa: F401 (fixture)
from safetensors_io import save_safetensors
from test_node import Loader, PKG, folder_paths, mm, model_mod, tf  # noqa: F401
import wan_reference as ref

import comfy.clip_vision  # noqa: E402  (comfy_standin, on sys.path once test_node is imported)
import comfy.latent_formats  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.supported_models  # noqa: E402

nodes = PKG.tensorfleet_nodes

# --------------------------------------------------------------------- a WAN-speaking peer

# File name -> the configuration the coordinator reports for it (small shapes; the channel
# counts and model types of the real variants).
PEER_MODELS = {
    "wan21-t2v.safetensors": dict(model_type="t2v", in_dim=16, out_dim=16, i2v=False),
    "wan21-i2v.safetensors": dict(model_type="i2v", in_dim=36, out_dim=16, i2v=True),
    "wan21-flf2v.safetensors": dict(model_type="flf2v", in_dim=36, out_dim=16, i2v=True),
    "wan21-fun-control.safetensors": dict(model_type="i2v", in_dim=48, out_dim=16, i2v=True),
    "wan22-t2v-high.safetensors": dict(model_type="t2v", in_dim=16, out_dim=16, i2v=False),
    "wan22-t2v-low.safetensors": dict(model_type="t2v", in_dim=16, out_dim=16, i2v=False),
    "wan22-i2v-high.safetensors": dict(model_type="t2v", in_dim=36, out_dim=16, i2v=False),
    "wan22-ti2v-5b.safetensors": dict(model_type="ti2v", in_dim=48, out_dim=48, i2v=False),
}
SMALL = dict(dim=64, ffn_dim=128, num_heads=1, num_layers=2, text_dim=32, freq_dim=256,
             patch_size=[1, 2, 2], eps=1e-6)
TEXT = SMALL["text_dim"]


def peer_config(path):
    """The config of a peer model; other names (the example workflows' files) are WAN 2.2
    A14B experts: I2V (36 input channels) when the name says i2v, else T2V."""
    name = os.path.basename(path)
    if name not in PEER_MODELS:
        name = "wan22-i2v-high.safetensors" if "i2v" in name else "wan22-t2v-high.safetensors"
    return dict(SMALL, **PEER_MODELS[name])


class WanPeer(JobPeer):
    """JobPeer whose models are WAN: ModelInfo says family "wan" with the coordinator's config,
    and a step's "model" is out = x[:, :out_dim] + sum(context) + sum(clip_fea); every step's
    input arrays are kept (`steps`)."""

    def __init__(self):
        self.steps = []
        super().__init__()

    def _model_info(self, b, name, path, loading=None):
        strings = [b.CreateString(s) for s in (name, path, "wan", "cuda:0", json.dumps(
            {"family": "wan", "config": peer_config(path), "compute_dtype": "f32",
             "assignments": [{"unit": "stem", "device": "cuda:0", "bytes": 1000}]}))]
        g.ModelInfoStart(b)
        g.ModelInfoAddName(b, strings[0])
        g.ModelInfoAddPath(b, strings[1])
        g.ModelInfoAddFamily(b, strings[2])
        g.ModelInfoAddState(b, g.ModelState.Ready if loading is None else g.ModelState.Loading)
        g.ModelInfoAddBytesTotal(b, 1000)
        g.ModelInfoAddComputeDevice(b, strings[3])
        g.ModelInfoAddKeepLoaded(b, True)
        g.ModelInfoAddPlanJson(b, strings[4])
        return g.ModelInfoEnd(b)

    def _forward(self, peer, rid, table, frames):
        f = g.ForwardRequest()
        f.Init(table.Bytes, table.Pos)
        model, run_id = _s(f.Model()), _s(f.RunId())
        consts = [_s(f.ConstantInputs(i)) for i in range(f.ConstantInputsLength())]
        inputs, dtypes = {}, {}
        for i in range(f.InputsLength()):
            d = f.Inputs(i)
            shape = tuple(d.Shape(j) for j in range(d.ShapeLength()))
            buf = frames[d.Frame() - 1] if d.Frame() else b""
            arr = np.frombuffer(buf, conftest_client._NP[d.Dtype()]).reshape(shape)
            if d.Dtype() == g.DType.BF16:
                arr = (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            inputs[_s(d.Name())] = arr
            dtypes[_s(d.Name())] = d.Dtype()
        self.requests.append(("Forward", {"model": model, "run_id": run_id, "consts": consts,
                                          "inputs": sorted(inputs), "dtypes": dtypes}))
        self.steps.append(dict(inputs))
        if model not in self.models:
            self._error(peer, rid, g.ErrorCode.NotFound, "model '%s' is not loaded" % model)
            return
        if run_id:
            cached = self.runs.setdefault(run_id, {})
            for c in consts:
                if c in inputs:
                    cached[c] = inputs[c]
                elif c in cached:
                    inputs[c] = cached[c]
                else:
                    self._error(peer, rid, g.ErrorCode.FailedPrecondition,
                                "run cache miss: run '%s' has no cached '%s'" % (run_id, c))
                    return
        out_dim = peer_config(self.models[model])["out_dim"]
        out = inputs["x"][:, :out_dim].astype(np.float32) + \
            np.float32(inputs["context"].astype(np.float32).sum())
        if "clip_fea" in inputs:
            out = out + np.float32(inputs["clip_fea"].astype(np.float32).sum())
        self._send_output(peer, rid, out)


@pytest.fixture
def wan_peer():
    p = WanPeer()
    yield p
    p.stop()


@pytest.fixture
def wan_dir(tmp_path):
    for n in PEER_MODELS:
        (tmp_path / n).write_bytes(b"")  # not readable as safetensors: the peer's config counts
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(tmp_path)],
                                                               {".safetensors"})
    mm.interrupt_current_processing(False)
    return tmp_path


def load(peer, name, **kw):
    return Loader().load_unet(name, coordinator=peer.endpoint, **kw)[0]


def cvo(batch=1, tokens=257, seed=0):
    """A CLIPVisionEncode output (CLIP-H: penultimate_hidden_states [B, 257, 1280])."""
    out = comfy.clip_vision.Output()
    out["penultimate_hidden_states"] = torch.randn(
        batch, tokens, 1280, generator=torch.Generator().manual_seed(seed))
    return out


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ the ComfyUI model

@pytest.mark.parametrize("name,config,base_cls,i2v_base,latent,channels", [
    ("wan21-t2v.safetensors", "WAN21_T2V", "WAN21", False, "Wan21", 16),
    ("wan22-t2v-high.safetensors", "WAN21_T2V", "WAN21", False, "Wan21", 16),
    ("wan22-i2v-high.safetensors", "WAN21_T2V", "WAN21", False, "Wan21", 16),
    ("wan21-i2v.safetensors", "WAN21_I2V", "WAN21", True, "Wan21", 16),
    ("wan21-flf2v.safetensors", "WAN21_I2V", "WAN21", True, "Wan21", 16),
    ("wan21-fun-control.safetensors", "WAN21_FunControl2V", "WAN21", False, "Wan21", 16),
    ("wan22-ti2v-5b.safetensors", "WAN22_T2V", "WAN22", True, "Wan22", 48),
])
def test_wan_model_is_comfys_own_for_the_variant(wan_peer, wan_dir, name, config, base_cls,
                                                 i2v_base, latent, channels):
    patcher = load(wan_peer, name)
    base = patcher.model
    cfg = peer_config(name)
    # The classes ComfyUI itself would pick for this file (comfy/model_detection.py walks
    # supported_models.models): WAN 2.2's A14B experts are WAN21_T2V, T2V and I2V alike.
    assert type(base.model_config) is getattr(comfy.supported_models, config)
    assert type(base) is getattr(comfy.model_base, base_cls)
    assert base.image_to_video is i2v_base
    assert type(base.latent_format) is getattr(comfy.latent_formats, latent)
    assert base.latent_format.latent_channels == channels
    # Model sampling as ComfyUI sets it for WAN: discrete flow, shift 8, timestep = 1000 sigma.
    assert base.model_type == comfy.model_base.ModelType.FLOW
    assert base.model_sampling.shift == 8.0 and base.model_sampling.multiplier == 1000
    uc = base.model_config.unet_config
    assert (uc["image_model"], uc["in_dim"], uc["out_dim"], uc["dim"], uc["num_layers"]) == \
        ("wan2.1", cfg["in_dim"], cfg["out_dim"], 64, 2)
    assert uc["model_type"] == ("i2v" if cfg["model_type"] in ("i2v", "flf2v") else "t2v")
    assert ("flf_pos_embed_token_number" in uc) is (cfg["model_type"] == "flf2v")
    assert base.model_config.memory_usage_factor == 64 / 2222
    dm = base.diffusion_model
    assert isinstance(dm, model_mod.TensorfleetWan)
    assert list(dm.parameters()) == [] and dm.dtype == torch.float32
    assert patcher.model_size() == 0  # ComfyUI must not reserve VRAM for remote weights
    assert tuple(dm.patch_embedding.weight.shape) == (64, cfg["in_dim"], 1, 2, 2)
    sd = base.state_dict()
    assert "diffusion_model.blocks.1.ffn.2.weight" in sd and \
        "diffusion_model.head.head.bias" in sd
    assert ("diffusion_model.blocks.0.cross_attn.k_img.weight" in sd) is cfg["i2v"]
    assert ("diffusion_model.img_emb.emb_pos" in sd) is (cfg["model_type"] == "flf2v")
    assert dm.weight_shapes["head.head.weight"] == [4 * cfg["out_dim"], 64]
    assert dm.weight_shapes["blocks.0.ffn.0.weight"] == [128, 64]
    assert set(dm.weight_shapes) == {k[len("diffusion_model."):] for k in sd}


def test_wan_t2v_steps_send_x_timestep_and_context(wan_peer, wan_dir):
    base = load(wan_peer, "wan21-t2v.safetensors").model
    x = rand(2, 16, 3, 4, 6, seed=1)  # cond and uncond in one batch, as ComfyUI runs them
    context = rand(2, 7, TEXT, seed=2)
    consts = []
    for sigma in (1.0, 0.6, 0.3):
        s = torch.full((2,), sigma)
        conds = base.extra_conds(noise=x, device=torch.device("cpu"), cross_attn=context)
        assert set(conds) == {"c_crossattn"}  # a T2V model has no extra input channels
        den = base.apply_model(x, s, **conds)
        out = x + context.sum()
        assert torch.allclose(den, x - out * sigma, atol=1e-4)
        step = wan_peer.steps[-1]
        consts.append(wan_peer.requests[-1][1]["inputs"])
        assert step["x"].shape == (2, 16, 3, 4, 6)
        assert step["timestep"].dtype == np.float32
        assert np.array_equal(step["timestep"], np.full((2,), sigma * 1000, np.float32))
    assert consts == [["context", "timestep", "x"], ["timestep", "x"], ["timestep", "x"]]


def test_wan21_i2v_gets_the_image_channels_and_clip_fea(wan_peer, wan_dir):
    """WanImageToVideo's conditioning: concat_latent_image + concat_mask become 20 channels
    ComfyUI's WAN21 puts after the noise (mask first, 1 - mask, the image latent
    process_in'ed), clip_vision_output becomes clip_fea; both pass through to the cluster."""
    base = load(wan_peer, "wan21-i2v.safetensors").model
    x = rand(1, 16, 3, 4, 6, seed=1)
    image = rand(1, 16, 3, 4, 6, seed=3)
    mask = torch.ones(1, 1, 3, 4, 6)
    mask[:, :, :1] = 0.0  # the start image's latent frame is kept
    clip = cvo()
    conds = base.extra_conds(noise=x, device=torch.device("cpu"), cross_attn=rand(1, 5, TEXT),
                             concat_latent_image=image, concat_mask=mask,
                             clip_vision_output=clip)
    assert set(conds) == {"c_concat", "c_crossattn", "clip_fea"}
    base.apply_model(x, torch.full((1,), 0.9), **conds)
    step = wan_peer.steps[-1]
    want_mask = (1.0 - mask).repeat(1, 4, 1, 1, 1)
    want = torch.cat([x, want_mask, comfy.latent_formats.Wan21().process_in(image)], dim=1)
    assert step["x"].shape == (1, 36, 3, 4, 6)
    assert np.allclose(step["x"], want.numpy(), atol=1e-6)
    assert np.array_equal(step["clip_fea"], clip.penultimate_hidden_states.numpy())
    assert wan_peer.requests[-1][1]["consts"] == ["context", "clip_fea"]
    # A second image is a new run (the run id hashes clip_fea): both constants go again.
    conds["clip_fea"] = cvo(seed=9).penultimate_hidden_states
    base.apply_model(x, torch.full((1,), 0.8), **conds)
    assert wan_peer.requests[-1][1]["inputs"] == ["clip_fea", "context", "timestep", "x"]


def test_wan22_a14b_i2v_takes_the_image_channels_and_ignores_clip_fea_as_comfy(wan_peer,
                                                                               wan_dir):
    """The WAN 2.2 A14B I2V experts have 36 input channels and no image embedding: ComfyUI's
    WanModel ignores clip_fea there, and so does the node (nothing to send it to)."""
    base = load(wan_peer, "wan22-i2v-high.safetensors").model
    x = rand(1, 16, 2, 4, 4, seed=1)
    conds = base.extra_conds(noise=x, device=torch.device("cpu"), cross_attn=rand(1, 5, TEXT),
                             concat_latent_image=rand(1, 16, 2, 4, 4, seed=2),
                             concat_mask=torch.zeros(1, 1, 2, 4, 4), clip_vision_output=cvo())
    base.apply_model(x, torch.full((1,), 0.5), **conds)
    assert wan_peer.requests[-1][1]["inputs"] == ["context", "timestep", "x"]
    assert wan_peer.steps[-1]["x"].shape == (1, 36, 2, 4, 4)
    # Without a start image ComfyUI still fills the 20 channels (zeros): x is always 36 wide.
    conds = base.extra_conds(noise=x, device=torch.device("cpu"), cross_attn=rand(1, 5, TEXT))
    base.apply_model(x, torch.full((1,), 0.5), **conds)
    assert wan_peer.steps[-1]["x"].shape == (1, 36, 2, 4, 4)
    assert not wan_peer.steps[-1]["x"][:, 16:].any()


def test_wan22_5b_sends_one_timestep_per_latent_frame(wan_peer, wan_dir):
    """TI2V 5B image-to-video (Wan22ImageToVideoLatent's noise mask): ComfyUI's WAN22 turns the
    denoise mask into one timestep per latent frame, [B, T], sent as given."""
    base = load(wan_peer, "wan22-ti2v-5b.safetensors").model
    x = rand(1, 48, 4, 4, 6, seed=1)
    mask = torch.ones(1, 48, 4, 4, 6)
    mask[:, :, 0] = 0.0  # the start image's frame is not denoised
    conds = base.extra_conds(noise=x, device=torch.device("cpu"), cross_attn=rand(1, 5, TEXT),
                             denoise_mask=mask)
    assert set(conds) == {"c_crossattn", "denoise_mask"}  # 48 in, 48 out: no c_concat
    den = base.apply_model(x, torch.full((1,), 0.75), **conds)
    step = wan_peer.steps[-1]
    assert step["timestep"].shape == (1, 4) and step["timestep"].dtype == np.float32
    assert np.array_equal(step["timestep"], np.array([[0.0, 750.0, 750.0, 750.0]], np.float32))
    assert step["x"].shape == (1, 48, 4, 4, 6) and den.shape == x.shape
    assert wan_peer.requests[-1][1]["inputs"] == ["context", "timestep", "x"]  # no denoise_mask
    # Text-to-video (no mask): one timestep per sample.
    conds = base.extra_conds(noise=x, device=torch.device("cpu"), cross_attn=rand(1, 5, TEXT))
    base.apply_model(x, torch.full((1,), 0.75), **conds)
    assert wan_peer.steps[-1]["timestep"].shape == (1,)


@pytest.mark.parametrize("extra,named", [
    ({"time_dim_concat": rand(1, 16, 1, 4, 6)}, "latents concatenated along time "
                                                "('time_dim_concat')"),
    ({"reference_latents": [rand(1, 16, 1, 4, 6)]}, "reference latents ('reference_latent'"),
    ({"cross_attn_controlnet": rand(1, 5, TEXT)}, "ControlNet cross-attention"),
])
def test_wan_conditioning_the_cluster_lacks_is_refused_by_name(wan_peer, wan_dir, extra,
                                                               named):
    base = load(wan_peer, "wan21-t2v.safetensors").model
    x = rand(1, 16, 2, 4, 6)
    conds = base.extra_conds(noise=x, device=torch.device("cpu"), cross_attn=rand(1, 5, TEXT),
                             **extra)
    with pytest.raises(model_mod.UnsupportedConditioningError) as e:
        base.apply_model(x, torch.ones(1), **conds)
    assert named in str(e.value) and "refuses rather than ignoring" in str(e.value)
    assert "Forward" not in [k for k, _ in wan_peer.requests]


@pytest.mark.parametrize("kwargs,named", [
    ({"control": {"output": [torch.zeros(1)]}}, "ControlNet residuals ('control'"),
    ({"vace_context": torch.zeros(1), "vace_strength": [1.0]}, "VACE controls"),
    ({"camera_conditions": torch.zeros(1)}, "camera conditions"),
    ({"transformer_options": {"patches_replace": {"dit": {("double_block", 0): None}}}},
     "transformer_options['patches_replace']: dit"),
    ({"mystery_cond": torch.zeros(1)}, "conditioning 'mystery_cond'"),
])
def test_wan_kwargs_and_patches_the_cluster_lacks_are_refused(wan_peer, wan_dir, kwargs, named):
    base = load(wan_peer, "wan21-t2v.safetensors").model
    with pytest.raises(model_mod.UnsupportedConditioningError) as e:
        base.apply_model(rand(1, 16, 2, 4, 6), torch.ones(1), c_crossattn=rand(1, 5, TEXT),
                         **kwargs)
    assert named in str(e.value)
    assert "Forward" not in [k for k, _ in wan_peer.requests]


def test_wan_lora_binds_and_oft_is_refused(wan_peer, wan_dir):
    patcher = load(wan_peer, "wan22-t2v-low.safetensors")
    lora = patcher.clone()
    key = "diffusion_model.blocks.1.self_attn.q.weight"
    assert lora.add_patches({key: ("lora", (torch.zeros(2, 2), torch.zeros(2, 2)))}, 1.0) == [key]
    lora.pre_run()  # LoRA runs in the cluster (test_node_lora.py)
    oft = patcher.clone()
    oft.add_patches({key: ("oft", (torch.zeros(2, 2), None, 1.0))}, 1.0)
    with pytest.raises(model_mod.UnsupportedConditioningError, match="OFT adapter"):
        oft.pre_run()


def test_diffusion_model_wrappers_run_around_the_step_as_in_wanmodel(wan_peer, wan_dir):
    """A DIFFUSION_MODEL wrapper (EasyCache's kind) runs around the remote step exactly as
    ComfyUI's WanModel.forward runs it: it sees the arguments and may skip the step."""
    base = load(wan_peer, "wan21-t2v.safetensors").model
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append((executor.class_obj, args[0].shape, tuple(args[1].shape)))
        if len(seen) == 2:
            return torch.zeros_like(args[0])  # a cached step: nothing is sent
        return executor(*args, **kwargs)

    to = {}
    comfy.patcher_extension.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test", wrapper, to)
    x, ctx = rand(1, 16, 2, 4, 6), rand(1, 5, TEXT)
    base.apply_model(x, torch.ones(1), c_crossattn=ctx, transformer_options=to)
    sent = len(wan_peer.steps)
    base.apply_model(x, torch.ones(1), c_crossattn=ctx, transformer_options=to)
    assert len(wan_peer.steps) == sent  # the wrapper skipped the step
    assert seen == [(base.diffusion_model, (1, 16, 2, 4, 6), (1,))] * 2


def test_wan_model_is_loaded_again_with_the_cost_logged(wan_peer, wan_dir, caplog):
    """A step that finds its model gone (another load evicted it, or the coordinator restarted)
    loads it again with the loader's spec, once; the coordinator makes room for it as for any
    load (here: by evicting the other expert), and the node logs what it cost and what the
    coordinator's plan had it evict."""
    base = load(wan_peer, "wan22-t2v-high.safetensors").model
    load(wan_peer, "wan22-t2v-low.safetensors")
    runner = base.diffusion_model._runner
    del wan_peer.models["wan22-t2v-high"]  # evicted for another model, as the coordinator does
    wan_peer.plan_evicts = ["wan22-t2v-low"]
    with caplog.at_level(logging.WARNING, logger="tensorfleet"):
        base.apply_model(rand(1, 16, 2, 4, 6), torch.ones(1), c_crossattn=rand(1, 5, TEXT))
    kinds = [k for k, _ in wan_peer.requests]
    assert kinds[-5:] == ["Forward", "ListModels", "Plan", "LoadModel", "Forward"]
    assert wan_peer.requests[-2][1]["eject_models"] is True  # the loader's, as set
    assert list(wan_peer.models) == ["wan22-t2v-high"]
    assert runner.reloads == 1 and runner.reload_seconds > 0
    assert re.search(r"'wan22-t2v-high' was not resident on the cluster .*; loading it again "
                     r"cost \d+\.\d\d s for 1000 B; the coordinator's plan had it evict "
                     r"'wan22-t2v-low' to make room", caplog.text)


def test_two_experts_through_the_node_never_reload_at_a_switch(wan_peer, wan_dir):
    """A WAN 2.2 two-expert workflow as KSamplerAdvanced runs it (high-noise steps, then
    low-noise steps, twice): plan and load go with eject_models as set (the default true; the
    coordinator keeps models that fit together), each expert is loaded once, every step goes
    to its own expert."""
    high = load(wan_peer, "wan22-t2v-high.safetensors").model
    low = load(wan_peer, "wan22-t2v-low.safetensors").model
    loads = [d for k, d in wan_peer.requests if k == "LoadModel"]
    assert [d["eject_models"] for d in loads] == [True, True]
    plans = [d for k, d in wan_peer.requests if k == "Plan"]
    assert plans == loads
    x, ctx = rand(2, 16, 2, 4, 6), rand(2, 5, TEXT)
    for _prompt in range(2):
        for step, sigma in enumerate([1.0, 0.9, 0.7, 0.4]):
            model = high if step < 2 else low
            model.apply_model(x, torch.full((2,), sigma), c_crossattn=ctx)
    forwards = [d["model"] for k, d in wan_peer.requests if k == "Forward"]
    assert forwards == (["wan22-t2v-high"] * 2 + ["wan22-t2v-low"] * 2) * 2
    assert [k for k, _ in wan_peer.requests].count("LoadModel") == 2


def test_describe_wan_from_the_file_header(tmp_path):
    specs = ref.weight_specs("i2v", dim=256, ffn_dim=512, num_layers=3, in_dim=36, out_dim=16,
                             text_dim=4096)
    header = {"__metadata__": {}}
    for name, shape, _ in specs:
        header["model.diffusion_model." + name] = {"dtype": "BF16", "shape": list(shape),
                                                   "data_offsets": [0, 0]}
    raw = json.dumps(header).encode()
    p = tmp_path / "w.safetensors"
    p.write_bytes(len(raw).to_bytes(8, "little") + raw)
    info = tf.ModelInfo(name="w", path="w.safetensors", family="wan", state="ready",
                        bytes_loaded=0, bytes_total=0, compute_device="cuda:0", mode="auto",
                        keep_loaded=True, error="", plan_json="{}")
    cfg = model_mod.describe_wan(info, "default", str(p))
    assert (cfg["dim"], cfg["ffn_dim"], cfg["num_layers"], cfg["in_dim"], cfg["out_dim"],
            cfg["num_heads"], cfg["model_type"], cfg["comfy_model_type"], cfg["i2v"],
            cfg["dtype"]) == (256, 512, 3, 36, 16, 2, "i2v", "i2v", True, torch.bfloat16)
    assert sorted(cfg["weight_names"]) == sorted(n for n, _, _ in specs)
    # The node's own list of WAN names and shapes is the real checkpoint's.
    assert model_mod.wan_weight_shapes(cfg) == {n: list(s) for n, s, _ in specs}
    with pytest.raises(tf.TensorfleetError, match="cannot describe the WAN model 'w'"):
        model_mod.describe_wan(info, "default", None)
    info.family = "flux"
    with pytest.raises(tf.TensorfleetError, match="'w' is a 'flux' model, not WAN"):
        model_mod.describe_wan(info, "default", str(p))


# ------------------------------------------------------------------------ example workflows

EXAMPLES = os.path.join(conftest_client.REPO, "comfyui", "example_workflows")


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_wan22_example_workflows_are_two_experts_split_by_step(wan_peer, tmp_path, kind):
    """comfyui/example_workflows/wan22_{t2v,i2v}_tensorfleet.json: two Tensorfleet loaders (the
    high- and low-noise experts), each through ModelSamplingSD3 (shift 8, as ComfyUI's WAN
    config) into its own KSamplerAdvanced; the first adds noise and stops at the switch step
    with the leftover noise, the second continues from there; umt5 as a Tensorfleet CLIPLoader
    type wan, the
    WAN 2.1 VAE; for I2V, WanImageToVideo's conditioning and latent. Their loaders validate as
    ComfyUI would and load through the node."""
    import execution  # noqa: PLC0415  (comfy_standin)
    from test_workflow_convert import _widget_names, wc  # noqa: PLC0415

    with open(os.path.join(EXAMPLES, "wan22_%s_tensorfleet.json" % kind)) as f:
        wf = json.load(f)
    assert wc.convert(wf) == (wf, [])  # nothing of ComfyUI-MultiGPU's in it
    nodes_by_id = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}

    def source(node, input_name):
        link = next(i["link"] for i in node["inputs"] if i["name"] == input_name)
        return nodes_by_id[links[link][1]], links[link][2]

    def widgets(node):
        names = {"KSamplerAdvanced": ["add_noise", "noise_seed", "control_after_generate",
                                      "steps", "cfg", "sampler_name", "scheduler",
                                      "start_at_step", "end_at_step",
                                      "return_with_leftover_noise"]}[node["type"]]
        return dict(zip(names, node["widgets_values"]))

    samplers = [n for n in wf["nodes"] if n["type"] == "KSamplerAdvanced"]
    assert len(samplers) == 2
    first, second = sorted(samplers, key=lambda n: widgets(n)["start_at_step"])
    a, b = widgets(first), widgets(second)
    assert (a["add_noise"], a["start_at_step"], a["return_with_leftover_noise"]) == \
        ("enable", 0, "enable")
    assert (b["add_noise"], b["return_with_leftover_noise"]) == ("disable", "disable")
    assert a["end_at_step"] == b["start_at_step"] < a["steps"] == b["steps"] <= b["end_at_step"]
    assert source(second, "latent_image")[0] is first
    experts = []
    for sampler in (first, second):
        patch, _ = source(sampler, "model")
        assert patch["type"] == "ModelSamplingSD3" and patch["widgets_values"] == [8.0]
        loader, _ = source(patch, "model")
        assert loader["type"] == "UNETLoaderTensorfleet"
        experts.append(loader)
    assert "high_noise" in experts[0]["widgets_values"][0]
    assert "low_noise" in experts[1]["widgets_values"][0]
    assert ("_%s_" % kind) in experts[0]["widgets_values"][0]
    clip = next(n for n in wf["nodes"] if n["type"] == "CLIPLoaderTensorfleet")
    assert clip["widgets_values"][:2] == ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan"]
    assert source(source(first, "positive")[0], "clip")[0] is clip \
        if kind == "t2v" else True
    vae = next(n for n in wf["nodes"] if n["type"] == "VAELoader")
    assert vae["widgets_values"] == ["wan_2.1_vae.safetensors"]
    if kind == "i2v":
        i2v = next(n for n in wf["nodes"] if n["type"] == "WanImageToVideo")
        for sampler in (first, second):
            assert source(sampler, "positive") == (i2v, 0)
            assert source(sampler, "negative") == (i2v, 1)
        assert source(first, "latent_image") == (i2v, 2)
        assert source(i2v, "start_image")[0]["type"] == "LoadImage"
        assert source(i2v, "vae")[0] is vae
    else:
        assert source(first, "latent_image")[0]["type"] == "EmptyHunyuanLatentVideo"
    # The loaders as ComfyUI would run them (against the WAN peer).
    for loader in experts:
        (tmp_path / loader["widgets_values"][0]).write_bytes(b"")
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(tmp_path)],
                                                               {".safetensors"})
    models = []
    for loader in experts:
        kwargs = dict(zip(_widget_names(Loader), loader["widgets_values"]))
        assert execution.validate_inputs(Loader, kwargs) == []
        assert kwargs["eject_models"] is True  # the default; experts that fit stay together
        kwargs["coordinator"] = wan_peer.endpoint
        models.append(Loader().load_unet(**kwargs)[0].model)
    assert all(type(m.model_config) is comfy.supported_models.WAN21_T2V for m in models)
    assert [m.diffusion_model.in_dim for m in models] == [36 if kind == "i2v" else 16] * 2


# ------------------------------------------------------------------- against a real cluster

REF_SIZES = {  # random models with the real key names (wan_reference), 2 heads of 64
    "t2v": dict(dim=128, ffn_dim=256, num_layers=2, text_dim=64),
    "i2v": dict(dim=128, ffn_dim=192, num_layers=2, text_dim=64),
    "ti2v5b": dict(dim=128, ffn_dim=256, num_layers=2, text_dim=64),
}
EXPERT = dict(dim=128, ffn_dim=512, num_layers=4, text_dim=64)  # 4.8 MiB in float32
TOLERANCE = 1e-4


def _write_model(root, name, variant, seed, **sizes):
    path = os.path.join(root, name)
    if not os.path.exists(path):
        w = ref.random_weights(variant, seed=seed, **sizes)
        config = {"num_heads": 2}
        if variant == "ti2v5b":
            config["model_type"] = "ti2v"
        save_safetensors(w, path, {"config": json.dumps(config)})
    return name


def _weights(root, name):
    from safetensors_io import load_safetensors  # noqa: PLC0415
    w = load_safetensors(os.path.join(root, name))[0]
    return w, ref.config_from_weights(w, {"num_heads": 2})


def _loads_logged(c, name):
    """How many times the coordinator logged loading `name` (its own count, not ours)."""
    time.sleep(0.2)  # the coordinator's output is read by a thread
    return sum(1 for line in list(c.coordinator.output)
               if re.search(r"\bloading %s \(wan," % re.escape(name), line))


@pytest.fixture
def on_cluster(cluster):
    folder_paths.folder_names_and_paths["diffusion_models"] = ([cluster.model_root],
                                                               {".safetensors"})
    mm.interrupt_current_processing(False)
    return cluster


SMALL_SIZES = dict(compute_device="cuda:0", virtual_vram_gb=0, width=64, height=64, frames=9)


@pytest.mark.parametrize("variant", ["t2v", "i2v", "ti2v5b"])
def test_node_steps_on_a_cluster_equal_the_reference(on_cluster, variant):
    """ComfyUI's own conditioning (the stand-in's WAN21 / WAN22) through the node to a real
    cluster: each step's output is the independent reference's for the same x (with the I2V
    channels), timestep (1000 sigma, per frame for the 5B) and context (with clip_fea)."""
    name = _write_model(on_cluster.model_root, "node-wan-%s.safetensors" % variant, variant, 11,
                        **REF_SIZES[variant])
    weights, config = _weights(on_cluster.model_root, name)
    base = Loader().load_unet(name, coordinator=on_cluster.address, compute_dtype="float32",
                              expert_mode_allocations="cuda:0,50%;cuda:1,50%",
                              **dict(SMALL_SIZES, virtual_vram_gb=4))[0].model
    assert isinstance(base.diffusion_model, model_mod.TensorfleetWan)
    cin = 48 if variant == "ti2v5b" else 16
    x = rand(2, cin, 3, 4, 6, seed=4)
    context = rand(2, 9, 64, seed=5)
    kw = {"noise": x, "device": torch.device("cpu"), "cross_attn": context}
    if variant == "i2v":
        mask = torch.ones(1, 1, 3, 4, 6)
        mask[:, :, :1] = 0.0
        kw.update(concat_latent_image=rand(1, 16, 3, 4, 6, seed=6), concat_mask=mask,
                  clip_vision_output=cvo(batch=2, seed=7))
    if variant == "ti2v5b":
        mask = torch.ones(2, 48, 3, 4, 6)
        mask[:, :, :1] = 0.0
        kw["denoise_mask"] = mask
    conds = base.extra_conds(**kw)
    for sigma in (0.9, 0.5):
        s = torch.full((2,), sigma)
        den = base.apply_model(x, s, **conds)
        xc = torch.cat([x, conds["c_concat"]], dim=1) if "c_concat" in conds else x
        t = s * 1000
        if variant == "ti2v5b":
            t = torch.tensor([[0.0, sigma * 1000, sigma * 1000]] * 2)
        want = ref.forward(weights, config, xc, t, context, conds.get("clip_fea"))
        diff = float((den - (x - want * sigma)).abs().max())
        assert diff <= TOLERANCE, "%s step at sigma %g differs by %g" % (variant, sigma, diff)
    tf_client = nodes.client_for(on_cluster.address)
    tf_client.unload_model(name.rsplit(".", 1)[0])


def _ksampler_advanced(high, low, x, context, steps=4, switch=2, prompts=2):
    """Two KSamplerAdvanced: steps [0, switch) on the high-noise expert, [switch, steps) on the
    low-noise one (Euler), `prompts` times; returns the outputs of each step per prompt."""
    sigmas = [ref_time_shift(1 - i / steps) for i in range(steps)] + [0.0]
    outs = []
    for _ in range(prompts):
        xi, run = x.clone(), []
        for i in range(steps):
            model = high if i < switch else low
            s = torch.full((x.shape[0],), sigmas[i])
            den = model.apply_model(xi, s, c_crossattn=context)
            run.append(den)
            xi = xi + (sigmas[i + 1] - sigmas[i]) * (xi - den) / sigmas[i]
        outs.append(run)
    return outs


def ref_time_shift(t, shift=8.0):
    """ComfyUI's WAN sigmas: time_snr_shift with the config's shift 8."""
    return shift * t / (1 + (shift - 1) * t)


def _check_steps(root, outs, x, context):
    """Every prompt gave the same steps; the first step is the high-noise expert's and the
    third the low-noise expert's (each against the reference, from the second prompt's inputs
    rebuilt by Euler)."""
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    sigmas = [ref_time_shift(1 - i / 4) for i in range(4)]
    xi = x.clone()
    for i, name in enumerate(["wan22-expert-high.safetensors"] * 2 +
                             ["wan22-expert-low.safetensors"] * 2):
        w, cfg = _weights(root, name)
        want = xi - ref.forward(w, cfg, xi, torch.full((2,), sigmas[i] * 1000), context) * \
            sigmas[i]
        diff = float((outs[1][i] - want).abs().max())
        assert diff <= TOLERANCE, "step %d (%s) differs from the reference by %g" % (i, name,
                                                                                    diff)
        nxt = sigmas[i + 1] if i + 1 < 4 else 0.0
        xi = xi + (nxt - sigmas[i]) * (xi - outs[1][i]) / sigmas[i]


def _experts(root):
    return (_write_model(root, "wan22-expert-high.safetensors", "t2v", 21, **EXPERT),
            _write_model(root, "wan22-expert-low.safetensors", "t2v", 22, **EXPERT))


def test_two_experts_that_fit_stay_loaded_and_are_never_reloaded(on_cluster, caplog):
    """WAN 2.2 A14B's workflow: two loaders with the defaults (eject_models true), then high-noise
    steps and low-noise steps, twice. Both experts fit: the coordinator evicts nothing for the
    second, and no step reloads either (the coordinator logs one load of each)."""
    high_name, low_name = _experts(on_cluster.model_root)
    client = nodes.client_for(on_cluster.address)
    for m in client.list_models():
        client.unload_model(m.name)
    before = {n: _loads_logged(on_cluster, n) for n in ("wan22-expert-high", "wan22-expert-low")}
    with caplog.at_level(logging.INFO, logger="tensorfleet"):
        high = Loader().load_unet(high_name, coordinator=on_cluster.address, **SMALL_SIZES)[0]
        low = Loader().load_unet(low_name, coordinator=on_cluster.address, **SMALL_SIZES)[0]
        resident = {m.name for m in client.list_models() if m.state == "ready"}
        assert {"wan22-expert-high", "wan22-expert-low"} <= resident
        x, context = rand(2, 16, 3, 4, 6, seed=8), rand(2, 6, 64, seed=9)
        outs = _ksampler_advanced(high.model, low.model, x, context)
    assert "evict" not in caplog.text and "was not resident" not in caplog.text
    assert len(re.findall(r"loading 'wan22-expert-(?:high|low)' took \d+\.\d\d s for "
                          r"4\.\d\d MiB\n", caplog.text)) == 2
    for model in (high, low):
        assert model.model.diffusion_model._runner.reloads == 0
    after = {n: _loads_logged(on_cluster, n) for n in before}
    assert {n: after[n] - before[n] for n in before} == \
        {"wan22-expert-high": 1, "wan22-expert-low": 1}
    resident = {m.name for m in client.list_models() if m.state == "ready"}
    assert {"wan22-expert-high", "wan22-expert-low"} <= resident
    _check_steps(on_cluster.model_root, outs, x, context)
    for name in ("wan22-expert-high", "wan22-expert-low"):
        client.unload_model(name)


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory):
    """A cluster whose cuda:0 (8 MiB) holds one expert (4.8 MiB) but not two."""
    _, missing = cluster_binaries()
    if missing:
        pytest.skip("end-to-end tests need %s (build them first)" % ", ".join(missing))
    root = str(tmp_path_factory.mktemp("small-models"))
    c = conftest_client.Cluster(root, capacity="8mb")
    yield c
    c.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_two_experts_that_do_not_fit_swap_with_the_cost_logged(small_cluster, caplog):
    """The same workflow on a device that holds one expert: the coordinator makes room for the
    second by evicting the first (the loader logs that from the plan before loading, and the
    load's time after), and each switch between them loads the expert it needs once, logging
    what it cost and what it evicted; the steps give what they give when both fit. Then the
    coordinator's rule for what may go: keep_loaded models only with eject_models, models
    without keep_loaded always, and nothing when evicting all of them would not make room."""
    c = small_cluster
    folder_paths.folder_names_and_paths["diffusion_models"] = ([c.model_root], {".safetensors"})
    mm.interrupt_current_processing(False)
    high_name, low_name = _experts(c.model_root)
    client = nodes.client_for(c.address)
    with caplog.at_level(logging.INFO, logger="tensorfleet"):
        high = Loader().load_unet(high_name, coordinator=c.address, **SMALL_SIZES)[0]
        low = Loader().load_unet(low_name, coordinator=c.address, **SMALL_SIZES)[0]
        assert [m.name for m in client.list_models()] == ["wan22-expert-low"]
        assert re.search(r"'wan22-expert-low.safetensors' does not fit beside the models on the "
                         r"cluster; loading it evicts 'wan22-expert-high' \(least recently used "
                         r"first, per the coordinator's plan\)", caplog.text)
        assert re.search(r"loading 'wan22-expert-low' took \d+\.\d\d s for 4\.\d\d MiB; the "
                         r"coordinator's plan had it evict 'wan22-expert-high' to make room",
                         caplog.text)
        caplog.clear()
        x, context = rand(2, 16, 3, 4, 6, seed=8), rand(2, 6, 64, seed=9)
        outs = _ksampler_advanced(high.model, low.model, x, context)
    # One load per switch: high at the start of each prompt, low at each switch to it.
    hr, lr = (m.model.diffusion_model._runner for m in (high, low))
    assert (hr.reloads, lr.reloads) == (2, 2)
    assert hr.reload_seconds > 0 and lr.reload_seconds > 0
    swaps = re.findall(r"'(wan22-expert-\w+)' was not resident on the cluster .*?; loading it "
                       r"again cost \d+\.\d\d s for 4\.\d\d MiB; the coordinator's plan had "
                       r"it evict '(wan22-expert-\w+)'", caplog.text)
    assert swaps == [("wan22-expert-high", "wan22-expert-low"),
                     ("wan22-expert-low", "wan22-expert-high")] * 2
    assert _loads_logged(c, "wan22-expert-high") == 3 and \
        _loads_logged(c, "wan22-expert-low") == 3
    _check_steps(c.model_root, outs, x, context)
    assert [m.name for m in client.list_models()] == ["wan22-expert-low"]

    # The Tensorfleet Plan node shows what a load would evict, and evicts nothing itself.
    plan_node = PKG.NODE_CLASS_MAPPINGS["TensorfleetPlan"]()
    text = plan_node.plan(high_name, coordinator=c.address, **SMALL_SIZES)["ui"]["text"][0]
    assert "loading it evicts (least recently used first): wan22-expert-low" in text
    assert [m.name for m in client.list_models()] == ["wan22-expert-low"]

    # eject_models off: a model kept with keep_loaded stays, so there is no room, and nothing
    # is evicted (the plan says so too).
    with pytest.raises(tf.ResourceExhaustedError, match="Tensorfleet plan of"):
        plan_node.plan(high_name, coordinator=c.address, eject_models=False, **SMALL_SIZES)
    with pytest.raises(tf.ResourceExhaustedError, match="Tensorfleet LoadModel of"):
        Loader().load_unet(high_name, coordinator=c.address, eject_models=False, **SMALL_SIZES)
    assert [m.name for m in client.list_models()] == ["wan22-expert-low"]
    assert _loads_logged(c, "wan22-expert-low") == 3

    # A model loaded without keep_loaded may go even then. (Loading the loaded expert again
    # re-uses it and only changes keep_loaded; its own copy, which the plan counts, is not
    # reported as evicted.)
    assert client.plan(nodes._spec(low_name, **SMALL_SIZES)).evicts == ["wan22-expert-low"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tensorfleet"):
        Loader().load_unet(low_name, coordinator=c.address, keep_loaded=False, **SMALL_SIZES)
        assert "evict" not in caplog.text
        assert _loads_logged(c, "wan22-expert-low") == 3
        Loader().load_unet(high_name, coordinator=c.address, eject_models=False, **SMALL_SIZES)
    assert [m.name for m in client.list_models()] == ["wan22-expert-high"]
    assert re.search(r"loading it evicts 'wan22-expert-low' \(least recently used first",
                     caplog.text)

    # A model that cannot fit even with the device empty evicts nothing, and says so.
    big = _write_model(c.model_root, "wan-too-big.safetensors", "t2v", 23,
                       **dict(EXPERT, num_layers=8))
    with pytest.raises(tf.ResourceExhaustedError,
                       match=r"would not make room either; nothing was evicted"):
        Loader().load_unet(big, coordinator=c.address, **SMALL_SIZES)
    assert [m.name for m in client.list_models()] == ["wan22-expert-high"]
    client.unload_model("wan22-expert-high")
