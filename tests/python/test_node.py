"""The ComfyUI node package against the ComfyUI interfaces it uses (tests/python/comfy_standin,
written from ComfyUI's source) and a JobPeer standing in for the far end of the wire."""

import importlib.util
import json
import os
import re
import socket
import struct
import sys
import threading

import pytest
import torch

from conftest_client import REPO, JobPeer, peer  # noqa: F401  (fixture)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "comfy_standin"))

import comfy.model_base  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import folder_paths  # noqa: E402


def load_package():
    """Imports comfyui/ the way ComfyUI's load_custom_node does (spec from the folder's
    __init__.py under the folder's name), so relative imports are exercised as in ComfyUI."""
    name = "tensorfleet_custom_node"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(REPO, "comfyui", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[os.path.dirname(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# No coordinator control API here: the device lists are the static ones (a closed port).
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    NO_CONTROL = "http://127.0.0.1:%d" % _s.getsockname()[1]
os.environ["TENSORFLEET_CONTROL"] = NO_CONTROL

PKG = load_package()
Loader = PKG.NODE_CLASS_MAPPINGS["UNETLoaderTensorfleet"]
model_mod = sys.modules["tensorfleet_custom_node.tensorfleet_model"]
# The node's own copy of the client (ComfyUI imports the package under the folder's name).
tf = sys.modules["tensorfleet_custom_node.tensorfleet_client"]


@pytest.fixture
def models_dir(tmp_path):
    for n in ("dev.safetensors", "schnell.safetensors", "slow.safetensors", "q8/dev-Q8_0.gguf"):
        (tmp_path / n).parent.mkdir(exist_ok=True)
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "q8" / "loop").symlink_to(tmp_path)  # a cycle: listed once, not forever
    # ComfyUI's own extensions for this kind: no .gguf (the node lists those itself).
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(tmp_path)], {".safetensors", ".sft"})
    mm.interrupt_current_processing(False)
    return tmp_path


def load(peer, name="dev.safetensors", **kw):
    return Loader().load_unet(name, coordinator=peer.endpoint, **kw)[0]


def conds(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 16, 4, 6, generator=g),
            "context": torch.randn(batch, 5, 8, generator=g),
            "y": torch.randn(batch, 12, generator=g)}


# -------------------------------------------------------------------------- node surface

def test_node_surface_mirrors_distorch2(models_dir):
    assert PKG.NODE_DISPLAY_NAME_MAPPINGS == {
        "UNETLoaderTensorfleet": "Load Diffusion Model (Tensorfleet)",
        "UnetLoaderGGUFTensorfleet": "Unet Loader GGUF (Tensorfleet)",
        "UnetLoaderGGUFAdvancedTensorfleet": "Unet Loader GGUF Advanced (Tensorfleet)",
        "TensorfleetPlan": "Tensorfleet Plan",
        "CLIPLoaderTensorfleet": "Load CLIP (Tensorfleet)",
        "DualCLIPLoaderTensorfleet": "DualCLIPLoader (Tensorfleet)"}
    for cls in PKG.NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(cls, cls.FUNCTION)) and cls.CATEGORY == "tensorfleet"
    assert Loader.RETURN_TYPES == ("MODEL",)
    types = Loader.INPUT_TYPES()
    assert types["required"]["unet_name"][0] == ["dev.safetensors", "q8/dev-Q8_0.gguf",
                                                 "schnell.safetensors", "slow.safetensors"]
    # ComfyUI's UNETLoader: unet_name, weight_dtype (DisTorch2 keeps them first).
    assert list(types["required"]) == ["unet_name", "weight_dtype"]
    assert types["required"]["weight_dtype"][0] == ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast",
                                                    "fp8_e5m2"]
    # DisTorch2's inputs in upstream's order, then ours.
    assert list(types["optional"]) == ["compute_device", "virtual_vram_gb", "donor_device",
                                       "expert_mode_allocations", "eject_models",
                                       "compute_dtype", "keep_loaded", "mode", "coordinator",
                                       "width", "height", "frames", "batch"]
    gguf = PKG.NODE_CLASS_MAPPINGS["UnetLoaderGGUFTensorfleet"].INPUT_TYPES()
    assert gguf["required"]["unet_name"][0] == ["q8/dev-Q8_0.gguf"]
    adv = PKG.NODE_CLASS_MAPPINGS["UnetLoaderGGUFAdvancedTensorfleet"].INPUT_TYPES()
    assert list(adv["required"]) == ["unet_name", "dequant_dtype", "patch_dtype",
                                     "patch_on_device"]
    assert adv["required"]["dequant_dtype"] == (["default", "target", "float32", "float16",
                                                 "bfloat16"], {"default": "default"})
    assert adv["required"]["patch_on_device"] == ("BOOLEAN", {"default": False})
    opt = types["optional"]
    devices = opt["compute_device"][0]
    assert devices[0] == "cpu" and devices[1] == "cuda:0"
    assert opt["compute_device"][1]["default"] == "cuda:0"
    assert opt["virtual_vram_gb"][0] == "FLOAT"
    assert {k: opt["virtual_vram_gb"][1][k] for k in ("default", "min", "max", "step")} == \
        {"default": 4.0, "min": 0.0, "max": 128.0, "step": 0.1}
    assert opt["donor_device"][0] == devices and opt["donor_device"][1]["default"] == "cpu"
    assert opt["expert_mode_allocations"][0] == "STRING"
    assert opt["expert_mode_allocations"][1]["default"] == ""
    assert opt["expert_mode_allocations"][1]["multiline"] is False
    assert opt["eject_models"][0] == "BOOLEAN" and opt["eject_models"][1]["default"] is True
    assert opt["keep_loaded"][1]["default"] is True
    assert opt["mode"][0] == ["auto", "stream", "pipeline"]
    assert opt["coordinator"][1]["default"] == "tcp://127.0.0.1:7770"


