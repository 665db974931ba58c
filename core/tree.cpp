#include "core/tree.h"

#include <unordered_map>

namespace titanax {

ParamTree::ParamTree(std::initializer_list<Entry> entries) {
  for (const auto& e : entries) insert(e.first, e.second);
}

void ParamTree::insert(const std::string& path, Tensor t) {
  if (index_.count(path)) throw ValueError("duplicate path in a parameter tree", "unique paths", "'" + path + "' twice");
  index_[path] = entries_.size();
  entries_.emplace_back(path, std::move(t));
}

const Tensor& ParamTree::at(const std::string& path) const {
  auto it = index_.find(path);
  if (it == index_.end())
    throw ValueError("no parameter at path '" + path + "'", "a path in the tree", "'" + path + "'",
                     did_you_mean(path, paths()));
  return entries_[it->second].second;
}

Tensor& ParamTree::at(const std::string& path) {
  return const_cast<Tensor&>(static_cast<const ParamTree*>(this)->at(path));
}

bool ParamTree::contains(const std::string& path) const { return index_.count(path) > 0; }

int ParamTree::index_of(const std::string& path) const {
  auto it = index_.find(path);
  return it == index_.end() ? -1 : int(it->second);
}

std::vector<std::string> ParamTree::paths() const {
  std::vector<std::string> p;
  p.reserve(entries_.size());
  for (const auto& e : entries_) p.push_back(e.first);
  return p;
}

TensorList ParamTree::tensors() const {
  TensorList t;
  t.reserve(entries_.size());
  for (const auto& e : entries_) t.push_back(e.second);
  return t;
}

int64_t ParamTree::numel() const {
  int64_t n = 0;
  for (const auto& e : entries_) n += e.second.numel();
  return n;
}

ParamTree ParamTree::map(const std::function<Tensor(const std::string&, const Tensor&)>& fn) const {
  ParamTree out;
  for (const auto& [p, t] : entries_) out.insert(p, fn(p, t));
  return out;
}

void ParamTree::check_same_structure(const ParamTree& other, const std::string& what) const {
  for (const auto& [p, t] : entries_) {
    if (!other.contains(p))
      throw ValueError(what + ": path missing", "'" + p + "'", "absent", did_you_mean(p, other.paths()));
    const Tensor& o = other.at(p);
    if (o.shape() != t.shape() || o.dtype() != t.dtype())
      throw ValueError(what + ": tensor '" + p + "' differs",
                       std::string(dtype_name(t.dtype())) + t.shape().str(),
                       std::string(dtype_name(o.dtype())) + o.shape().str());
  }
  for (const auto& [p, t] : other)
    if (!contains(p)) throw ValueError(what + ": unexpected path", "only known paths", "'" + p + "'");
}

ParamTree ParamTree::prefixed(const std::string& prefix) const {
  ParamTree out;
  for (const auto& [p, t] : entries_) out.insert(prefix + "/" + p, t);
  return out;
}

}  // namespace titanax
