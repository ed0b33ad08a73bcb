"""Rewrites a ComfyUI workflow from ComfyUI-MultiGPU's loaders to Tensorfleet's.

The one implementation of the conversion: `fleet convert-workflow IN OUT` runs this file as a
program, and the ComfyUI package serves it on POST /tensorfleet/convert-workflow (the
"Convert DisTorch2 workflow to Tensorfleet" menu command). Standard library only, no relative
imports: it runs as a script with any python3, without ComfyUI, pyzmq or numpy.

Both workflow formats are handled:
- UI format (what the editor saves): {"nodes": [{"id", "type", "widgets_values": [...],
  "inputs": [...], "outputs": [...], "properties": {...}}], "links": [...]}, subgraphs under
  definitions.subgraphs included. Widget values are positional, so they are read by the
  upstream node's input names and written in the Tensorfleet node's order.
- API format (what /prompt takes): {"<id>": {"class_type", "inputs": {name: value or
  [node id, slot]}}}, optionally wrapped as {"prompt": {...}}.

Nothing else changes: node ids, links, positions, titles and every other node stay as they
were. Nodes without a counterpart (VAEs, CLIP-G / triple / quadruple text encoders on the
cluster are future work) stay unconverted and are listed in the report; so is every value that
behaves differently.

Text encoders: CLIPLoader / DualCLIPLoader DisTorch2 loaders (and their ComfyUI-GGUF variants,
whose inputs are the same names) become CLIPLoaderTensorfleet / DualCLIPLoaderTensorfleet; their
DisTorch2 device input is named `device` (it takes over the core node's own), eject_models
defaults to False. T5 GGUF files run as ComfyUI-GGUF reads them; a UMT5 GGUF file name
("umt5" in it) is kept and noted: the node cannot read the tokenizer such a file stores in its
GGUF metadata, so it refuses it when it runs.

Upstream facts (ComfyUI-MultiGPU 2.x `wrappers.py` and `__init__.py`, ComfyUI `nodes.py`,
ComfyUI-GGUF `nodes.py`): DisTorch2 loaders append the optional inputs compute_device (default
the second device, normally cuda:0), virtual_vram_gb (4.0), donor_device (cpu),
expert_mode_allocations ("") and eject_models (True; False for CLIP loaders) to the wrapped
loader's inputs; the plain *MultiGPU loaders append one `device` input. ComfyUI's UNETLoader has
unet_name, weight_dtype; ComfyUI-GGUF's UnetLoaderGGUF has unet_name, and UnetLoaderGGUFAdvanced
unet_name, dequant_dtype, patch_dtype, patch_on_device.

Exit status of the program: 0 written (the report on stdout), 2 bad input (one line on stderr),
1 the output could not be written.
"""

import copy
import json
import sys

DISTORCH = ["compute_device", "virtual_vram_gb", "donor_device", "expert_mode_allocations",
            "eject_models"]

# DisTorch2's CLIP loaders name the compute device `device` (the core node's own input).
CLIP_DISTORCH = ["device"] + DISTORCH[1:]

# Tensorfleet's loaders: widget inputs in order (upstream's first, extras after) and defaults.
# tests/python/test_workflow_convert.py checks these against the nodes' INPUT_TYPES.
SIZES = ["width", "height", "frames", "batch"]  # 0: the model family's default
TARGETS = {
    "UNETLoaderTensorfleet": (["unet_name", "weight_dtype"] + DISTORCH
                              + ["compute_dtype", "keep_loaded", "mode", "coordinator"] + SIZES),
    "UnetLoaderGGUFTensorfleet": (["unet_name"] + DISTORCH
                                  + ["compute_dtype", "keep_loaded", "mode", "coordinator"]
                                  + SIZES),
    "UnetLoaderGGUFAdvancedTensorfleet": (["unet_name", "dequant_dtype", "patch_dtype",
                                           "patch_on_device"] + DISTORCH
                                          + ["compute_dtype", "keep_loaded", "mode",
                                             "coordinator"] + SIZES),
    "CLIPLoaderTensorfleet": (["clip_name", "type"] + CLIP_DISTORCH
                              + ["compute_dtype", "keep_loaded", "mode", "coordinator"]),
    "DualCLIPLoaderTensorfleet": (["clip_name1", "clip_name2", "type"] + CLIP_DISTORCH
                                  + ["compute_dtype", "keep_loaded", "mode", "coordinator"]),
}
DEFAULTS = {
    "weight_dtype": "default", "dequant_dtype": "default", "patch_dtype": "default",
    "patch_on_device": False, "compute_device": "cuda:0", "virtual_vram_gb": 4.0,
    "donor_device": "cpu", "expert_mode_allocations": "", "eject_models": True,
    "compute_dtype": "default", "keep_loaded": True, "mode": "auto",
    "device": "cuda:0",
    "coordinator": "",  # empty: the node uses TENSORFLEET_COORDINATOR or tcp://127.0.0.1:7770
    "width": 0, "height": 0, "frames": 0, "batch": 0,
}

