// The control API for operators (HTTP/JSON, Triton/KServe style), over the Coordinator:
//
//   GET  /v2                                     server metadata: name, version, extensions
//   GET  /v2/health/live                         200 while the process runs
//   GET  /v2/health/ready                        200 when a worker is up and not draining, else 503
//   GET  /v2/models                              loaded models with state, load progress and
//                                                bytes per device
//   GET  /v2/models/{name}                       KServe model metadata (name, versions, platform
//                                                "tensorfleet", inputs, outputs), state, plan
//                                                summary, and the full plan and schedule
//   GET  /v2/models/{name}/ready                 200 when the model is ready and every worker it
//                                                needs is up, else 503 {"ready": false, "reason"}
//   POST /v2/repository/index                    Triton's index: [{name, version, state, reason?,
//                                                path}] of loaded models and the model files
//                                                under the model roots; body {"ready": true}
//                                                lists only READY ones
//   POST /v2/repository/models/{name}/load       body: {"path", "compute_device", "virtual_vram_gb",
//                                                "donor_device", "expert_mode_allocations",
//                                                "eject_models", "keep_loaded", "mode", "dtype"}
//   POST /v2/repository/models/{name}/unload
//   GET  /v2/workers                             the registry: device, endpoint, up, memory
//   GET  /v2/plan?path=...&compute_device=...    a dry-run plan (same fields as load, as query)
//
// Errors are {"error": "...", "code": "..."} with a fitting HTTP status.
//
// Thread safety: the handler is called concurrently by the HTTP server.
#pragma once

#include "fleet/coordinator/coordinator.h"
#include "fleet/coordinator/http_server.h"

namespace fleet::coordinator {

/// The HTTP handler of the control API.
HttpHandler MakeControlApi(Coordinator* coordinator);

}  // namespace fleet::coordinator
