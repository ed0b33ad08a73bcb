#include "fleet/models/lora.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/einsum.h>
#include <ATen/ops/kron.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/norm.h>

#include <cmath>
#include <cstdlib>
#include <limits>

#include "block_util.h"
#include "fleet/tensor/torch_view.h"

namespace fleet::models {
namespace {

using families::LoraModule;

int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// A floating part on `device` (a copy: the source may go away after loading).
StatusOr<at::Tensor> OnDevice(const std::string& key, const at::Tensor& t, at::Device device) {
  if (!t.defined() || !at::isFloatingType(t.scalar_type())) {
    return InvalidArgumentError("tensor '" + key + "' is not a floating tensor");
  }
  return t.to(device, t.scalar_type(), /*non_blocking=*/false, /*copy=*/true).contiguous();
}

const at::Tensor* Part(const Adapter& a, std::string_view suffix) {
  auto it = a.parts.find(suffix);
  return it == a.parts.end() ? nullptr : &it->second;
}

// The LoRA spellings: (up, down) suffix pairs, in ComfyUI's order of preference.
constexpr std::pair<std::string_view, std::string_view> kLoraPairs[] = {
    {".lora_up.weight", ".lora_down.weight"},
    {"_lora.up.weight", "_lora.down.weight"},
    {".lora_B.weight", ".lora_A.weight"},
    {".lora.up.weight", ".lora.down.weight"},
    {".lora_B", ".lora_A"},
    {".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"},
    {".lora_B.default.weight", ".lora_A.default.weight"},
};

// A LoRA's up and down in the first spelling whose up is present (up null when none is).
struct UpDown {
  const at::Tensor* up = nullptr;
  const at::Tensor* down = nullptr;
  std::string_view down_name = ".lora_down.weight";
};
UpDown FindUpDown(const Adapter& a) {
  for (const auto& [u, d] : kLoraPairs) {
    if (const at::Tensor* up = Part(a, u)) return {up, Part(a, d), d};
  }
  return {};
}

// The size along dim 0 and the element count of what a patch must produce: the weight, or the
// slice an offset patch lands in.
StatusOr<std::vector<int64_t>> SliceShape(const LoraModule& m) {
  std::vector<int64_t> shape = m.shape;
  if (m.offset_length < 0) return shape;
  if (m.offset_dim < 0 || m.offset_dim >= static_cast<int64_t>(shape.size()) ||
      m.offset_start < 0 || m.offset_start + m.offset_length > shape[m.offset_dim]) {
    return InvalidArgumentError("its slice [" + std::to_string(m.offset_start) + ", " +
                                std::to_string(m.offset_start + m.offset_length) + ") of dim " +
                                std::to_string(m.offset_dim) + " is outside weight '" + m.target +
                                "' of shape " + internal::ShapeString(shape));
  }
  shape[m.offset_dim] = m.offset_length;
  return shape;
}

Status CheckSize(const LoraModule& m, const std::vector<int64_t>& slice, int64_t numel,
                 const std::string& what) {
  if (numel != Numel(slice)) {
    return InvalidArgumentError(what + " has " + std::to_string(numel) + " values but weight '" +
                                m.target + "'" + (m.offset_length >= 0 ? " (its slice)" : "") +
                                " has shape " + internal::ShapeString(slice));
  }
  return Status::OK();
}

Status NeedMatrix(const at::Tensor* t, std::string_view suffix) {
  if (t == nullptr) return InvalidArgumentError("'" + std::string(suffix) + "' is missing");
  if (t->dim() < 2) {
    return InvalidArgumentError("'" + std::string(suffix) + "' has shape " +
                                internal::ShapeString(t->sizes()) +
                                ", expected at least 2 dimensions");
  }
  return Status::OK();
}

// Checks that an adapter's parts fit together and produce exactly the slice's element count,
// without computing it (a model's LoRA is checked in milliseconds).
Status CheckAdapter(const LoraModule& m, const Adapter& a, const std::vector<int64_t>& slice) {
  switch (a.kind) {
    case Adapter::Kind::kDiff:
    case Adapter::Kind::kSet: {
      const at::Tensor& t = a.parts.begin()->second;
      if (t.sizes().vec() != slice) {
        return InvalidArgumentError("'" + a.parts.begin()->first + "' has shape " +
                                    internal::ShapeString(t.sizes()) + " but weight '" + m.target +
                                    "' has " + internal::ShapeString(slice));
      }
      return Status::OK();
    }
    case Adapter::Kind::kLora: {
      const auto [up, down, down_name] = FindUpDown(a);
      FLEET_RETURN_IF_ERROR(NeedMatrix(up, "up"));
      FLEET_RETURN_IF_ERROR(NeedMatrix(down, down_name));
      int64_t rank = down->size(0);
      int64_t in = down->numel() / std::max<int64_t>(rank, 1);
      if (const at::Tensor* mid = Part(a, ".lora_mid.weight")) {
        if (mid->dim() != 4 || down->dim() != 4 || mid->size(1) != rank) {
          return InvalidArgumentError(
              "'.lora_mid.weight' of shape " + internal::ShapeString(mid->sizes()) +
              " does not fit a conv down of shape " + internal::ShapeString(down->sizes()) +
              " (LoCon's mid is [rank, rank, kh, kw])");
        }
        rank = mid->size(0);
        in = down->size(1) * mid->size(2) * mid->size(3);
      }
      const int64_t up_rank = up->numel() / up->size(0);
      if (rank < 1 || up_rank != rank) {
        return InvalidArgumentError("its up of shape " + internal::ShapeString(up->sizes()) +
                                    " and down of shape " + internal::ShapeString(down->sizes()) +
                                    " have different ranks (" + std::to_string(up_rank) + " and " +
                                    std::to_string(rank) + ")");
      }
      return CheckSize(m, slice, up->size(0) * in, "its product up x down");
    }
    case Adapter::Kind::kLoha: {
      for (auto s : {".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"}) {
        FLEET_RETURN_IF_ERROR(NeedMatrix(Part(a, s), s));
      }
      if ((Part(a, ".hada_t1") == nullptr) != (Part(a, ".hada_t2") == nullptr)) {
        return InvalidArgumentError("has one of '.hada_t1' and '.hada_t2' but not the other");
      }
      if (Part(a, ".hada_t1") != nullptr) return Status::OK();  // CP form: checked when computed
      const at::Tensor& w1a = *Part(a, ".hada_w1_a");
      const at::Tensor& w1b = *Part(a, ".hada_w1_b");
      const at::Tensor& w2a = *Part(a, ".hada_w2_a");
      const at::Tensor& w2b = *Part(a, ".hada_w2_b");
      if (w1a.dim() != 2 || w1b.dim() != 2 || w2a.dim() != 2 || w2b.dim() != 2 ||
          w1a.size(1) != w1b.size(0) || w2a.size(1) != w2b.size(0) || w1a.size(0) != w2a.size(0) ||
          w1b.size(1) != w2b.size(1)) {
        return InvalidArgumentError("LoHa parts of shapes " + internal::ShapeString(w1a.sizes()) +
                                    " x " + internal::ShapeString(w1b.sizes()) + " and " +
                                    internal::ShapeString(w2a.sizes()) + " x " +
                                    internal::ShapeString(w2b.sizes()) + " do not fit together");
      }
      return CheckSize(m, slice, w1a.size(0) * w1b.size(1), "its LoHa product");
    }
    case Adapter::Kind::kLokr: {
      auto factor = [&](const char* whole, const char* fa, const char* fb,
                        int64_t* numel) -> Status {
        if (const at::Tensor* w = Part(a, whole)) {
          *numel = w->numel();
          return Status::OK();
        }
        const at::Tensor* wa = Part(a, fa);
        const at::Tensor* wb = Part(a, fb);
        if (wa == nullptr || wb == nullptr) {
          return InvalidArgumentError("LoKr needs '" + std::string(whole) + "' or both '" + fa +
                                      "' and '" + fb + "'");
        }
        FLEET_RETURN_IF_ERROR(NeedMatrix(wa, fa));
        FLEET_RETURN_IF_ERROR(NeedMatrix(wb, fb));
        if (std::string(fa) == ".lokr_w2_a" && Part(a, ".lokr_t2") != nullptr) {
          *numel = -1;  // CP form: checked when computed
          return Status::OK();
        }
        if (wa->dim() != 2 || wb->dim() != 2 || wa->size(1) != wb->size(0)) {
          return InvalidArgumentError("'" + std::string(fa) + "' of shape " +
                                      internal::ShapeString(wa->sizes()) + " and '" + fb +
                                      "' of shape " + internal::ShapeString(wb->sizes()) +
                                      " have different ranks");
        }
        *numel = wa->size(0) * wb->size(1);
        return Status::OK();
      };
      int64_t n1 = 0, n2 = 0;
      FLEET_RETURN_IF_ERROR(factor(".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", &n1));
      FLEET_RETURN_IF_ERROR(factor(".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", &n2));
      if (n2 < 0) return Status::OK();
      return CheckSize(m, slice, n1 * n2, "its LoKr product");
    }
  }
  return Status::OK();
}

// Which adapter a module is; ComfyUI's load_lora order: set_weight replaces a diff, which
// replaces an adapter.
StatusOr<Adapter::Kind> KindOf(const LoraModule& m) {
  auto has = [&](std::string_view s) { return m.parts.count(s) != 0; };
  if (has(".set_weight")) return Adapter::Kind::kSet;
  if (has(".diff") || has(".w_norm") || has(".diff_b") || has(".b_norm")) {
    return Adapter::Kind::kDiff;
  }
  for (const auto& [up, down] : kLoraPairs) {
    if (has(up) || has(down)) return Adapter::Kind::kLora;
  }
  if (has(".hada_w1_a")) return Adapter::Kind::kLoha;
  for (auto s : {".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a"}) {
    if (has(s)) return Adapter::Kind::kLokr;
  }
  return InvalidArgumentError("it has no adapter weights (only " + m.parts.begin()->first + ")");
}

StatusOr<std::shared_ptr<Adapter>> ReadAdapter(const PartReader& read, const LoraModule& m,
                                               at::Device device) {
  auto a = std::make_shared<Adapter>();
  FLEET_ASSIGN_OR_RETURN(a->kind, KindOf(m));
  // The parts the kind uses (a set or a diff ignores the others, as ComfyUI does).
  for (const auto& [suffix, key] : m.parts) {
    if (suffix == ".alpha") {
      FLEET_ASSIGN_OR_RETURN(at::Tensor t, read(key));
      if (!at::isFloatingType(t.scalar_type()) || t.numel() != 1) {
        return InvalidArgumentError("'.alpha' has " + std::to_string(t.numel()) +
                                    " values, expected one floating value");
      }
      const double alpha = t.to(at::kDouble).item<double>();
      if (!std::isfinite(alpha)) {
        return InvalidArgumentError("'.alpha' is " + std::to_string(alpha) + ", not finite");
      }
      a->alpha = alpha;
      continue;
    }
    const bool diff_part =
        suffix == ".diff" || suffix == ".w_norm" || suffix == ".diff_b" || suffix == ".b_norm";
    if ((a->kind == Adapter::Kind::kSet && suffix != ".set_weight") ||
        (a->kind == Adapter::Kind::kDiff && !diff_part) ||
        (a->kind != Adapter::Kind::kDiff && a->kind != Adapter::Kind::kSet && diff_part)) {
      continue;
    }
    FLEET_ASSIGN_OR_RETURN(at::Tensor read_part, read(key));
    FLEET_ASSIGN_OR_RETURN(at::Tensor t, OnDevice(key, read_part, device));
    if (suffix == ".dora_scale") {
      a->dora_scale = t;
    } else {
      a->parts[suffix] = t;
    }
  }
  if (a->kind == Adapter::Kind::kDiff && a->parts.size() != 1) {
    return InvalidArgumentError("it has both '.diff' and '.w_norm'");
  }
  return a;
}

// ComfyUI's swap_scale_shift for diffusers' norm_out: the two halves along dim 0 exchanged.
at::Tensor SwapHalves(const at::Tensor& t, bool swap) {
  if (!swap) return t;
  auto halves = t.chunk(2, 0);
  return at::cat({halves[1], halves[0]}, 0);
}

at::Tensor F32(const at::Tensor& t) { return t.to(at::kFloat); }

// The adapter's unscaled difference (float32, reshaped to `shape`) and its alpha factor.
at::Tensor AdapterDiff(const Adapter& a, at::IntArrayRef shape, double* alpha) {
  *alpha = 1.0;
  switch (a.kind) {
    case Adapter::Kind::kLora: {
      const auto [up, down, down_name] = FindUpDown(a);
      at::Tensor mat1 = F32(*up), mat2 = F32(*down);
      if (const at::Tensor* mid = Part(a, ".lora_mid.weight")) {
        at::Tensor mat3 = F32(*mid);
        mat2 = at::mm(mat2.transpose(0, 1).flatten(1), mat3.transpose(0, 1).flatten(1))
                   .reshape({mat2.size(1), mat2.size(0), mat3.size(2), mat3.size(3)})
                   .transpose(0, 1);
      }
      if (a.alpha) *alpha = *a.alpha / static_cast<double>(mat2.size(0));
      return at::mm(mat1.flatten(1), mat2.flatten(1)).reshape(shape);
    }
    case Adapter::Kind::kLoha: {
      const at::Tensor w1a = F32(*Part(a, ".hada_w1_a")), w1b = F32(*Part(a, ".hada_w1_b"));
      const at::Tensor w2a = F32(*Part(a, ".hada_w2_a")), w2b = F32(*Part(a, ".hada_w2_b"));
      if (a.alpha) *alpha = *a.alpha / static_cast<double>(w1b.size(0));
      at::Tensor m1, m2;
      if (const at::Tensor* t1 = Part(a, ".hada_t1")) {
        m1 = at::einsum("i j k l, j r, i p -> p r k l", {F32(*t1), w1b, w1a});
        m2 = at::einsum("i j k l, j r, i p -> p r k l", {F32(*Part(a, ".hada_t2")), w2b, w2a});
      } else {
        m1 = at::mm(w1a, w1b);
        m2 = at::mm(w2a, w2b);
      }
      return (m1 * m2).reshape(shape);
    }
    case Adapter::Kind::kLokr: {
      std::optional<int64_t> dim;
      at::Tensor w1, w2;
      if (const at::Tensor* w = Part(a, ".lokr_w1")) {
        w1 = F32(*w);
      } else {
        const at::Tensor b = F32(*Part(a, ".lokr_w1_b"));
        dim = b.size(0);
        w1 = at::mm(F32(*Part(a, ".lokr_w1_a")), b);
      }
      if (const at::Tensor* w = Part(a, ".lokr_w2")) {
        w2 = F32(*w);
      } else {
        const at::Tensor b = F32(*Part(a, ".lokr_w2_b"));
        const at::Tensor wa = F32(*Part(a, ".lokr_w2_a"));
        dim = b.size(0);
        if (const at::Tensor* t2 = Part(a, ".lokr_t2")) {
          // contiguous: libtorch 1.13's kron cannot view einsum's strided output
          w2 = at::einsum("i j k l, j r, i p -> p r k l", {F32(*t2), b, wa}).contiguous();
        } else {
          w2 = at::mm(wa, b);
        }
      }
      if (w2.dim() == 4) w1 = w1.unsqueeze(2).unsqueeze(2);
      if (a.alpha && dim) *alpha = *a.alpha / static_cast<double>(*dim);
      return at::kron(w1, w2).reshape(shape);
    }
    case Adapter::Kind::kDiff:
    case Adapter::Kind::kSet:
      break;
  }
  return {};
}

// ComfyUI's weight_decompose (DoRA), on `weight` (float32, modified in place).
void WeightDecompose(const at::Tensor& dora_scale, at::Tensor& weight, at::Tensor diff,
                     double alpha, double strength, bool swap) {
  const at::Tensor dora = F32(dora_scale).to(weight.device());
  diff.mul_(alpha);
  at::Tensor calc = weight + SwapHalves(diff, swap);
  std::vector<int64_t> ones(static_cast<size_t>(weight.dim() - 1), 1);
  at::Tensor norm;
  if (dora.size(0) == calc.size(0)) {  // on the output axis: the norm of the unpatched weight
    std::vector<int64_t> shape{weight.size(0)};
    shape.insert(shape.end(), ones.begin(), ones.end());
    norm = weight.reshape({weight.size(0), -1}).norm(2, {1}, /*keepdim=*/true).reshape(shape);
  } else {
    std::vector<int64_t> shape{calc.size(1)};
    shape.insert(shape.end(), ones.begin(), ones.end());
    norm = calc.transpose(0, 1)
               .reshape({calc.size(1), -1})
               .norm(2, {1}, /*keepdim=*/true)
               .reshape(shape)
               .transpose(0, 1);
  }
  norm = norm + static_cast<double>(std::numeric_limits<float>::epsilon());
  calc.mul_(dora / norm);
  if (strength != 1.0) {
    calc.sub_(weight);
    weight.add_(calc * strength);
  } else {
    weight.copy_(calc);
  }
}

}  // namespace

PartReader FileParts(const formats::ModelFile& file) {
  return [&file](const std::string& key) -> StatusOr<at::Tensor> {
    const formats::TensorInfo* info = file.Find(key);
    if (info == nullptr) return InvalidArgumentError("no tensor '" + key + "'");
    FLEET_ASSIGN_OR_RETURN(at::Tensor t, tensor::ViewOrCopy(file, *info));
    if (info->dtype == "F8_E4M3" || info->dtype == "F8_E5M2") {
      return tensor::UpcastF8(
          t, info->dtype == "F8_E5M2" ? tensor::F8Format::kE5M2 : tensor::F8Format::kE4M3,
          at::kFloat);
    }
    return t;
  };
}

PartReader TensorParts(const TensorMap& tensors) {
  return [&tensors](const std::string& key) -> StatusOr<at::Tensor> {
    auto it = tensors.find(key);
    if (it == tensors.end()) return InvalidArgumentError("no tensor '" + key + "'");
    return it->second;
  };
}

Status AddLoraPatches(std::string_view source, const PartReader& read,
                      const std::vector<LoraModule>& modules, double strength, at::Device device,
                      PatchSet& patches) {
  const std::string from(source);
  if (!std::isfinite(strength)) {
    return InvalidArgumentError(from + ": LoRA strength " + std::to_string(strength) +
                                " is not finite");
  }
  PatchSet added;
  try {
    for (const LoraModule& m : modules) {
      const std::string where = from + ": module '" + m.prefix + "' (for '" + m.target + "')";
      auto slice = SliceShape(m);
      if (!slice.ok()) return slice.status().WithContext(where);
      auto adapter = ReadAdapter(read, m, device);
      if (!adapter.ok()) return adapter.status().WithContext(where);
      FLEET_RETURN_IF_ERROR(CheckAdapter(m, **adapter, *slice).WithContext(where));
      if ((*adapter)->dora_scale.defined()) {
        const at::Tensor& d = (*adapter)->dora_scale;
        const bool fits =
            d.dim() >= 1 && !slice->empty() &&
            (d.size(0) == (*slice)[0] || (slice->size() > 1 && d.numel() == (*slice)[1]));
        if (!fits) {
          return InvalidArgumentError("'.dora_scale' of shape " + internal::ShapeString(d.sizes()) +
                                      " fits neither axis of " + internal::ShapeString(*slice))
              .WithContext(where);
        }
      }
      WeightPatch p;
      p.adapter = std::move(*adapter);
      p.strength = strength;
      p.offset_dim = m.offset_dim;
      p.offset_start = m.offset_start;
      p.offset_length = m.offset_length;
      p.swap_halves = m.swap_halves;
      added[m.target].push_back(std::move(p));
    }
  } catch (const c10::Error& e) {
    return InternalError(from + ": reading LoRA: " + e.what_without_backtrace());
  }
  for (auto& [name, list] : added) {
    auto& to = patches[name];
    to.insert(to.end(), list.begin(), list.end());
  }
  return Status::OK();
}

StatusOr<at::Tensor> ApplyPatches(std::string_view name, const at::Tensor& base,
                                  const std::vector<WeightPatch>& patches) {
  try {
    // A float32 copy (ComfyUI: cast_to_device(weight, device, float32, copy=True)).
    at::Tensor weight = base.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    for (const WeightPatch& p : patches) {
      at::Tensor w = p.offset_length >= 0
                         ? weight.narrow(p.offset_dim, p.offset_start, p.offset_length)
                         : weight;
      const Adapter& a = *p.adapter;
      // The parts were checked against the shape the module named; a weight of another shape
      // (a module sent with a wrong shape) must fail here, not broadcast.
      if ((a.kind == Adapter::Kind::kSet || a.kind == Adapter::Kind::kDiff) &&
          a.parts.begin()->second.sizes() != w.sizes()) {
        return InvalidArgumentError("patching weight '" + std::string(name) + "': '" +
                                    a.parts.begin()->first + "' has shape " +
                                    internal::ShapeString(a.parts.begin()->second.sizes()) +
                                    ", the weight " + internal::ShapeString(w.sizes()));
      }
      switch (a.kind) {
        case Adapter::Kind::kSet:
          w.copy_(a.parts.begin()->second);
          break;
        case Adapter::Kind::kDiff:
          if (p.strength != 0.0) {
            w.add_(SwapHalves(F32(a.parts.begin()->second.to(w.device())) * p.strength,
                              p.swap_halves));
          }
          break;
        default: {
          double alpha = 1.0;
          at::Tensor diff = AdapterDiff(a, w.sizes(), &alpha);
          if (a.dora_scale.defined()) {
            WeightDecompose(a.dora_scale, w, diff, alpha, p.strength, p.swap_halves);
          } else {
            w.add_(SwapHalves(diff * (p.strength * alpha), p.swap_halves));
          }
        }
      }
    }
    return weight.to(base.scalar_type());
  } catch (const c10::Error& e) {
    return InvalidArgumentError("patching weight '" + std::string(name) +
                                "': " + e.what_without_backtrace());
  }
}

StatusOr<at::Tensor> PatchedWeights::Get(std::string_view name) const {
  FLEET_ASSIGN_OR_RETURN(at::Tensor w, base_.Get(name));
  auto it = patches_.find(name);
  if (it == patches_.end() || it->second.empty()) return w;
  return ApplyPatches(name, w, it->second);
}

StatusOr<std::pair<std::string, double>> ParseLoraArgument(std::string_view text) {
  std::string path(text);
  double strength = 1.0;
  if (auto colon = text.rfind(':'); colon != std::string_view::npos) {
    const std::string tail(text.substr(colon + 1));
    char* end = nullptr;
    const double v = std::strtod(tail.c_str(), &end);
    if (!tail.empty() && end == tail.c_str() + tail.size()) {
      path = std::string(text.substr(0, colon));
      strength = v;
    }
  }
  if (path.empty()) return InvalidArgumentError("--lora '" + std::string(text) + "': no file");
  if (!std::isfinite(strength)) {
    return InvalidArgumentError("--lora '" + std::string(text) + "': strength " +
                                std::to_string(strength) + " is not finite");
  }
  return std::make_pair(path, strength);
}

}  // namespace fleet::models
