// ParamTree: named tensors in a fixed order, keyed by "/"-joined paths ("layers/0/weight").
// The parameter "tree" of a model, its gradients, optimizer state and checkpoint contents all use it.
#pragma once

#include <functional>
#include <unordered_map>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace titanax {

class ParamTree {
 public:
  using Entry = std::pair<std::string, Tensor>;

  ParamTree() = default;
  ParamTree(std::initializer_list<Entry> entries);

  /// Appends `path`; throws ValueError if it is already present.
  void insert(const std::string& path, Tensor t);
  /// Throws ValueError naming the nearest known path when `path` is absent.
  const Tensor& at(const std::string& path) const;
  Tensor& at(const std::string& path);
  bool contains(const std::string& path) const;
  /// Index of `path` in insertion order, or -1.
  int index_of(const std::string& path) const;

  size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  const Entry& operator[](size_t i) const { return entries_[i]; }
  Entry& operator[](size_t i) { return entries_[i]; }
  auto begin() const { return entries_.begin(); }
  auto end() const { return entries_.end(); }
  auto begin() { return entries_.begin(); }
  auto end() { return entries_.end(); }

  std::vector<std::string> paths() const;
  TensorList tensors() const;
  /// Total number of elements over all tensors.
  int64_t numel() const;
  /// A tree with the same paths and fn applied to each tensor.
  ParamTree map(const std::function<Tensor(const std::string&, const Tensor&)>& fn) const;
  /// Every path of `other` is in this tree with the same shape and dtype, and vice versa; else ValueError
  /// naming the first difference. `what` names the trees for the message.
  void check_same_structure(const ParamTree& other, const std::string& what) const;
  /// Adds `prefix + "/"` to every path.
  ParamTree prefixed(const std::string& prefix) const;

 private:
  std::vector<Entry> entries_;
  std::unordered_map<std::string, size_t> index_;
};

}  // namespace titanax