# Upstream loaders we convert: (widget inputs in upstream order, Tensorfleet node, renames,
# values the Tensorfleet node needs to behave as upstream did).
# A plain *MultiGPU loader puts the whole model on `device`: no virtual VRAM.
_WHOLE_ON_DEVICE = {"virtual_vram_gb": 0.0, "expert_mode_allocations": ""}
CONVERTIBLE = {
    "UNETLoaderDisTorch2MultiGPU": (["unet_name", "weight_dtype"] + DISTORCH,
                                    "UNETLoaderTensorfleet", {}, {}),
    "UnetLoaderGGUFDisTorch2MultiGPU": (["unet_name"] + DISTORCH,
                                        "UnetLoaderGGUFTensorfleet", {}, {}),
    "UnetLoaderGGUFAdvancedDisTorch2MultiGPU": (
        ["unet_name", "dequant_dtype", "patch_dtype", "patch_on_device"] + DISTORCH,
        "UnetLoaderGGUFAdvancedTensorfleet", {}, {}),
    "UNETLoaderMultiGPU": (["unet_name", "weight_dtype", "device"], "UNETLoaderTensorfleet",
                           {"device": "compute_device"}, _WHOLE_ON_DEVICE),
    "UnetLoaderGGUFMultiGPU": (["unet_name", "device"], "UnetLoaderGGUFTensorfleet",
                               {"device": "compute_device"}, _WHOLE_ON_DEVICE),
    "UnetLoaderGGUFAdvancedMultiGPU": (
        ["unet_name", "dequant_dtype", "patch_dtype", "patch_on_device", "device"],
        "UnetLoaderGGUFAdvancedTensorfleet", {"device": "compute_device"}, _WHOLE_ON_DEVICE),
}
# CLIP loaders (DisTorch2's, plain *MultiGPU and their ComfyUI-GGUF variants: same inputs).
for _gguf in ("", "GGUF"):
    CONVERTIBLE["CLIPLoader%sDisTorch2MultiGPU" % _gguf] = (
        ["clip_name", "type"] + CLIP_DISTORCH, "CLIPLoaderTensorfleet", {}, {})
    CONVERTIBLE["DualCLIPLoader%sDisTorch2MultiGPU" % _gguf] = (
        ["clip_name1", "clip_name2", "type"] + CLIP_DISTORCH, "DualCLIPLoaderTensorfleet", {},
        {})
    CONVERTIBLE["CLIPLoader%sMultiGPU" % _gguf] = (
        ["clip_name", "type", "device"], "CLIPLoaderTensorfleet", {}, _WHOLE_ON_DEVICE)
    CONVERTIBLE["DualCLIPLoader%sMultiGPU" % _gguf] = (
        ["clip_name1", "clip_name2", "type", "device"], "DualCLIPLoaderTensorfleet", {},
        _WHOLE_ON_DEVICE)

_NOT_YET_TEXT = ("this text encoder loader has no Tensorfleet counterpart yet (CLIPLoader and "
                 "DualCLIPLoader do): it keeps running in ComfyUI")
_NOT_YET_VAE = "VAEs on the cluster are future work: it keeps running in ComfyUI"
# Upstream nodes with no counterpart yet, and why. Any other *MultiGPU node is listed too.
NOT_CONVERTED = {}
for _n in ("CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "QuadrupleCLIPLoader",
           "CLIPLoaderGGUF", "DualCLIPLoaderGGUF", "TripleCLIPLoaderGGUF",
           "QuadrupleCLIPLoaderGGUF"):
    for _suffix in ("DisTorch2MultiGPU", "DisTorchMultiGPU", "MultiGPU"):
        if _n + _suffix in CONVERTIBLE:
            continue
        NOT_CONVERTED[_n + _suffix] = (
            "legacy DisTorch (V1) loader: its virtual VRAM has other semantics "
            "(use_other_vram); replace it by hand" if _suffix == "DisTorchMultiGPU"
            else _NOT_YET_TEXT)
for _n in ("VAELoaderDisTorch2MultiGPU", "VAELoaderMultiGPU"):
    NOT_CONVERTED[_n] = _NOT_YET_VAE
