// `fleet quantize IN.safetensors OUT.gguf`: a GGUF copy of a model with its large 2-D weights in
// Q8_0, as the GGUF Flux checkpoints ComfyUI users load (city96's convention: a tensor is
// quantised when it is a 2-D weight of more than 1024 values whose rows are whole 32-value
// blocks; everything else keeps its stored type). Tensor names, shapes and metadata carry over.
#include <cstdio>

#include "command.h"
#include "fleet/config/bytes.h"
#include "fleet/config/options.h"
#include "fleet/formats/gguf_writer.h"
#include "fleet/formats/model_file.h"

namespace fleet::cli {
namespace {

bool Quantised(const formats::TensorInfo& t) {
  const bool floating = t.dtype == "F32" || t.dtype == "F16" || t.dtype == "BF16";
  return floating && t.shape.size() == 2 && t.numel() > 1024 && t.shape[1] % 32 == 0 &&
         t.name.size() > 7 && t.name.compare(t.name.size() - 7, 7, ".weight") == 0;
}

// The GGUF copy of `in`, ready to write.
StatusOr<formats::GgufWriter> Quantize(const std::string& in, uint64_t* quantised) {
  FLEET_ASSIGN_OR_RETURN(auto file, formats::ModelFile::Open(in));
  if (file->format() != formats::FileFormat::kSafetensors) {
    return InvalidArgumentError(in + ": expected a safetensors file");
  }
  formats::GgufWriter w;
  w.SetMetadata("general.architecture", "flux");
  for (const auto& [key, value] : file->metadata()) w.SetMetadata(key, value);
  for (const auto& t : file->tensors()) {
    auto bytes = file->Data(t);
    const std::string where = in + ": tensor '" + t.name + "'";
    if (Quantised(t)) {
      auto values = formats::ToFloat32(*formats::ParseDType(t.dtype), bytes);
      if (!values.ok()) return values.status().WithContext(where);
      FLEET_ASSIGN_OR_RETURN(auto q8, formats::EncodeQ8_0(*values));
      FLEET_RETURN_IF_ERROR(w.Add(t.name, formats::GgmlType::kQ8_0, t.shape, std::move(q8)).WithContext(where));
      *quantised += 1;
      continue;
    }
    auto type = formats::GgmlTypeByName(t.dtype);  // F32, F16, BF16, I8.. keep their bytes
    if (!type) {
      return InvalidArgumentError(where + ": dtype " + t.dtype +
                                  " has no GGUF equivalent (fp8 checkpoints: convert from bf16/f16/f32)");
    }
    FLEET_RETURN_IF_ERROR(
        w.Add(t.name, type->type, t.shape, std::vector<uint8_t>(bytes.begin(), bytes.end())).WithContext(where));
  }
  return w;
}

int RunQuantize(const std::vector<std::string>& args) {
  config::OptionSet set("fleet quantize IN.safetensors OUT.gguf",
                        "Write a GGUF copy of a model with its large 2-D weights in Q8_0.");
  int rc = 0;
  auto parsed = ParseFlags("fleet quantize", set, args, &rc);
  if (!parsed) return rc;
  const std::vector<std::string>& positional = *parsed;
  if (positional.size() != 2) {
    std::fprintf(stderr, "fleet quantize: expected IN.safetensors OUT.gguf\n");
    return 2;
  }
  uint64_t quantised = 0;
  auto gguf = Quantize(positional[0], &quantised);
  if (!gguf.ok()) {  // a file we cannot read or convert: bad input
    std::fprintf(stderr, "fleet quantize: %s\n", std::string(gguf.status().message()).c_str());
    return 2;
  }
  Status written = gguf->Write(positional[1]);
  if (!written.ok()) {
    std::fprintf(stderr, "fleet quantize: %s\n", std::string(written.message()).c_str());
    return 1;
  }
  std::printf("%s: %llu tensors in Q8_0\n", positional[1].c_str(),
              static_cast<unsigned long long>(quantised));
  return 0;
}

}  // namespace

FLEET_REGISTER_COMMAND(quantize, "Write a GGUF (Q8_0) copy of a safetensors model", RunQuantize);

}  // namespace fleet::cli
