#include "parallel/zero.h"

#include <algorithm>

#include "autodiff/tape.h"
#include "ops/ops.h"
#include "parallel/collectives.h"
#include "parallel/dp.h"

namespace titanax {

ZeroShards::ZeroShards(const Mesh& mesh, const std::string& axis, const ParamTree& params, size_t bucket_bytes, Loc loc)
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
  check_same_parameters(mesh.comm(axis), axis, params, "bucket_bytes " + std::to_string(bucket_bytes), loc);

  // Buckets in parameter order, one dtype each, up to bucket_bytes of padded data over all ranks.
  size_t bytes = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    const size_t b = size_t(params_[i].chunk * n_) * itemsize(params_[i].dtype);
    if (buckets_.empty() || params_[buckets_.back()[0]].dtype != params_[i].dtype || bytes + b > bucket_bytes) {
      buckets_.emplace_back();
      bytes = 0;
    }
    buckets_.back().push_back(i);
    bytes += b;
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto [lo, hi] = range(i);
    masters_.insert(params_[i].path, zeros(Shape{hi - lo}, params_[i].dtype, params[i].second.device()));
  }
}

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

ParamTree ZeroShards::reduce_scatter_mean(const ParamTree& grads) const {
  check_count(grads, "gradients");
  for (size_t i = 0; i < params_.size(); ++i)  // all before the first collective
    if (grads[i].second.shape() != params_[i].shape)
      throw ShapeError("optimizer sharding: the gradient of '" + params_[i].path + "' has another shape",
                       params_[i].shape.str(), grads[i].second.shape().str());
  NoGradGuard ng;
  ParamTree out;
  std::vector<Tensor> parts(params_.size());
  for (const auto& bucket : buckets_) {
    // [n, C_i] per parameter (padded with zeros to n C_i), side by side: row r holds rank r's chunks.
    TensorList cols;
    int64_t S = 0;
    for (size_t i : bucket) {
      const Param& p = params_[i];
      Tensor flat = reshape(grads[i].second.astype(p.dtype), Shape{p.numel});
      if (p.chunk * n_ > p.numel) flat = pad(flat, 0, 0, p.chunk * n_ - p.numel);
      cols.push_back(reshape(flat, Shape{n_, p.chunk}));
      S += p.chunk;
    }
    const Tensor packed = cols.size() == 1 ? cols[0] : concat(cols, 1);
    const Tensor mine = reduce_scatter(mesh_, reshape(packed, Shape{n_ * S}), axis_, 0) * (1.0 / n_);  // [S]
    int64_t at = 0;
    for (size_t i : bucket) {
      const auto [lo, hi] = range(i);
      parts[i] = mine.slice(0, at, at + (hi - lo));
      at += params_[i].chunk;
    }
  }
  for (size_t i = 0; i < params_.size(); ++i) out.insert(params_[i].path, parts[i]);
  return out;
}

ParamTree ZeroShards::all_gather(const ParamTree& parts) const {
  check_count(parts, "parts");
  for (size_t i = 0; i < params_.size(); ++i) {  // all before the first collective
    const auto [lo, hi] = range(i);
    if (parts[i].second.shape() != Shape{hi - lo})
      throw ShapeError("optimizer sharding: this rank's part of '" + params_[i].path + "' has another shape",
                       Shape{hi - lo}.str(), parts[i].second.shape().str());
  }
  NoGradGuard ng;
  std::vector<Tensor> whole(params_.size());
  for (const auto& bucket : buckets_) {
    TensorList segs;  // this rank's chunk of each parameter, padded to C_i
    int64_t S = 0;
    for (size_t i : bucket) {
      const Param& p = params_[i];
      const Tensor& t = parts[i].second;
      const auto [lo, hi] = range(i);
      segs.push_back(hi - lo == p.chunk ? t.astype(p.dtype)
                     : hi == lo        ? zeros(Shape{p.chunk}, p.dtype, t.device())
                                       : pad(t.astype(p.dtype), 0, 0, p.chunk - (hi - lo)));
      S += p.chunk;
    }
    const Tensor packed = segs.size() == 1 ? segs[0] : concat(segs, 0);
    const Tensor all = reshape(titanax::all_gather(mesh_, packed, axis_, 0), Shape{n_, S});  // row r: rank r's
    int64_t at = 0;
    for (size_t i : bucket) {
      const Param& p = params_[i];
      const Tensor flat = reshape(all.slice(1, at, at + p.chunk), Shape{n_ * p.chunk});
      whole[i] = reshape(flat.slice(0, 0, p.numel), p.shape);
      at += p.chunk;
    }
  }
  ParamTree out;
  for (size_t i = 0; i < params_.size(); ++i) out.insert(params_[i].path, whole[i]);
  return out;
}

void ZeroShards::all_gather_into(ParamTree& params) const {
  check_count(params, "parameters");
  const ParamTree whole = all_gather(masters_);
  NoGradGuard ng;
  for (size_t i = 0; i < params_.size(); ++i) copy_(params[i].second, whole[i].second);
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
