#include "parallel/dp.h"

#include <algorithm>
#include <cstdio>
#include <utility>

#include "autodiff/tape.h"
#include "ops/ops.h"
#include "parallel/collectives.h"
#include "parallel/overlap.h"

namespace titanax {
namespace {

DType pack_dtype(DType t) { return (t == DType::bf16 || t == DType::f16) ? DType::f32 : t; }

std::string hex64(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < s.size()) {
    size_t nl = s.find('\n', start);
    if (nl == std::string::npos) nl = s.size();
    out.push_back(s.substr(start, nl - start));
    start = nl + 1;
  }
  return out;
}

}  // namespace

void check_same_parameters(Communicator& comm, const std::string& axis, const ParamTree& params,
                           const std::string& header, Loc loc) {
  const int n = comm.size();
  if (n == 1) return;
  std::string desc = header + "\n";
  for (const auto& [path, t] : params) desc += "'" + path + "' " + std::string(dtype_name(t.dtype())) + t.shape().str() + "\n";
  std::string digest = hex64(fnv1a(desc)) + " " + std::to_string(params.size());
  std::vector<std::string> digests = comm.all_gather_string(digest);
  bool same = true;
  for (const auto& d : digests) same &= (d == digests[0]);
  if (same) return;
  // Every rank sees the mismatch: gather the full lists and report the same error everywhere.
  std::vector<std::string> all = comm.all_gather_string(desc);
  std::vector<std::string> ref = split_lines(all[0]);
  std::string first;
  std::vector<std::string> differing;
  for (int r = 1; r < n; ++r) {
    if (all[size_t(r)] == all[0]) continue;
    differing.push_back(std::to_string(r));
    if (!first.empty()) continue;
    std::vector<std::string> mine = split_lines(all[size_t(r)]);
    size_t i = 0;
    while (i < ref.size() && i < mine.size() && ref[i] == mine[i]) ++i;
    auto at = [](const std::vector<std::string>& v, size_t i) { return i < v.size() ? v[i] : std::string("(no parameter)"); };
    std::string where = i == 0 ? "in the bucket sizes" : "at parameter index " + std::to_string(i - 1);
    first = where + ": rank 0 has " + at(ref, i) + ", rank " + std::to_string(r) + " has " + at(mine, i);
  }
  throw PlanError("parameter lists differ between the ranks of axis '" + axis + "'",
                  "the same parameter paths, shapes and dtypes (and bucket sizes) on every rank",
                  first + " (ranks differing from rank 0: " + join(differing) + ")",
                  "build the model identically on every rank: same config, no rank-dependent layers", loc);
}

struct GradientSync::State {
  struct Param {
    Shape shape;
    DType dtype;
    Device device;
    int bucket = -1;  // -1: not floating, passed through
    int64_t offset = 0;
  };
  struct Bucket {
    DType dtype;
    Device device;
    int64_t numel = 0;
    Tensor buffer;
  };
  std::shared_ptr<Communicator> comm;
  std::vector<Param> params;
  std::vector<Bucket> buckets;
  std::unique_ptr<detail::OverlappedBuckets> overlap;
};

GradientSync::GradientSync(const Mesh& mesh, const std::string& axis, const ParamTree& params, size_t bucket_bytes,
                           size_t first_bucket_bytes, Loc loc)
    : s_(std::make_unique<State>()) {
  if (!mesh.has_axis(axis)) {
    std::string hint = mesh.axes().empty() ? "build a mesh first" : did_you_mean(axis, mesh.axes());
    throw PlanError("gradient averaging axis '" + axis + "' is not in the mesh", "one of [" + join(mesh.axes()) + "]",
                    "'" + axis + "'", hint, loc);
  }
  s_->comm = mesh.comm_ptr(axis, loc);

  std::string header = "bucket_bytes " + std::to_string(bucket_bytes) + " first_bucket_bytes " + std::to_string(first_bucket_bytes);
  std::vector<std::string> paths;
  std::vector<Shape> shapes;
  for (const auto& [path, t] : params) {
    if (!t.defined())
      throw ValueError("GradientSync: parameter '" + path + "' is an undefined tensor", "defined tensors", "Tensor()", "", loc);
    paths.push_back(path);
    shapes.push_back(t.shape());
    s_->params.push_back({t.shape(), t.dtype(), t.device()});
  }
  check_same_parameters(*s_->comm, axis, params, header, loc);

  // Buckets over the floating parameters in reverse order.
  int cur = -1;
  size_t cur_bytes = 0;
  for (size_t k = params.size(); k-- > 0;) {
    auto& p = s_->params[k];
    if (!is_floating(p.dtype)) continue;
    DType pd = pack_dtype(p.dtype);
    size_t bytes = size_t(p.shape.numel()) * itemsize(pd);
    size_t cap = cur <= 0 ? first_bucket_bytes : bucket_bytes;  // cur 0 (or none yet): the first bucket
    bool fits = cur >= 0 && s_->buckets[size_t(cur)].dtype == pd && s_->buckets[size_t(cur)].device == p.device &&
                cur_bytes + bytes <= cap;
    if (!fits) {
      s_->buckets.push_back({pd, p.device});
      bucket_params_.emplace_back();
      cur = int(s_->buckets.size()) - 1;
      cur_bytes = 0;
    }
    auto& b = s_->buckets[size_t(cur)];
    p.bucket = cur;
    p.offset = b.numel;
    b.numel += p.shape.numel();
    cur_bytes += bytes;
    bucket_params_[size_t(cur)].push_back(k);
  }
  s_->overlap = std::make_unique<detail::OverlappedBuckets>("GradientSync", std::move(paths), std::move(shapes), bucket_params_,
                                                            [this](size_t b) { return launch(b); });
}

