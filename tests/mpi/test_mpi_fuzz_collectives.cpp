// Random SPMD programs of local ops and collectives (psum, pmean, all_gather, reduce_scatter, broadcast,
// ppermute, all_to_all) over the axes of a 2-D mesh, against a simulation of every rank in one process
// written with plain ops (sums, concatenations, slices): each rank's values, and each rank's gradient of
// the sum over all ranks of <out_r, cot_r> (JAX's SPMD convention) against the simulation's gradient
// with respect to that rank's inputs, and likewise second derivatives (the gradient of the sum over
// ranks of <gradient_r, w_r>). Every rank draws the same program from a shared seed (the shapes
// agree across ranks) and every rank's inputs from (trial, rank). FUZZ_SEED explores other draws.
#include <catch2/catch.hpp>

#include <algorithm>
#include <functional>
#include <numeric>
#include <optional>

#include "../unit/fuzz_program.h"
#include "mpi_util.h"
#include "parallel/collectives.h"

using namespace titanax;
using namespace mpitest;
namespace fz = titanax::testing::fuzz;

namespace {

// A step: `local` runs on this rank (collectives talk to the others); `sim` maps every rank's values
// (by world rank) to every rank's result.
struct DStep {
  std::string what;
  std::function<Tensor(const TensorList&)> local;
  std::function<TensorList(const std::vector<TensorList>&)> sim;
};

struct DProgram {
  std::vector<DStep> steps;
  Tensor run(const TensorList& in) const {
    TensorList v = in;
    for (const auto& s : steps) v.push_back(s.local(v));
    return v.back();
  }
  // Every rank's result from every rank's inputs.
  TensorList simulate(const std::vector<TensorList>& in) const {
    std::vector<TensorList> v = in;
    for (const auto& s : steps) {
      const TensorList r = s.sim(v);
      for (size_t w = 0; w < v.size(); ++w) v[w].push_back(r[w]);
    }
    TensorList out;
    for (const auto& vw : v) out.push_back(vw.back());
    return out;
  }
  std::string str(int inputs) const {
    std::string s;
    for (size_t i = 0; i < steps.size(); ++i) s += "v" + std::to_string(inputs + int(i)) + " = " + steps[i].what + "\n";
    return s;
  }
};

struct CollectiveGen {
  fz::Gen z;
  std::vector<std::string> axes;
  std::vector<int> shape;  // mesh shape

  int one_of(const std::vector<int>& v) { return v[size_t(z.pick(0, int64_t(v.size()) - 1))]; }
  // Ranks of world rank w's group along axis a, in axis-index order.
  std::vector<int> group(int w, size_t a) const { return group_of(shape, w, a); }

  DStep local(const TensorList& v) {
    fz::Step s = z.candidate(v);
    auto run = s.run;
    return {s.what, run, [run](const std::vector<TensorList>& all) {
              TensorList r;
              for (const auto& vw : all) r.push_back(run(vw));
              return r;
            }};
  }