def test_bad_allocation_string_fails_when_the_node_runs(peer, models_dir):
    with pytest.raises(tf.InvalidArgumentError) as e:
        load(peer, expert_mode_allocations="cuda:0,1tb;cpu,*")
    assert "unknown unit 'tb' in token 'cuda:0,1tb'" in str(e.value)
    assert "Tensorfleet Plan of 'dev.safetensors'" in str(e.value)
    assert [k for k, _ in peer.requests] == ["Hello", "Plan"]  # nothing was loaded


def test_loader_sends_the_distorch_inputs(peer, models_dir):
    load(peer, compute_device="cuda:1", virtual_vram_gb=7.5, donor_device="cuda:0",
         eject_models=False, keep_loaded=False, mode="stream", compute_dtype="float32")
    kinds = [k for k, _ in peer.requests]
    assert kinds == ["Hello", "Plan", "LoadModel"]
    assert peer.requests[1][1] == peer.requests[2][1]
    assert peer.requests[2][1] == {"path": "dev.safetensors", "compute_device": "cuda:1",
                                   "virtual_vram_gb": 7.5, "donor_device": "cuda:0",
                                   "expert": "", "eject_models": False, "keep_loaded": False,
                                   "mode": 1, "dtype": 1, "weight_dtype": "default",
                                   "dequant_dtype": "default"}


# ------------------------------------------------------------- eviction: the coordinator's

