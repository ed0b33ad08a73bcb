#include "fleet/coordinator/control_api.h"

#include <cerrno>
#include <nlohmann/json.hpp>

#include "fleet/families/family.h"

namespace fleet::coordinator {
namespace {

using json = nlohmann::ordered_json;

HttpResponse Json(const json& j, int status = 200) { return HttpResponse{status, j.dump(), "application/json"}; }

json ModelJson(const ModelInfo& m, bool with_plan) {
  json j = {{"name", m.name},
            {"path", m.path},
            {"family", m.family},
            {"state", ModelStateName(m.state)},
            {"bytes_loaded", m.bytes_loaded},
            {"bytes_total", m.bytes_total},
            {"progress", m.bytes_total ? static_cast<double>(m.bytes_loaded) / static_cast<double>(m.bytes_total) : 0.0},
            {"compute_device", m.compute_device},
            {"mode", ExecModeName(m.mode)},
            {"keep_loaded", m.keep_loaded}};
  if (!m.error.empty()) j["error"] = m.error;
  json bytes_per_device = json::object();
  if (!m.plan_json.empty()) {
    json plan = json::parse(m.plan_json);
    for (const auto& d : plan["devices"]) {
      if (d["bytes"].get<uint64_t>() > 0) bytes_per_device[d["id"].get<std::string>()] = d["bytes"];
    }
    if (with_plan) j["plan"] = std::move(plan);
  }
  j["bytes_per_device"] = std::move(bytes_per_device);
  return j;
}

// KServe's tensor datatype for a protocol dtype name.
std::string KServeDatatype(const std::string& dtype) {
  if (dtype == "bf16") return "BF16";
  if (dtype == "f16") return "FP16";
  if (dtype == "f32") return "FP32";
  return "BYTES";
}

// KServe model metadata (GET /v2/models/{name}): name, versions, platform, inputs/outputs as
// far as the family says, plus our state and a plan summary. Tensors a family does not
// describe yet are left out (empty lists) rather than guessed.
json ModelMetadata(const ModelInfo& m) {
  json j = ModelJson(m, false);
  j["versions"] = json::array({"1"});
  j["platform"] = "tensorfleet";
  json inputs = json::array(), outputs = json::array();
  if (!m.plan_json.empty()) {
    json plan = json::parse(m.plan_json);
    const json& c = plan["config"];
    const std::string dt = KServeDatatype(plan.value("compute_dtype", ""));
    if (m.family == "flux") {  // docs/models.md: the Flux forward pass (-1: any size)
      const int64_t latent = c.value("in_channels", 64) / 4;
      inputs.push_back({{"name", "x"}, {"datatype", dt}, {"shape", {-1, latent, -1, -1}}});
      inputs.push_back({{"name", "timestep"}, {"datatype", "FP32"}, {"shape", {-1}}});
      inputs.push_back({{"name", "context"}, {"datatype", dt}, {"shape", {-1, -1, c.value("context_in_dim", -1)}}});
      inputs.push_back({{"name", "y"}, {"datatype", dt}, {"shape", {-1, -1}}});
      if (c.value("guidance_embed", false)) {
        inputs.push_back({{"name", "guidance"}, {"datatype", dt}, {"shape", {-1}}, {"optional", true}});
      }
      outputs.push_back({{"name", "out"}, {"datatype", dt}, {"shape", {-1, c.value("out_channels", 64) / 4, -1, -1}}});
    } else if (m.family == "text-encoder") {  // docs/models.md: text encoders (float32 out)
      const bool clip = c.value("model_type", "") == "clip";
      const int64_t dim = c.value("dim", -1);
      inputs.push_back({{"name", "tokens"}, {"datatype", "INT64"}, {"shape", {-1, -1}}});
      inputs.push_back({{"name", "attention_mask"},
                        {"datatype", "INT64"},
                        {"shape", {-1, -1}},
                        {"optional", true}});
      if (clip)
        inputs.push_back(
            {{"name", "num_tokens"}, {"datatype", "INT64"}, {"shape", {-1}}, {"optional", true}});
      inputs.push_back(
          {{"name", "layer"}, {"datatype", "INT64"}, {"shape", {1}}, {"optional", true}});
      inputs.push_back({{"name", "layer_norm_hidden_state"},
                        {"datatype", "INT64"},
                        {"shape", {1}},
                        {"optional", true}});
      outputs.push_back({{"name", "out"}, {"datatype", "FP32"}, {"shape", {-1, -1, dim}}});
      if (clip) {
        outputs.push_back({{"name", "pooled"}, {"datatype", "FP32"}, {"shape", {-1, dim}}});
        if (c.value("projection", false)) {
          outputs.push_back(
              {{"name", "pooled_projected"}, {"datatype", "FP32"}, {"shape", {-1, dim}}});
        }
      }
    }
    json devices = json::array();
    for (const auto& d : plan["devices"]) {
      if (d["bytes"].get<uint64_t>() == 0 && d["role"] == "unused") continue;
      devices.push_back({{"id", d["id"]}, {"role", d["role"]}, {"bytes", d["bytes"]}, {"units", d["units"].size()}});
    }
    j["plan_summary"] = {{"compute_device", plan["compute_device"]},
                         {"compute_dtype", plan.value("compute_dtype", "")},
                         {"mode", plan["mode"]},
                         {"model_bytes", plan["model_bytes"]},
                         {"expert_string", plan["expert_string"]},
                         {"devices", devices}};
    if (plan.contains("schedule")) j["plan_summary"]["bit_identical"] = plan["schedule"]["bit_identical"];
  }
  j["inputs"] = inputs;
  j["outputs"] = outputs;
  return j;
}

// Reads the DisTorch2 inputs from a JSON object or from query parameters (`get`).
template <typename Get>
StatusOr<ModelSpec> ReadSpec(Get get) {
  ModelSpec spec;
  spec.path = get("path").value_or("");
  spec.compute_device = get("compute_device").value_or("");
  if (auto v = get("virtual_vram_gb")) {
    char* end = nullptr;
    spec.virtual_vram_gb = std::strtod(v->c_str(), &end);
    if (v->empty() || *end != '\0') return InvalidArgumentError("virtual_vram_gb: not a number: '" + *v + "'");
  }
  spec.donor_device = get("donor_device").value_or("cpu");
  spec.expert_mode_allocations = get("expert_mode_allocations").value_or("");
  auto flag = [&](const char* name, bool* out) -> Status {
    if (auto v = get(name)) {
      if (*v == "true" || *v == "1") *out = true;
      else if (*v == "false" || *v == "0") *out = false;
      else return InvalidArgumentError(std::string(name) + ": expected true or false, got '" + *v + "'");
    }
    return Status();
  };
  FLEET_RETURN_IF_ERROR(flag("eject_models", &spec.eject_models));
  FLEET_RETURN_IF_ERROR(flag("keep_loaded", &spec.keep_loaded));
  FLEET_RETURN_IF_ERROR(flag("allow_mixed", &spec.allow_mixed));
  if (auto v = get("mode")) {
    FLEET_ASSIGN_OR_RETURN(ExecMode mode, ParseExecMode(*v));
    spec.mode = mode;
  }
  spec.dtype = get("dtype").value_or("");
  auto size = [&](const char* name, int64_t* out) -> Status {
    if (auto v = get(name)) {
      char* end = nullptr;
      errno = 0;
      long long n = std::strtoll(v->c_str(), &end, 10);
      if (v->empty() || *end != '\0' || errno != 0) {
        return InvalidArgumentError(std::string(name) + ": not a whole number: '" + *v + "'");
      }
      FLEET_ASSIGN_OR_RETURN(*out, families::CheckInputSize(name, n));
    }
    return Status();
  };
  FLEET_RETURN_IF_ERROR(size("width", &spec.width));
  FLEET_RETURN_IF_ERROR(size("height", &spec.height));
  FLEET_RETURN_IF_ERROR(size("frames", &spec.frames));
  FLEET_RETURN_IF_ERROR(size("batch", &spec.batch));
  spec.weight_dtype = get("weight_dtype").value_or("");
  FLEET_RETURN_IF_ERROR(ParseWeightDtype(spec.weight_dtype).status());
  spec.dequant_dtype = get("dequant_dtype").value_or("");
  FLEET_RETURN_IF_ERROR(ParseDequantDtype(spec.dequant_dtype).status());
  return spec;
}

// Request bodies nest at most this deep. nlohmann::json's dump and comparisons recurse, so a
// body of a few hundred KB of brackets (under the size limit) would overflow the stack.
constexpr int kMaxBodyDepth = 32;

bool NestsDeeperThan(std::string_view text, int limit) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char ch : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (ch == '\\') {
        escaped = true;
      } else if (ch == '"') {
        in_string = false;
      }
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      if (++depth > limit) return true;
    } else if (ch == ']' || ch == '}') {
      --depth;
    }
  }
  return false;
}

