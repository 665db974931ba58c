#include "parallel/mesh.h"

#include <algorithm>
#include <exception>
#include <set>

#include <nlohmann/json.hpp>

#include "parallel/runtime.h"

namespace titanax {
namespace {

std::string braces(const std::vector<std::string>& axes, const std::vector<int>& sizes) {
  std::string s = "{";
  for (size_t i = 0; i < axes.size(); ++i) {
    if (i) s += ", ";
    s += axes[i] + ": " + (i < sizes.size() ? std::to_string(sizes[i]) : std::string("?"));
  }
  return s + "}";
}

struct CurrentMesh {
  Mesh mesh;
  bool set = false;
};
CurrentMesh& current_mesh() {
  static CurrentMesh c;
  return c;
}

}  // namespace

// ---------------------------------------------------------------------------------------------- MeshSpec

std::string MeshSpec::describe() const { return braces(axes, shape); }

std::vector<int> MeshSpec::resolve(int world_size, Loc loc) const {
  const std::string me = "mesh " + describe();
  if (axes.empty())
    throw MeshError("a mesh needs at least one axis", "one or more named axes", me,
                    "MeshSpec{{\"data\"}, {-1}} puts every rank on one data axis", loc);
  if (axes.size() != shape.size())
    throw MeshError(me + " has " + std::to_string(axes.size()) + " axis names but " + std::to_string(shape.size()) +
                        " sizes",
                    "one size per axis name", std::to_string(axes.size()) + " names, " + std::to_string(shape.size()) +
                    " sizes", "give each axis a size (-1 for the one to infer)", loc);
  std::set<std::string> seen;
  for (const auto& a : axes) {
    if (a.empty())
      throw MeshError(me + " has an empty axis name", "non-empty names such as \"data\" or \"model\"", "\"\"", "", loc);
    if (!seen.insert(a).second)
      throw MeshError(me + " names axis '" + a + "' twice", "unique axis names", "'" + a + "' twice",
                      "give every axis its own name", loc);
  }
  int infer = -1;
  int64_t fixed = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      if (infer >= 0)
        throw MeshError(me + " has two axes of size -1", "at most one inferred (-1) axis",
                        "'" + axes[size_t(infer)] + "' and '" + axes[i] + "' are both -1",
                        "give all but one axis a fixed size", loc);
      infer = int(i);
    } else if (shape[i] < 1) {
      throw MeshError(me + ": axis '" + axes[i] + "' has size " + std::to_string(shape[i]), "sizes >= 1 (or -1 to infer)",
                      std::to_string(shape[i]), "use -1 to infer the size from the number of ranks", loc);
    } else {
      fixed *= shape[i];
    }
  }
  if (world_size < 1)
    throw MeshError("a world of " + std::to_string(world_size) + " ranks", "at least 1 rank", std::to_string(world_size), "", loc);
  std::vector<int> out = shape;
  if (infer >= 0) {
    if (world_size % fixed != 0)
      throw MeshError(me + " does not divide " + std::to_string(world_size) + " ranks",
                      "a number of ranks that is a multiple of " + std::to_string(fixed) + " (the product of the fixed sizes)",
                      std::to_string(world_size) + " ranks",
                      "run with a multiple of " + std::to_string(fixed) + " ranks (mpirun -np " + std::to_string(fixed) +
                          ", " + std::to_string(2 * fixed) + ", ...) or change the fixed sizes",
                      loc);
    out[size_t(infer)] = int(world_size / fixed);
    return out;
  }
  if (fixed != world_size) {
    std::string msg = world_size % fixed != 0 ? me + " does not divide " + std::to_string(world_size) + " ranks"
                                              : me + " covers " + std::to_string(fixed) + " of " +
                                                    std::to_string(world_size) + " ranks";
    throw MeshError(msg, "axis sizes whose product is " + std::to_string(world_size) + " (the number of ranks)",
                    me + " = " + std::to_string(fixed) + " ranks",
                    "use -1 for one axis to infer its size, or run with mpirun -np " + std::to_string(fixed), loc);
  }
  return out;
}

Mesh MeshSpec::build(const Runtime& rt, Loc loc) const { return build(rt.world(), loc); }