def test_the_coordinator_decides_what_a_load_evicts_and_the_loader_logs_it(peer, models_dir,
                                                                           caplog):
    """Plan and LoadModel go with eject_models as set (the default true); what to evict is the
    coordinator's decision, never the node's: before the load the loader logs what the plan
    says it evicts, after it the load's time. The node itself unloads nothing."""
    import logging  # noqa: PLC0415

    load(peer, "schnell.safetensors", eject_models=False)
    with caplog.at_level(logging.INFO, logger="tensorfleet"):
        load(peer)  # fits: nothing to evict
        peer.plan_evicts = ["schnell"]
        caplog.clear()
        load(peer, "slow.safetensors")
    kinds = [k for k, _ in peer.requests]
    assert kinds == ["Hello"] + ["Plan", "LoadModel"] * 3  # no ListModels, no UnloadModel
    assert [d["eject_models"] for k, d in peer.requests if k in ("Plan", "LoadModel")] == \
        [False, False, True, True, True, True]
    assert sorted(peer.models) == ["dev", "slow"]
    messages = [r.getMessage() for r in caplog.records]
    warned = messages.index("tensorfleet: 'slow.safetensors' does not fit beside the models on "
                            "the cluster; loading it evicts 'schnell' (least recently used "
                            "first, per the coordinator's plan)")
    took = next(i for i, m in enumerate(messages) if m.startswith("tensorfleet: loading 'slow' "
                                                                  "took"))
    assert warned < took
    assert re.fullmatch(r"tensorfleet: loading 'slow' took \d+\.\d\d s for 0 B; the "
                        r"coordinator's plan had it evict 'schnell' to make room \(least "
                        r"recently used first\)", messages[took])
    # A plan that counts a loaded copy of the model itself: the load re-uses or replaces that
    # copy, so it is not reported as evicted.
    peer.plan_evicts = ["slow"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tensorfleet"):
        load(peer, "slow.safetensors")
    assert "evict" not in caplog.text


def test_a_load_that_cannot_make_room_fails_with_the_coordinators_message(peer, models_dir):
    """No room even after evicting what may go: the Plan's ResourceExhausted does not stop the
    loader (a loaded copy of the model would be re-used), the load's does, unchanged."""
    load(peer)
    (models_dir / "huge.safetensors").write_bytes(b"")
    with pytest.raises(tf.ResourceExhaustedError) as e:
        load(peer, "huge.safetensors")
    assert e.value.request == "LoadModel"
    assert str(e.value).startswith("Tensorfleet LoadModel of 'huge.safetensors' (coordinator ")
    assert str(e.value).endswith("would not make room either; nothing was evicted")
    assert [k for k, _ in peer.requests] == ["Hello"] + ["Plan", "LoadModel"] * 2
    assert list(peer.models) == ["dev"]


def test_plan_node_shows_what_a_load_would_evict(peer, models_dir):
    plan_node = PKG.NODE_CLASS_MAPPINGS["TensorfleetPlan"]()
    out = plan_node.plan("dev.safetensors", coordinator=peer.endpoint)
    assert "evicts" not in out["ui"]["text"][0]
    load(peer, "schnell.safetensors")
    peer.plan_evicts = ["schnell"]
    out = plan_node.plan("dev.safetensors", coordinator=peer.endpoint, eject_models=False)
    text = out["ui"]["text"][0]
    assert out["result"][0] == text
    assert "loading it evicts (least recently used first): schnell" in text
    plans = [d for k, d in peer.requests if k == "Plan"]
    assert [d["eject_models"] for d in plans] == [True, True, False]
    assert "schnell" in peer.models  # a plan evicts nothing


# -------------------------------------------------------------------------- the MODEL

@pytest.mark.parametrize("name,model_type,guidance", [
    ("dev.safetensors", comfy.model_base.ModelType.FLUX, True),
    ("schnell.safetensors", comfy.model_base.ModelType.FLOW, False)])
def test_model_is_a_comfy_flux_whose_steps_run_remotely(peer, models_dir, name, model_type,
                                                        guidance):
    patcher = load(peer, name)
    base = patcher.model
    assert isinstance(base, comfy.model_base.Flux) and base.model_type == model_type
    assert base.model_config.unet_config["guidance_embed"] is guidance
    dm = base.diffusion_model
    assert list(dm.parameters()) == [] and dm.dtype == torch.float32
    assert patcher.model_size() == 0  # ComfyUI must not reserve VRAM for remote weights
    sd = base.state_dict()
    assert "diffusion_model.double_blocks.1.img_attn.qkv.weight" in sd
    assert ("diffusion_model.guidance_in.in_layer.weight" in sd) is guidance

    patcher.pre_run()
    c = conds(batch=2)
    consts = []
    for step, sigma in enumerate([1.0, 0.75, 0.5]):
        s = torch.full((2,), sigma)
        den = base.apply_model(c["x"], s, c_crossattn=c["context"], y=c["y"],
                               guidance=torch.full((2,), 3.5),
                               transformer_options={"cond_or_uncond": [0, 1]})
        # the peer's "model", summed as the peer does (numpy, float32)
        out = c["x"] + c["context"].numpy().sum(dtype="float32") + \
            c["y"].numpy().sum(dtype="float32")
        assert torch.equal(den, c["x"] - out * s.view(2, 1, 1, 1))
        fwd = peer.requests[-1][1]
        consts.append(fwd["inputs"])
        assert fwd["dtypes"]["timestep"] == 1  # always float32 on the wire
    full = ["context", "guidance", "timestep", "x", "y"] if guidance else \
        ["context", "timestep", "x", "y"]
    assert consts == [full, ["timestep", "x"], ["timestep", "x"]]


@pytest.mark.parametrize("kwargs,named", [
    ({"control": {"input": [torch.zeros(1)]}}, "ControlNet residuals ('control'"),
    ({"ref_latents": [torch.zeros(1, 16, 4, 6)]}, "reference latents ('ref_latents'"),
    ({"attention_mask": torch.ones(1, 5)}, "attention masks ('attention_mask')"),
    ({"transformer_options": {"patches": {"post_input": [lambda a: a]}}},
     "transformer_options['patches']: post_input"),
    ({"transformer_options": {"patches_replace": {"dit": {("double_block", 0): None}}}},
     "transformer_options['patches_replace']: dit"),
    ({"mystery_cond": torch.zeros(1)}, "conditioning 'mystery_cond'"),
])
def test_unsupported_conditioning_is_refused_by_name(peer, models_dir, kwargs, named):
    base = load(peer).model
    c = conds()
    with pytest.raises(model_mod.UnsupportedConditioningError) as e:
        base.apply_model(c["x"], torch.ones(1), c_crossattn=c["context"], y=c["y"], **kwargs)
    assert named in str(e.value) and "refuses rather than ignoring" in str(e.value)
    assert "Forward" not in [k for k, _ in peer.requests]


def test_lora_patches_bind_to_the_model_and_unsupported_adapters_are_refused(peer, models_dir):
    patcher = load(peer)
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    # ComfyUI keeps only patches whose key is in the model's state_dict: it must be there.
    lora = patcher.clone()
    assert lora.add_patches({key: ("lora", (torch.zeros(2, 2), torch.zeros(2, 2)))}, 0.8) == [key]
    lora.pre_run()  # LoRA runs in the cluster (test_node_lora.py)
    glora = patcher.clone()
    glora.add_patches({key: ("glora", (torch.zeros(2, 2),) * 5)}, 1.0)
    with pytest.raises(model_mod.UnsupportedConditioningError, match="GLORA adapter"):
        glora.pre_run()
    glora.model.current_patcher = glora
    c = conds()
    with pytest.raises(model_mod.UnsupportedConditioningError, match=key.replace(".", r"\.")):
        glora.model.apply_model(c["x"], torch.ones(1), c_crossattn=c["context"], y=c["y"])
    # the unpatched original still runs
    patcher.model.current_patcher = patcher
    patcher.pre_run()
    patcher.model.apply_model(c["x"], torch.ones(1), c_crossattn=c["context"], y=c["y"])


def test_comfy_cancel_aborts_the_forward_on_the_coordinator(peer, models_dir):
    base = load(peer, "slow.safetensors").model
    threading.Timer(0.3, mm.interrupt_current_processing).start()
    c = conds()
    with pytest.raises(mm.InterruptProcessingException):
        base.apply_model(c["x"], torch.ones(1), c_crossattn=c["context"], y=c["y"])
    kinds = [k for k, _ in peer.requests]
    assert kinds[-2:] == ["Forward", "Cancel"]
    assert not mm.processing_interrupted()  # consumed, as ComfyUI's own check does


def test_model_is_loaded_again_after_the_coordinator_forgot_it(peer, models_dir):
    base = load(peer).model
    peer.models.clear()
    c = conds()
    base.apply_model(c["x"], torch.ones(1), c_crossattn=c["context"], y=c["y"])
    kinds = [k for k, _ in peer.requests]
    # is it gone? then the plan, to report what the load evicts; then the load, with the
    # loader's spec
    assert kinds[-5:] == ["Forward", "ListModels", "Plan", "LoadModel", "Forward"]
    assert peer.requests[-3][1] == peer.requests[-2][1] == peer.requests[1][1]


def test_describe_flux_from_the_file_header(tmp_path):
    header = {"__metadata__": {}}
    names = model_mod.flux_weight_names({"guidance_embed": False, "depth": 3,
                                         "depth_single_blocks": 5})
    for n in names:
        header["model.diffusion_model." + n] = {"dtype": "F16", "shape": [64, 64],
                                                "data_offsets": [0, 0]}
    header["model.diffusion_model.img_in.weight"]["shape"] = [64, 64]
    header["model.diffusion_model.vector_in.in_layer.weight"]["shape"] = [64, 96]
    raw = json.dumps(header).encode()
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    info = tf.ModelInfo(name="m", path="m.safetensors", family="flux", state="ready",
                        bytes_loaded=0, bytes_total=0, compute_device="cuda:0", mode="auto",
                        keep_loaded=True, error="", plan_json="{}")
    cfg = model_mod.describe_flux(info, "default", str(p))
    assert (cfg["guidance_embed"], cfg["depth"], cfg["depth_single_blocks"], cfg["in_channels"],
            cfg["vec_in_dim"], cfg["hidden_size"], cfg["dtype"]) == \
        (False, 3, 5, 16, 96, 64, torch.float16)
    assert sorted(cfg["weight_names"]) == sorted(names)
    with pytest.raises(tf.TensorfleetError, match="cannot tell whether 'm' is Flux dev or "):
        model_mod.describe_flux(info, "default", None)
    info.family = "wan"
    with pytest.raises(tf.TensorfleetError, match="is a 'wan' model"):
        model_mod.describe_flux(info, "default", str(p))
    # The node builds ComfyUI models per family; one it has no builder for is refused by name
    # before anything is sent.
    info.family = "linear"
    with pytest.raises(tf.TensorfleetError,
                       match="'m' is a 'linear' model; this node builds ComfyUI models for: "
                             "flux, wan"):
        model_mod.build_model_patcher(None, "tcp://unused", None, info, str(p))


def test_run_id_follows_the_constant_inputs():
    a = {"context": torch.ones(1, 3, 4), "y": torch.zeros(1, 5)}
    b = {"context": torch.ones(1, 3, 4), "y": torch.zeros(1, 5)}
    assert model_mod.run_id_for("m", a) == model_mod.run_id_for("m", b)
    b["context"][0, 0, 0] = 2
    assert model_mod.run_id_for("m", a) != model_mod.run_id_for("m", b)
    assert model_mod.run_id_for("m", a) != model_mod.run_id_for("n", a)
    assert model_mod.run_id_for("m", a) != model_mod.run_id_for(
        "m", {"context": a["context"].to(torch.float16), "y": a["y"]})


def _widget_inputs(cls):
    """Widget inputs in the order ComfyUI's frontend serialises widgets_values (required, then
    optional; combos, numbers, strings and booleans are widgets)."""
    types = cls.INPUT_TYPES()
    out = []
    for group in ("required", "optional"):
        for name, spec in types.get(group, {}).items():
            if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                out.append((name, spec))
    return out


@pytest.mark.parametrize("fname", sorted(os.listdir(os.path.join(REPO, "comfyui",
                                                                 "example_workflows"))))
def test_example_workflows_match_the_nodes(models_dir, fname):
    with open(os.path.join(REPO, "comfyui", "example_workflows", fname)) as f:
        wf = json.load(f)
    nodes = {n["id"]: n for n in wf["nodes"]}
    ours = [n for n in nodes.values() if n["type"] in PKG.NODE_CLASS_MAPPINGS]
    assert ours, "%s uses no Tensorfleet node" % fname
    for n in ours:
        widgets = _widget_inputs(PKG.NODE_CLASS_MAPPINGS[n["type"]])
        assert len(n["widgets_values"]) == len(widgets), n["type"]
        for (name, spec), value in zip(widgets, n["widgets_values"]):
            if name in ("unet_name", "clip_name", "clip_name1", "clip_name2"):
                assert value.endswith(".safetensors")
            elif isinstance(spec[0], list):
                assert value in spec[0], (name, value)
            elif spec[0] == "FLOAT":
                assert spec[1]["min"] <= value <= spec[1]["max"], (name, value)
            elif spec[0] == "INT":
                assert isinstance(value, int) and spec[1]["min"] <= value <= spec[1]["max"], name
            elif spec[0] == "BOOLEAN":
                assert isinstance(value, bool), name
            else:
                assert isinstance(value, str), name
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        assert lid in nodes[src]["outputs"][sslot]["links"]
        assert nodes[dst]["inputs"][dslot]["link"] == lid
        assert nodes[src]["outputs"][sslot]["type"] == typ == nodes[dst]["inputs"][dslot]["type"]
    # Every sampler's MODEL comes from one of our loaders (possibly through model patches such
    # as ModelSamplingSD3), and every loader feeds a sampler: two loaders, two samplers (WAN
    # 2.2's experts) means one loader each.
    samplers = [n for n in nodes.values() if n["type"] in ("KSampler", "KSamplerAdvanced")]
    assert samplers, "%s has no sampler" % fname
    links = {l[0]: l for l in wf["links"]}

    def model_source(node):
        while node["type"] not in PKG.NODE_CLASS_MAPPINGS:
            model_in = next(i for i in node["inputs"] if i["type"] == "MODEL")
            node = nodes[links[model_in["link"]][1]]
        return node["id"]

    sources = [model_source(n) for n in samplers]
    loaders = {n["id"] for n in ours if "MODEL" in PKG.NODE_CLASS_MAPPINGS[n["type"]].RETURN_TYPES}
    assert set(sources) == loaders
    if len(loaders) > 1:
        assert len(sources) == len(set(sources))


# ------------------------------------------------------------- load progress and cancel

@pytest.fixture
def progress_seen():
    """(value, total) of every progress-bar update, as ComfyUI's server hook would see them."""
    import comfy.utils  # noqa: PLC0415 - the stand-in's progress bar
    seen = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: seen.append((value, total)))
    yield seen
    comfy.utils.set_progress_bar_global_hook(None)