  // A collective over a random axis on a random value, drawn so that it fits the shapes.
  std::optional<DStep> collective(const TensorList& v) {
    const size_t i = size_t(z.pick(0, int64_t(v.size()) - 1));
    const size_t a = size_t(z.pick(0, int64_t(axes.size()) - 1));
    const int k = shape[a];
    const std::string ax = axes[a], V = "v" + std::to_string(i), on = " over '" + ax + "'";
    const Shape s = v[i].shape();
    const int rank = s.rank();
    const CollectiveGen* self = this;
    // sim: for each world rank w, f(values of w's group at i (in axis order), w's index in the group).
    auto per_group = [self, i, a](std::function<Tensor(const TensorList&, int)> f) {
      return [self, i, a, f](const std::vector<TensorList>& all) {
        TensorList r;
        for (int w = 0; w < int(all.size()); ++w) {
          const std::vector<int> g = self->group(w, a);
          TensorList vals;
          for (int m : g) vals.push_back(all[size_t(m)][i]);
          r.push_back(f(vals, int(std::find(g.begin(), g.end(), w) - g.begin())));
        }
        return r;
      };
    };
    auto total = [](const TensorList& vals) {
      Tensor t = vals[0];
      for (size_t m = 1; m < vals.size(); ++m) t = t + vals[m];
      return t;
    };
    switch (z.pick(0, 6)) {
      case 0:
        return DStep{"psum(" + V + ")" + on, [=](const TensorList& x) { return psum(x[i], ax); },
                     per_group([=](const TensorList& vals, int) { return total(vals); })};
      case 1:
        return DStep{"pmean(" + V + ")" + on, [=](const TensorList& x) { return pmean(x[i], ax); },
                     per_group([=](const TensorList& vals, int) { return total(vals) * (1.0 / double(k)); })};
      case 2: {
        if (rank == 0 || s.numel() * k > 256) return std::nullopt;
        const int d = int(z.pick(0, rank - 1));
        return DStep{"all_gather(" + V + ", dim " + std::to_string(d) + ")" + on,
                     [=](const TensorList& x) { return all_gather(x[i], ax, d); },
                     per_group([=](const TensorList& vals, int) { return concat(vals, d); })};
      }
      case 3: {
        std::vector<int> dims;
        for (int d = 0; d < rank; ++d)
          if (s[size_t(d)] % k == 0) dims.push_back(d);
        if (dims.empty()) return std::nullopt;
        const int d = one_of(dims);
        const int64_t m = s[size_t(d)] / k;
        return DStep{"reduce_scatter(" + V + ", dim " + std::to_string(d) + ")" + on,
                     [=](const TensorList& x) { return reduce_scatter(x[i], ax, d); },
                     per_group([=](const TensorList& vals, int idx) { return slice(total(vals), d, idx * m, (idx + 1) * m); })};
      }
      case 4: {
        const int root = int(z.pick(0, k - 1));
        return DStep{"broadcast(" + V + ", root " + std::to_string(root) + ")" + on,
                     [=](const TensorList& x) { return broadcast(x[i], ax, root); },
                     per_group([=](const TensorList& vals, int) { return vals[size_t(root)] * 1.0; })};
      }
      case 5: {
        std::vector<int> dst(static_cast<size_t>(k));
        std::iota(dst.begin(), dst.end(), 0);
        std::shuffle(dst.begin(), dst.end(), z.g);
        std::vector<std::pair<int, int>> perm;
        std::string ps;
        for (int src = 0; src < k; ++src)
          if (z.pick(0, 9) < 7) {
            perm.emplace_back(src, dst[size_t(src)]);
            ps += " " + std::to_string(src) + "->" + std::to_string(dst[size_t(src)]);
          }
        return DStep{"ppermute(" + V + ",{" + ps + " })" + on, [=](const TensorList& x) { return ppermute(x[i], ax, perm); },
                     per_group([=](const TensorList& vals, int idx) {
                       for (auto [src, to] : perm)
                         if (to == idx) return vals[size_t(src)] * 1.0;
                       return zeros_like(vals[0]);
                     })};
      }
      default: {
        std::vector<int> dims;
        for (int d = 0; d < rank; ++d)
          if (s[size_t(d)] % k == 0) dims.push_back(d);
        if (dims.empty()) return std::nullopt;
        const int sd = one_of(dims), cd = int(z.pick(0, rank - 1));
        const int64_t m = s[size_t(sd)] / k;
        return DStep{"all_to_all(" + V + ", split " + std::to_string(sd) + ", concat " + std::to_string(cd) + ")" + on,
                     [=](const TensorList& x) { return all_to_all(x[i], ax, sd, cd); },
                     per_group([=](const TensorList& vals, int idx) {
                       TensorList parts;
                       for (const auto& t : vals) parts.push_back(slice(t, sd, idx * m, (idx + 1) * m));
                       return concat(parts, cd);
                     })};
      }
    }
  }

  DProgram program(const TensorList& in, int length) {
    DProgram p;
    TensorList v = in;
    NoGradGuard ng;
    while (int(p.steps.size()) < length) {
      std::optional<DStep> s;
      if (z.pick(0, 9) < 4) s = collective(v);
      else s = local(v);
      if (!s) continue;
      try {
        Tensor r = s->local(v);  // every rank draws the same steps, so every rank runs (or refuses) them alike
        if (r.numel() == 0 || r.numel() > 256) continue;
        v.push_back(r);
        p.steps.push_back(std::move(*s));
      } catch (const Error&) {
      }
    }
    return p;
  }
};

}  // namespace