GradientSync::~GradientSync() = default;

int GradientSync::axis_size() const { return s_->comm->size(); }

std::function<void(size_t, const Tensor&)> GradientSync::hook() {
  return [this](size_t i, const Tensor& g) { on_grad_ready(i, g); };
}

void GradientSync::on_grad_ready(size_t index, const Tensor& grad) { s_->overlap->report(index, grad); }

std::unique_ptr<CollectiveRequest> GradientSync::launch(size_t bi) {
  auto& s = *s_;
  auto& b = s.buckets[bi];
  NoGradGuard ng;
  b.buffer = empty(Shape{b.numel}, b.dtype, b.device);
  for (size_t k : bucket_params_[bi]) {
    const auto& p = s.params[k];
    Tensor view = make_view(b.buffer, p.shape, p.shape.contiguous_strides(), p.offset);
    const Tensor& g = s.overlap->grad(k);
    if (g.defined()) copy_(view, g);
    else fill_(view, 0.0);
  }
  return s.comm->iall_reduce(b.buffer, CollectiveOp::sum);
}

std::vector<std::string> GradientSync::paths() const { return s_->overlap->paths(); }

ParamTree GradientSync::finish() {
  auto& s = *s_;
  ParamTree out;
  try {
    s.overlap->complete();
    NoGradGuard ng;
    const double inv = 1.0 / s.comm->size();
    std::vector<Tensor> avg(s.buckets.size());
    for (size_t bi = 0; bi < s.buckets.size(); ++bi) {
      Tensor buf = std::exchange(s.buckets[bi].buffer, Tensor());  // freed as its mean is made: one copy at a time
      avg[bi] = s.comm->size() == 1 ? buf : mul(buf, scalar_like(inv, buf));
    }
    for (size_t k = 0; k < s.params.size(); ++k) {
      const auto& p = s.params[k];
      Tensor g;
      if (p.bucket < 0) {
        g = s.overlap->grad(k).defined() ? s.overlap->grad(k) : zeros(p.shape, p.dtype, p.device);
      } else {
        g = make_view(avg[size_t(p.bucket)], p.shape, p.shape.contiguous_strides(), p.offset);
        if (g.dtype() != p.dtype) g = g.astype(p.dtype);
      }
      out.insert(s.overlap->paths()[k], g);
    }
  } catch (...) {
    reset();
    throw;
  }
  reset();
  return out;
}

ParamTree GradientSync::sync(const ParamTree& grads) {
  auto& s = *s_;
  if (s.overlap->in_step())
    throw ValueError("GradientSync::sync() while an overlapped step is in progress",
                     "finish() before sync()", "gradients already reported through on_grad_ready");
  for (const auto& [path, t] : grads)
    if (const auto& ps = s.overlap->paths(); std::find(ps.begin(), ps.end(), path) == ps.end())
      throw ValueError("GradientSync::sync(): unexpected gradient path '" + path + "'", "the parameters' paths",
                       "'" + path + "'");
  try {
    for (size_t k = s.params.size(); k-- > 0;) on_grad_ready(k, grads.at(s.overlap->paths()[k]));
  } catch (...) {
    reset();
    throw;
  }
  return finish();
}

void GradientSync::reset() {
  s_->overlap->reset();
  for (auto& b : s_->buckets) b.buffer = Tensor();
}

DataShard data_shard(const Mesh& mesh, const Plan& plan, Loc loc) {
  if (!plan.dp) return {0, 1};
  plan.validate(mesh, loc);
  return {mesh.axis_index(plan.dp->axis, loc), mesh.axis_size(plan.dp->axis, loc)};
}

RngKey rank_key(RngKey base, const Mesh& mesh) { return fold_in(base, uint64_t(mesh.rank())); }

ParamTree bucketed_pmean(const Mesh& mesh, const ParamTree& grads, const std::string& axis, size_t bucket_bytes,
                         Loc loc) {
  ParamTree out = grads;
  std::vector<size_t> bucket;
  size_t bytes = 0;
  auto flush = [&] {
    if (bucket.empty()) return;
    TensorList flat;
    for (size_t i : bucket) flat.push_back(reshape(grads[i].second, Shape{grads[i].second.numel()}));
    const Tensor mean = pmean(mesh, flat.size() == 1 ? flat[0] : concat(flat, 0), axis, loc);
    int64_t at = 0;
    for (size_t i : bucket) {
      const Tensor& g = grads[i].second;
      out[i].second = reshape(mean.slice(0, at, at + g.numel()), g.shape());
      at += g.numel();
    }
    bucket.clear();
    bytes = 0;
  };
  for (size_t k = grads.size(); k-- > 0;) {
    const Tensor& g = grads[k].second;
    if (!is_floating(g.dtype())) continue;
    if (!bucket.empty() && (grads[bucket[0]].second.dtype() != g.dtype() || bytes + g.nbytes() > bucket_bytes)) flush();
    bucket.push_back(k);
    bytes += g.nbytes();
  }
  flush();
  return out;
}

}  // namespace titanax
