// Differentiable collectives: each is an Op whose kernel calls the axis's Communicator and whose vjp is
// built from collectives (see collectives.h for the SPMD gradient convention).
#include "parallel/collectives.h"

#include <algorithm>

#include "autodiff/tape.h"
#include "ops/ops.h"
#include "parallel/axis_context.h"
#include "parallel/comm_detail.h"

namespace titanax {
namespace {

using Ctx = detail::AxisContext;

bool reducible(DType t) { return t != DType::bool_; }

Tensor fresh_copy(const Tensor& x, DType dtype) {
  Tensor y = empty(x.shape(), dtype, x.device());
  copy_(y, x);
  return y;
}

/// x [.., d, ..] -> [n, .., d / n, ..] (contiguous): chunk j of axis `dim` moved to the front.
Tensor split_front(const Tensor& x, int dim, int n) {
  Shape s = x.shape();
  s[size_t(dim)] /= n;
  s.insert(dim, n);
  std::vector<int> perm{dim};
  for (int i = 0; i < s.rank(); ++i)
    if (i != dim) perm.push_back(i);
  return x.reshape(s).permute(perm).contiguous();
}

/// r [n, c0, .., ck-1] -> [c0, .., n * c_dim, ..]: the n blocks concatenated along chunk axis `dim`.
Tensor merge_front(const Tensor& r, int dim) {
  const int k = r.dim() - 1;
  std::vector<int> perm;
  for (int i = 0; i < dim; ++i) perm.push_back(i + 1);
  perm.push_back(0);
  for (int i = dim; i < k; ++i) perm.push_back(i + 1);
  Shape s;
  for (int i = 0; i < k; ++i) s.push_back(r.shape()[size_t(i + 1)]);
  s[size_t(dim)] *= r.shape()[0];
  return r.permute(perm).contiguous().reshape(s);
}

class CollectiveOpBase : public Op {
 public:
  explicit CollectiveOpBase(Ctx c) : c_(std::move(c)) {}
  std::string attrs() const override { return c_.attrs() + more_attrs(); }

  bool custom_forward() const override { return true; }
  TensorList forward(const TensorList& in) const override {
    infer(in);
    NoGradGuard ng;
    return {run(in[0])};
  }
  void cpu(const TensorList& in, TensorList& out) const override { run_into(in, out); }
  void cuda(const TensorList& in, TensorList& out) const override { run_into(in, out); }

 protected:
  virtual Tensor compute(const Tensor& x) const = 0;
  virtual std::string more_attrs() const { return {}; }

  Tensor run(const Tensor& x) const {
    try {
      return compute(x);
    } catch (const CollectiveError& e) {  // re-raise at the user's call site, naming the collective
      throw CollectiveError(std::string(name()) + " over axis '" + c_.axis + "': " + e.message(), e.expected(),
                            e.found(), e.suggestion(), c_.loc);
    }
  }
  void run_into(const TensorList& in, TensorList& out) const {
    NoGradGuard ng;
    copy_(out[0], run(in[0]));
  }

  TensorSpec same_spec(const Tensor& x) const { return {x.shape(), x.dtype(), x.device()}; }
  void need_reducible(const Tensor& x) const {
    if (!reducible(x.dtype()))
      throw DTypeError(std::string(name()) + ": dtype cannot be reduced", "f32, f64, f16, bf16, i32, i64 or u8",
                       std::string(dtype_name(x.dtype())), "cast with astype(DType::f32)", c_.loc);
  }
  int norm_dim(int dim, const Tensor& x) const {
    if (x.dim() == 0)
      throw ShapeError(std::string(name()) + " of a 0-d tensor", "a tensor with at least one dimension", x.str(),
                       "reshape it to [1] first", c_.loc);
    return normalize_axis(dim, x.dim(), c_.loc);
  }
  void need_divisible(const Tensor& x, int dim) const {
    if (x.shape()[size_t(dim)] % c_.size() != 0)
      throw ShapeError(std::string(name()) + ": dimension " + std::to_string(dim) + " does not divide by the size of axis '" +
                           c_.axis + "'",
                       "x.shape[" + std::to_string(dim) + "] a multiple of " + std::to_string(c_.size()), x.str(),
                       "pad the tensor or pick a dimension whose size divides by " + std::to_string(c_.size()), c_.loc);
  }