def test_load_drives_comfys_progress_bar_with_bytes_loaded(peer, models_dir, progress_seen):
    from conftest_client import SLOW_LOAD_STEPS, SLOW_LOAD_TOTAL  # noqa: PLC0415
    (models_dir / "slowload.safetensors").write_bytes(b"")
    seen = progress_seen
    load(peer, "slowload.safetensors")
    # The peer answers the load after SLOW_LOAD_STEPS ListModels, each showing more bytes.
    step = SLOW_LOAD_TOTAL // SLOW_LOAD_STEPS
    assert seen == [(k * step, SLOW_LOAD_TOTAL) for k in range(1, SLOW_LOAD_STEPS + 1)] + \
        [(SLOW_LOAD_TOTAL, SLOW_LOAD_TOTAL)]  # and once more from the load's own answer
    kinds = [k for k, _ in peer.requests]
    assert kinds == ["Hello", "Plan", "LoadModel"] + ["ListModels"] * SLOW_LOAD_STEPS


def test_comfy_cancel_during_a_load_cancels_it_on_the_coordinator(peer, models_dir,
                                                                  progress_seen):
    (models_dir / "slowload.safetensors").write_bytes(b"")
    seen = []
    import comfy.utils  # noqa: PLC0415
    # ComfyUI's Cancel, pressed when the first progress arrives.
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: (seen.append(value),
                                                     mm.interrupt_current_processing(True)))
    with pytest.raises(mm.InterruptProcessingException):
        load(peer, "slowload.safetensors")
    kinds = [k for k, _ in peer.requests]
    assert kinds == ["Hello", "Plan", "LoadModel", "ListModels", "Cancel"]
    assert peer.requests[-1][1]["target"] == 3  # the LoadModel's request id
    assert seen == [100] and "slowload" not in peer.models
    assert not mm.processing_interrupted()  # ComfyUI's flag is consumed, as upstream does
