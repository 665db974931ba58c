#include "core/shape.h"

#include "core/device.h"

namespace titanax {

Shape::Shape(std::initializer_list<int64_t> dims, Loc loc) {
  if (dims.size() > size_t(kMaxRank))
    throw ShapeError("rank too large", "at most " + std::to_string(kMaxRank) + " dimensions",
                     std::to_string(dims.size()), "reshape to fewer dimensions", loc);
  for (auto v : dims) d_[n_++] = v;
}

Shape::Shape(const std::vector<int64_t>& dims, Loc loc) {
  if (dims.size() > size_t(kMaxRank))
    throw ShapeError("rank too large", "at most " + std::to_string(kMaxRank) + " dimensions",
                     std::to_string(dims.size()), "reshape to fewer dimensions", loc);
  for (auto v : dims) d_[n_++] = v;
}

void Shape::push_back(int64_t v) {
  if (n_ >= kMaxRank)
    throw ShapeError("rank too large", "at most " + std::to_string(kMaxRank) + " dimensions",
                     std::to_string(n_ + 1));
  d_[n_++] = v;
}

void Shape::insert(int pos, int64_t v) {
  push_back(0);
  for (int i = n_ - 1; i > pos; --i) d_[i] = d_[i - 1];
  d_[pos] = v;
}

void Shape::erase(int pos) {
  for (int i = pos; i + 1 < n_; ++i) d_[i] = d_[i + 1];
  --n_;
}

void Shape::resize(int n, int64_t fill) {
  if (n > kMaxRank) throw ShapeError("rank too large", "at most 8 dimensions", std::to_string(n));
  for (int i = n_; i < n; ++i) d_[i] = fill;
  n_ = uint8_t(n);
}

int64_t Shape::numel() const {
  int64_t p = 1;
  for (int i = 0; i < n_; ++i) p *= d_[i];
  return p;
}

Shape Shape::contiguous_strides() const {
  Shape s;
  s.n_ = n_;
  int64_t acc = 1;
  for (int i = n_ - 1; i >= 0; --i) {
    s.d_[i] = acc;
    acc *= d_[i];
  }
  return s;
}

std::string Shape::str() const {
  std::string s = "[";
  for (int i = 0; i < n_; ++i) {
    if (i) s += ", ";
    s += std::to_string(d_[i]);
  }
  return s + "]";
}

bool operator==(const Shape& a, const Shape& b) {
  if (a.n_ != b.n_) return false;
  for (int i = 0; i < a.n_; ++i)
    if (a.d_[i] != b.d_[i]) return false;
  return true;
}

int normalize_axis(int axis, int rank, Loc loc) {
  int a = axis < 0 ? axis + rank : axis;
  if (a < 0 || a >= rank)  // a 0-d tensor has no axis (its shape has no entry an op could index)
    throw ShapeError("axis out of range",
                     rank == 0 ? std::string("no axis: the tensor is 0-d (reshape it to [1] first)")
                               : "an axis in [" + std::to_string(-rank) + ", " + std::to_string(rank) + ")",
                     std::to_string(axis), "", loc);
  return a;
}

Shape broadcast_shapes(const Shape& a, const Shape& b, Loc loc) {
  int n = std::max(a.rank(), b.rank());
  Shape out;
  out.resize(n);
  for (int i = 0; i < n; ++i) {
    int ia = a.rank() - n + i, ib = b.rank() - n + i;
    int64_t da = ia >= 0 ? a[ia] : 1, db = ib >= 0 ? b[ib] : 1;
    if (da != db && da != 1 && db != 1)
      throw ShapeError("shapes do not broadcast", "equal dimensions or 1 at each position (from the right)",
                       a.str() + " and " + b.str(), "reshape one operand or insert a size-1 axis", loc);
    out[i] = da == 1 ? db : da;
  }
  return out;
}

Device parse_device(const std::string& s) {
  if (s == "cpu" || s == "cpu:0") return Device::cpu();
  if (s.rfind("cuda", 0) == 0) {
    if (s == "cuda") return Device::cuda(0);
    if (s.size() > 5 && s[4] == ':') {
      try {
        return Device::cuda(std::stoi(s.substr(5)));
      } catch (...) {
      }
    }
  }
  throw DeviceError("unknown device", "'cpu', 'cuda' or 'cuda:N'", "'" + s + "'");
}

}  // namespace titanax
