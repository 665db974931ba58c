#include "autodiff/anomaly.h"

#include <cmath>
#include <cstdlib>
#include <limits>

#include <fmt/format.h>

#include "autodiff/tape.h"
#include "core/op.h"
#include "ops/ops.h"

namespace titanax {

namespace {
thread_local const AnomalyOptions* t_guard = nullptr;  // the innermost guard's options
thread_local bool t_guarded = false;                   // a guard is open (it may say "off")
thread_local std::vector<std::string_view> t_scopes;
thread_local const detail::AnomalyContext* t_context = nullptr;

bool env_on(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::string_view(v) != "0";
}
// The environment's options, or nullptr when neither variable is set.
const AnomalyOptions* env_options() {
  static const AnomalyOptions opts{env_on("TITANAX_DEBUG_NANS"), env_on("TITANAX_DEBUG_INFS")};
  static const bool on = opts.nans || opts.infs;
  return on ? &opts : nullptr;
}
}  // namespace

DetectAnomalyGuard::DetectAnomalyGuard(AnomalyOptions opts) : prev_(t_guard), prev_guarded_(t_guarded), opts_(opts) {
  t_guard = opts_.nans || opts_.infs ? &opts_ : nullptr;
  t_guarded = true;
}
DetectAnomalyGuard::~DetectAnomalyGuard() {
  t_guard = prev_;
  t_guarded = prev_guarded_;
}

const AnomalyOptions* anomaly_options() { return t_guarded ? t_guard : env_options(); }

NameScope::NameScope(std::string_view name) { t_scopes.push_back(name); }
NameScope::~NameScope() { t_scopes.pop_back(); }

std::string current_scope() {
  std::string s;
  for (std::string_view n : t_scopes) {
    if (n.empty()) continue;
    if (!s.empty()) s += '/';
    s += n;
  }
  return s;
}

namespace detail {
AnomalyContext::AnomalyContext(const std::string& what, const char* differentiated)
    : what_(what), differentiated_(differentiated), prev_(t_context) {
  t_context = this;
}
AnomalyContext::~AnomalyContext() { t_context = prev_; }

ScopeOverride::ScopeOverride(std::string_view path) : saved_(std::move(t_scopes)) { t_scopes = {path}; }
ScopeOverride::~ScopeOverride() { t_scopes = std::move(saved_); }
}  // namespace detail

namespace {
// A scope in which the checks' own ops are neither checked, recorded, traced nor profiled as the user's.
struct Unchecked {
  DetectAnomalyGuard off{AnomalyOptions{false, false}};
  NoGradGuard ng;
  NoTraceGuard nt;
};

// The elements of t in row-major order as doubles, on the host (widened exactly from every floating dtype).
std::vector<double> host_values(const Tensor& t) {
  Unchecked u;
  return t.detach().to_vector<double>();
}

template <class T>
NonFiniteCount count_contiguous(const T* p, int64_t n) {
  NonFiniteCount c;
  for (int64_t i = 0; i < n; ++i) {
    const T v = p[i];
    if (std::isfinite(v)) continue;
    if (std::isnan(v)) ++c.nan;
    else if (v > 0) ++c.posinf;
    else ++c.neginf;
  }
  return c;
}

bool reported(const NonFiniteCount& c, const AnomalyOptions& o) {
  return (o.nans && c.nan > 0) || (o.infs && c.posinf + c.neginf > 0);
}

// Whether t may hold a non-finite element: exact for CPU tensors; on a device, one reduction read on the
// host (sum(x * 0) is NaN iff an element is NaN or infinite), so the full count runs only after a hit.
bool may_be_non_finite(const Tensor& t) {
  if (!is_floating(t.dtype()) || t.numel() == 0) return false;
  if (t.device().is_cpu()) return count_non_finite(t).total() > 0;
  Unchecked u;
  const Tensor x = is_half(t.dtype()) ? t.detach().astype(DType::f32) : t.detach();
  return std::isnan(sum(mul(x, scalar_like(0.0, x))).item());
}

std::string index_str(const Shape& shape, int64_t flat) {
  std::vector<int64_t> idx(size_t(shape.rank()));
  for (int a = shape.rank() - 1; a >= 0; --a) {
    idx[size_t(a)] = flat % shape[a];
    flat /= shape[a];
  }
  std::string s = "[";
  for (size_t a = 0; a < idx.size(); ++a) s += (a ? ", " : "") + std::to_string(idx[a]);
  return s + "]";
}

std::string counts_str(const NonFiniteCount& c) {
  std::vector<std::string> parts;
  if (c.nan) parts.push_back(std::to_string(c.nan) + " nan");
  if (c.posinf) parts.push_back(std::to_string(c.posinf) + " +inf");
  if (c.neginf) parts.push_back(std::to_string(c.neginf) + " -inf");
  return join(parts, ", ");
}

// "f32[4, 8]: 3 nan of 32 elements, the first at [0, 5]; the finite ones in [-1.5, 2]" (values scanned on the host).
std::string describe(const Tensor& t, const AnomalyOptions& o) {
  const std::vector<double> v = host_values(t);
  NonFiniteCount c;
  int64_t first = -1;
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (size_t i = 0; i < v.size(); ++i) {
    const double x = v[i];
    if (std::isfinite(x)) {
      lo = std::min(lo, x);
      hi = std::max(hi, x);
      continue;
    }
    std::isnan(x) ? ++c.nan : x > 0 ? ++c.posinf : ++c.neginf;
    if (first < 0 && ((o.nans && std::isnan(x)) || (o.infs && !std::isnan(x)))) first = int64_t(i);
  }
  std::string s = spec_str(t) + ": ";
  if (c.total() == 0) s += "finite";
  else s += counts_str(c) + " of " + std::to_string(v.size()) + " elements";
  if (first >= 0) s += ", the first at " + index_str(t.shape(), first);
  auto num = [&](double x) { return t.dtype() == DType::f64 ? attr_num(x) : fmt::format("{}", float(x)); };
  if (lo <= hi) s += std::string(c.total() ? "; the finite ones" : "") + " in [" + num(lo) + ", " + num(hi) + "]";
  return s;
}

std::string input_name(const Tensor& t, size_t i) {
  return "input " + std::to_string(i) + (t.name().empty() ? "" : " '" + t.name() + "'");
}

bool is_collective(std::string_view op) {
  for (std::string_view c : {"psum", "pmean", "pmax", "all_gather", "reduce_scatter", "broadcast", "ppermute",
                             "all_to_all", "reduce_from_tensor_parallel_region", "gather_from_tensor_parallel_region"})
    if (op == c) return true;
  return false;
}

// The fix for a non-finite value an op created from finite inputs, where one is known. `differentiated`:
// the forward op whose vjp ran `op` (nullptr in a forward pass).
std::string fix_for(std::string_view op, const char* differentiated, const AnomalyOptions& o) {
  if (differentiated) {
    const std::string_view d = differentiated;
    if (d == "sqrt" || d == "rsqrt" || d == "log" || d == "pow" || d == "div" || d == "reciprocal")
      return std::string("the derivative of ") + differentiated + " is not finite at the inputs its forward got (" +
             (d == "sqrt" || d == "pow" ? "sqrt's and x ** p's for p < 1 at 0" : "at a zero input or denominator") +
             "): keep them away from it, e.g. add an epsilon (sqrt(x + eps))";
  }
  if (op == "log")
    return "log is -inf at 0 and nan below it: clamp its input (log(maximum(x, eps))), or compute from logits with "
           "log_softmax / cross_entropy";
  if (op == "sqrt") return "sqrt is nan below 0: clamp its input, sqrt(maximum(x, 0) + eps)";
  if (op == "rsqrt") return "rsqrt is inf at 0 and nan below it: add an epsilon, rsqrt(x + eps)";
  if (op == "div" || op == "reciprocal")
    return "a zero denominator gives inf, and 0 / 0 nan: add an epsilon to the denominator or select around it "
           "with where()";
  if (op == "pow") return "pow of a negative base and a non-integer exponent is nan: clamp the base";
  if (op == "exp") return "exp overflows f32 above 88: subtract the maximum first (softmax and log_softmax do)";
  if (is_collective(op))
    return "this rank's inputs were finite, so another rank's were not, or the reduction overflowed: run every "
           "rank with anomaly detection to find the op there";
  std::string f;
  if (differentiated)
    f = "a gradient became non-finite: look at the forward op named above at the inputs it got (a derivative "
        "infinite there, as sqrt's at 0); if values grow step by step, lower the learning rate or clip the "
        "gradient norm (optimizer.grad_clip)";
  else
    f = "if values grow step by step, lower the learning rate or clip the gradient norm (optimizer.grad_clip); "
        "with fp16, prefer bf16 or a loss scale";
  if (!o.infs) f += "; a nan often comes from an inf (inf - inf, 0 * inf): report infs too (TITANAX_DEBUG_INFS=1) to find it";
  return f;
}
}  // namespace

NonFiniteCount count_non_finite(const Tensor& t) {
  if (!t.defined() || !is_floating(t.dtype()) || t.numel() == 0) return {};
  detail::notify_host_read(t);  // the counts are host values: inside a traced function, a TraceError
  if (t.device().is_cpu() && t.is_contiguous()) {
    if (t.dtype() == DType::f32) return count_contiguous(t.data<float>(), t.numel());
    if (t.dtype() == DType::f64) return count_contiguous(t.data<double>(), t.numel());
  }
  const std::vector<double> v = host_values(t);
  return count_contiguous(v.data(), int64_t(v.size()));
}

namespace detail {
void check_outputs(const AnomalyOptions& opts, const Op& op, const TensorList& in, const TensorList& out,
                   const std::string& where) {
  for (size_t k = 0; k < out.size(); ++k) {
    const Tensor& o = out[k];
    if (!o.defined() || !may_be_non_finite(o)) continue;
    const NonFiniteCount c = count_non_finite(o);
    if (!reported(c, opts)) continue;
    const std::string kind = opts.nans && c.nan ? "nan" : "inf";
    std::string msg = std::string("op '") + op.name() + "'";
    const std::string a = op.attrs();
    if (!a.empty()) msg += "[" + a + "]";
    msg += " produced " + kind + " in output " + std::to_string(k);
    const std::string scope = current_scope();
    if (!scope.empty()) msg += " in '" + scope + "'";
    if (t_context) msg += ", " + t_context->what();
    if (!where.empty()) msg += ", " + where;

    std::string found = "output " + std::to_string(k) + " " + describe(o, opts);
    int bad_input = -1;
    for (size_t i = 0; i < in.size() && bad_input < 0; ++i)
      if (in[i].defined() && reported(count_non_finite(in[i]), opts)) bad_input = int(i);
    std::string fix;
    if (bad_input >= 0) {
      const Tensor& b = in[size_t(bad_input)];
      found += "; " + input_name(b, size_t(bad_input)) + " already held it: " + describe(b, opts);
      fix = "the value came from outside the ops checked: from data, a copy_ / fill_, an optimizer update, a "
            "checkpoint, or an op run before detection was on; check " + input_name(b, size_t(bad_input)) +
            " where it is written";
    } else {
      std::vector<std::string> ins;
      for (size_t i = 0; i < in.size(); ++i)
        if (in[i].defined() && is_floating(in[i].dtype())) ins.push_back(input_name(in[i], i) + " " + describe(in[i], opts));
      found += "; its inputs were finite" + (ins.empty() ? std::string() : " (" + join(ins, "; ") + ")");
      fix = fix_for(op.name(), t_context ? t_context->differentiated() : nullptr, opts);
    }
    const std::string expected =
        std::string(opts.infs ? (opts.nans ? "no nan or inf" : "no inf") : "no nan") + " (anomaly detection is on)";
    throw FloatingPointError(msg, expected, found, fix, Loc());
  }
}
}  // namespace detail

}  // namespace titanax
