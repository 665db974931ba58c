// What an op over a mesh axis needs (the collectives of parallel/collectives.cpp and the tensor-parallel
// region ops of parallel/tp.cpp): the axis group, the axis name for messages, the user's call site, and
// the mesh's layout. Internal to parallel/.
#pragma once

#include <memory>
#include <string>

#include "core/error.h"
#include "parallel/communicator.h"
#include "parallel/mesh.h"

namespace titanax::detail {

struct AxisContext {
  std::shared_ptr<Communicator> comm;
  std::string axis;
  Loc loc;
  std::string mesh;  ///< Mesh::layout()
  int size() const { return comm->size(); }
  int rank() const { return comm->rank(); }
  /// "axis=model size=2 mesh={data: 2, model: 2}", the start of the op's attrs(): with the mesh's layout,
  /// the JIT's CSE never merges ops over the same axis name of meshes whose groups differ.
  std::string attrs() const { return "axis=" + axis + " size=" + std::to_string(size()) + " mesh=" + mesh; }
};

/// The context of `what` on `axis` of `mesh` for tensor x. Throws MeshError for an axis not in the mesh,
/// ValueError for an undefined x (both at loc).
inline AxisContext axis_context(const Mesh& mesh, const std::string& axis, const Tensor& x, const char* what, Loc loc) {
  mesh.check_axis(axis, loc);
  if (!x.defined()) throw ValueError(std::string(what) + " of an undefined tensor", "a defined tensor", "Tensor()", "", loc);
  return {mesh.comm_ptr(axis, loc), axis, loc, mesh.layout()};
}

}  // namespace titanax::detail
