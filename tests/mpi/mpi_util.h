// Helpers for the MPI tests (run under mpirun with any number of ranks, including 1). Expected values
// are computed here from rank ids, independently of the code under test.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <titanax/titanax.h>

#include "parallel/collectives.h"
#include "parallel/dp.h"
#include "parallel/mesh.h"
#include "parallel/plan.h"
#include "parallel/runtime.h"

namespace mpitest {

using namespace titanax;

inline Runtime& rt() { return Runtime::instance(); }
inline int world_rank() { return rt().rank(); }
inline int world_size() { return rt().world_size(); }

/// A scratch directory shared by every rank (rank 0 names, creates and finally removes it).
struct SharedDir {
  std::filesystem::path path;
  SharedDir() {
    static std::atomic<int> counter{0};
    const std::string mine = (std::filesystem::temp_directory_path() /
                              ("titanax_mpi_" + std::to_string(::getpid()) + "_" + std::to_string(counter++)))
                                 .string();
    path = rt().world()->all_gather_string(mine)[0];
    if (world_rank() == 0) {
      std::filesystem::remove_all(path);
      std::filesystem::create_directories(path);
    }
    rt().world()->barrier();
  }
  ~SharedDir() {
    rt().world()->barrier();
    std::error_code ec;
    if (world_rank() == 0) std::filesystem::remove_all(path, ec);
  }
};

/// A mesh layout to test: axis names and fixed sizes.
struct MeshCase {
  std::vector<std::string> axes;
  std::vector<int> shape;  // resolved
  std::string name() const {
    std::string s = "{";
    for (size_t i = 0; i < axes.size(); ++i) s += (i ? ", " : "") + axes[i] + ": " + std::to_string(shape[i]);
    return s + "}";
  }
};

/// {data: n} always; {data: 2, model: n/2} when the world size is even.
inline std::vector<MeshCase> mesh_cases() {
  const int n = world_size();
  std::vector<MeshCase> c{{{"data"}, {n}}};
  if (n % 2 == 0) c.push_back({{"data", "model"}, {2, n / 2}});
  return c;
}

/// World ranks of the group along axis `ax` that contains world rank r, in axis-index order
/// (row-major layout: the last axis varies fastest).
inline std::vector<int> group_of(const std::vector<int>& shape, int r, size_t ax) {
  std::vector<int> c(shape.size());
  for (size_t i = shape.size(); i-- > 0;) {
    c[i] = r % shape[i];
    r /= shape[i];
  }
  std::vector<int> out;
  for (int k = 0; k < shape[ax]; ++k) {
    std::vector<int> cc = c;
    cc[ax] = k;
    int rank = 0;
    for (size_t i = 0; i < shape.size(); ++i) rank = rank * shape[i] + cc[i];
    out.push_back(rank);
  }
  return out;
}

/// x[idx] = (wr + 1) * 100 + idx (f64, row-major).
inline Tensor value_of(int wr, const Shape& s) {
  std::vector<double> v(size_t(s.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = (wr + 1) * 100.0 + double(i);
  return from_vector(v, s);
}

inline std::vector<double> vals(const Tensor& t) { return t.to_vector<double>(); }

/// Token ids in [0, n) of shape s, from a seed (the same on every rank for the same seed).
inline Tensor tokens(uint64_t seed, const Shape& s, int64_t n) {
  Tensor u = random_uniform(RngKey::from_seed(seed), s, DType::f64);
  std::vector<int64_t> v;
  for (double x : u.to_vector<double>()) v.push_back(std::min<int64_t>(n - 1, int64_t(x * double(n))));
  return from_vector(v, s);
}

/// Sum over all ranks of a local scalar (the test's own reduction, on the world communicator).
inline double world_sum(double v) {
  Tensor t = scalar(v, DType::f64);
  rt().world()->all_reduce(t);
  return t.item();
}

/// True on every rank iff `ok` on every rank (keeps ranks in step after a failed check).
inline bool all_ranks(bool ok) { return world_sum(ok ? 0.0 : 1.0) == 0.0; }

/// For data-parallel replicas `got` (this rank's parameters) against `want` (the same paths, by position):
/// the largest |got - want| and the largest |got - rank 0's got| over every element (replicas that stay
/// identical give 0). Collective over the mesh axis `axis` (a broadcast per parameter).
struct ReplicaDiff {
  double worst = 0, spread = 0;
};
inline ReplicaDiff replica_diff(const ParamTree& got, const ParamTree& want, const Mesh& mesh, const std::string& axis = "data") {
  ReplicaDiff d;
  for (size_t k = 0; k < want.size(); ++k) {
    Tensor root = got[k].second.clone();
    mesh.comm(axis).broadcast(root, 0);  // rank 0's replica
    const auto a = got[k].second.to_vector<double>(), b = want[k].second.to_vector<double>(), r0 = root.to_vector<double>();
    for (size_t i = 0; i < a.size(); ++i) {
      d.worst = std::max(d.worst, std::fabs(a[i] - b[i]));
      d.spread = std::max(d.spread, std::fabs(a[i] - r0[i]));
    }
  }
  return d;
}

}  // namespace mpitest
