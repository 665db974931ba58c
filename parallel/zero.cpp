#include "parallel/zero.h"

#include <algorithm>
#include <utility>

#include "autodiff/tape.h"
#include "ops/ops.h"
#include "parallel/collectives.h"
#include "parallel/dp.h"
#include "parallel/overlap.h"

namespace titanax {

ZeroShards::ZeroShards(const Mesh& mesh, const std::string& axis, const ParamTree& params, size_t bucket_bytes,
                       size_t first_bucket_bytes, Loc loc)
    : mesh_(mesh), axis_(axis) {
  if (!mesh.has_axis(axis))
    throw PlanError("optimizer sharding axis '" + axis + "' is not in the mesh", "one of the mesh's axes",
                    "'" + axis + "'", "name the data-parallel axis (DP::axis)", loc);
  n_ = mesh.axis_size(axis, loc);
  rank_ = mesh.axis_index(axis, loc);
  for (const auto& [path, t] : params) {
    if (!t.defined() || !is_floating(t.dtype()) || !t.is_contiguous() || t.device() != params[0].second.device())
      throw ValueError("optimizer sharding: parameter '" + path + "' is not a contiguous floating tensor on " +
                           params[0].second.device().str(),
                       "contiguous floating-point parameters on one device",
                       t.defined() ? t.str() : std::string("Tensor()"), "shard only trainable floating parameters", loc);
    const int64_t N = t.numel();
    params_.push_back({path, t.shape(), t.dtype(), N, std::max<int64_t>(1, (N + n_ - 1) / n_)});
  }
  check_same_parameters(mesh.comm(axis), axis, params,
                        "bucket_bytes " + std::to_string(bucket_bytes) + " first_bucket_bytes " + std::to_string(first_bucket_bytes),
                        loc);

  // Buckets in reverse parameter order, one dtype each, up to the cap of padded data over all ranks.
  size_t bytes = 0;
  std::vector<Shape> shapes(params_.size());
  for (size_t i = params_.size(); i-- > 0;) {
    const size_t b = size_t(params_[i].chunk * n_) * itemsize(params_[i].dtype);
    const size_t cap = buckets_.size() <= 1 ? first_bucket_bytes : bucket_bytes;  // filling the first bucket
    if (buckets_.empty() || params_[buckets_.back()[0]].dtype != params_[i].dtype || bytes + b > cap) {
      buckets_.emplace_back();
      bytes = 0;
    }
    buckets_.back().push_back(i);
    bytes += b;
    shapes[i] = params_[i].shape;
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto [lo, hi] = range(i);
    masters_.insert(params_[i].path, zeros(Shape{hi - lo}, params_[i].dtype, params[i].second.device()));
  }
  reduced_.resize(buckets_.size());
  overlap_ = std::make_unique<detail::OverlappedBuckets>("optimizer sharding", paths(), shapes, buckets_,
                                                         [this](size_t b) { return launch(b); });
}

ZeroShards::~ZeroShards() = default;

std::vector<std::string> ZeroShards::paths() const {
  std::vector<std::string> out;
  for (const auto& p : params_) out.push_back(p.path);
  return out;
}

std::pair<int64_t, int64_t> ZeroShards::range(size_t i) const {
  const Param& p = params_.at(i);
  return {std::min(p.numel, rank_ * p.chunk), std::min(p.numel, (rank_ + 1) * p.chunk)};
}

Tensor ZeroShards::part_of(size_t i, const Tensor& whole) const {
  const Param& p = params_.at(i);
  if (whole.shape() != p.shape)
    throw ShapeError("optimizer sharding: a tensor for parameter '" + p.path + "' has another shape", p.shape.str(),
                     whole.shape().str());
  const auto [lo, hi] = range(i);
  return reshape(whole, Shape{p.numel}).slice(0, lo, hi);
}

void ZeroShards::check_count(const ParamTree& t, const char* what) const {
  if (t.size() != params_.size())
    throw ValueError(std::string("optimizer sharding: ") + what + " for another number of parameters",
                     std::to_string(params_.size()) + " (those it was made for)", std::to_string(t.size()),
                     "pass one tensor per parameter, in the order of the parameters it was made for");
}

ParamTree ZeroShards::parts_of(const ParamTree& whole) const {
  check_count(whole, "whole tensors");
  ParamTree out;
  for (size_t i = 0; i < params_.size(); ++i) out.insert(params_[i].path, part_of(i, whole[i].second));
  return out;
}

void ZeroShards::load_masters(const ParamTree& params) {
  NoGradGuard ng;
  const ParamTree parts = parts_of(params);
  for (size_t i = 0; i < params_.size(); ++i)
    if (masters_[i].second.numel() > 0) copy_(masters_[i].second, parts[i].second);
}

Tensor ZeroShards::chunk_rows(size_t i, const Tensor& grad) const {
  const Param& p = params_[i];
  Tensor flat = reshape(grad.astype(p.dtype), Shape{p.numel});
  if (p.chunk * n_ > p.numel) flat = pad(flat, 0, 0, p.chunk * n_ - p.numel);
  return reshape(flat, Shape{n_, p.chunk});
}

void ZeroShards::unpack_parts(size_t b, const Tensor& mine, std::vector<Tensor>& parts) const {
  int64_t at = 0;
  for (size_t i : buckets_[b]) {
    const auto [lo, hi] = range(i);
    parts[i] = mine.slice(0, at, at + (hi - lo));
    at += params_[i].chunk;
  }
}

ParamTree ZeroShards::reduce_scatter_mean(const ParamTree& grads) const {
  check_count(grads, "gradients");
  for (size_t i = 0; i < params_.size(); ++i)  // all before the first collective
    if (grads[i].second.shape() != params_[i].shape)
      throw ShapeError("optimizer sharding: the gradient of '" + params_[i].path + "' has another shape",
                       params_[i].shape.str(), grads[i].second.shape().str());
  NoGradGuard ng;
  std::vector<Tensor> parts(params_.size());
  for (size_t b = 0; b < buckets_.size(); ++b) {
    // [n, C_i] per parameter side by side: row r holds rank r's chunks.
    TensorList cols;
    for (size_t i : buckets_[b]) cols.push_back(chunk_rows(i, grads[i].second));
    const Tensor packed = cols.size() == 1 ? cols[0] : concat(cols, 1);
    const Tensor mine = reduce_scatter(mesh_, reshape(packed, Shape{packed.numel()}), axis_, 0) * (1.0 / n_);  // [S]
    unpack_parts(b, mine, parts);
  }
  ParamTree out;
  for (size_t i = 0; i < params_.size(); ++i) out.insert(params_[i].path, parts[i]);
  return out;
}

void ZeroShards::on_grad_ready(size_t i, const Tensor& grad) { overlap_->report(i, grad); }

std::function<void(size_t, const Tensor&)> ZeroShards::hook() {
  return [this](size_t i, const Tensor& g) { on_grad_ready(i, g); };
}

int64_t ZeroShards::bucket_elems(size_t b) const {
  int64_t S = 0;
  for (size_t i : buckets_[b]) S += params_[i].chunk;
  return S;
}

std::unique_ptr<CollectiveRequest> ZeroShards::launch(size_t b) {
  NoGradGuard ng;
  const int64_t S = bucket_elems(b);
  const DType dtype = params_[buckets_[b][0]].dtype;
  const Device device = masters_[0].second.device();
  const Tensor packed = empty(Shape{n_ * S}, dtype, device);
  reduced_[b] = empty(Shape{S}, dtype, device);
  const Tensor rows = reshape(packed, Shape{n_, S});
  int64_t at = 0;
  for (size_t i : buckets_[b]) {
    Tensor cols = rows.slice(1, at, at + params_[i].chunk);
    const Tensor& g = overlap_->grad(i);
    if (g.defined()) copy_(cols, chunk_rows(i, g));
    else fill_(cols, 0.0);
    at += params_[i].chunk;
  }
  return mesh_.comm(axis_).ireduce_scatter(packed, reduced_[b], CollectiveOp::sum);
}

ParamTree ZeroShards::finish() {
  std::vector<Tensor> parts(params_.size());
  try {
    overlap_->complete();
    NoGradGuard ng;
    for (size_t b = 0; b < buckets_.size(); ++b) unpack_parts(b, std::exchange(reduced_[b], Tensor()) * (1.0 / n_), parts);
  } catch (...) {
    reset();
    throw;
  }
  reset();
  ParamTree out;
  for (size_t i = 0; i < params_.size(); ++i) out.insert(params_[i].path, parts[i]);
  return out;
}

void ZeroShards::reset() {
  overlap_->reset();
  for (auto& t : reduced_) t = Tensor();
}

void ZeroShards::check_parts(const ParamTree& parts) const {
  check_count(parts, "parts");
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto [lo, hi] = range(i);
    if (parts[i].second.shape() != Shape{hi - lo})
      throw ShapeError("optimizer sharding: this rank's part of '" + params_[i].path + "' has another shape",
                       Shape{hi - lo}.str(), parts[i].second.shape().str());
  }
}

