"""ComfyUI nodes of the Tensorfleet package.

The loaders mirror ComfyUI-MultiGPU's DisTorch2 loaders input for input (names, order,
defaults), extras after them, so that `workflow_convert` can rewrite a DisTorch2 workflow by
renaming the node and keeping its widget values:
- `UNETLoaderTensorfleet`: UNETLoaderDisTorch2MultiGPU (unet_name, weight_dtype, compute_device,
  virtual_vram_gb, donor_device, expert_mode_allocations, eject_models) + compute_dtype,
  keep_loaded, mode, coordinator.
- `UnetLoaderGGUFTensorfleet`: UnetLoaderGGUFDisTorch2MultiGPU (unet_name, then the DisTorch2
  inputs) + the same extras.
- `UnetLoaderGGUFAdvancedTensorfleet`: UnetLoaderGGUFAdvancedDisTorch2MultiGPU (unet_name,
  dequant_dtype, patch_dtype, patch_on_device, then the DisTorch2 inputs) + keep_loaded, mode,
  coordinator.
Each validates the allocation through the coordinator's Plan when it runs (a bad string fails
here, not at sampling time), loads the model with ComfyUI's progress bar showing the bytes
loaded (ComfyUI's Cancel cancels the load on the coordinator) and returns a ComfyUI MODEL
(Flux or WAN, tensorfleet_model.COMFY_BUILDERS). Plan and load go with the inputs as set,
eject_models included; the coordinator decides what stays loaded: a model that fits beside the
loaded ones evicts nothing (WAN 2.2's two experts stay loaded together), one that does not
evicts idle models least recently used first, only as far as needed (keep_loaded ones only
with eject_models). The loader logs what its plan says the load evicts, then the load's time.
The text-encoder loaders (`CLIPLoaderTensorfleet`, `DualCLIPLoaderTensorfleet`) live in
tensorfleet_clip and are registered here.
`TensorfleetPlan` shows the plan (tables, the equivalent expert string, the models a load would
evict: the coordinator's "loading it evicts" line, and a picture) without loading.

compute_device and donor_device offer the cluster's devices (GET /v2/workers on the
coordinator's control API, short timeout, cached briefly), else the static list cpu,
cuda:0..15; VALIDATE_INPUTS accepts any device name there, so a workflow saved on another
cluster still loads in the editor and fails when it runs, naming the device.

Clients are cached per coordinator address for the life of the ComfyUI process.
"""

import logging
import os
import threading

import json
import time
import urllib.error
import urllib.parse
import urllib.request

from .tensorfleet_client import (DEFAULT_ADDRESS, CancelledError, Client, InvalidArgumentError,
                                 ModelSpec, ResourceExhaustedError, TensorfleetError)
from . import tensorfleet_model
from .tensorfleet_client import wire
from . import tensorfleet_plan_image

log = logging.getLogger("tensorfleet")

CATEGORY = "tensorfleet"
MODES = ["auto", "stream", "pipeline"]
COMPUTE_DTYPES = ["default", "bfloat16", "float16", "float32"]

_clients = {}
_clients_lock = threading.Lock()


def client_for(address):
    with _clients_lock:
        c = _clients.get(address)
        if c is None:
            c = Client(address)
            _clients[address] = c
        return c


def default_address():
    return os.environ.get("TENSORFLEET_COORDINATOR", DEFAULT_ADDRESS)


STATIC_DEVICES = ["cpu"] + ["cuda:%d" % i for i in range(16)]
CONTROL_PORT = 7780          # fleet-coordinator's default --http-listen port
DEVICE_QUERY_TIMEOUT = 0.5   # seconds: INPUT_TYPES runs while the editor waits
DEVICE_CACHE_SECONDS = 10.0
_device_cache = {}           # control URL -> (monotonic time, [devices] or None)
_device_cache_lock = threading.Lock()


def control_url(address=None):
    """The coordinator's control API: $TENSORFLEET_CONTROL, else the job address's host on
    port 7780 (fleet-coordinator's default --http-listen)."""
    env = os.environ.get("TENSORFLEET_CONTROL", "").strip()
    if env:
        return env.rstrip("/") if "://" in env else "http://" + env.rstrip("/")
    host = urllib.parse.urlsplit(address or default_address()).hostname or "127.0.0.1"
    if host in ("*", "0.0.0.0"):
        host = "127.0.0.1"
    return "http://%s:%d" % (host, CONTROL_PORT)


