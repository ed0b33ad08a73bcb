"""DisTorch2 workflows -> Tensorfleet: the converter (comfyui/tensorfleet_client/workflow_convert.py)
on workflow files written as ComfyUI saves them with ComfyUI-MultiGPU's loaders (tests/python/
workflows/: UI format and API format, with the UNet, GGUF, GGUF-advanced, plain *MultiGPU, CLIP
and VAE loaders), the converted result loaded through the node stand-in (ComfyUI's input
validation, then the node's function against a JobPeer), `fleet convert-workflow` (build tree,
installed layout, errors), and the ComfyUI route + web extension that offer it in the editor.
"""

import asyncio
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest_client import REPO, peer  # noqa: F401  (fixture)
from test_node import PKG, folder_paths, mm

sys.path.insert(0, os.path.join(REPO, "comfyui", "tensorfleet_client"))
import workflow_convert as wc  # noqa: E402  (as `fleet convert-workflow` runs it: a plain file)

import execution  # noqa: E402  (comfy_standin: ComfyUI's prompt validation)
import server  # noqa: E402  (comfy_standin: PromptServer)

HERE = os.path.dirname(os.path.abspath(__file__))
UI = os.path.join(HERE, "workflows", "distorch2_flux_ui.json")
API = os.path.join(HERE, "workflows", "distorch2_flux_api.json")
MODELS = ["flux1-dev.safetensors", "flux1-schnell.safetensors", "flux1-dev-Q8_0.gguf",
          "flux1-dev-Q4_K_S.gguf", "flux1-schnell-Q8_0.gguf"]

# What each upstream loader of the fixtures must become, with the Tensorfleet inputs it means.
EXPECTED = {
    1: ("UNETLoaderTensorfleet", {
        "unet_name": "flux1-dev.safetensors", "weight_dtype": "default",
        "compute_device": "cuda:0", "virtual_vram_gb": 8.5, "donor_device": "cuda:1",
        "expert_mode_allocations": "", "eject_models": True}),
    11: ("UnetLoaderGGUFTensorfleet", {
        "unet_name": "flux1-dev-Q8_0.gguf", "compute_device": "cuda:0", "virtual_vram_gb": 4,
        "donor_device": "cpu", "expert_mode_allocations": "cuda:0,6gb;cuda:1,4gb;cpu,*",
        "eject_models": True}),
    12: ("UnetLoaderGGUFAdvancedTensorfleet", {
        "unet_name": "flux1-dev-Q4_K_S.gguf", "dequant_dtype": "bfloat16",
        "patch_dtype": "default", "patch_on_device": False, "compute_device": "cuda:1",
        "virtual_vram_gb": 2.5, "donor_device": "cuda:0,cpu", "expert_mode_allocations": "",
        "eject_models": False}),
    13: ("UNETLoaderTensorfleet", {  # plain UNETLoaderMultiGPU: all on `device`
        "unet_name": "flux1-schnell.safetensors", "weight_dtype": "fp8_e4m3fn",
        "compute_device": "cuda:1", "virtual_vram_gb": 0.0, "expert_mode_allocations": ""}),
    16: ("UnetLoaderGGUFTensorfleet", {
        "unet_name": "flux1-schnell-Q8_0.gguf", "compute_device": "cuda:0",
        "virtual_vram_gb": 0.0}),
    2: ("DualCLIPLoaderTensorfleet", {
        "clip_name1": "t5xxl_fp16.safetensors", "clip_name2": "clip_l.safetensors",
        "type": "flux", "device": "cuda:1", "virtual_vram_gb": 0, "donor_device": "cpu",
        "expert_mode_allocations": "", "eject_models": False}),
    15: ("CLIPLoaderTensorfleet", {
        "clip_name": "clip_l.safetensors", "type": "stable_diffusion", "device": "cuda:0",
        "virtual_vram_gb": 0, "eject_models": False}),
}
NOT_CONVERTED = {8: "VAELoaderDisTorch2MultiGPU"}
CLIP_NODES = {2, 15}  # converted, but they load text encoders (test_node_clip.py runs those)


def _load(path):
    with open(path) as f:
        return json.load(f)


