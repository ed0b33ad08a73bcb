"""Stand-in for ComfyUI's `comfy` package (see ../README.md)."""
