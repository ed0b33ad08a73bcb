// fleet-run-local: runs a whole model in one process (the bit-exact single-device reference).
//
//   fleet-run-local MODEL --inputs IN.safetensors --out OUT.safetensors
//       [--dtype float32|bfloat16|float16] [--threads N] [--trace TRACE.safetensors] [--device D]
//       [--lora FILE[:STRENGTH]]... [--dump-weights WEIGHTS.safetensors] [--layer N]
#include <ATen/Parallel.h>
#include <ATen/ops/full.h>

#include <charconv>
#include <chrono>
#include <cstdio>
#include <optional>

#include "fleet/config/options.h"
#include "fleet/log/log.h"
#include "fleet/models/host_allocator.h"
#include "run_local.h"

namespace {

int Fail(const fleet::Status& s, int code) {
  std::fprintf(stderr, "fleet-run-local: %s\n", std::string(s.message()).c_str());
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace fleet;
  std::string inputs, out, dtype_text, trace_path, device = "cpu", weight_dtype = "default";
  std::string dequant_dtype = "default", dump_weights;
  std::vector<std::string> loras;
  int64_t threads = 2, repeat = 1;
  bool tune_allocator = true;
  config::OptionSet set("fleet-run-local",
                        "Run a whole model in one process: fleet-run-local MODEL --inputs IN "
                        "--out OUT");
  set.Add("inputs", &inputs,
          "Input tensors as safetensors (x, timestep, context, y, guidance; text encoders: tokens, "
          "attention_mask)");
  set.Add("out", &out,
          "Where to write the outputs (safetensors): 'out', plus 'pooled' (and "
          "'pooled_projected') for CLIP text encoders");
  set.Add("dtype", &dtype_text, "Compute dtype: float32, bfloat16 or float16 (default: stored)");
  set.Add("weight_dtype", &weight_dtype,
          "ComfyUI's weight_dtype: default, fp8_e4m3fn, fp8_e4m3fn_fast or fp8_e5m2 (keep the "
          "floating weights as fp8, as the workers do)");
  set.Add("dequant_dtype", &dequant_dtype,
          "ComfyUI-GGUF's dequant_dtype: default, target, float32, float16 or bfloat16 (the dtype "
          "GGUF weights expand into before the compute dtype)");
  set.Add("lora", &loras,
          "A LoRA file to patch the model with, FILE or FILE:STRENGTH (default 1.0); repeat the "
          "flag to stack several, applied in order");
  set.Add("dump_weights", &dump_weights,
          "Write every weight as the blocks see it (patched, compute dtype) to this safetensors "
          "file; --inputs and --out are then optional");
  std::string layer;
  set.Add("layer", &layer,
          "Text encoders: return the hidden state after this layer instead of the last (negative "
          "counts from the end, as ComfyUI's CLIPSetLastLayer); the input 'layer'");
  set.Add("threads", &threads, "libtorch intra-op threads");
  set.Add("device", &device, "Where to run: cpu or cuda:N (CUDA needs a CUDA build of libtorch)");
  set.Add("trace", &trace_path, "Also write the state after every block ('<block>/<name>')");
  set.Add("repeat", &repeat, "Run the forward this many times and print the time of each");
  set.Add("tune_allocator", &tune_allocator,
          "Keep freed buffers in the heap (models::TuneHostAllocator); false to measure without");
  std::string log_format = "text";
  set.Add("log_format", &log_format,
          "Log line format on stderr: text or json (one object per line)");
  std::vector<std::string> positional = set.ParseOrExit(argc, argv);
  if (!log::SetFormatByName(log_format)) {
    std::fprintf(stderr, "fleet-run-local: --log-format: expected text or json, got '%s'\n",
                 log_format.c_str());
    return 2;
  }
  // Before libtorch allocates anything big (weights are views of the mapping).
  if (tune_allocator) models::TuneHostAllocator();
  if (positional.size() != 1) {
    std::fprintf(stderr, "fleet-run-local: expected one MODEL path, got %zu\n", positional.size());
    return 2;
  }
  const bool dump_only = !dump_weights.empty() && inputs.empty() && out.empty();
  if (!dump_only && (inputs.empty() || out.empty())) {
    std::fprintf(stderr, "fleet-run-local: --inputs and --out are required\n");
    return 2;
  }
  if (threads < 1 || repeat < 1) {
    std::fprintf(stderr, "fleet-run-local: --threads and --repeat must be >= 1\n");
    return 2;
  }
  std::optional<at::ScalarType> dtype;
  if (!dtype_text.empty()) {
    if (dtype_text == "float32" || dtype_text == "f32") {
      dtype = at::kFloat;
    } else if (dtype_text == "bfloat16" || dtype_text == "bf16") {
      dtype = at::kBFloat16;
    } else if (dtype_text == "float16" || dtype_text == "f16") {
      dtype = at::kHalf;
    } else {
      std::fprintf(stderr, "fleet-run-local: --dtype '%s': expected float32, bfloat16 or float16\n",
                   dtype_text.c_str());
      return 2;
    }
  }
  at::set_num_threads(static_cast<int>(threads));

  auto runner =
      run_local::LocalRunner::Create(positional[0], dtype, device, weight_dtype, dequant_dtype);
  if (!runner.ok()) return Fail(runner.status(), 2);
  for (const std::string& arg : loras) {
    auto lora = models::ParseLoraArgument(arg);
    if (!lora.ok()) return Fail(lora.status(), 2);
    Status s = (*runner)->AddLora(lora->first, lora->second);
    if (!s.ok()) return Fail(s, 2);
  }
  if (!dump_weights.empty()) {
    auto weights = (*runner)->Weights();
    if (!weights.ok()) return Fail(weights.status(), 2);
    Status s = run_local::WriteTensors(*weights, dump_weights);
    if (!s.ok()) return Fail(s, 1);
    if (dump_only) return 0;
  }
  auto input = run_local::ReadTensors(inputs);
  if (!input.ok()) return Fail(input.status(), 2);

  if (!layer.empty()) {
    int64_t n = 0;
    auto [end, ec] = std::from_chars(layer.data(), layer.data() + layer.size(), n);
    if (ec != std::errc() || end != layer.data() + layer.size()) {
      std::fprintf(stderr, "fleet-run-local: --layer '%s': expected an integer\n", layer.c_str());
      return 2;
    }
    (*input)["layer"] = at::full({1}, n, at::TensorOptions().dtype(at::kLong));
  }

  models::TensorMap trace;
  models::TensorMap state;
  for (int64_t r = 0; r < repeat; ++r) {
    state = *input;
    auto start = std::chrono::steady_clock::now();
    Status s = (*runner)->Run(state, trace_path.empty() || r > 0 ? nullptr : &trace);
    double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (!s.ok()) return Fail(s.WithContext(inputs), 2);
    if (repeat > 1) std::printf("forward_ms %.3f\n", ms);
  }
  // What the last block leaves is the output: "out", plus "pooled" for CLIP.
  if (!state.count("out")) return Fail(InternalError("the model produced no 'out'"), 1);
  Status s = run_local::WriteTensors(state, out);
  if (s.ok() && !trace_path.empty()) s = run_local::WriteTensors(trace, trace_path);
  if (!s.ok()) return Fail(s, 1);
  return 0;
}
