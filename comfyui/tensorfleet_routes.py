"""HTTP routes the package adds to ComfyUI's server (PromptServer).

POST /tensorfleet/convert-workflow
  body:  {"workflow": <a ComfyUI workflow, UI or API format>}
  200:   {"workflow": <converted>, "report": [...], "text": "<the report as text>"}
  400:   {"error": "<what was wrong>"}
The conversion is tensorfleet_client/workflow_convert.py, the same code `fleet convert-workflow`
runs. The web extension (web/js/tensorfleet.js) posts the open workflow here and loads the
answer, so a DisTorch2 user never edits JSON.
"""

from .tensorfleet_client import workflow_convert

CONVERT_ROUTE = "/tensorfleet/convert-workflow"


def convert_payload(payload):
    """The route's work without aiohttp: returns (HTTP status, JSON body)."""
    if not isinstance(payload, dict) or "workflow" not in payload:
        return 400, {"error": "expected a JSON object {\"workflow\": ...}"}
    try:
        converted, report = workflow_convert.convert(payload["workflow"])
    except workflow_convert.ConvertError as e:
        return 400, {"error": str(e)}
    return 200, {"workflow": converted, "report": report,
                 "text": workflow_convert.format_report(report)}


def register(server):
    """Adds the routes to a ComfyUI PromptServer (its aiohttp RouteTableDef `routes`)."""
    from aiohttp import web  # noqa: PLC0415 - ComfyUI's web framework

    @server.routes.post(CONVERT_ROUTE)
    async def convert_workflow(request):
        try:
            payload = await request.json()
        except ValueError:
            return web.json_response({"error": "the request body is not JSON"}, status=400)
        status, body = convert_payload(payload)
        return web.json_response(body, status=status)

    return convert_workflow
