"""Tensorfleet for ComfyUI: run diffusion models too big for one GPU on a Tensorfleet cluster.

Drop this folder into ComfyUI/custom_nodes/ (it needs pyzmq and flatbuffers: see
requirements.txt). The Python client in tensorfleet_client/ is usable without ComfyUI.
Set-up: docs/comfyui.md in the Tensorfleet repository.
"""

from .tensorfleet_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