def _device_order(device):
    """DisTorch2's order: cpu first, then by type and index (cuda:2 before cuda:10)."""
    kind, _, index = device.partition(":")
    return (kind != "cpu", kind, int(index) if index.isdigit() else -1, device)


def cluster_devices(url=None, timeout=DEVICE_QUERY_TIMEOUT):
    """The devices of the cluster's workers (GET <control>/v2/workers, with $TENSORFLEET_TOKEN
    as bearer token when set), in DisTorch2's order. Raises OSError / ValueError when the
    coordinator does not answer or answers nonsense."""
    url = url or control_url()
    request = urllib.request.Request(url + "/v2/workers")
    token = os.environ.get("TENSORFLEET_TOKEN", "").strip()
    if token:  # the coordinator's --http-token-file
        request.add_header("Authorization", "Bearer " + token)
    with urllib.request.urlopen(request, timeout=timeout) as r:
        workers = json.load(r)["workers"]
    devices = {w["device"] for w in workers
               if isinstance(w.get("device"), str) and w["device"] and
               not w["device"].startswith("?")}  # "?": a static worker that never answered
    return sorted(devices, key=_device_order)


def device_list():
    """compute_device / donor_device choices: the cluster's devices when the coordinator's
    control API answers within DEVICE_QUERY_TIMEOUT (cached DEVICE_CACHE_SECONDS), else the
    static list cpu, cuda:0..15."""
    url = control_url()
    now = time.monotonic()
    with _device_cache_lock:
        hit = _device_cache.get(url)
    if hit is None or now - hit[0] > DEVICE_CACHE_SECONDS:
        try:
            devices = cluster_devices(url) or None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.debug("tensorfleet: no device list from %s (%s); offering the static list",
                      url, e)
            devices = None
        hit = (now, devices)
        with _device_cache_lock:
            _device_cache[url] = hit
    return list(hit[1] or STATIC_DEVICES)


def _validate_device_inputs(compute_device=None, donor_device=None):
    """VALIDATE_INPUTS for the device combos: any device name passes in the editor (the
    cluster that runs the workflow may differ from the one that saved it); the run checks it."""
    for name, value in (("compute_device", compute_device), ("donor_device", donor_device)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            return "%s must be a device name such as cuda:0 or cpu, got %r" % (name, value)
    return True


def check_devices(address, compute_device, donor_device, virtual_vram_gb, expert):
    """Fails naming a device the cluster lacks and the devices it has. Skipped when the control
    API does not answer (the coordinator's plan still refuses unknown devices)."""
    url = control_url(address)
    try:
        have = cluster_devices(url, timeout=1.0)
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not have:
        return
    wanted = [("compute_device", compute_device)]
    if not expert.strip() and float(virtual_vram_gb) > 0:
        wanted += [("donor_device", d.strip()) for d in donor_device.split(",") if d.strip()]
    for name, device in wanted:
        if device and device not in have:
            raise InvalidArgumentError(
                "%s '%s' is not a device of the Tensorfleet cluster (coordinator %s); the "
                "cluster has %s" % (name, device, address, ", ".join(have)), "Plan")


def _model_files(gguf_only=False, folder="diffusion_models"):
    """Model files under ComfyUI's `folder` folders (diffusion_models; text_encoders for the
    CLIP loaders), GGUF included: ComfyUI lists no .gguf there (ComfyUI-GGUF adds a folder kind
    of its own), and the cluster runs GGUF diffusion models and T5 encoders."""
    import folder_paths  # noqa: PLC0415 - ComfyUI module

    names = set() if gguf_only else set(folder_paths.get_filename_list(folder))
    for base in folder_paths.folder_names_and_paths.get(folder, ([], None))[0]:
        seen = set()  # real paths: a symlink cycle is walked once, not until paths get too long
        for root, dirs, files in os.walk(base, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            for f in files:
                if f.endswith(".gguf"):
                    names.add(os.path.relpath(os.path.join(root, f), base))
    return sorted(names)


def _local_path(unet_name):
    import folder_paths  # noqa: PLC0415

    try:
        return folder_paths.get_full_path("diffusion_models", unet_name)
    except Exception:  # noqa: BLE001 - some versions raise for unknown names
        return None


WEIGHT_DTYPES = list(wire.WEIGHT_DTYPES)  # ComfyUI UNETLoader's
GGUF_DTYPES = ["default", "target", "float32", "float16", "bfloat16"]  # ComfyUI-GGUF Advanced


def _distorch_inputs():
    """DisTorch2's optional inputs, in upstream's order, with upstream's defaults."""
    devices = device_list()
    return {
        "compute_device": (devices, {"default": devices[1] if len(devices) > 1 else devices[0],
                                     "tooltip": "Device that runs the model's steps."}),
        "virtual_vram_gb": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 128.0, "step": 0.1,
                                      "tooltip": "GB of the model moved off the compute device "
                                                 "onto the donor(s)."}),
        "donor_device": (devices, {"default": "cpu",
                                   "tooltip": "Where the virtual VRAM's weights live."}),
        "expert_mode_allocations": ("STRING", {"multiline": False, "default": "",
                                               "tooltip": "DisTorch2 allocation string, e.g. "
                                                          "cuda:0,4gb;cuda:1,2gb;cpu,*"}),
        "eject_models": ("BOOLEAN", {
            "default": True,
            "tooltip": "When this model does not fit beside the models loaded on the cluster, "
                       "let the coordinator evict models kept with keep_loaded too (least "
                       "recently used first, only as far as needed); models loaded without "
                       "keep_loaded may always go. Models that fit together stay loaded "
                       "together (e.g. WAN 2.2's two experts)."}),
    }


