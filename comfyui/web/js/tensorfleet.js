// Tensorfleet's ComfyUI frontend extension: "Convert DisTorch2 workflow to Tensorfleet" in the
// Extensions menu (and the command palette). It posts the open workflow to the package's route
// (tensorfleet_routes.py), which rewrites ComfyUI-MultiGPU loaders to Tensorfleet's with the same
// code as `fleet convert-workflow`, then loads the converted graph and shows what was converted
// and what was left (text encoders and VAEs stay in ComfyUI for now).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const COMMAND_ID = "tensorfleet.convertDisTorch2Workflow";

function show(message, isError) {
  const toast = app.extensionManager && app.extensionManager.toast;
  if (toast && typeof toast.add === "function") {
    toast.add({
      severity: isError ? "error" : "info",
      summary: "Tensorfleet",
      detail: message,
      life: isError ? 10000 : 8000,
    });
  } else {
    window.alert("Tensorfleet\n\n" + message);
  }
}

async function convertOpenWorkflow() {
  const workflow = app.graph.serialize();
  let response;
  let body;
  try {
    response = await api.fetchApi("/tensorfleet/convert-workflow", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ workflow }),
    });
    body = await response.json();
  } catch (e) {
    show("converting the workflow failed: " + e, true);
    return;
  }
  if (!response.ok) {
    show("cannot convert this workflow: " + (body && body.error), true);
    return;
  }
  await app.loadGraphData(body.workflow);
  show(body.text, false);
}

app.registerExtension({
  name: "tensorfleet.ConvertWorkflow",
  commands: [
    {
      id: COMMAND_ID,
      label: "Convert DisTorch2 workflow to Tensorfleet",
      function: convertOpenWorkflow,
    },
  ],
  menuCommands: [{ path: ["Extensions", "Tensorfleet"], commands: [COMMAND_ID] }],
});
