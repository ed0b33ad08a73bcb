// `fleet gen-model` and `fleet gen-inputs`: random-weight Flux models with the real key names
// (tests/unit/formats/keys/flux-dev.tsv) at any width, and matching model inputs, both
// deterministic in a seed and written as safetensors. Torch-free: values come from our own
// PRNG (splitmix64 + Box-Muller), so the same seed gives the same bytes on every machine.
//
// Thread safety: commands run on the main thread only.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "command.h"
#include "fleet/config/options.h"
#include "fleet/families/layout.h"
#include "fleet/formats/dequant.h"
#include "fleet/formats/model_file.h"
#include "fleet/formats/safetensors_writer.h"

namespace fleet::cli {
namespace {

// splitmix64: a tiny, well-mixed 64-bit generator; each tensor gets its own stream seeded from
// (seed, name), so adding a tensor or an option never changes the values of the others.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  /// Uniform in (0, 1).
  double Uniform() {
    return (static_cast<double>(Next() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
  }
  /// Standard normal (Box-Muller).
  double Normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double r = std::sqrt(-2.0 * std::log(Uniform())), a = 2.0 * M_PI * Uniform();
    spare_ = r * std::sin(a);
    has_spare_ = true;
    return r * std::cos(a);
  }

 private:
  uint64_t state_;
  bool has_spare_ = false;
  double spare_ = 0;
};

uint64_t StreamSeed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a of the name, mixed with the seed
  for (unsigned char ch : name) h = (h ^ ch) * 1099511628211ull;
  Rng mix(seed ^ h);
  return mix.Next();
}

struct DtypeChoice {
  formats::DType dtype;
  int size;
};

StatusOr<DtypeChoice> ParseDtypeFlag(const std::string& text) {
  if (text == "bf16" || text == "bfloat16") return DtypeChoice{formats::DType::kBF16, 2};
  if (text == "f16" || text == "fp16" || text == "float16")
    return DtypeChoice{formats::DType::kF16, 2};
  if (text == "f32" || text == "fp32" || text == "float32")
    return DtypeChoice{formats::DType::kF32, 4};
  return InvalidArgumentError("--dtype '" + text + "': expected bf16, f16 or f32");
}

std::vector<uint8_t> Encode(const std::vector<float>& values, formats::DType dtype) {
  std::vector<uint8_t> out;
  if (dtype == formats::DType::kF32) {
    out.resize(values.size() * 4);
    std::memcpy(out.data(), values.data(), out.size());
    return out;
  }
  out.resize(values.size() * 2);
  for (size_t i = 0; i < values.size(); ++i) {
    uint16_t h = dtype == formats::DType::kBF16 ? formats::Fp32ToBf16(values[i])
                                                : formats::Fp32ToFp16(values[i]);
    std::memcpy(out.data() + 2 * i, &h, 2);
  }
  return out;
}

// Adds `name` with normal values * std + mean.
Status AddRandom(formats::SafetensorsWriter& writer, uint64_t seed, const std::string& name,
                 std::vector<int64_t> shape, double std_dev, double mean, formats::DType dtype) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  Rng rng(StreamSeed(seed, name));
  std::vector<float> values(static_cast<size_t>(n));
  for (auto& v : values) v = static_cast<float>(mean + std_dev * rng.Normal());
  std::vector<uint8_t> bytes = Encode(values, dtype);
  return writer.Add(name, dtype, std::move(shape), bytes);
}

struct FluxShape {
  int64_t hidden = 64, heads = 2, depth = 2, depth_single = 2, context = 64, vec = 32;
  int64_t latent = 16, patch = 2, mlp_ratio = 4;
  bool guidance = true;
  std::vector<int64_t> axes;  // empty: derived from the head width
};

std::vector<int64_t> DefaultAxes(int64_t head) {
  if (head == 128) return {16, 56, 56};
  // Flux's 16:56:56 proportions of 128, every axis even.
  int64_t a1 = (head - 2 * static_cast<int64_t>(std::llround(head / 16.0))) / 2;
  a1 -= a1 % 2;
  return {head - 2 * a1, a1, a1};
}