def _extra_inputs(compute_dtype=True, sizes=True):
    """Tensorfleet's own inputs, after upstream's; `sizes`: the image size inputs (not for
    text encoders)."""
    extra = {}
    if compute_dtype:
        extra["compute_dtype"] = (COMPUTE_DTYPES, {
            "default": "default", "tooltip": "dtype the model computes in; default: the "
                                             "stored dtype (GGUF: the file's float dtype)."})
    extra.update({
        "keep_loaded": ("BOOLEAN", {"default": True,
                                    "tooltip": "Keep the model on the cluster after the prompt."}),
        "mode": (MODES, {"default": "auto", "tooltip": "stream: weights come to the compute "
                         "device (DisTorch); pipeline: activations go to the device holding the "
                         "next blocks; auto: chosen per range from measured bandwidth."}),
        "coordinator": ("STRING", {"multiline": False, "default": default_address(),
                                   "tooltip": "Coordinator job endpoint; empty: "
                                              "$TENSORFLEET_COORDINATOR or " + DEFAULT_ADDRESS}),
    })
    if not sizes:
        return extra
    # The workflow's latent size: the plan keeps room for its activations on the compute device.
    size_tip = (" of the images or video this model will make, for the activation memory the "
                "plan keeps free on the compute device; 0: the model family's default. A "
                "larger input is checked again on its first step.")
    extra.update({
        "width": ("INT", {"default": 0, "min": 0, "max": 65536, "step": 8,
                          "tooltip": "Width" + size_tip}),
        "height": ("INT", {"default": 0, "min": 0, "max": 65536, "step": 8,
                           "tooltip": "Height" + size_tip}),
        "frames": ("INT", {"default": 0, "min": 0, "max": 16384,
                           "tooltip": "Video frames" + size_tip}),
        "batch": ("INT", {"default": 0, "min": 0, "max": 4096,
                          "tooltip": "Batch size" + size_tip}),
    })
    return extra


def _spec(unet_name, compute_dtype="default", compute_device="cuda:0", virtual_vram_gb=4.0,
          donor_device="cpu", expert_mode_allocations="", eject_models=True, keep_loaded=True,
          mode="auto", width=0, height=0, frames=0, batch=0, weight_dtype="default",
          dequant_dtype="default"):
    """The loader inputs (upstream's names and defaults, then ours) as a wire ModelSpec."""
    return ModelSpec(path=unet_name, compute_device=compute_device,
                     virtual_vram_gb=float(virtual_vram_gb), donor_device=donor_device,
                     expert_mode_allocations=expert_mode_allocations.strip(),
                     eject_models=bool(eject_models), keep_loaded=bool(keep_loaded), mode=mode,
                     dtype=compute_dtype, width=int(width), height=int(height),
                     frames=int(frames), batch=int(batch), weight_dtype=weight_dtype,
                     dequant_dtype=dequant_dtype)


