#include "block_util.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/softmax.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "fleet/families/attention.h"

#if __has_include(<ATen/ops/scaled_dot_product_attention.h>)
#include <ATen/ops/scaled_dot_product_attention.h>
#define FLEET_HAS_SDPA 1
#else
#define FLEET_HAS_SDPA 0
#endif

namespace fleet::models::internal {

std::string ShapeString(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

StatusOr<at::Tensor> Find(const TensorMap& map, std::string_view kind, std::string_view name,
                          std::initializer_list<int64_t> shape) {
  auto it = map.find(name);
  if (it == map.end() || !it->second.defined()) {
    return InvalidArgumentError(std::string("missing ") + std::string(kind) + " '" +
                                std::string(name) + "'");
  }
  FLEET_RETURN_IF_ERROR(CheckTensor(it->second, kind, name, shape));
  return it->second;
}

Status CheckTensor(const at::Tensor& t, std::string_view kind, std::string_view name,
                   std::initializer_list<int64_t> shape) {
  if (!at::isFloatingType(t.scalar_type())) {
    return InvalidArgumentError(std::string(kind) + " '" + std::string(name) + "' has dtype " +
                                std::string(DtypeName(t.scalar_type())) +
                                ", expected a floating dtype");
  }
  if (shape.size() != 0) {
    bool match = static_cast<size_t>(t.dim()) == shape.size();
    size_t i = 0;
    for (int64_t want : shape) {
      if (!match) break;
      if (want >= 0 && t.size(static_cast<int64_t>(i)) != want) match = false;
      ++i;
    }
    if (!match) {
      std::ostringstream want_text;
      want_text << "[";
      i = 0;
      for (int64_t want : shape) {
        want_text << (i++ ? ", " : "");
        if (want < 0) {
          want_text << "*";
        } else {
          want_text << want;
        }
      }
      want_text << "]";
      return InvalidArgumentError(std::string(kind) + " '" + std::string(name) + "' has shape " +
                                  ShapeString(t.sizes()) + ", expected " + want_text.str());
    }
  }
  return Status::OK();
}

StatusOr<nlohmann::json> ParseConfig(std::string_view family, std::string_view text) {
  nlohmann::json config = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded()) {
    return InvalidArgumentError(std::string(family) + " config: not valid JSON: '" +
                                std::string(text.substr(0, 200)) + "'");
  }
  if (!config.is_object()) {
    return InvalidArgumentError(std::string(family) + " config: expected a JSON object");
  }
  return config;
}

StatusOr<int64_t> IntField(const nlohmann::json& config, std::string_view family,
                           std::string_view key, int64_t min) {
  auto it = config.find(std::string(key));
  if (it == config.end()) {
    return InvalidArgumentError(std::string(family) + " config: missing field '" +
                                std::string(key) + "'");
  }
  if (!it->is_number_integer()) {
    return InvalidArgumentError(std::string(family) + " config: field '" + std::string(key) +
                                "' must be an integer, got " + it->dump());
  }
  int64_t v = it->get<int64_t>();
  if (v < min) {
    return InvalidArgumentError(std::string(family) + " config: field '" + std::string(key) +
                                "' is " + std::to_string(v) +
                                ", must be >= " + std::to_string(min));
  }
  return v;
}

std::string_view DtypeName(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    case at::kDouble:
      return "float64";
    case at::kLong:
      return "int64";
    case at::kInt:
      return "int32";
    case at::kByte:
      return "uint8";
    case at::kChar:
      return "int8";
    case at::kBool:
      return "bool";
    default:
      return c10::toString(dtype);
  }
}

at::Tensor Linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (x.scalar_type() == at::kHalf && x.device().is_cpu()) {
    return at::linear(x.to(at::kFloat), weight.to(at::kFloat),
                      bias.defined() ? bias.to(at::kFloat) : bias)
        .to(at::kHalf);
  }
  return at::linear(x, weight, bias);
}

at::Tensor GeluTanh(const at::Tensor& x) {
  return Fp16Safe(x, [](const at::Tensor& v) { return at::gelu(v, "tanh"); });
}

at::Tensor Silu(const at::Tensor& x) {
  return Fp16Safe(x, [](const at::Tensor& v) { return at::silu(v); });
}

at::Tensor LayerNorm(const at::Tensor& x, double eps) {
  return Fp16Safe(x, [&](const at::Tensor& v) {
    return at::layer_norm(v, {v.size(-1)}, /*weight=*/{}, /*bias=*/{}, eps);
  });
}