Status WriteFluxModel(const FluxShape& s, uint64_t seed, formats::DType dtype,
                      const std::string& prefix, const std::string& path) {
  formats::SafetensorsWriter w;
  const int64_t d = s.hidden, head = s.hidden / s.heads, mlp = s.mlp_ratio * s.hidden;
  const int64_t feat = s.latent * s.patch * s.patch;
  // Linear weights ~ N(0, 1/fan_in) (activations keep their scale through the block), biases
  // small, norm gains around 1.
  auto linear = [&](const std::string& name, int64_t out, int64_t in) -> Status {
    FLEET_RETURN_IF_ERROR(AddRandom(w, seed, prefix + name + ".weight", {out, in},
                                    1.0 / std::sqrt(static_cast<double>(in)), 0.0, dtype));
    return AddRandom(w, seed, prefix + name + ".bias", {out}, 0.02, 0.0, dtype);
  };
  auto gain = [&](const std::string& name) {
    return AddRandom(w, seed, prefix + name, {head}, 0.1, 1.0, dtype);
  };
  FLEET_RETURN_IF_ERROR(linear("img_in", d, feat));
  FLEET_RETURN_IF_ERROR(linear("time_in.in_layer", d, 256));
  FLEET_RETURN_IF_ERROR(linear("time_in.out_layer", d, d));
  FLEET_RETURN_IF_ERROR(linear("vector_in.in_layer", d, s.vec));
  FLEET_RETURN_IF_ERROR(linear("vector_in.out_layer", d, d));
  if (s.guidance) {
    FLEET_RETURN_IF_ERROR(linear("guidance_in.in_layer", d, 256));
    FLEET_RETURN_IF_ERROR(linear("guidance_in.out_layer", d, d));
  }
  FLEET_RETURN_IF_ERROR(linear("txt_in", d, s.context));
  for (int64_t i = 0; i < s.depth; ++i) {
    const std::string b = "double_blocks." + std::to_string(i) + ".";
    for (const char* st : {"img", "txt"}) {
      const std::string p = b + st;
      FLEET_RETURN_IF_ERROR(linear(p + "_mod.lin", 6 * d, d));
      FLEET_RETURN_IF_ERROR(linear(p + "_attn.qkv", 3 * d, d));
      FLEET_RETURN_IF_ERROR(gain(p + "_attn.norm.query_norm.scale"));
      FLEET_RETURN_IF_ERROR(gain(p + "_attn.norm.key_norm.scale"));
      FLEET_RETURN_IF_ERROR(linear(p + "_attn.proj", d, d));
      FLEET_RETURN_IF_ERROR(linear(p + "_mlp.0", mlp, d));
      FLEET_RETURN_IF_ERROR(linear(p + "_mlp.2", d, mlp));
    }
  }
  for (int64_t i = 0; i < s.depth_single; ++i) {
    const std::string b = "single_blocks." + std::to_string(i) + ".";
    FLEET_RETURN_IF_ERROR(linear(b + "linear1", 3 * d + mlp, d));
    FLEET_RETURN_IF_ERROR(linear(b + "linear2", d, d + mlp));
    FLEET_RETURN_IF_ERROR(gain(b + "norm.query_norm.scale"));
    FLEET_RETURN_IF_ERROR(gain(b + "norm.key_norm.scale"));
    FLEET_RETURN_IF_ERROR(linear(b + "modulation.lin", 3 * d, d));
  }
  FLEET_RETURN_IF_ERROR(linear("final_layer.linear", feat, d));
  FLEET_RETURN_IF_ERROR(linear("final_layer.adaLN_modulation.1", 2 * d, d));
  // The model's configuration as ComfyUI's Flux keyword arguments (docs/models.md): what the
  // shapes cannot say (RoPE axes, theta) and a cross-check of what they can.
  nlohmann::ordered_json config;
  config["image_model"] = "flux";
  config["in_channels"] = s.latent;
  config["out_channels"] = s.latent;
  config["vec_in_dim"] = s.vec;
  config["context_in_dim"] = s.context;
  config["hidden_size"] = d;
  config["mlp_ratio"] = static_cast<double>(s.mlp_ratio);
  config["num_heads"] = s.heads;
  config["depth"] = s.depth;
  config["depth_single_blocks"] = s.depth_single;
  config["axes_dim"] = s.axes.empty() ? DefaultAxes(head) : s.axes;
  config["theta"] = 10000;
  config["qkv_bias"] = true;
  config["guidance_embed"] = s.guidance;
  config["patch_size"] = s.patch;
  w.SetMetadata("config", config.dump());
  w.SetMetadata("fleet.generator", "fleet gen-model seed=" + std::to_string(seed));
  return w.Write(path);
}

int Fail(const char* cmd, const Status& s, int code) {
  std::fprintf(stderr, "fleet %s: %s\n", cmd, std::string(s.message()).c_str());
  return code;
}