def _explain(e, what, unet_name, address):
    """The coordinator's message with where it came from, same exception class."""
    e.message = "Tensorfleet %s of '%s' (coordinator %s): %s" % (what, unet_name, address,
                                                                 e.message)
    e.args = (e.message,)
    return e


def _load(unet_name, coordinator=None, **inputs):
    """What every loader does: check, plan, load with progress and cancel, wrap as a MODEL.
    `inputs` are _spec's keyword arguments."""
    address, spec, info = load_on_cluster(unet_name, coordinator, **inputs)
    model = tensorfleet_model.build_model_patcher(client_for, address, spec, info,
                                                  _local_path(unet_name))
    return (model,)


def load_on_cluster(unet_name, coordinator=None, **inputs):
    """Check, plan and load a file on the cluster with ComfyUI's progress bar and Cancel; the
    plan's notes and evictions and the load's time are logged. Returns (coordinator address,
    wire ModelSpec, ModelInfo). `inputs` are _spec's keyword arguments."""
    import comfy.model_management as mm  # noqa: PLC0415 - ComfyUI module
    import comfy.utils  # noqa: PLC0415

    address = (coordinator or "").strip() or default_address()
    spec = _spec(unet_name, **inputs)
    client = client_for(address)
    bar = []

    def progress(loaded, total):
        if total <= 0:
            return
        if not bar:
            bar.append(comfy.utils.ProgressBar(total))
        bar[0].update_absolute(loaded, total)

    try:
        check_devices(address, spec.compute_device, spec.donor_device, spec.virtual_vram_gb,
                      spec.expert_mode_allocations)
        evicts = None
        try:
            plan = client.plan(spec)  # validates the allocation now, not at sampling time
        except ResourceExhaustedError as e:
            # Valid, but no room even after evicting every model it may evict: the load says
            # the same (unless a copy of this model is loaded already, which it re-uses).
            plan = None
            log.info("tensorfleet: the plan for %s does not fit the cluster now (%s); the "
                     "load will say whether it can", unet_name, e.message)
        if plan is not None:
            log.info("tensorfleet: plan for %s: %s", unet_name, plan.expert_string)
            _log_plan_notes(plan.plan())
            evicts = tensorfleet_model.plan_evictions(plan, spec)
            if evicts:
                log.warning("tensorfleet: '%s' does not fit beside the models on the cluster; "
                            "loading it evicts %s (least recently used first, per the "
                            "coordinator's plan)", unet_name,
                            ", ".join("'%s'" % n for n in evicts))
        start = time.monotonic()
        info = client.load_model(spec, progress=progress,
                                 should_cancel=mm.processing_interrupted)
    except CancelledError:
        mm.throw_exception_if_processing_interrupted()
        raise
    except TensorfleetError as e:
        raise _explain(e, e.request or "load", unet_name, address) from None
    seconds = time.monotonic() - start
    if info.state == "failed":
        raise TensorfleetError("Tensorfleet load of '%s' failed on the coordinator: %s"
                               % (unet_name, info.error or "no reason given"), "LoadModel")
    log.info("tensorfleet: loading '%s' took %.2f s for %s%s", info.name, seconds,
             tensorfleet_model.format_bytes(info.bytes_total),
             tensorfleet_model.evicts_text(evicts))
    return address, spec, info


def _log_plan_notes(plan):
    """The plan's notes and warnings, in DisTorch2's log wording ("GPU-ONLY MODE: ...")."""
    for note in plan.get("notes", []):
        log.info("tensorfleet: %s", note)
    for warning in plan.get("warnings", []):
        log.warning("tensorfleet: %s", warning)


class UNETLoaderTensorfleet:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet_name": (_model_files(),),
                "weight_dtype": (WEIGHT_DTYPES,),
            },
            "optional": dict(_distorch_inputs(), **_extra_inputs()),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a diffusion model on a Tensorfleet cluster, spread over its devices "
                   "with a DisTorch2 allocation, and returns a MODEL whose steps run there.")

    @classmethod
    def VALIDATE_INPUTS(cls, compute_device=None, donor_device=None):
        return _validate_device_inputs(compute_device, donor_device)

    def load_unet(self, unet_name, weight_dtype="default", **inputs):
        return _load(unet_name, weight_dtype=weight_dtype, **inputs)