void ZeroShards::gather_bucket(size_t b, const ParamTree& parts, std::vector<Tensor>& whole) const {
  TensorList segs;  // this rank's chunk of each parameter, padded to C_i
  for (size_t i : buckets_[b]) {
    const Param& p = params_[i];
    const Tensor& t = parts[i].second;
    const auto [lo, hi] = range(i);
    segs.push_back(hi - lo == p.chunk ? t.astype(p.dtype)
                   : hi == lo        ? zeros(Shape{p.chunk}, p.dtype, t.device())
                                     : pad(t.astype(p.dtype), 0, 0, p.chunk - (hi - lo)));
  }
  const Tensor packed = segs.size() == 1 ? segs[0] : concat(segs, 0);
  const Tensor all = reshape(titanax::all_gather(mesh_, packed, axis_, 0), Shape{n_, bucket_elems(b)});  // row r: rank r's
  int64_t at = 0;
  for (size_t i : buckets_[b]) {
    const Param& p = params_[i];
    const Tensor flat = reshape(all.slice(1, at, at + p.chunk), Shape{n_ * p.chunk});
    whole[i] = reshape(flat.slice(0, 0, p.numel), p.shape);
    at += p.chunk;
  }
}

ParamTree ZeroShards::all_gather(const ParamTree& parts) const {
  check_parts(parts);  // all before the first collective
  NoGradGuard ng;
  std::vector<Tensor> whole(params_.size());
  for (size_t b = 0; b < buckets_.size(); ++b) gather_bucket(b, parts, whole);
  ParamTree out;
  for (size_t i = 0; i < params_.size(); ++i) out.insert(params_[i].path, whole[i]);
  return out;
}

void ZeroShards::all_gather_into(ParamTree& params) const {
  check_count(params, "parameters");
  NoGradGuard ng;
  std::vector<Tensor> whole(params_.size());
  for (size_t b = 0; b < buckets_.size(); ++b) {  // one bucket's whole tensors at a time
    gather_bucket(b, masters_, whole);
    for (size_t i : buckets_[b]) copy_(params[i].second, std::exchange(whole[i], Tensor()));
  }
}

std::map<std::string, PartitionSpec> ZeroShards::norm_specs(const std::map<std::string, PartitionSpec>& specs) const {
  std::map<std::string, PartitionSpec> out;
  for (const auto& p : params_) {
    auto it = specs.find(p.path);
    PartitionSpec s = it == specs.end() ? PartitionSpec{} : it->second;
    s.push_back(axis_);
    out[p.path] = s;
  }
  return out;
}

}  // namespace titanax
