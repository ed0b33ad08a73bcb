"""Stand-in for ComfyUI's server.py: PromptServer.instance and its aiohttp route table.

Upstream: server.py (class PromptServer: __init__ sets PromptServer.instance = self and
self.routes = web.RouteTableDef(); custom nodes add routes with @PromptServer.instance.routes.post
while ComfyUI imports them, and the server adds the table to its aiohttp app afterwards).
ComfyUI creates the instance before it loads custom nodes; so does this module.
"""

from aiohttp import web


class PromptServer:
    instance = None

    def __init__(self):
        PromptServer.instance = self
        self.routes = web.RouteTableDef()


PromptServer()
