#include "run_local.h"

#include <ATen/Context.h>

#include <ATen/ops/empty.h>

#include <cstring>
#include <map>
#include <span>

#include "fleet/families/family.h"
#include "fleet/families/layout.h"
#include "fleet/formats/dtype.h"
#include "fleet/formats/safetensors_writer.h"
#include "fleet/log/log.h"
#include "fleet/tensor/torch_view.h"

namespace fleet::run_local {
namespace {

StatusOr<at::Tensor> UpcastFp8(const at::Tensor& bytes, bool e5m2) {
  return tensor::UpcastF8(bytes, e5m2 ? tensor::F8Format::kE5M2 : tensor::F8Format::kE4M3,
                          at::kFloat);
}

bool IsFp8(const formats::TensorInfo& info) {
  return info.dtype == "F8_E4M3" || info.dtype == "F8_E5M2";
}

// A private copy of a GGUF block tensor's bytes (kByte).
StatusOr<at::Tensor> RawBytes(const formats::ModelFile& file, const formats::TensorInfo& info) {
  std::span<const uint8_t> data = file.Data(info);
  if (data.size() != info.nbytes) {
    return OutOfRangeError(info.name + ": byte range is outside the file");
  }
  at::Tensor bytes = at::empty({static_cast<int64_t>(data.size())}, at::kByte);
  if (!data.empty()) std::memcpy(bytes.data_ptr(), data.data(), data.size());
  return bytes;
}

}  // namespace

StatusOr<models::TensorMap> ReadTensors(const std::string& path) {
  FLEET_ASSIGN_OR_RETURN(auto file, formats::ModelFile::Open(path));
  models::TensorMap out;
  try {
    for (const auto& info : file->tensors()) {
      FLEET_ASSIGN_OR_RETURN(at::Tensor t, tensor::ViewOrCopy(*file, info));
      if (IsFp8(info)) {
        FLEET_ASSIGN_OR_RETURN(out[info.name], UpcastFp8(t, info.dtype == "F8_E5M2"));
      } else {
        out[info.name] = t.clone();
      }
    }
  } catch (const std::exception& e) {
    return InternalError(path + ": libtorch: " + e.what());
  }
  return out;
}

Status WriteTensors(const models::TensorMap& tensors, const std::string& path) {
  formats::SafetensorsWriter writer;
  try {
    for (const auto& [name, t] : tensors) {
      std::optional<formats::DType> dtype = tensor::FromScalarType(t.scalar_type());
      if (!dtype) {
        return InvalidArgumentError(path + ": cannot write tensor '" + name + "' of dtype " +
                                    c10::toString(t.scalar_type()));
      }
      at::Tensor c = t.to(at::kCPU).contiguous();
      std::span<const uint8_t> bytes(static_cast<const uint8_t*>(c.data_ptr()), c.nbytes());
      FLEET_RETURN_IF_ERROR(writer.Add(name, *dtype, c.sizes().vec(), bytes));
    }
  } catch (const std::exception& e) {
    return InternalError(path + ": libtorch: " + e.what());
  }
  return writer.Write(path);
}

StatusOr<std::unique_ptr<LocalRunner>> LocalRunner::Create(const std::string& model_path,
                                                           std::optional<at::ScalarType> dtype,
                                                           const std::string& device,
                                                           const std::string& weight_dtype,
                                                           const std::string& dequant_dtype) {
  std::unique_ptr<LocalRunner> r(new LocalRunner());
  std::optional<tensor::F8Format> fp8;  // keep F32/F16/BF16 weights as fp8
  if (weight_dtype == "fp8_e4m3fn" || weight_dtype == "fp8_e4m3fn_fast") {
    fp8 = tensor::F8Format::kE4M3;
  } else if (weight_dtype == "fp8_e5m2") {
    fp8 = tensor::F8Format::kE5M2;
  } else if (weight_dtype != "default" && !weight_dtype.empty()) {
    return InvalidArgumentError("--weight-dtype '" + weight_dtype +
                                "': expected default, fp8_e4m3fn, fp8_e4m3fn_fast or fp8_e5m2");
  }
  if (dequant_dtype == "float32") {
    r->dequant_ = at::kFloat;
  } else if (dequant_dtype == "float16") {
    r->dequant_ = at::kHalf;
  } else if (dequant_dtype == "bfloat16") {
    r->dequant_ = at::kBFloat16;
  } else if (dequant_dtype != "default" && dequant_dtype != "target" && !dequant_dtype.empty()) {
    return InvalidArgumentError("--dequant-dtype '" + dequant_dtype +
                                "': expected default, target, float32, float16 or bfloat16");
  }
  try {
    r->device_ = at::Device(device);
  } catch (const std::exception& e) {
    return InvalidArgumentError("--device '" + device + "': not a device (cpu, cuda:N)");
  }
  if (r->device_.is_cuda() && !at::hasCUDA()) {
    return FailedPreconditionError("--device '" + device +
                                   "': this libtorch has no CUDA (build with a CUDA libtorch "
                                   "via Torch_DIR, see docs/ARCHITECTURE.md)");
  }
  FLEET_ASSIGN_OR_RETURN(r->file_, formats::ModelFile::Open(model_path));
  FLEET_ASSIGN_OR_RETURN(families::Layout layout, families::DetectLayout(*r->file_));
  if (families::FindFamily(layout.family) == nullptr) {
    return InvalidArgumentError(model_path + ": not a model family Tensorfleet knows (" +
                                families::FamilyNames() + ")");
  }
  for (const auto& info : r->file_->tensors()) {
    // GGUF block-quantised weights compute in bf16 by default, as the coordinator does.
    if (!dtype && formats::IsBlockQuantised(info.dtype)) dtype = at::kBFloat16;
  }
  if (!dtype) {
    // The stored dtype of the first floating, non-fp8 weight; fp8-only files compute in bf16.
    for (const auto& info : r->file_->tensors()) {
      if (info.dtype == "F32" || info.dtype == "F16" || info.dtype == "BF16") {
        dtype = info.dtype == "F32" ? at::kFloat : info.dtype == "F16" ? at::kHalf : at::kBFloat16;
        break;
      }
    }
    if (!dtype) dtype = at::kBFloat16;
  }
  FLEET_ASSIGN_OR_RETURN(r->model_, models::CreateModel(layout.family, layout.config_json, *dtype));
  const auto& names = r->model_->block_names();
  std::map<std::string, const families::Unit*> units;
  for (const auto& u : layout.units) units[u.name] = &u;
  r->blocks_.resize(names.size());
  try {
    for (size_t i = 0; i < names.size(); ++i) {
      auto it = units.find(names[i]);
      if (it == units.end()) {
        return InvalidArgumentError(model_path + ": no tensors for block '" + names[i] + "'");
      }
      for (const std::string& full : it->second->tensors) {
        const formats::TensorInfo* info = r->file_->Find(full);
        const std::string name = layout.WeightName(full);
        models::WeightStore& store = r->blocks_[i];
        if (formats::IsBlockQuantised(info->dtype)) {  // kept quantised, expanded at use
          FLEET_ASSIGN_OR_RETURN(at::Tensor bytes, RawBytes(*r->file_, *info));
          FLEET_ASSIGN_OR_RETURN(
              store[name],
              models::MakeStoredGguf(name, bytes.to(r->device_),
                                     formats::GgmlTypeByName(info->dtype)->type, info->shape));
          continue;
        }
        FLEET_ASSIGN_OR_RETURN(at::Tensor stored, tensor::ViewOrCopy(*r->file_, *info));
        if (formats::IsQuantParameter(name)) {  // kept as stored for AttachScales
          store[name] = models::StoredWeight::Resident(stored.to(r->device_));
          continue;
        }
        if (fp8 && (info->dtype == "F32" || info->dtype == "F16" || info->dtype == "BF16")) {
          FLEET_ASSIGN_OR_RETURN(at::Tensor bytes, tensor::DowncastF8(stored, *fp8));
          FLEET_ASSIGN_OR_RETURN(
              store[name],
              models::MakeStoredF8(name, bytes.to(r->device_), *fp8 == tensor::F8Format::kE5M2));
          continue;
        }
        if (!r->device_.is_cpu()) stored = stored.to(r->device_);
        if (IsFp8(*info)) {
          FLEET_ASSIGN_OR_RETURN(store[name],
                                 models::MakeStoredF8(name, stored, info->dtype == "F8_E5M2"));
          continue;
        }
        FLEET_ASSIGN_OR_RETURN(at::Tensor w, r->model_->PrepareWeight(name, stored));
        store[name] = models::StoredWeight::Resident(w);
      }
      FLEET_RETURN_IF_ERROR(models::AttachScales(r->blocks_[i]).WithContext(model_path));
    }
  } catch (const std::exception& e) {
    std::string what = e.what();
    if (auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
    return InternalError(model_path + " on " + device + ": libtorch: " + what);
  }
  return r;
}

Status LocalRunner::Run(models::TensorMap& state, models::TensorMap* trace) const {
  const auto& names = model_->block_names();
  if (!device_.is_cpu()) {
    try {
      for (auto& [name, t] : state) t = t.to(device_);
    } catch (const std::exception& e) {
      return InternalError(std::string("moving inputs to ") + device_.str() + ": " + e.what());
    }
  }
  for (size_t i = 0; i < names.size(); ++i) {
    const models::StoredWeights stored(*model_, blocks_[i], dequant_);
    FLEET_RETURN_IF_ERROR(model_->RunBlock(i, models::PatchedWeights(stored, patches_), state));
    if (trace) {
      for (const auto& [name, t] : state) {
        if (i > 0 && model_->IsRunConstant(name)) continue;
        (*trace)[names[i] + "/" + name] = t.clone();
      }
    }
  }
  return Status::OK();
}

Status LocalRunner::AddLora(const std::string& path, double strength) {
  families::WeightShapes shapes;
  for (const models::WeightStore& store : blocks_) {
    for (const auto& [name, w] : store) {
      if (formats::IsQuantParameter(name)) continue;
      shapes[name] =
          w.form == models::StoredWeight::Form::kResident ? w.data.sizes().vec() : w.shape;
    }
  }
  FLEET_ASSIGN_OR_RETURN(auto file, formats::ModelFile::Open(path));
  std::vector<std::string> keys;
  for (const auto& info : file->tensors()) keys.push_back(info.name);
  FLEET_ASSIGN_OR_RETURN(
      families::LoraMapping mapping,
      families::MapLoraKeys(model_->family(), model_->config_json(), shapes, keys, path));
  if (!mapping.unmatched.empty() || !mapping.text_encoder.empty()) {
    FLEET_LOG(WARNING, "run-local")
        << path << ": " << mapping.modules.size() << " modules patch the model; "
        << mapping.unmatched.size() << " match no weight (first: '"
        << (mapping.unmatched.empty() ? "" : mapping.unmatched.front()) << "'), "
        << mapping.text_encoder.size() << " are for a text encoder (not applied)";
  }
  return models::AddLoraPatches(path, models::FileParts(*file), mapping.modules, strength, device_,
                                patches_);
}

StatusOr<models::TensorMap> LocalRunner::Weights() const {
  models::TensorMap out;
  for (const models::WeightStore& store : blocks_) {
    const models::StoredWeights stored(*model_, store, dequant_);
    const models::PatchedWeights patched(stored, patches_);
    for (const auto& [name, w] : store) {
      if (formats::IsQuantParameter(name)) continue;
      FLEET_ASSIGN_OR_RETURN(out[name], patched.Get(name));
    }
  }
  return out;
}

}  // namespace fleet::run_local