int RunGenModel(const std::vector<std::string>& args) {
  std::string preset = "tiny", dtype_text = "f32", prefix, guidance = "", axes_text;
  int64_t hidden = -1, heads = -1, dbl = -1, single = -1, context = -1, vec = -1, seed = 0;
  config::OptionSet set("fleet gen-model",
                        "Write a random-weight Flux model with the real key names: "
                        "fleet gen-model [flags] OUT.safetensors");
  set.Add("preset", &preset,
          "tiny (hidden 64, 2 heads, 2+2 blocks, context 64, y 32) or small (hidden 256, head "
          "width 128, axes 16/56/56, 2+4 blocks, context 4096, y 768)");
  set.Add("hidden", &hidden, "Hidden width (overrides the preset)");
  set.Add("heads", &heads, "Attention heads");
  set.Add("double", &dbl, "Double-stream blocks");
  set.Add("single", &single, "Single-stream blocks");
  set.Add("context_dim", &context, "Text context width (T5: 4096)");
  set.Add("vec_dim", &vec, "Pooled vector width (CLIP-L: 768)");
  set.Add("guidance", &guidance, "true (dev: guidance_in) or false (schnell)");
  set.Add("axes", &axes_text, "RoPE axes, e.g. 16,56,56 (default: Flux's proportions)");
  set.Add("seed", &seed, "PRNG seed");
  set.Add("dtype", &dtype_text, "Stored dtype: bf16, f16 or f32");
  set.Add("prefix", &prefix, "Key prefix, e.g. model.diffusion_model.");
  int rc = 0;
  auto parsed = ParseFlags("fleet gen-model", set, args, &rc, [](const std::string&) { return std::optional<std::string>(); });
  if (!parsed) return rc;
  const std::vector<std::string>& positional = *parsed;
  if (positional.size() != 1) {
    std::fprintf(stderr, "fleet gen-model: expected one output path, got %zu arguments\n",
                 positional.size());
    return 2;
  }
  FluxShape s;
  if (preset == "small") {
    s.hidden = 256;
    s.heads = 2;
    s.depth = 2;
    s.depth_single = 4;
    s.context = 4096;
    s.vec = 768;
  } else if (preset != "tiny") {
    std::fprintf(stderr, "fleet gen-model: --preset '%s': expected tiny or small\n",
                 preset.c_str());
    return 2;
  }
  auto positive = [](const char* flag, int64_t v, int64_t min, int64_t* target) -> bool {
    if (v == -1) return true;
    if (v < min) {
      std::fprintf(stderr, "fleet gen-model: --%s %lld: must be >= %lld\n", flag,
                   static_cast<long long>(v), static_cast<long long>(min));
      return false;
    }
    *target = v;
    return true;
  };
  if (!positive("hidden", hidden, 2, &s.hidden) || !positive("heads", heads, 1, &s.heads) ||
      !positive("double", dbl, 1, &s.depth) || !positive("single", single, 0, &s.depth_single) ||
      !positive("context-dim", context, 1, &s.context) || !positive("vec-dim", vec, 1, &s.vec)) {
    return 2;
  }
  if (!guidance.empty()) {
    if (guidance != "true" && guidance != "false") {
      std::fprintf(stderr, "fleet gen-model: --guidance '%s': expected true or false\n",
                   guidance.c_str());
      return 2;
    }
    s.guidance = guidance == "true";
  }
  if (s.hidden % s.heads != 0 || (s.hidden / s.heads) % 2 != 0) {
    std::fprintf(stderr,
                 "fleet gen-model: --hidden %lld / --heads %lld must give an even head width\n",
                 static_cast<long long>(s.hidden), static_cast<long long>(s.heads));
    return 2;
  }
  const int64_t head = s.hidden / s.heads;
  if (!axes_text.empty()) {
    int64_t sum = 0;
    size_t pos = 0;
    while (pos <= axes_text.size()) {
      size_t comma = axes_text.find(',', pos);
      std::string tok =
          axes_text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
      char* end = nullptr;
      long long v = std::strtoll(tok.c_str(), &end, 10);
      if (tok.empty() || *end != '\0' || v <= 0 || v % 2 != 0) {
        std::fprintf(stderr, "fleet gen-model: --axes '%s': '%s' is not a positive even integer\n",
                     axes_text.c_str(), tok.c_str());
        return 2;
      }
      s.axes.push_back(v);
      sum += v;
      if (comma == std::string::npos) break;
      pos = comma + 1;
    }
    if (s.axes.size() != 3 || sum != head) {
      std::fprintf(stderr,
                   "fleet gen-model: --axes '%s' must be 3 values summing to the head width %lld\n",
                   axes_text.c_str(), static_cast<long long>(head));
      return 2;
    }
  } else if (DefaultAxes(head)[0] <= 0) {
    std::fprintf(stderr, "fleet gen-model: head width %lld is too small for 3 RoPE axes\n",
                 static_cast<long long>(head));
    return 2;
  }
  auto dtype = ParseDtypeFlag(dtype_text);
  if (!dtype.ok()) return Fail("gen-model", dtype.status(), 2);
  Status st =
      WriteFluxModel(s, static_cast<uint64_t>(seed), dtype->dtype, prefix, positional[0]);
  if (!st.ok()) return Fail("gen-model", st, 1);
  return 0;
}