TEST_CASE("random SPMD programs of collectives: every rank's values, gradients and second derivatives against a one-process simulation",
          "[mpi][fuzz][collectives]") {
  const int n = world_size();
  std::vector<std::string> axes{"a", "b"};
  std::vector<int> shape{n >= 2 ? 2 : 1, n >= 2 ? n / 2 : 1};
  Mesh mesh = MeshSpec{axes, shape}.build(rt());
  CollectiveGen z{fz::Gen{std::mt19937_64(fz::seed_or(21))}, axes, shape};
  int collectives = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const Shape s0 = fz::small_shape(z.z);
    const Shape s1 = z.z.coin() ? s0 : fz::small_shape(z.z);
    const uint64_t base = z.z.g();
    auto inputs_of = [&](int w) {  // rank w's inputs
      return TensorList{random_normal(RngKey::from_seed(base + 2 * uint64_t(w)), s0, DType::f64),
                        random_normal(RngKey::from_seed(base + 2 * uint64_t(w) + 1), s1, DType::f64)};
    };
    const DProgram prog = z.program(inputs_of(world_rank()), int(z.z.pick(2, 7)));
    const std::string text = prog.str(2);
    collectives += text.find("over '") != std::string::npos;
    const uint64_t cot_seed = z.z.g();
    INFO("trial " << trial << ", mesh {a: " << shape[0] << ", b: " << shape[1] << "}, rank " << world_rank() << ", inputs "
                  << s0.str() << " " << s1.str() << "\n" << text);

    // Distributed: this rank's value, and its gradient of the sum over ranks of <out_r, cot_r>.
    TensorList leaves;
    for (const auto& t : inputs_of(world_rank())) leaves.push_back(t.detach().set_requires_grad());
    const Tensor out = prog.run(leaves);
    auto cot_of = [&](int w) { return random_normal(RngKey::from_seed(cot_seed + uint64_t(w)), out.shape(), DType::f64); };
    BackwardOptions cg;
    cg.create_graph = true;  // for the second derivatives below
    const TensorList got = grad(sum(out * cot_of(world_rank())), leaves, cg);

    // Simulated: all ranks in this process, differentiated as one function of every rank's inputs.
    std::vector<TensorList> all;
    TensorList all_leaves;
    for (int w = 0; w < n; ++w) {
      TensorList in;
      for (const auto& t : inputs_of(w)) in.push_back(t.detach().set_requires_grad()), all_leaves.push_back(in.back());
      all.push_back(in);
    }
    const TensorList sim = prog.simulate(all);
    Tensor loss = sum(sim[0] * cot_of(0));
    for (int w = 1; w < n; ++w) loss = loss + sum(sim[size_t(w)] * cot_of(w));
    const TensorList want = grad(loss, all_leaves, cg);

    CHECK(fz::close(out.detach(), sim[size_t(world_rank())].detach(), 1e-12));
    for (size_t k = 0; k < got.size(); ++k) {
      INFO("gradient of input " << k << ": distributed " << fz::values(got[k]) << ", simulated "
                                << fz::values(want[size_t(world_rank()) * 2 + k]));
      CHECK(fz::close(got[k], want[size_t(world_rank()) * 2 + k], 1e-12));
    }

    // Second derivatives (the vjps of the collectives' vjps): the gradient of the sum over ranks of
    // <gradient_r, w_r>, each rank differentiating its own term, against the simulation's.
    const uint64_t w_seed = z.z.g();
    auto w_of = [&](int w, size_t k) { return random_normal(RngKey::from_seed(w_seed + 2 * uint64_t(w) + k), k ? s1 : s0, DType::f64); };
    Tensor inner = sum(got[0] * w_of(world_rank(), 0)) + sum(got[1] * w_of(world_rank(), 1));
    const TensorList hv = inner.requires_grad() ? grad(inner, leaves) : TensorList{zeros_like(leaves[0]), zeros_like(leaves[1])};
    Tensor all_inner = scalar(0.0, DType::f64);
    for (int w = 0; w < n; ++w)
      for (size_t k = 0; k < 2; ++k) all_inner = all_inner + sum(want[size_t(w) * 2 + k] * w_of(w, k));
    const TensorList want_hv = all_inner.requires_grad() ? grad(all_inner, all_leaves) : TensorList(all_leaves.size());
    for (size_t k = 0; k < hv.size(); ++k) {
      const Tensor& wk = want_hv[size_t(world_rank()) * 2 + k];
      INFO("second derivative, input " << k << ": distributed " << fz::values(hv[k]) << ", simulated "
                                       << (wk.defined() ? fz::values(wk) : std::string("zero")));
      CHECK(fz::close(hv[k], wk.defined() ? wk : zeros_like(hv[k]), 1e-12));
    }
  }
  if (n > 1) CHECK(collectives >= 40);  // most programs talk
}
