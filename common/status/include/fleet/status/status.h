// Status and StatusOr<T>: how every fleet module reports failure.
//
// A Status is either OK or a code plus a message a user can act on ("model.safetensors: tensor
// 'img_in.weight' data_offsets [0, 9000] end past the data section (8192 bytes)"). Like
// LevelDB's Status, the OK state is a null pointer, so returning success costs nothing.
// No exception crosses a module boundary: foreign errors (c10::Error, zmq::error_t,
// boost::system::error_code) are translated into a Status where they are caught.
//
// The numeric codes go on the wire (schemas/common.fbs ErrorCode): never renumber them.
//
// Thread safety: Status and StatusOr are values; const methods are safe to call concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace fleet {

enum class StatusCode : uint8_t {
  kOk = 0,
  kInvalidArgument = 1,    // the caller's input is wrong (bad allocation string, bad shape)
  kNotFound = 2,           // a named thing does not exist (model, tensor, file, worker)
  kAlreadyExists = 3,      // a named thing exists and may not be created again
  kOutOfRange = 4,         // an offset or index outside its bounds (file offsets, tensor ids)
  kResourceExhausted = 5,  // a budget is full (device capacity, queue, message size)
  kFailedPrecondition = 6, // the system is not in a state that allows the call
  kUnavailable = 7,        // a peer cannot be reached or went down; retrying may help
  kDeadlineExceeded = 8,   // a deadline passed before the work finished
  kDataLoss = 9,           // stored bytes are corrupt (truncated file, hash mismatch)
  kCancelled = 10,         // the caller cancelled the work
  kUnimplemented = 11,     // a valid request this build does not support yet
  kInternal = 12,          // a broken invariant of ours: a bug
};
inline constexpr int kStatusCodeCount = 13;

/// \return the code's name without the k prefix, e.g. "InvalidArgument".
std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() noexcept = default;  // OK
  Status(StatusCode code, std::string_view message);
  Status(const Status& other);
  Status& operator=(const Status& other);
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  static Status OK() { return Status(); }

  bool ok() const { return state_ == nullptr; }
  StatusCode code() const { return state_ ? state_->code : StatusCode::kOk; }
  /// The message without the code name; empty when OK.
  std::string_view message() const { return state_ ? std::string_view(state_->message) : ""; }
  /// "InvalidArgument: message", or "OK".
  std::string ToString() const;

  /// A copy whose message is "<context>: <message>"; OK stays OK.
  Status WithContext(std::string_view context) const;

  /// Marks a status as deliberately dropped (best-effort cleanup paths).
  void IgnoreError() const {}

  friend bool operator==(const Status& a, const Status& b) {
    return a.code() == b.code() && a.message() == b.message();
  }

 private:
  struct State {
    StatusCode code;
    std::string message;
  };
  std::unique_ptr<State> state_;
};

std::ostream& operator<<(std::ostream& os, const Status& s);

// Factories, one per code: return InvalidArgumentError("...");
Status InvalidArgumentError(std::string_view message);
Status NotFoundError(std::string_view message);
Status AlreadyExistsError(std::string_view message);
Status OutOfRangeError(std::string_view message);
Status ResourceExhaustedError(std::string_view message);
Status FailedPreconditionError(std::string_view message);
Status UnavailableError(std::string_view message);
Status DeadlineExceededError(std::string_view message);
Status DataLossError(std::string_view message);
Status CancelledError(std::string_view message);
Status UnimplementedError(std::string_view message);
Status InternalError(std::string_view message);

/// A value or the Status that explains why there is none.
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  // REQUIRES: !status.ok()  (an OK status without a value is turned into kInternal).
  StatusOr(Status status) : value_(std::move(status)) {  // NOLINT: implicit by design
    if (std::get<Status>(value_).ok()) {
      value_ = InternalError("StatusOr constructed from an OK status without a value");
    }
  }
  StatusOr(const T& value) : value_(value) {}       // NOLINT
  StatusOr(T&& value) : value_(std::move(value)) {}  // NOLINT
  template <typename U>
    requires(std::is_convertible_v<U &&, T> && !std::is_same_v<std::decay_t<U>, Status> &&
             !std::is_same_v<std::decay_t<U>, T>)
  StatusOr(U&& value) : value_(T(std::forward<U>(value))) {}  // NOLINT

  bool ok() const { return std::holds_alternative<T>(value_); }
  Status status() const { return ok() ? Status() : std::get<Status>(value_); }

  // REQUIRES: ok()
  const T& value() const& { return std::get<T>(value_); }
  T& value() & { return std::get<T>(value_); }
  T&& value() && { return std::get<T>(std::move(value_)); }
  const T& operator*() const& { return value(); }
  T& operator*() & { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  const T* operator->() const { return &value(); }
  T* operator->() { return &value(); }

 private:
  std::variant<Status, T> value_;
};

}  // namespace fleet

#define FLEET_STATUS_CONCAT_INNER(a, b) a##b
#define FLEET_STATUS_CONCAT(a, b) FLEET_STATUS_CONCAT_INNER(a, b)

/// Returns the status from the enclosing function when `expr` is not OK.
#define FLEET_RETURN_IF_ERROR(expr)                  \
  do {                                               \
    ::fleet::Status _fleet_status = (expr);          \
    if (!_fleet_status.ok()) return _fleet_status;   \
  } while (0)

/// `FLEET_ASSIGN_OR_RETURN(auto x, MakeX());` declares x from a StatusOr or returns its error.
#define FLEET_ASSIGN_OR_RETURN(lhs, expr) \
  FLEET_ASSIGN_OR_RETURN_IMPL(FLEET_STATUS_CONCAT(_fleet_statusor_, __LINE__), lhs, expr)
#define FLEET_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()

/// Aborts with a message: only for broken internal invariants, never for remote input.
#define FLEET_CHECK(cond)                                                               \
  do {                                                                                  \
    if (!(cond)) ::fleet::internal::CheckFailed(__FILE__, __LINE__, #cond);             \
  } while (0)

namespace fleet::internal {
[[noreturn]] void CheckFailed(const char* file, int line, const char* condition);
}  // namespace fleet::internal
