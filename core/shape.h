// Shape: a small inline vector of int64 dimensions (rank at most kMaxRank), no heap allocation.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "core/error.h"

namespace titanax {

inline constexpr int kMaxRank = 8;

class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims, Loc loc = Loc::current());
  explicit Shape(const std::vector<int64_t>& dims, Loc loc = Loc::current());
  template <class It>
  Shape(It first, It last) {
    for (; first != last; ++first) push_back(int64_t(*first));
  }

  int rank() const { return n_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  int64_t operator[](size_t i) const { return d_[i]; }
  int64_t& operator[](size_t i) { return d_[i]; }
  const int64_t* begin() const { return d_; }
  const int64_t* end() const { return d_ + n_; }
  int64_t* begin() { return d_; }
  int64_t* end() { return d_ + n_; }
  int64_t back() const { return d_[n_ - 1]; }
  const int64_t* data() const { return d_; }

  void push_back(int64_t v);
  void insert(int pos, int64_t v);
  void erase(int pos);
  void resize(int n, int64_t fill = 0);

  /// Product of the dimensions (1 for a scalar).
  int64_t numel() const;
  /// Row-major (C order) strides in elements for this shape.
  Shape contiguous_strides() const;
  /// "[2, 3, 4]".
  std::string str() const;
  std::vector<int64_t> vec() const { return {begin(), end()}; }

  friend bool operator==(const Shape& a, const Shape& b);
  friend bool operator!=(const Shape& a, const Shape& b) { return !(a == b); }

 private:
  int64_t d_[kMaxRank] = {};
  uint8_t n_ = 0;
};

/// Normalises a possibly negative axis against `rank` (-rank <= axis < rank) to [0, rank); throws
/// ShapeError when out of range, which every axis of a 0-d tensor is.
int normalize_axis(int axis, int rank, Loc loc = Loc::current());

/// NumPy broadcasting of two shapes; throws ShapeError naming both shapes when incompatible.
Shape broadcast_shapes(const Shape& a, const Shape& b, Loc loc = Loc::current());

}  // namespace titanax