  Ctx c_;
};

Tensor psum_c(const Ctx& c, const Tensor& x);
Tensor pmean_c(const Ctx& c, const Tensor& x);
Tensor all_gather_c(const Ctx& c, const Tensor& x, int dim);
Tensor reduce_scatter_c(const Ctx& c, const Tensor& x, int dim);
Tensor ppermute_c(const Ctx& c, const Tensor& x, const std::vector<std::pair<int, int>>& perm);
Tensor all_to_all_c(const Ctx& c, const Tensor& x, int split_dim, int concat_dim);

class PSum final : public CollectiveOpBase {
 public:
  using CollectiveOpBase::CollectiveOpBase;
  const char* name() const override { return "psum"; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    need_reducible(in[0]);
    return {same_spec(in[0])};
  }
  Tensor compute(const Tensor& x) const override {
    Tensor y = fresh_copy(x, x.dtype());
    c_.comm->all_reduce(y, CollectiveOp::sum);
    return y;
  }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    return {psum_c(c_, ct[0])};
  }
};

class PMean final : public CollectiveOpBase {
 public:
  using CollectiveOpBase::CollectiveOpBase;
  const char* name() const override { return "pmean"; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    if (!is_floating(in[0].dtype()))
      throw DTypeError("pmean of a non-floating tensor", "f32, f64, f16 or bf16", std::string(dtype_name(in[0].dtype())),
                       "use psum for integers, or cast with astype(DType::f32)", c_.loc);
    return {same_spec(in[0])};
  }
  Tensor compute(const Tensor& x) const override {
    const DType work = (x.dtype() == DType::f64) ? DType::f64 : DType::f32;  // halves sum and divide in f32
    Tensor y = fresh_copy(x, work);
    c_.comm->all_reduce(y, CollectiveOp::sum);
    y = mul(y, scalar_like(1.0 / c_.size(), y));
    return work == x.dtype() ? y : fresh_copy(y, x.dtype());
  }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    return {pmean_c(c_, ct[0])};
  }
};

class PMax final : public CollectiveOpBase {
 public:
  using CollectiveOpBase::CollectiveOpBase;
  const char* name() const override { return "pmax"; }
  bool saves_outputs() const override { return true; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    need_reducible(in[0]);
    return {same_spec(in[0])};
  }
  Tensor compute(const Tensor& x) const override {
    Tensor y = fresh_copy(x, x.dtype());
    c_.comm->all_reduce(y, CollectiveOp::max);
    return y;
  }
  TensorList vjp(const TensorList& in, const TensorList& out, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    // Both collectives run on every rank, whatever its mask, so the group stays in step.
    Tensor g = psum_c(c_, ct[0]);
    Tensor hit = eq(in[0], out[0]);
    Tensor zero = scalar_like(0.0, g), one = scalar_like(1.0, g);
    Tensor ties = psum_c(c_, where(hit, one, zero));
    return {where(hit, div(g, maximum(ties, one)), zero)};
  }
};

class AllGather final : public CollectiveOpBase {
 public:
  AllGather(Ctx c, int dim) : CollectiveOpBase(std::move(c)), dim_(dim) {}
  const char* name() const override { return "all_gather"; }
  std::string more_attrs() const override { return " dim=" + std::to_string(dim_); }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    int d = norm_dim(dim_, in[0]);
    TensorSpec s = same_spec(in[0]);
    s.shape[size_t(d)] *= c_.size();
    return {s};
  }
  Tensor compute(const Tensor& x) const override {
    int d = normalize_axis(dim_, x.dim());
    Tensor g = c_.comm->all_gather(x.unsqueeze(0));  // [n, *x.shape], by axis rank
    return merge_front(g, d);
  }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    return {reduce_scatter_c(c_, ct[0], dim_)};
  }

 private:
  int dim_;
};