NOT_CONVERTED["CLIPVisionLoaderDisTorch2MultiGPU"] = "CLIP vision on the cluster is future work"
NOT_CONVERTED["CLIPVisionLoaderMultiGPU"] = "CLIP vision on the cluster is future work"
for _n in ("CheckpointLoaderSimpleDisTorch2MultiGPU", "CheckpointLoaderSimpleMultiGPU",
           "CheckpointLoaderAdvancedDisTorch2MultiGPU", "CheckpointLoaderAdvancedMultiGPU"):
    NOT_CONVERTED[_n] = ("a checkpoint holds the text encoder and VAE too; load its diffusion "
                         "model with a Tensorfleet loader from a separate file")
for _n in ("UnetLoaderGGUFDisTorchMultiGPU", "UnetLoaderGGUFAdvancedDisTorchMultiGPU"):
    NOT_CONVERTED[_n] = ("legacy DisTorch (V1) loader: its virtual VRAM has other semantics "
                         "(use_other_vram); replace it by hand")


class ConvertError(ValueError):
    """The input is not a ComfyUI workflow we can read."""


def _notes(target, values):
    """What behaves differently from upstream for these input values."""
    notes = []
    if values.get("weight_dtype") == "fp8_e4m3fn_fast":
        notes.append("weight_dtype fp8_e4m3fn_fast behaves as fp8_e4m3fn: the weights are kept "
                     "as fp8 and expanded for the matmul (no fp8 matmul here)")
    for k in ("clip_name", "clip_name1", "clip_name2"):
        name = values.get(k)
        if isinstance(name, str) and name.lower().endswith(".gguf") and "umt5" in name.lower():
            notes.append("%s '%s' looks like a UMT5 GGUF text encoder: the node cannot read the "
                         "tokenizer it stores in GGUF metadata yet (it refuses the file); pick "
                         "the .safetensors UMT5" % (k, name))
    if values.get("patch_dtype", "default") != "default" or values.get("patch_on_device"):
        notes.append("patch_dtype/patch_on_device have no effect: LoRA patches are refused on "
                     "Tensorfleet models for now")
    return notes


def _entry(node_id, title, old, new, reason="", notes=()):
    return {"node": node_id, "title": title, "from": old, "to": new, "reason": reason,
            "notes": list(notes)}


def _unconverted(node_id, title, class_type):
    reason = NOT_CONVERTED.get(class_type)
    if reason is None and class_type.endswith("MultiGPU"):
        reason = "no Tensorfleet counterpart"
    return None if reason is None else _entry(node_id, title, class_type, None, reason)


def _convert_ui_node(node, report):
    kind = node.get("type")
    if not isinstance(kind, str):
        return
    title = node.get("title") or kind
    if kind not in CONVERTIBLE:
        entry = _unconverted(node.get("id"), title, kind)
        if entry:
            report.append(entry)
        return
    names, target, renames, forced = CONVERTIBLE[kind]
    widgets = node.get("widgets_values")
    if isinstance(widgets, dict):  # some frontends save named widget values
        values = dict(widgets)
    elif isinstance(widgets, list) and len(widgets) == len(names):
        values = dict(zip(names, widgets))
    else:
        report.append(_entry(node.get("id"), title, kind, None,
                             "its %s widget values do not match upstream's %d inputs %s; "
                             "saved by another version?" % (
                                 len(widgets) if isinstance(widgets, list) else "missing",
                                 len(names), names)))
        return
    for old, new in renames.items():
        if old in values:
            values[new] = values.pop(old)
    values.update(forced)
    node["type"] = target
    node["widgets_values"] = [values.get(n, DEFAULTS.get(n)) for n in TARGETS[target]]
    for slot in node.get("inputs") or []:  # widgets turned into sockets keep their links
        if isinstance(slot, dict) and slot.get("name") in renames:
            old_name = slot["name"]
            slot["name"] = renames[old_name]
            if isinstance(slot.get("widget"), dict):
                slot["widget"]["name"] = slot["name"]
            if slot.get("localized_name") == old_name:  # newer frontends save it too
                slot["localized_name"] = slot["name"]
    props = node.setdefault("properties", {})
    if isinstance(props, dict):
        props["Node name for S&R"] = target
        if props.get("cnr_id") == "comfyui-multigpu":
            props["cnr_id"] = "comfyui-tensorfleet"
            props.pop("ver", None)
    report.append(_entry(node.get("id"), title, kind, target, notes=_notes(target, values)))


