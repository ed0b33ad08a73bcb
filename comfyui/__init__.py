"""Tensorfleet for ComfyUI: run diffusion models too big for one GPU on a Tensorfleet cluster.

Drop this folder into ComfyUI/custom_nodes/ (it needs pyzmq and flatbuffers: see
requirements.txt). The Python client in tensorfleet_client/ is usable without ComfyUI.
Set-up: docs/comfyui.md in the Tensorfleet repository.

WEB_DIRECTORY holds the frontend extension (the "Convert DisTorch2 workflow to Tensorfleet"
command); its route is registered on ComfyUI's server when the package is loaded by ComfyUI.
"""

from .tensorfleet_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from . import tensorfleet_routes

WEB_DIRECTORY = "./web/js"

try:
    from server import PromptServer  # ComfyUI's server module
except ImportError:  # imported outside ComfyUI (the client, the converter, tests without it)
    PromptServer = None
if PromptServer is not None and getattr(PromptServer, "instance", None) is not None:
    tensorfleet_routes.register(PromptServer.instance)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