class ReduceScatter final : public CollectiveOpBase {
 public:
  ReduceScatter(Ctx c, int dim) : CollectiveOpBase(std::move(c)), dim_(dim) {}
  const char* name() const override { return "reduce_scatter"; }
  std::string more_attrs() const override { return " dim=" + std::to_string(dim_); }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    need_reducible(in[0]);
    int d = norm_dim(dim_, in[0]);
    need_divisible(in[0], d);
    TensorSpec s = same_spec(in[0]);
    s.shape[size_t(d)] /= c_.size();
    return {s};
  }
  Tensor compute(const Tensor& x) const override {
    int d = normalize_axis(dim_, x.dim());
    Tensor blocks = split_front(x, d, c_.size());                       // [n, chunk...]
    Tensor mine = c_.comm->reduce_scatter(blocks, CollectiveOp::sum);   // [1, chunk...]
    Shape s = x.shape();
    s[size_t(d)] /= c_.size();
    return mine.reshape(s);
  }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    return {all_gather_c(c_, ct[0], dim_)};
  }

 private:
  int dim_;
};

class Broadcast final : public CollectiveOpBase {
 public:
  Broadcast(Ctx c, int root) : CollectiveOpBase(std::move(c)), root_(root) {}
  const char* name() const override { return "broadcast"; }
  std::string more_attrs() const override { return " root=" + std::to_string(root_); }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    if (root_ < 0 || root_ >= c_.size())
      throw CollectiveError("broadcast over axis '" + c_.axis + "': root out of range",
                            "0 <= root < " + std::to_string(c_.size()), std::to_string(root_), "", c_.loc);
    return {same_spec(in[0])};
  }
  Tensor compute(const Tensor& x) const override {
    Tensor y = fresh_copy(x, x.dtype());
    c_.comm->broadcast(y, root_);
    return y;
  }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    Tensor g = psum_c(c_, ct[0]);  // every rank joins the sum; only the root keeps it
    // By a select on a rank-dependent constant, not a rank-dependent graph: every rank records the same
    // ops, so the backward of this backward (second derivatives) calls the same collectives everywhere.
    const Tensor zero = scalar_like(0.0, g), root = ne(scalar_like(c_.rank() == root_ ? 1.0 : 0.0, g), zero);
    return {where(root, g, zero)};
  }

 private:
  int root_;
};

class PPermute final : public CollectiveOpBase {
 public:
  PPermute(Ctx c, std::vector<std::pair<int, int>> perm) : CollectiveOpBase(std::move(c)), perm_(std::move(perm)) {}
  const char* name() const override { return "ppermute"; }
  std::string more_attrs() const override { return " perm=" + perm_str(); }
  std::vector<TensorSpec> infer(const TensorList& in) const override { return {same_spec(in[0])}; }
  Tensor compute(const Tensor& x) const override {
    if (c_.size() > 1 && detail::collective_checks_enabled()) {
      // sendrecv is point-to-point, so agree on the call first: shapes, dtypes and pairs, on every rank.
      std::string me = detail::tensor_sig(x) + " perm=" + perm_str();
      std::vector<std::string> all = c_.comm->all_gather_string(me);
      if (std::any_of(all.begin(), all.end(), [&](const std::string& s) { return s != all[0]; })) {
        std::vector<std::string> parts;
        for (size_t r = 0; r < all.size(); ++r) parts.push_back("axis rank " + std::to_string(r) + ": " + all[r]);
        throw CollectiveError("ranks disagree on the ppermute call", "the same shape, dtype and pairs on every rank",
                              join(parts, "; "), "compute the pairs from values shared by all ranks");
      }
    }
    int dst = -1, src = -1;
    for (auto [s, d] : perm_) {
      if (s == c_.rank()) dst = d;
      if (d == c_.rank()) src = s;
    }
    return c_.comm->sendrecv(x, dst, src);
  }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    std::vector<std::pair<int, int>> inv;
    for (auto [s, d] : perm_) inv.emplace_back(d, s);
    return {ppermute_c(c_, ct[0], inv)};
  }

 private:
  std::string perm_str() const {
    std::string s = "[";
    for (size_t i = 0; i < perm_.size(); ++i)
      s += (i ? ", (" : "(") + std::to_string(perm_[i].first) + "->" + std::to_string(perm_[i].second) + ")";
    return s + "]";
  }
  std::vector<std::pair<int, int>> perm_;
};