// A request body as a JSON object (an empty body is an empty object), or InvalidArgument.
StatusOr<json> ParseBody(const std::string& body) {
  if (body.empty()) return json::object();
  if (NestsDeeperThan(body, kMaxBodyDepth)) {
    return InvalidArgumentError("request body nests deeper than " + std::to_string(kMaxBodyDepth) +
                                " levels");
  }
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return InvalidArgumentError("request body is not a JSON object");
  return j;
}

StatusOr<ModelSpec> SpecFromBody(const std::string& body) {
  FLEET_ASSIGN_OR_RETURN(json j, ParseBody(body));
  for (const auto& [key, value] : j.items()) {
    if (value.is_structured()) {
      return InvalidArgumentError("field '" + key + "' must be a string, number or boolean, got " +
                                  (value.is_array() ? "an array" : "an object"));
    }
  }
  return ReadSpec([&](const char* name) -> std::optional<std::string> {
    if (!j.contains(name) || j[name].is_null()) return std::nullopt;
    const auto& v = j[name];
    if (v.is_string()) return v.get<std::string>();
    return v.dump();  // numbers and booleans as text
  });
}

StatusOr<ModelSpec> SpecFromQuery(const std::string& query) {
  return ReadSpec([&](const char* name) -> std::optional<std::string> {
    std::string key = std::string(name) + "=";
    if (query.find(key) == std::string::npos) return std::nullopt;
    return QueryParam(query, name);
  });
}

}  // namespace