def _widget_names(cls):
    types = cls.INPUT_TYPES()
    return [n for group in ("required", "optional") for n, spec in types.get(group, {}).items()
            if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]


@pytest.fixture
def flux_models(tmp_path):
    for n in MODELS:
        (tmp_path / n).write_bytes(b"")
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(tmp_path)],
                                                               {".safetensors", ".sft"})
    mm.interrupt_current_processing(False)
    return tmp_path


def test_converter_targets_are_the_nodes_inputs_in_order():
    for target, names in wc.TARGETS.items():
        assert _widget_names(PKG.NODE_CLASS_MAPPINGS[target]) == names, target
    # Upstream's inputs come first, in upstream's order (the converted widgets keep positions).
    for upstream, (names, target, renames, _) in wc.CONVERTIBLE.items():
        ours = [renames.get(n, n) for n in names]
        if not renames:
            assert wc.TARGETS[target][:len(ours)] == ours, upstream


def test_ui_workflow_converts_keeping_values_links_and_the_rest(flux_models):
    before = _load(UI)
    after, report = wc.convert(before)
    assert before == _load(UI), "the input was modified"
    assert after["links"] == before["links"]
    old = {n["id"]: n for n in before["nodes"]}
    new = {n["id"]: n for n in after["nodes"]}
    assert list(new) == list(old)
    for nid, n in new.items():
        if nid in EXPECTED:
            target, meant = EXPECTED[nid]
            assert n["type"] == target
            assert n["properties"]["Node name for S&R"] == target
            assert n["properties"]["cnr_id"] == "comfyui-tensorfleet"
            names = wc.TARGETS[target]
            assert len(n["widgets_values"]) == len(names)
            values = dict(zip(names, n["widgets_values"]))
            for k, v in meant.items():
                assert values[k] == v, (nid, k)
            for k in ("pos", "size", "order", "outputs", "title"):
                assert n.get(k) == old[nid].get(k), (nid, k)
        else:
            assert n == old[nid], "node %s changed" % nid
    # The PrimitiveNode's link into UNETLoaderMultiGPU's `device` now feeds compute_device.
    assert new[13]["inputs"] == [{"name": "compute_device", "type": "COMBO", "link": 11,
                                  "widget": {"name": "compute_device"}}]
    by_node = {e["node"]: e for e in report}
    assert set(by_node) == set(EXPECTED) | set(NOT_CONVERTED)
    for nid, kind in NOT_CONVERTED.items():
        assert by_node[nid]["from"] == kind and by_node[nid]["to"] is None
        assert "future work" in by_node[nid]["reason"]
    # weight_dtype is applied (fp8 storage), so it needs no note.
    assert not any("weight_dtype" in n for n in by_node[13]["notes"])
    text = wc.format_report(report)
    assert "converted 7 node(s), left 1 unconverted" in text
    assert "node 8 (VAELoaderDisTorch2MultiGPU): VAELoaderDisTorch2MultiGPU NOT converted" in text


def test_converted_ui_workflow_loads_and_runs_through_the_nodes(peer, flux_models):
    after, _ = wc.convert(_load(UI))
    inputs = {}
    for n in after["nodes"]:
        if n["id"] not in EXPECTED or n["id"] in CLIP_NODES:
            continue
        cls = PKG.NODE_CLASS_MAPPINGS[n["type"]]
        kwargs = dict(zip(wc.TARGETS[n["type"]], n["widgets_values"]))
        # ComfyUI's prompt validation: every value is accepted (devices through VALIDATE_INPUTS).
        assert execution.validate_inputs(cls, kwargs) == [], n["id"]
        inputs[n["id"]] = kwargs
        kwargs["coordinator"] = peer.endpoint
        getattr(cls(), cls.FUNCTION)(**kwargs)
    # eject_models arrives at the node as the workflow had it and goes to the coordinator so
    # (plan and load): it decides what a load that does not fit may evict (test_node_wan.py
    # runs that against a real cluster).
    assert (inputs[11]["eject_models"], inputs[12]["eject_models"]) == (True, False)
    loads = [d for k, d in peer.requests if k == "LoadModel"]
    assert [d["path"] for d in loads] == ["flux1-dev.safetensors", "flux1-dev-Q8_0.gguf",
                                          "flux1-dev-Q4_K_S.gguf", "flux1-schnell.safetensors",
                                          "flux1-schnell-Q8_0.gguf"]
    dev, q8, q4, schnell, plain_gguf = loads
    assert (dev["compute_device"], dev["virtual_vram_gb"], dev["donor_device"]) == \
        ("cuda:0", 8.5, "cuda:1")
    assert q8["expert"] == "cuda:0,6gb;cuda:1,4gb;cpu,*"
    assert (q4["compute_device"], q4["donor_device"]) == ("cuda:1", "cuda:0,cpu")
    assert [d["eject_models"] for d in loads] == [True, True, False, True, True]
    plans = [d for k, d in peer.requests if k == "Plan"]
    assert plans == loads
    # dequant_dtype is its own input; the compute dtype stays the default (the file's).
    assert (q4["dequant_dtype"], q4["dtype"]) == ("bfloat16", 0)
    assert (schnell["compute_device"], schnell["virtual_vram_gb"]) == ("cuda:1", 0.0)
    assert (plain_gguf["compute_device"], plain_gguf["virtual_vram_gb"]) == ("cuda:0", 0.0)


