// Device mesh: the world's ranks arranged on named axes, row-major (the last axis varies fastest, so a
// "model" axis placed last groups consecutive ranks, as Megatron does). Each axis gets a communicator
// over the ranks that differ only in that axis's coordinate (MPI_Comm_split by the other coordinates).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "parallel/communicator.h"

namespace titanax {

class Runtime;
class Mesh;

/// How a tensor is laid out over mesh axes: one entry per dimension naming the axis that dimension is
/// split over, "" = not split. All entries empty (or an empty spec) = replicated.
using PartitionSpec = std::vector<std::string>;

struct MeshSpec {
  std::vector<std::string> axes;  ///< axis names, e.g. {"data", "model"}
  std::vector<int> shape;         ///< sizes; one may be -1 (inferred from the world size)

  /// Resolves -1 against `world_size` and validates: at least one axis, same number of names and sizes,
  /// unique non-empty names, sizes >= 1 (or one -1), product == world_size. Not collective. Throws
  /// MeshError at `loc`, e.g. "mesh {data: 3} does not divide 4 ranks" (fix: "use -1 for one axis to
  /// infer its size, or run with mpirun -np 3"), "mesh {data: 2} covers 2 of 4 ranks",
  /// "mesh {data: -1, model: -1} has two axes of size -1".
  std::vector<int> resolve(int world_size, Loc loc = Loc::current()) const;
  /// Builds the mesh over rt's world communicator: collective over all ranks, which must pass the same
  /// spec (else MeshError on every rank, not a hang). Splits one communicator per axis, in axis order,
  /// and makes the result Mesh::current(). Throws what resolve() throws.
  Mesh build(const Runtime& rt, Loc loc = Loc::current()) const;
  /// Builds over an explicit world communicator (tests; make_local_communicator() for one rank).
  Mesh build(std::shared_ptr<Communicator> world, Loc loc = Loc::current()) const;
  /// "{data: 2, model: -1}".
  std::string describe() const;
};

class Mesh {
 public:
  Mesh() = default;
  const std::vector<std::string>& axes() const { return axes_; }
  const std::vector<int>& shape() const { return shape_; }
  int size() const;  ///< number of ranks (0 for a default-constructed Mesh)
  int rank() const;  ///< this rank in the world
  /// This rank's coordinates, one per axis (row-major: rank = sum coords[i] * prod(shape[i+1:])).
  const std::vector<int>& coords() const { return coords_; }
  /// Size of an axis; throws MeshError naming the known axes (and the nearest) for an unknown name.
  int axis_size(const std::string& axis, Loc loc = Loc::current()) const;
  /// This rank's coordinate on an axis (MeshError for an unknown axis).
  int axis_index(const std::string& axis, Loc loc = Loc::current()) const;
  /// The communicator over an axis: its rank is this rank's coordinate on the axis (MeshError for an
  /// unknown axis).
  Communicator& comm(const std::string& axis, Loc loc = Loc::current()) const;
  std::shared_ptr<Communicator> comm_ptr(const std::string& axis, Loc loc = Loc::current()) const;
  /// The world communicator the mesh was built over; throws MeshError on a default-constructed Mesh.
  Communicator& world() const;
  bool has_axis(const std::string& axis) const;
  /// Throws MeshError unless `axis` is an axis of this mesh.
  void check_axis(const std::string& axis, Loc loc = Loc::current()) const;
  /// "mesh {data: 2, model: 2} over 4 ranks (mpi); rank 3 at {data: 1, model: 1}".
  std::string describe() const;
  /// "{data: 2, model: 2}": the axes and their sizes, which fix every axis's groups of ranks.
  std::string layout() const;
  /// {"data": 2, "model": 2}: axis sizes as JSON, keys in axis order (what checkpoints record as their
  /// mesh; the order gives the row-major rank coordinates).
  std::string to_json() const;

  /// The mesh collectives use when none is passed: the last one built in this process (the reference
  /// stays valid and follows later builds). Throws MeshError (with the fix) if none was built.
  static const Mesh& current(Loc loc = Loc::current());
  static bool has_current();

 private:
  friend struct MeshSpec;
  std::vector<std::string> axes_;
  std::vector<int> shape_;
  std::vector<int> coords_;
  std::shared_ptr<Communicator> world_;
  std::vector<std::shared_ptr<Communicator>> comms_;
};

}  // namespace titanax