HttpHandler MakeControlApi(Coordinator* c) {
  return [c](const HttpRequest& req) -> HttpResponse {
    const std::string& p = req.path;
    const bool get = req.method == "GET";
    const bool post = req.method == "POST";
    if (p == "/v2" && get) {
      return Json({{"name", "tensorfleet"}, {"version", FLEET_VERSION},
                   {"extensions", {"distorch2_allocations", "model_repository", "plan"}}});
    }
    if (p == "/v2/health/live" && get) return Json({{"live", true}});
    if (p == "/v2/health/ready" && get) {
      Status ready = c->Ready();
      json body = {{"ready", ready.ok()}, {"draining", c->draining()}};
      if (!ready.ok()) body["reason"] = std::string(ready.message());
      return Json(body, ready.ok() ? 200 : 503);
    }
    if (p == "/v2/models" && get) {
      json models = json::array();
      for (const auto& m : c->ListModels()) models.push_back(ModelJson(m, false));
      return Json({{"models", models}});
    }
    const std::string kModel = "/v2/models/";
    const std::string kReady = "/ready";
    if (get && p.rfind(kModel, 0) == 0 && p.size() > kModel.size() + kReady.size() &&
        p.compare(p.size() - kReady.size(), kReady.size(), kReady) == 0) {
      const std::string name = p.substr(kModel.size(), p.size() - kModel.size() - kReady.size());
      Status ready = c->ModelReady(name);
      json body = {{"name", name}, {"ready", ready.ok()}};
      if (!ready.ok()) body["reason"] = std::string(ready.message());
      return Json(body, ready.ok() ? 200 : 503);
    }
    if (get && p.rfind(kModel, 0) == 0) {
      auto m = c->GetModel(p.substr(kModel.size()));
      if (!m.ok()) return ErrorResponse(m.status());
      json j = ModelMetadata(*m);
      if (!m->plan_json.empty()) j["plan"] = json::parse(m->plan_json);
      return Json(j);
    }
    if (p == "/v2/repository/index") {
      if (!post) return ErrorResponse(InvalidArgumentError(req.method + " " + p + ": use POST"));
      bool ready_only = false;
      if (!req.body.empty()) {
        auto parsed = ParseBody(req.body);
        if (!parsed.ok()) return ErrorResponse(parsed.status());
        const json& b = *parsed;
        if (b.contains("ready")) {
          if (!b["ready"].is_boolean()) return ErrorResponse(InvalidArgumentError("\"ready\" must be true or false"));
          ready_only = b["ready"].get<bool>();
        }
      }
      json index = json::array();
      for (const auto& e : c->RepositoryIndex()) {
        if (ready_only && e.state != "READY") continue;
        json row = {{"name", e.name}, {"version", "1"}, {"state", e.state}, {"path", e.path}};
        if (!e.reason.empty()) row["reason"] = e.reason;
        index.push_back(std::move(row));
      }
      return Json(index);
    }
    const std::string kRepo = "/v2/repository/models/";
    if (p.rfind(kRepo, 0) == 0) {
      std::string rest = p.substr(kRepo.size());
      size_t slash = rest.find('/');
      std::string name = rest.substr(0, slash);
      std::string action = slash == std::string::npos ? "" : rest.substr(slash + 1);
      if (name.empty()) return ErrorResponse(InvalidArgumentError("missing model name in the path"));
      if (!post) return ErrorResponse(InvalidArgumentError(req.method + " " + p + ": use POST"));
      if (action == "load") {
        auto spec = SpecFromBody(req.body);
        if (!spec.ok()) return ErrorResponse(spec.status());
        auto info = c->LoadModel(name, *spec);
        if (!info.ok()) return ErrorResponse(info.status());
        return Json(ModelJson(*info, true));
      }
      if (action == "unload") {
        Status s = c->UnloadModel(name);
        if (!s.ok()) return ErrorResponse(s);
        return Json({{"unloaded", name}});
      }
      return ErrorResponse(NotFoundError("unknown action '" + action + "' (use load or unload)"));
    }
    if (p == "/v2/workers" && get) {
      json workers = json::array();
      auto now = std::chrono::steady_clock::now();
      for (const auto& w : c->Cluster().workers) {
        json models = json::array();
        for (const auto& m : w.models) {
          models.push_back({{"model", m.model}, {"blocks", m.blocks.size()}, {"resident_bytes", m.resident_bytes}});
        }
        workers.push_back({{"device", w.device},
                           {"endpoint", w.endpoint},
                           {"up", w.up},
                           {"backing", w.backing},
                           {"total_bytes", w.total_bytes},
                           {"capacity_bytes", w.capacity_bytes},
                           {"resident_bytes", w.resident_bytes},
                           {"registered", w.registered},
                           {"metrics", w.metrics},
                           {"last_seen_seconds",
                            std::chrono::duration<double>(now - w.last_seen).count()},
                           {"models", models}});
      }
      return Json({{"workers", workers}});
    }
    if (p == "/v2/plan" && get) {
      auto spec = SpecFromQuery(req.query);
      if (!spec.ok()) return ErrorResponse(spec.status());
      auto plan = c->Plan(*spec);
      if (!plan.ok()) return ErrorResponse(plan.status());
      json j = json::parse(plan->json);
      j["text"] = plan->text;
      j["evicts"] = plan->evicts;
      return Json(j);
    }
    return ErrorResponse(NotFoundError("no route " + req.method + " " + p));
  };
}

}  // namespace fleet::coordinator