class AllToAll final : public CollectiveOpBase {
 public:
  AllToAll(Ctx c, int split_dim, int concat_dim) : CollectiveOpBase(std::move(c)), split_(split_dim), concat_(concat_dim) {}
  const char* name() const override { return "all_to_all"; }
  std::string more_attrs() const override {
    return " split_dim=" + std::to_string(split_) + " concat_dim=" + std::to_string(concat_);
  }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    int s = norm_dim(split_, in[0]), c = norm_dim(concat_, in[0]);
    need_divisible(in[0], s);
    TensorSpec o = same_spec(in[0]);
    o.shape[size_t(s)] /= c_.size();
    o.shape[size_t(c)] *= c_.size();
    return {o};
  }
  Tensor compute(const Tensor& x) const override {
    int s = normalize_axis(split_, x.dim()), c = normalize_axis(concat_, x.dim());
    Tensor blocks = split_front(x, s, c_.size());     // [n (destination), chunk...]
    Tensor got = c_.comm->all_to_all(blocks);         // [n (source), chunk...]
    return merge_front(got, c);
  }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    return {all_to_all_c(c_, ct[0], concat_, split_)};
  }

 private:
  int split_, concat_;
};

Tensor psum_c(const Ctx& c, const Tensor& x) { return apply1(std::make_shared<PSum>(c), {x}); }
Tensor pmean_c(const Ctx& c, const Tensor& x) { return apply1(std::make_shared<PMean>(c), {x}); }
Tensor all_gather_c(const Ctx& c, const Tensor& x, int dim) { return apply1(std::make_shared<AllGather>(c, dim), {x}); }
Tensor reduce_scatter_c(const Ctx& c, const Tensor& x, int dim) {
  return apply1(std::make_shared<ReduceScatter>(c, dim), {x});
}
Tensor ppermute_c(const Ctx& c, const Tensor& x, const std::vector<std::pair<int, int>>& perm) {
  return apply1(std::make_shared<PPermute>(c, perm), {x});
}
Tensor all_to_all_c(const Ctx& c, const Tensor& x, int split_dim, int concat_dim) {
  return apply1(std::make_shared<AllToAll>(c, split_dim, concat_dim), {x});
}

void check_perm(const Ctx& c, const std::vector<std::pair<int, int>>& perm) {
  const int n = c.size();
  std::vector<int> src_seen(size_t(n), 0), dst_seen(size_t(n), 0);
  for (auto [s, d] : perm) {
    std::string pair = "(";  // built by appends: GCC 12 -O3 warns (-Wrestrict) on "(" + to_string(...)
    pair += std::to_string(s);
    pair += ", ";
    pair += std::to_string(d);
    pair += ")";
    if (s < 0 || s >= n || d < 0 || d >= n)
      throw CollectiveError("ppermute over axis '" + c.axis + "': pair " + pair + " is out of range",
                            "axis indices in [0, " + std::to_string(n) + ")", pair, "", c.loc);
    if (src_seen[size_t(s)]++)
      throw CollectiveError("ppermute over axis '" + c.axis + "': source " + std::to_string(s) + " appears twice",
                            "each source at most once", pair, "send to several ranks with several ppermute calls", c.loc);
    if (dst_seen[size_t(d)]++)
      throw CollectiveError("ppermute over axis '" + c.axis + "': destination " + std::to_string(d) + " appears twice",
                            "each destination at most once", pair, "a rank can receive only one tensor per ppermute", c.loc);
  }
}

}  // namespace