at::Tensor LayerNormAffine(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           double eps) {
  return Fp16Safe(x, [&](const at::Tensor& v) {
    return at::layer_norm(v, {v.size(-1)}, weight.to(v.scalar_type()), bias.to(v.scalar_type()),
                          eps);
  });
}

at::Tensor Matmul(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kHalf && a.device().is_cpu()) {
    return at::matmul(a.to(at::kFloat), b.to(at::kFloat)).to(at::kHalf);
  }
  return at::matmul(a, b);
}

at::Tensor Modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                    double eps) {
  at::Tensor normed = LayerNorm(x, eps);
  at::Tensor one_plus = scale + 1;
  return Fp16Safe(normed, [&](const at::Tensor& n) {
    return at::addcmul(shift.to(n.scalar_type()), n, one_plus.to(n.scalar_type()));
  });
}

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& gain, at::ScalarType out_dtype,
                   double eps) {
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor r = xf * at::rsqrt(at::mean(xf * xf, {-1}, /*keepdim=*/true) + eps);
  return (r * gain.to(at::kFloat)).to(out_dtype);
}

at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& pe) {
  auto sizes = x.sizes().vec();
  at::Tensor xr = x.to(at::kFloat).reshape({sizes[0], sizes[1], sizes[2], -1, 1, 2});
  at::Tensor out = pe.select(-1, 0) * xr.select(-1, 0) + pe.select(-1, 1) * xr.select(-1, 1);
  return out.reshape(sizes).to(x.scalar_type());
}

StatusOr<at::Tensor> PrepareFloatingWeight(std::string_view family, std::string_view name,
                                           const at::Tensor& stored, at::ScalarType dtype) {
  const std::string where = std::string(family) + ": weight '" + std::string(name) + "'";
  if (!stored.defined()) return InvalidArgumentError(where + " is undefined");
  if (!at::isFloatingType(stored.scalar_type())) {
    return InvalidArgumentError(where + " has dtype " +
                                std::string(DtypeName(stored.scalar_type())) +
                                ", expected a floating dtype");
  }
  at::Tensor out;
  FLEET_RETURN_IF_ERROR(GuardTorch(name, [&]() -> Status {
    out = ConvertWeight(stored, dtype);
    return Status::OK();
  }));
  return out;
}

StatusOr<at::Tensor> FindActivation(const TensorMap& state, std::string_view name,
                                    std::initializer_list<int64_t> shape, at::ScalarType dtype) {
  FLEET_ASSIGN_OR_RETURN(at::Tensor t, Find(state, "state", name, shape));
  if (t.scalar_type() != dtype) {
    return InvalidArgumentError("state '" + std::string(name) + "' has dtype " +
                                std::string(DtypeName(t.scalar_type())) + ", expected " +
                                std::string(DtypeName(dtype)));
  }
  return t;
}

at::Tensor ConvertWeight(const at::Tensor& stored, at::ScalarType dtype) {
  if (!at::isFloatingType(stored.scalar_type())) return stored;
  return stored.to(dtype).contiguous();
}

}  // namespace fleet::models::internal

namespace fleet::models {

at::Tensor ScaledDotAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              int64_t max_rows, const at::Tensor& mask) {
  const int64_t b = q.size(0), h = q.size(1), tq = q.size(2), tk = k.size(2), d = q.size(3);
#if FLEET_HAS_SDPA
  if (q.is_cuda()) {
    return at::scaled_dot_product_attention(q, k, v,
                                            mask.defined() ? mask.to(q.scalar_type()) : mask)
        .permute({0, 2, 1, 3})
        .reshape({b, tq, -1});
  }
#endif
  const int64_t rows =
      max_rows > 0 ? std::min(max_rows, tq) : families::AttentionChunkRows(b * h, tq, tk);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const at::Tensor kt = k.to(at::kFloat).transpose(-1, -2);
  at::Tensor out = at::empty({b, tq, h, v.size(3)}, v.options());
  for (int64_t r0 = 0; r0 < tq; r0 += rows) {
    const int64_t n = std::min(rows, tq - r0);
    at::Tensor sim = at::matmul(q.narrow(2, r0, n).to(at::kFloat), kt) * scale;
    if (mask.defined()) sim = sim + (mask.size(-2) == 1 ? mask : mask.narrow(-2, r0, n));
    at::Tensor p = at::softmax(sim, -1).to(v.scalar_type());
    out.narrow(1, r0, n).copy_(internal::Matmul(p, v).permute({0, 2, 1, 3}));  // [B, n, H, d]
  }
  return out.view({b, tq, -1});
}

}  // namespace fleet::models