class UnetLoaderGGUFTensorfleet:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"unet_name": (_model_files(gguf_only=True),)},
            "optional": dict(_distorch_inputs(), **_extra_inputs()),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a GGUF diffusion model on a Tensorfleet cluster (each worker "
                   "dequantises its blocks), spread with a DisTorch2 allocation.")

    @classmethod
    def VALIDATE_INPUTS(cls, compute_device=None, donor_device=None):
        return _validate_device_inputs(compute_device, donor_device)

    def load_unet(self, unet_name, **inputs):
        return _load(unet_name, **inputs)


class UnetLoaderGGUFAdvancedTensorfleet:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet_name": (_model_files(gguf_only=True),),
                "dequant_dtype": (GGUF_DTYPES, {"default": "default"}),
                "patch_dtype": (GGUF_DTYPES, {"default": "default"}),
                "patch_on_device": ("BOOLEAN", {"default": False}),
            },
            "optional": dict(_distorch_inputs(), **_extra_inputs()),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a GGUF diffusion model on a Tensorfleet cluster; dequant_dtype is "
                   "the dtype the workers dequantise into before the compute dtype.")

    @classmethod
    def VALIDATE_INPUTS(cls, compute_device=None, donor_device=None):
        return _validate_device_inputs(compute_device, donor_device)

    def load_unet(self, unet_name, dequant_dtype="default", patch_dtype="default",
                  patch_on_device=False, **inputs):
        # patch_dtype / patch_on_device concern LoRA patches: the cluster computes them in float32
        # on the device that computes the block (docs/models.md), whatever these say.
        return _load(unet_name, dequant_dtype=dequant_dtype, **inputs)


class TensorfleetPlan:
    @classmethod
    def INPUT_TYPES(cls):
        extra = _extra_inputs(compute_dtype=False)
        return {"required": {"unet_name": (_model_files(),)},
                "optional": dict(_distorch_inputs(), **extra)}

    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("plan", "expert_string", "image")
    FUNCTION = "plan"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Shows where each block of the model would go and the equivalent DisTorch2 "
                   "expert string, against what the cluster holds now, without loading "
                   "anything; when the model does not fit beside the models loaded, the text "
                   "ends with the models loading it would evict (least recently used first). "
                   "`image` pictures the placement (connect a Preview Image).")

    @classmethod
    def VALIDATE_INPUTS(cls, compute_device=None, donor_device=None):
        return _validate_device_inputs(compute_device, donor_device)

    def plan(self, unet_name, coordinator=None, **inputs):
        import torch  # noqa: PLC0415 - ComfyUI's IMAGE is a torch tensor

        address = (coordinator or "").strip() or default_address()
        spec = _spec(unet_name, **inputs)
        try:
            check_devices(address, spec.compute_device, spec.donor_device, spec.virtual_vram_gb,
                          spec.expert_mode_allocations)
            plan = client_for(address).plan(spec)
        except TensorfleetError as e:
            raise _explain(e, "plan", unet_name, address) from None
        picture = tensorfleet_plan_image.render(plan.plan(), title=unet_name)
        image = torch.from_numpy(picture).unsqueeze(0)  # [1, H, W, 3], 0..1
        return {"ui": {"text": [plan.text]}, "result": (plan.text, plan.expert_string, image)}


NODE_CLASS_MAPPINGS = {
    "UNETLoaderTensorfleet": UNETLoaderTensorfleet,
    "UnetLoaderGGUFTensorfleet": UnetLoaderGGUFTensorfleet,
    "UnetLoaderGGUFAdvancedTensorfleet": UnetLoaderGGUFAdvancedTensorfleet,
    "TensorfleetPlan": TensorfleetPlan,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "UNETLoaderTensorfleet": "Load Diffusion Model (Tensorfleet)",
    "UnetLoaderGGUFTensorfleet": "Unet Loader GGUF (Tensorfleet)",
    "UnetLoaderGGUFAdvancedTensorfleet": "Unet Loader GGUF Advanced (Tensorfleet)",
    "TensorfleetPlan": "Tensorfleet Plan",
}

# The text-encoder loaders (tensorfleet_clip imports this module: registered after it is whole).
from . import tensorfleet_clip  # noqa: E402

NODE_CLASS_MAPPINGS.update(tensorfleet_clip.NODE_CLASS_MAPPINGS)
NODE_DISPLAY_NAME_MAPPINGS.update(tensorfleet_clip.NODE_DISPLAY_NAME_MAPPINGS)