Tensor psum(const Mesh& mesh, const Tensor& x, const std::string& axis, Loc loc) {
  return psum_c(detail::axis_context(mesh, axis, x, "psum", loc), x);
}
Tensor psum(const Tensor& x, const std::string& axis, Loc loc) { return psum(Mesh::current(loc), x, axis, loc); }

Tensor pmean(const Mesh& mesh, const Tensor& x, const std::string& axis, Loc loc) {
  return pmean_c(detail::axis_context(mesh, axis, x, "pmean", loc), x);
}
Tensor pmean(const Tensor& x, const std::string& axis, Loc loc) { return pmean(Mesh::current(loc), x, axis, loc); }

Tensor pmax(const Mesh& mesh, const Tensor& x, const std::string& axis, Loc loc) {
  return apply1(std::make_shared<PMax>(detail::axis_context(mesh, axis, x, "pmax", loc)), {x});
}
Tensor pmax(const Tensor& x, const std::string& axis, Loc loc) { return pmax(Mesh::current(loc), x, axis, loc); }

Tensor all_gather(const Mesh& mesh, const Tensor& x, const std::string& axis, int dim, Loc loc) {
  return all_gather_c(detail::axis_context(mesh, axis, x, "all_gather", loc), x, dim);
}
Tensor all_gather(const Tensor& x, const std::string& axis, int dim, Loc loc) {
  return all_gather(Mesh::current(loc), x, axis, dim, loc);
}

Tensor reduce_scatter(const Mesh& mesh, const Tensor& x, const std::string& axis, int dim, Loc loc) {
  return reduce_scatter_c(detail::axis_context(mesh, axis, x, "reduce_scatter", loc), x, dim);
}
Tensor reduce_scatter(const Tensor& x, const std::string& axis, int dim, Loc loc) {
  return reduce_scatter(Mesh::current(loc), x, axis, dim, loc);
}

Tensor broadcast(const Mesh& mesh, const Tensor& x, const std::string& axis, int root, Loc loc) {
  return apply1(std::make_shared<Broadcast>(detail::axis_context(mesh, axis, x, "broadcast", loc), root), {x});
}
Tensor broadcast(const Tensor& x, const std::string& axis, int root, Loc loc) {
  return broadcast(Mesh::current(loc), x, axis, root, loc);
}

Tensor ppermute(const Mesh& mesh, const Tensor& x, const std::string& axis, const std::vector<std::pair<int, int>>& perm,
                Loc loc) {
  Ctx c = detail::axis_context(mesh, axis, x, "ppermute", loc);
  check_perm(c, perm);
  return ppermute_c(c, x, perm);
}
Tensor ppermute(const Tensor& x, const std::string& axis, const std::vector<std::pair<int, int>>& perm, Loc loc) {
  return ppermute(Mesh::current(loc), x, axis, perm, loc);
}

Tensor all_to_all(const Mesh& mesh, const Tensor& x, const std::string& axis, int split_dim, int concat_dim, Loc loc) {
  return all_to_all_c(detail::axis_context(mesh, axis, x, "all_to_all", loc), x, split_dim, concat_dim);
}
Tensor all_to_all(const Tensor& x, const std::string& axis, int split_dim, int concat_dim, Loc loc) {
  return all_to_all(Mesh::current(loc), x, axis, split_dim, concat_dim, loc);
}

int axis_index(const std::string& axis, Loc loc) { return Mesh::current(loc).axis_index(axis, loc); }
int axis_size(const std::string& axis, Loc loc) { return Mesh::current(loc).axis_size(axis, loc); }

}  // namespace titanax