def _convert_api_node(node_id, node, report):
    kind = node.get("class_type")
    if not isinstance(kind, str):
        return
    meta = node.get("_meta")
    title = meta.get("title", kind) if isinstance(meta, dict) else kind
    if kind not in CONVERTIBLE:
        entry = _unconverted(node_id, title, kind)
        if entry:
            report.append(entry)
        return
    _, target, renames, forced = CONVERTIBLE[kind]
    inputs = node.get("inputs")
    if not isinstance(inputs, dict):
        raise ConvertError("node %s (%s): 'inputs' is not an object" % (node_id, kind))
    out = {}
    for name, value in inputs.items():  # order kept: links are by name here
        out[renames.get(name, name)] = value
    out.update(forced)
    node["inputs"] = out
    node["class_type"] = target
    report.append(_entry(node_id, title, kind, target,
                         notes=_notes(target, {k: v for k, v in out.items()
                                               if not isinstance(v, list)})))


def is_api_format(workflow):
    return (isinstance(workflow, dict) and bool(workflow) and "nodes" not in workflow and
            all(isinstance(v, dict) and "class_type" in v for v in workflow.values()))


def convert(workflow):
    """Returns (converted workflow, report). The input is not modified.

    report: one entry per upstream node found, converted or not: {"node", "title", "from",
    "to" (None: left unconverted), "reason" (why not), "notes" (what behaves differently)}.
    Raises ConvertError when `workflow` is neither format.
    """
    if not isinstance(workflow, dict):
        raise ConvertError("a workflow is a JSON object, got %s" % type(workflow).__name__)
    wf = copy.deepcopy(workflow)
    report = []
    if isinstance(wf.get("prompt"), dict) and is_api_format(wf["prompt"]):
        for node_id, node in wf["prompt"].items():
            _convert_api_node(node_id, node, report)
    elif is_api_format(wf):
        for node_id, node in wf.items():
            _convert_api_node(node_id, node, report)
    elif isinstance(wf.get("nodes"), list):
        graphs = [wf]
        subgraphs = (wf.get("definitions") or {}).get("subgraphs") or []
        graphs += [g for g in subgraphs if isinstance(g, dict)]
        for graph in graphs:
            for node in graph.get("nodes") or []:
                if isinstance(node, dict):
                    _convert_ui_node(node, report)
    else:
        raise ConvertError("not a ComfyUI workflow: neither the UI format (a 'nodes' list) nor "
                           "the API format (objects with 'class_type')")
    return wf, report


def format_report(report):
    """The report as lines of text."""
    done = [e for e in report if e["to"]]
    left = [e for e in report if not e["to"]]
    lines = ["converted %d node(s), left %d unconverted" % (len(done), len(left))]
    for e in done:
        lines.append("  node %s (%s): %s -> %s" % (e["node"], e["title"], e["from"], e["to"]))
        lines += ["      note: " + n for n in e["notes"]]
    for e in left:
        lines.append("  node %s (%s): %s NOT converted: %s" % (e["node"], e["title"], e["from"],
                                                               e["reason"]))
    if not report:
        lines.append("  (no ComfyUI-MultiGPU nodes in this workflow)")
    return "\n".join(lines)


USAGE = """usage: fleet convert-workflow IN.json OUT.json [--json]

Rewrites a ComfyUI workflow (UI or API format) from ComfyUI-MultiGPU's DisTorch2 and *MultiGPU
loaders to Tensorfleet's loaders, keeping every widget value and link. Prints what it converted
and what it left unconverted (and why); --json prints that report as JSON. OUT may equal IN.
"""


def main(argv):
    args = [a for a in argv if a != "--json"]
    if any(a in ("-h", "--help") for a in args):
        sys.stdout.write(USAGE)
        return 0
    if len(args) != 2:
        sys.stderr.write(USAGE)
        return 2
    src, dst = args
    try:
        with open(src, encoding="utf-8") as f:
            workflow = json.load(f)
    except OSError as e:
        sys.stderr.write("convert-workflow: cannot read %s: %s\n" % (src, e.strerror))
        return 2
    except ValueError as e:
        sys.stderr.write("convert-workflow: %s is not JSON: %s\n" % (src, e))
        return 2
    try:
        converted, report = convert(workflow)
    except ConvertError as e:
        sys.stderr.write("convert-workflow: %s: %s\n" % (src, e))
        return 2
    try:
        with open(dst, "w", encoding="utf-8") as f:
            json.dump(converted, f, indent=2)
            f.write("\n")
    except OSError as e:
        sys.stderr.write("convert-workflow: cannot write %s: %s\n" % (dst, e.strerror))
        return 1
    if "--json" in argv:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_report(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
