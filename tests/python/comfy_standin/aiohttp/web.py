"""Stand-in for aiohttp.web: RouteTableDef, json_response and the Response they make.

Upstream: aiohttp/web_routedef.py (RouteTableDef: a sequence of RouteDef(method, path, handler,
kwargs), filled by the @routes.get/@routes.post decorators) and aiohttp/web_response.py
(json_response(data, status=200, ...) -> Response with .status, .text, .content_type).
Tests call a route's handler with a request object whose `json()` is a coroutine, as aiohttp's.
"""

import json
from collections import namedtuple

RouteDef = namedtuple("RouteDef", ["method", "path", "handler", "kwargs"])


class RouteTableDef(list):
    def route(self, method, path, **kwargs):
        def inner(handler):
            self.append(RouteDef(method, path, handler, kwargs))
            return handler
        return inner

    def get(self, path, **kwargs):
        return self.route("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.route("POST", path, **kwargs)


class Response:
    def __init__(self, text="", status=200, content_type="text/plain"):
        self.text = text
        self.status = status
        self.content_type = content_type


def json_response(data, status=200, dumps=json.dumps):
    return Response(text=dumps(data), status=status, content_type="application/json")