def test_api_workflow_converts_and_runs_through_the_nodes(peer, flux_models):
    before = _load(API)
    after, report = wc.convert(before)
    assert {e["node"] for e in report} == {str(i) for i in list(EXPECTED) + list(NOT_CONVERTED)}
    for nid, node in after.items():
        if int(nid) not in EXPECTED:
            assert node == before[nid]
            continue
        target, meant = EXPECTED[int(nid)]
        assert node["class_type"] == target
        assert node["_meta"] == before[nid]["_meta"]
        cls = PKG.NODE_CLASS_MAPPINGS[target]
        for k, v in meant.items():
            assert node["inputs"][k] == v, (nid, k)
        if int(nid) in CLIP_NODES:
            continue
        assert execution.validate_inputs(cls, node["inputs"]) == [], nid
        getattr(cls(), cls.FUNCTION)(**dict(node["inputs"], coordinator=peer.endpoint))
    # Links between nodes ([id, slot]) are untouched.
    assert after["7"]["inputs"]["model"] == ["1", 0]
    # The wrapped form {"prompt": {...}} converts the same.
    wrapped, _ = wc.convert({"prompt": before, "client_id": "x"})
    assert wrapped["prompt"] == after and wrapped["client_id"] == "x"


def test_subgraphs_are_converted_too():
    wf = _load(UI)
    inner = copy.deepcopy(next(n for n in wf["nodes"] if n["id"] == 1))
    wf["definitions"] = {"subgraphs": [{"id": "sg-1", "nodes": [inner], "links": []}]}
    after, report = wc.convert(wf)
    assert after["definitions"]["subgraphs"][0]["nodes"][0]["type"] == "UNETLoaderTensorfleet"
    assert sum(1 for e in report if e["node"] == 1) == 2


def test_what_cannot_be_converted_is_reported_not_dropped():
    wf = {"nodes": [
        {"id": 3, "type": "UNETLoaderDisTorch2MultiGPU", "widgets_values": ["a.safetensors"]},
        {"id": 4, "type": "WanVideoModelLoaderMultiGPU", "widgets_values": []},
        {"id": 5, "type": "UnetLoaderGGUFDisTorchMultiGPU", "widgets_values": []}],
        "links": []}
    after, report = wc.convert(wf)
    assert after == wf
    reasons = {e["node"]: e["reason"] for e in report}
    assert "do not match upstream's 7 inputs" in reasons[3]
    assert reasons[4] == "no Tensorfleet counterpart"
    assert "legacy DisTorch" in reasons[5]
    for bad in ([], {"nodes": 3}, {"a": {"inputs": {}}}):
        with pytest.raises(wc.ConvertError):
            wc.convert(bad)


# --------------------------------------------------------------- fleet convert-workflow


def _fleet(fleet_bin, *args, env=None):
    return subprocess.run([str(fleet_bin), "convert-workflow"] + [str(a) for a in args],
                          capture_output=True, text=True, env=env)


