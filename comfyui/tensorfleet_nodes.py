"""ComfyUI nodes of the Tensorfleet package.

`UNETLoaderTensorfleet` mirrors DisTorch2's UNETLoaderDisTorch2MultiGPU: the same optional inputs
(compute_device, virtual_vram_gb, donor_device, expert_mode_allocations, eject_models; same
defaults and ranges) plus keep_loaded, mode and the coordinator address. It validates the
allocation through the coordinator's Plan when it runs (a bad string fails here, not at sampling
time), asks the coordinator to load the model and returns a ComfyUI MODEL.
`TensorfleetPlan` shows the plan (tables and the equivalent expert string) without loading.

Clients are cached per coordinator address for the life of the ComfyUI process.
"""

import logging
import os
import threading

from .tensorfleet_client import DEFAULT_ADDRESS, Client, ModelSpec, TensorfleetError
from . import tensorfleet_model

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


def device_list():
    """DisTorch2's order: "cpu" first, then the GPUs. The devices are the cluster's workers,
    not this process's, so offer cuda:0..15 (the coordinator rejects ids it has no worker for)."""
    return ["cpu"] + ["cuda:%d" % i for i in range(16)]


def _diffusion_models():
    """Model files under ComfyUI's diffusion_models folders, GGUF included: ComfyUI lists no
    .gguf there (ComfyUI-GGUF adds a folder kind of its own); the cluster runs them."""
    import folder_paths  # noqa: PLC0415 - ComfyUI module

    names = set(folder_paths.get_filename_list("diffusion_models"))
    for base in folder_paths.folder_names_and_paths.get("diffusion_models", ([], None))[0]:
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


def _distorch_inputs():
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
        "eject_models": ("BOOLEAN", {"default": True}),
        "keep_loaded": ("BOOLEAN", {"default": True,
                                    "tooltip": "Keep the model on the cluster after the prompt."}),
        "mode": (MODES, {"default": "auto", "tooltip": "stream: weights come to the compute "
                         "device (DisTorch); pipeline: activations go to the device holding the "
                         "next blocks; auto: chosen per range from measured bandwidth."}),
        "coordinator": ("STRING", {"multiline": False, "default": default_address()}),
    }


def _spec(unet_name, compute_dtype, compute_device, virtual_vram_gb, donor_device,
          expert_mode_allocations, eject_models, keep_loaded, mode):
    return ModelSpec(path=unet_name, compute_device=compute_device,
                     virtual_vram_gb=float(virtual_vram_gb), donor_device=donor_device,
                     expert_mode_allocations=expert_mode_allocations.strip(),
                     eject_models=bool(eject_models), keep_loaded=bool(keep_loaded), mode=mode,
                     dtype=compute_dtype)


def _explain(e, what, unet_name, address):
    """The coordinator's message with where it came from, same exception class."""
    e.message = "Tensorfleet %s of '%s' (coordinator %s): %s" % (what, unet_name, address,
                                                                 e.message)
    e.args = (e.message,)
    return e


class UNETLoaderTensorfleet:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet_name": (_diffusion_models(),),
                "compute_dtype": (COMPUTE_DTYPES, {"default": "default"}),
            },
            "optional": _distorch_inputs(),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a diffusion model on a Tensorfleet cluster, spread over its devices "
                   "with a DisTorch2 allocation, and returns a MODEL whose steps run there.")

    def load_unet(self, unet_name, compute_dtype="default", compute_device="cuda:0",
                  virtual_vram_gb=4.0, donor_device="cpu", expert_mode_allocations="",
                  eject_models=True, keep_loaded=True, mode="auto", coordinator=None):
        address = (coordinator or "").strip() or default_address()
        spec = _spec(unet_name, compute_dtype, compute_device, virtual_vram_gb, donor_device,
                     expert_mode_allocations, eject_models, keep_loaded, mode)
        client = client_for(address)
        try:
            plan = client.plan(spec)  # validates the allocation now, not at sampling time
            log.info("tensorfleet: plan for %s: %s", unet_name, plan.expert_string)
            info = client.load_model(spec)
        except TensorfleetError as e:
            raise _explain(e, e.request or "load", unet_name, address) from None
        if info.state == "failed":
            raise TensorfleetError("Tensorfleet load of '%s' failed on the coordinator: %s"
                                   % (unet_name, info.error or "no reason given"), "LoadModel")
        model = tensorfleet_model.build_model_patcher(client_for, address, spec, info,
                                                      _local_path(unet_name))
        return (model,)


class TensorfleetPlan:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (_diffusion_models(),)},
                "optional": _distorch_inputs()}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("plan", "expert_string")
    FUNCTION = "plan"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Shows where each block of the model would go and the equivalent DisTorch2 "
                   "expert string, without loading anything.")

    def plan(self, unet_name, compute_device="cuda:0", virtual_vram_gb=4.0, donor_device="cpu",
             expert_mode_allocations="", eject_models=True, keep_loaded=True, mode="auto",
             coordinator=None):
        address = (coordinator or "").strip() or default_address()
        spec = _spec(unet_name, "default", compute_device, virtual_vram_gb, donor_device,
                     expert_mode_allocations, eject_models, keep_loaded, mode)
        try:
            plan = client_for(address).plan(spec)
        except TensorfleetError as e:
            raise _explain(e, "plan", unet_name, address) from None
        return {"ui": {"text": [plan.text]}, "result": (plan.text, plan.expert_string)}


NODE_CLASS_MAPPINGS = {
    "UNETLoaderTensorfleet": UNETLoaderTensorfleet,
    "TensorfleetPlan": TensorfleetPlan,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "UNETLoaderTensorfleet": "Load Diffusion Model (Tensorfleet)",
    "TensorfleetPlan": "Tensorfleet Plan",
}
