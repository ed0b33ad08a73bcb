"""Stand-in for the parts of aiohttp (ComfyUI's web framework) that custom nodes use; see web.py."""