@pytest.mark.parametrize("fixture", [UI, API])
def test_fleet_convert_workflow_writes_what_the_module_computes(fleet_bin, tmp_path, fixture):
    out = tmp_path / "out.json"
    r = _fleet(fleet_bin, fixture, out)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == wc.convert(_load(fixture))[0]
    assert "converted 7 node(s), left 1 unconverted" in r.stdout
    r = _fleet(fleet_bin, fixture, out, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == wc.convert(_load(fixture))[1]


def test_fleet_convert_workflow_errors(fleet_bin, tmp_path):
    r = _fleet(fleet_bin, "-h")
    assert r.returncode == 0 and r.stdout.startswith("usage: fleet convert-workflow")
    r = _fleet(fleet_bin, "--version")
    assert r.returncode == 0 and r.stdout.startswith("fleet ")
    r = _fleet(fleet_bin, tmp_path / "missing.json", tmp_path / "o.json")
    assert r.returncode == 2 and "cannot read" in r.stderr and "missing.json" in r.stderr
    (tmp_path / "bad.json").write_text("{not json")
    r = _fleet(fleet_bin, tmp_path / "bad.json", tmp_path / "o.json")
    assert r.returncode == 2 and "bad.json is not JSON" in r.stderr
    (tmp_path / "list.json").write_text("[1, 2]")
    r = _fleet(fleet_bin, tmp_path / "list.json", tmp_path / "o.json")
    assert r.returncode == 2 and "a workflow is a JSON object" in r.stderr
    r = _fleet(fleet_bin, UI)
    assert r.returncode == 2 and "usage: fleet convert-workflow" in r.stderr
    env = dict(os.environ, FLEET_COMFYUI_DIR=str(tmp_path / "nowhere"))
    r = _fleet(fleet_bin, UI, tmp_path / "o.json", env=env)
    assert r.returncode == 2
    assert str(tmp_path / "nowhere" / "tensorfleet_client" / "workflow_convert.py") in r.stderr
    assert "FLEET_COMFYUI_DIR" in r.stderr


def test_fleet_convert_workflow_finds_the_package_in_an_installed_layout(fleet_bin, tmp_path):
    prefix = tmp_path / "usr"
    (prefix / "bin").mkdir(parents=True)
    shutil.copy2(fleet_bin, prefix / "bin" / "fleet")
    share = prefix / "share" / "tensorfleet" / "comfyui"
    shutil.copytree(os.path.join(REPO, "comfyui"), share,
                    ignore=shutil.ignore_patterns("__pycache__"))
    script = share / "tensorfleet_client" / "workflow_convert.py"
    # Mark the installed copy so the test sees which one ran (not the source tree's).
    script.write_text(script.read_text().replace(
        'if __name__ == "__main__":\n', 'if __name__ == "__main__":\n'
        '    sys.stderr.write("installed copy\\n")\n'))
    r = _fleet(prefix / "bin" / "fleet", UI, tmp_path / "o.json")
    assert r.returncode == 0, r.stderr
    assert "installed copy" in r.stderr
    # The environment variable wins over both.
    env = dict(os.environ, FLEET_COMFYUI_DIR=os.path.join(REPO, "comfyui"))
    r = _fleet(prefix / "bin" / "fleet", UI, tmp_path / "o.json", env=env)
    assert r.returncode == 0 and "installed copy" not in r.stderr


# ------------------------------------------------------------------- inside ComfyUI


class _Request:
    """What an aiohttp request offers a handler: an awaitable json()."""

    def __init__(self, body):
        self._body = body

    async def json(self):
        if isinstance(self._body, Exception):
            raise self._body
        return self._body


def _route():
    # The package's own route (test_pack imports a second copy from the archive).
    routes = [r for r in server.PromptServer.instance.routes
              if r.path == "/tensorfleet/convert-workflow" and
              r.handler.__module__ == PKG.__name__ + ".tensorfleet_routes"]
    assert len(routes) == 1 and routes[0].method == "POST"
    return routes[0].handler


def test_comfyui_route_converts_the_posted_workflow():
    handler = _route()
    r = asyncio.run(handler(_Request({"workflow": _load(UI)})))
    assert r.status == 200 and r.content_type == "application/json"
    body = json.loads(r.text)
    want, report = wc.convert(_load(UI))
    assert body["workflow"] == want and body["report"] == report
    assert body["text"] == wc.format_report(report)
    r = asyncio.run(handler(_Request({"workflow": {"nodes": 1}})))
    assert r.status == 400 and "not a ComfyUI workflow" in json.loads(r.text)["error"]
    r = asyncio.run(handler(_Request({"graph": {}})))
    assert r.status == 400 and "workflow" in json.loads(r.text)["error"]
    r = asyncio.run(handler(_Request(ValueError("bad json"))))
    assert r.status == 400 and "not JSON" in json.loads(r.text)["error"]


def test_web_extension_is_served_and_calls_the_route():
    web_dir = os.path.join(REPO, "comfyui", PKG.WEB_DIRECTORY)
    js = os.path.join(web_dir, "tensorfleet.js")
    text = open(js).read()
    assert '"/tensorfleet/convert-workflow"' in text
    assert "app.registerExtension" in text and "menuCommands" in text
    assert "app.loadGraphData(body.workflow)" in text
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the extension's syntax is not checked")
    r = subprocess.run([node, "--input-type=module", "--check"], stdin=open(js),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_clip_loaders_and_their_gguf_variants_convert(tmp_path):
    wf = {"nodes": [
        {"id": 1, "type": "CLIPLoaderGGUFDisTorch2MultiGPU",
         "widgets_values": ["umt5-xxl-Q8_0.gguf", "wan", "cuda:1", 2.0, "cpu", "", False]},
        {"id": 2, "type": "DualCLIPLoaderGGUFDisTorch2MultiGPU",
         "widgets_values": ["clip_l.safetensors", "t5-v1_1-xxl-Q8_0.gguf", "flux", "cuda:0",
                            4.0, "cpu", "", True]},
        {"id": 3, "type": "CLIPLoaderMultiGPU",
         "widgets_values": ["umt5_xxl_fp16.safetensors", "wan", "cuda:1"]},
        {"id": 4, "type": "TripleCLIPLoaderDisTorch2MultiGPU", "widgets_values": []}],
        "links": []}
    after, report = wc.convert(wf)
    nodes = {n["id"]: n for n in after["nodes"]}
    assert nodes[1]["type"] == "CLIPLoaderTensorfleet"
    assert dict(zip(wc.TARGETS["CLIPLoaderTensorfleet"], nodes[1]["widgets_values"])) == {
        "clip_name": "umt5-xxl-Q8_0.gguf", "type": "wan", "device": "cuda:1",
        "virtual_vram_gb": 2.0, "donor_device": "cpu", "expert_mode_allocations": "",
        "eject_models": False, "compute_dtype": "default", "keep_loaded": True, "mode": "auto",
        "coordinator": ""}
    assert nodes[2]["type"] == "DualCLIPLoaderTensorfleet"
    assert dict(zip(wc.TARGETS["DualCLIPLoaderTensorfleet"],
                    nodes[2]["widgets_values"]))["eject_models"] is True
    plain = dict(zip(wc.TARGETS["CLIPLoaderTensorfleet"], nodes[3]["widgets_values"]))
    assert (plain["device"], plain["virtual_vram_gb"]) == ("cuda:1", 0.0)
    by_node = {e["node"]: e for e in report}
    assert any("UMT5 GGUF text encoder" in n for n in by_node[1]["notes"])
    assert not any("GGUF" in n for n in by_node[2]["notes"]), "T5 GGUFs run"
    assert by_node[4]["to"] is None and "no Tensorfleet counterpart yet" in by_node[4]["reason"]
    # The converted values pass ComfyUI's validation of the Tensorfleet node's inputs.
    for name in ("umt5-xxl-Q8_0.gguf", "umt5_xxl_fp16.safetensors"):
        (tmp_path / name).write_bytes(b"")
    folder_paths.folder_names_and_paths["text_encoders"] = (
        [str(tmp_path)], folder_paths.supported_pt_extensions)
    cls = PKG.NODE_CLASS_MAPPINGS["CLIPLoaderTensorfleet"]
    for nid in (1, 3):
        kwargs = dict(zip(wc.TARGETS["CLIPLoaderTensorfleet"], nodes[nid]["widgets_values"]))
        assert execution.validate_inputs(cls, kwargs) == [], nid