int RunGenInputs(const std::vector<std::string>& args) {
  int64_t batch = 1, height = 16, width = 16, txt_len = 8, seed = 0;
  double guidance = 3.5;
  config::OptionSet set("fleet gen-inputs",
                        "Write inputs for a Flux model as ComfyUI hands them over (timestep "
                        "float32, the rest in the model dtype): fleet gen-inputs MODEL [flags] "
                        "OUT.safetensors");
  set.Add("batch", &batch, "Batch size");
  set.Add("height", &height, "Latent height (image height / 8)");
  set.Add("width", &width, "Latent width (image width / 8)");
  set.Add("txt_len", &txt_len, "Text tokens");
  set.Add("seed", &seed, "PRNG seed");
  set.Add("guidance", &guidance, "Guidance strength (dev models)");
  int rc = 0;
  auto parsed = ParseFlags("fleet gen-inputs", set, args, &rc, [](const std::string&) { return std::optional<std::string>(); });
  if (!parsed) return rc;
  const std::vector<std::string>& positional = *parsed;
  if (positional.size() != 2) {
    std::fprintf(stderr, "fleet gen-inputs: expected MODEL and OUT paths, got %zu arguments\n",
                 positional.size());
    return 2;
  }
  for (auto [flag, v] : {std::pair{"batch", batch}, std::pair{"height", height},
                         std::pair{"width", width}, std::pair{"txt-len", txt_len}}) {
    if (v < 1) {
      std::fprintf(stderr, "fleet gen-inputs: --%s %lld: must be >= 1\n", flag,
                   static_cast<long long>(v));
      return 2;
    }
  }
  auto file = formats::ModelFile::Open(positional[0]);
  if (!file.ok()) return Fail("gen-inputs", file.status(), 2);
  auto layout = families::DetectLayout(**file);
  if (!layout.ok()) return Fail("gen-inputs", layout.status(), 2);
  if (layout->family != "flux") {
    std::fprintf(stderr, "fleet gen-inputs: %s is a '%s' model; only flux is supported\n",
                 positional[0].c_str(), layout->family.c_str());
    return 2;
  }
  auto config = nlohmann::json::parse(layout->config_json);
  const int64_t channels = config["in_channels"].get<int64_t>() / 4;
  const int64_t context = config["context_in_dim"].get<int64_t>();
  const int64_t vec = config["vec_in_dim"].get<int64_t>();
  const formats::TensorInfo* img_in = (*file)->Find(layout->prefix + "img_in.weight");
  auto model_dtype = img_in ? formats::ParseDType(img_in->dtype) : std::nullopt;
  formats::DType dtype = formats::DType::kF32;
  if (model_dtype == formats::DType::kBF16 || model_dtype == formats::DType::kF16) {
    dtype = *model_dtype;
  }
  formats::SafetensorsWriter w;
  const uint64_t s = static_cast<uint64_t>(seed);
  Status st = AddRandom(w, s, "x", {batch, channels, height, width}, 1.0, 0.0, dtype);
  if (st.ok()) st = AddRandom(w, s, "context", {batch, txt_len, context}, 0.5, 0.0, dtype);
  if (st.ok()) st = AddRandom(w, s, "y", {batch, vec}, 1.0, 0.0, dtype);
  if (st.ok()) {
    // Timesteps (sigmas) in (0, 1), always float32 as ComfyUI passes them.
    Rng rng(StreamSeed(s, "timestep"));
    std::vector<float> t(static_cast<size_t>(batch));
    for (auto& v : t) v = static_cast<float>(rng.Uniform());
    st = w.Add("timestep", formats::DType::kF32, {batch}, Encode(t, formats::DType::kF32));
  }
  if (st.ok() && config.value("guidance_embed", false)) {
    std::vector<float> g(static_cast<size_t>(batch), static_cast<float>(guidance));
    st = w.Add("guidance", dtype, {batch}, Encode(g, dtype));
  }
  if (st.ok()) st = w.Write(positional[1]);
  if (!st.ok()) return Fail("gen-inputs", st, 1);
  return 0;
}

}  // namespace

// Registered by hand: FLEET_REGISTER_COMMAND takes an identifier, and these names have dashes.
[[maybe_unused]] static const bool kGenModelRegistered = RegisterCommand(
    Command{"gen-model", "Write a random-weight Flux test model (safetensors)", RunGenModel});
[[maybe_unused]] static const bool kGenInputsRegistered = RegisterCommand(
    Command{"gen-inputs", "Write random Flux inputs for a model (safetensors)", RunGenInputs});

}  // namespace fleet::cli