Mesh MeshSpec::build(std::shared_ptr<Communicator> world, Loc loc) const {
  if (!world)
    throw MeshError("MeshSpec::build without a communicator", "a world communicator (Runtime::world())", "nullptr", "", loc);
  const int n = world->size();
  // Resolve locally, then agree across ranks before any split, so a spec that differs between ranks is an
  // error on every rank rather than a hang in mismatched splits.
  std::vector<int> sizes;
  std::exception_ptr err;
  try {
    sizes = resolve(n, loc);
  } catch (const MeshError&) {
    err = std::current_exception();
  }
  if (n > 1) {
    std::string key = err ? describe() + " (invalid)" : braces(axes, sizes);
    std::vector<std::string> all = world->all_gather_string(key);
    if (std::any_of(all.begin(), all.end(), [&](const std::string& s) { return s != all[0]; })) {
      std::vector<std::string> parts;
      for (int r = 0; r < n; ++r) parts.push_back("rank " + std::to_string(r) + ": " + all[size_t(r)]);
      throw MeshError("ranks built different meshes", "the same MeshSpec on every rank", join(parts, "; "),
                      "build the mesh from values that are the same on every rank (not from the rank id)", loc);
    }
  }
  if (err) std::rethrow_exception(err);

  Mesh m;
  m.axes_ = axes;
  m.shape_ = sizes;
  m.world_ = world;
  m.coords_.assign(axes.size(), 0);
  int r = world->rank();
  for (int i = int(axes.size()) - 1; i >= 0; --i) {  // row-major: the last axis varies fastest
    m.coords_[size_t(i)] = r % sizes[size_t(i)];
    r /= sizes[size_t(i)];
  }
  // One group per axis over the ranks that share every other coordinate; all ranks split in axis order.
  for (size_t a = 0; a < axes.size(); ++a) {
    int color = 0;
    for (size_t b = 0; b < axes.size(); ++b)
      if (b != a) color = color * sizes[b] + m.coords_[b];
    auto c = world->split(color, m.coords_[a]);
    if (c->size() != sizes[a] || c->rank() != m.coords_[a])
      throw InternalError("mesh axis group has the wrong layout",
                          "axis '" + axes[a] + "' group of " + std::to_string(sizes[a]) + " with this rank at " +
                              std::to_string(m.coords_[a]),
                          "a group of " + std::to_string(c->size()) + " with this rank at " + std::to_string(c->rank()));
    m.comms_.push_back(std::move(c));
  }
  CurrentMesh& cur = current_mesh();
  cur.mesh = m;
  cur.set = true;
  return m;
}

// ---------------------------------------------------------------------------------------------- Mesh

int Mesh::size() const { return world_ ? world_->size() : 0; }
int Mesh::rank() const { return world_ ? world_->rank() : 0; }

bool Mesh::has_axis(const std::string& axis) const {
  return std::find(axes_.begin(), axes_.end(), axis) != axes_.end();
}

void Mesh::check_axis(const std::string& axis, Loc loc) const {
  if (has_axis(axis)) return;
  if (axes_.empty())
    throw MeshError("axis '" + axis + "' is not in the mesh: the mesh is empty (default-constructed)",
                    "a mesh built with MeshSpec::build", "Mesh{}",
                    "build one first: auto mesh = MeshSpec{{\"data\"}, {-1}}.build(rt);", loc);
  std::string hint = did_you_mean(axis, axes_);
  const bool near = hint.rfind("did you mean", 0) == 0;
  throw MeshError("axis '" + axis + "' is not in the mesh" + (near ? "; " + hint : ""), "one of [" + join(axes_) + "]",
                  "'" + axis + "'", near ? "use one of the mesh's axes (" + join(axes_) + ")" : hint, loc);
}

int Mesh::axis_size(const std::string& axis, Loc loc) const {
  check_axis(axis, loc);
  return shape_[size_t(std::find(axes_.begin(), axes_.end(), axis) - axes_.begin())];
}

int Mesh::axis_index(const std::string& axis, Loc loc) const {
  check_axis(axis, loc);
  return coords_[size_t(std::find(axes_.begin(), axes_.end(), axis) - axes_.begin())];
}

Communicator& Mesh::comm(const std::string& axis, Loc loc) const { return *comm_ptr(axis, loc); }

std::shared_ptr<Communicator> Mesh::comm_ptr(const std::string& axis, Loc loc) const {
  check_axis(axis, loc);
  return comms_[size_t(std::find(axes_.begin(), axes_.end(), axis) - axes_.begin())];
}

Communicator& Mesh::world() const {
  if (!world_)
    throw MeshError("world() of an empty mesh", "a mesh built with MeshSpec::build", "Mesh{}",
                    "build one first: auto mesh = MeshSpec{{\"data\"}, {-1}}.build(rt);");
  return *world_;
}

std::string Mesh::describe() const {
  if (!world_) return "mesh {} (empty: not built)";
  return "mesh " + braces(axes_, shape_) + " over " + std::to_string(size()) + " rank" + (size() == 1 ? "" : "s") +
         " (" + world_->backend() + "); rank " + std::to_string(rank()) + " at " + braces(axes_, coords_);
}

std::string Mesh::layout() const { return braces(axes_, shape_); }

std::string Mesh::to_json() const {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();  // keys in axis order (checkpoints rely on it)
  for (size_t i = 0; i < axes_.size(); ++i) j[axes_[i]] = shape_[i];
  return j.dump();
}

const Mesh& Mesh::current(Loc loc) {
  CurrentMesh& c = current_mesh();
  if (!c.set)
    throw MeshError("no mesh has been built in this process", "a mesh built before calling collectives",
                    "none", "build one first: auto mesh = MeshSpec{{\"data\"}, {-1}}.build(rt); or pass the mesh "
                    "explicitly (psum(mesh, x, \"data\"))", loc);
  return c.mesh;
}

bool Mesh::has_current() { return current_mesh().set; }

}  // namespace titanax
