#include "jit/fusion.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <queue>

#include "core/error.h"
#include "jit/codegen.h"
#include "jit/fusion_program.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/elementwise_math.h"
#include "kernels/cpu/loops.h"
#include "kernels/cpu/reduce.h"
#include "ops/fused_ops.h"
#include "ops/ops.h"

namespace titanax::jit {
namespace {

using kernels::cpu::BinaryOp;
using kernels::cpu::UnaryOp;
using kernels::cpu::binary_fn;
using kernels::cpu::binary_result_t;
using kernels::cpu::unary_fn;

static_assert(kernels::cpu::kGeneratedRun <= kFusedChunk, "a fused reduction asks for runs of at most one chunk");

bool is_float(DType d) { return d == DType::f32 || d == DType::f64; }
// The floating dtypes of fusable ops: f32, f64, and f16 / bf16 (computed in f32, rounded after each op).
bool is_fusable_float(DType d) { return is_float(d) || is_half(d); }
bool is_register_dtype(DType d) { return is_fusable_float(d) || d == DType::bool_; }
std::string spec_text(const TensorSpec& s) { return std::string(dtype_name(s.dtype)) + s.shape.str(); }

using fused::compute_dtype;
using fused::Instr;
using fused::Program;

}  // namespace

void fused::Program::finalize() {
  const int n = nregs();
  reg_dtype.assign(size_t(n), DType::f32);
  reg_scalar.assign(size_t(n), false);
  out_index.assign(size_t(n), -1);
  for (int i = 0; i < nin(); ++i) {
    reg_dtype[size_t(i)] = inputs[size_t(i)].dtype;
    reg_scalar[size_t(i)] = inputs[size_t(i)].shape.numel() == 1;
  }
  std::vector<int> last(size_t(n), -1);  // last instruction reading each register
  for (size_t k = 0; k < code.size(); ++k) {
    const int r = nin() + int(k);
    reg_dtype[size_t(r)] = code[k].dtype;
    bool scalar = true;
    for (int a : code[k].args) {
      scalar = scalar && reg_scalar[size_t(a)];
      last[size_t(a)] = int(k);
    }
    reg_scalar[size_t(r)] = scalar;
  }
  for (size_t k = 0; k < outputs.size(); ++k) out_index[size_t(outputs[k])] = int(k);
  // Linear scan: a buffer is free again after the last instruction reading its register. The result's
  // buffer is taken before the operands' are freed: a result wider than an operand (f32 -> f64, bool ->
  // f32) written over it would clobber operand values not yet read.
  slot.assign(size_t(n), -1);
  std::vector<int> free_slots;
  auto take = [&]() {
    if (free_slots.empty()) return nslots++;
    const int s = free_slots.back();
    free_slots.pop_back();
    return s;
  };
  nslots = 0;
  for (int i = 0; i < nin(); ++i)
    if (!reg_scalar[size_t(i)]) slot[size_t(i)] = take();
  for (size_t k = 0; k < code.size(); ++k) {
    const int r = nin() + int(k);
    if (!reg_scalar[size_t(r)] && (out_index[size_t(r)] < 0 || is_half(reg_dtype[size_t(r)]))) slot[size_t(r)] = take();
    for (int a : code[k].args)  // an operand read twice (mul(x, x)) is freed once
      if (last[size_t(a)] == int(k) && slot[size_t(a)] >= 0 &&
          std::find(free_slots.begin(), free_slots.end(), slot[size_t(a)]) == free_slots.end())
        free_slots.push_back(slot[size_t(a)]);
  }
  // The text: everything that decides the result, so equal texts mean equal programs.
  text = shape.str() + " in(";
  for (int i = 0; i < nin(); ++i) text += (i ? ", " : "") + spec_text(inputs[size_t(i)]);
  text += ")";
  for (size_t k = 0; k < code.size(); ++k) {
    const Instr& in = code[k];
    text += " r" + std::to_string(nin() + int(k)) + ":" + std::string(dtype_name(in.dtype)) + "=" + in.op->name();
    if (in.kind == Instr::Kind::clamp) {
      char b[96];
      std::snprintf(b, sizeof b, "[%a,%a]", in.lo, in.hi);  // exact
      text += b;
    }
    text += "(";
    for (size_t j = 0; j < in.args.size(); ++j) text += (j ? "," : "") + std::string("r") + std::to_string(in.args[j]);
    text += ")";
  }
  text += " out(";
  for (size_t k = 0; k < outputs.size(); ++k) text += (k ? "," : "") + std::string("r") + std::to_string(outputs[k]);
  text += ")";
}

namespace {

// ------------------------------------------------------------------------------------ the interpreter

// An operand of an instruction over one chunk: a run of values, or one value for every index.
struct Operand {
  const void* p;
  bool scalar;
};

// o[i] = f(a[i]); a scalar operand gives a scalar result (o[0]).
template <class R, class T, class F>
TITANAX_VMATH_INLINE void map1(int64_t n, void* dst, Operand a, F f) {
  R* o = static_cast<R*>(dst);
  const T* x = static_cast<const T*>(a.p);
  if (a.scalar) {
    o[0] = f(x[0]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) o[i] = f(x[i]);
}

// o[i] = f(a[i], b[i]) with the scalar-operand fast paths of the eager loop3.
template <class R, class T, class F>
TITANAX_VMATH_INLINE void map2(int64_t n, void* dst, Operand a, Operand b, F f) {
  R* o = static_cast<R*>(dst);
  const T* x = static_cast<const T*>(a.p);
  const T* y = static_cast<const T*>(b.p);
  if (a.scalar && b.scalar) {
    o[0] = f(x[0], y[0]);
  } else if (b.scalar) {
    const T yv = y[0];
    for (int64_t i = 0; i < n; ++i) o[i] = f(x[i], yv);
  } else if (a.scalar) {
    const T xv = x[0];
    for (int64_t i = 0; i < n; ++i) o[i] = f(xv, y[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) o[i] = f(x[i], y[i]);
  }
}

template <class T>
void run_unary(UnaryOp op, int64_t n, void* d, Operand a) {
  switch (op) {
#define TX_FUSED_UNARY(OP) \
  case UnaryOp::OP: map1<T, T>(n, d, a, [](T v) __attribute__((always_inline)) { return unary_fn<UnaryOp::OP, T>(v); }); break;
    TX_FUSED_UNARY(neg)
    TX_FUSED_UNARY(exp)
    TX_FUSED_UNARY(log)
    TX_FUSED_UNARY(sqrt)
    TX_FUSED_UNARY(rsqrt)
    TX_FUSED_UNARY(tanh)
    TX_FUSED_UNARY(sigmoid)
    TX_FUSED_UNARY(abs)
    TX_FUSED_UNARY(square)
    TX_FUSED_UNARY(reciprocal)
    TX_FUSED_UNARY(relu)
    TX_FUSED_UNARY(gelu_tanh)
    TX_FUSED_UNARY(gelu_erf)
    TX_FUSED_UNARY(sign)
#undef TX_FUSED_UNARY
  }
}

template <class T>
void run_binary(BinaryOp op, int64_t n, void* d, Operand a, Operand b) {
  switch (op) {
#define TX_FUSED_BINARY(OP)                                                                    \
  case BinaryOp::OP:                                                                           \
    map2<binary_result_t<BinaryOp::OP, T>, T>(n, d, a, b, [](T x, T y) __attribute__((always_inline)) { \
      return binary_fn<BinaryOp::OP, T>(x, y);                                                 \
    });                                                                                        \
    break;
    TX_FUSED_BINARY(add)
    TX_FUSED_BINARY(sub)
    TX_FUSED_BINARY(mul)
    TX_FUSED_BINARY(div)
    TX_FUSED_BINARY(maximum)
    TX_FUSED_BINARY(minimum)
    TX_FUSED_BINARY(pow)
    TX_FUSED_BINARY(eq)
    TX_FUSED_BINARY(ne)
    TX_FUSED_BINARY(lt)
    TX_FUSED_BINARY(le)
    TX_FUSED_BINARY(gt)
    TX_FUSED_BINARY(ge)
    TX_FUSED_BINARY(relu_backward)
    TX_FUSED_BINARY(gelu_tanh_backward)
    TX_FUSED_BINARY(gelu_erf_backward)
#undef TX_FUSED_BINARY
  }
}

template <class T>
void run_where(int64_t n, void* d, Operand c, Operand a, Operand b) {
  T* o = static_cast<T*>(d);
  const bool* pc = static_cast<const bool*>(c.p);
  const T* x = static_cast<const T*>(a.p);
  const T* y = static_cast<const T*>(b.p);
  if (c.scalar && a.scalar && b.scalar) n = 1;
  const int64_t sc = c.scalar ? 0 : 1, sa = a.scalar ? 0 : 1, sb = b.scalar ? 0 : 1;
  for (int64_t i = 0; i < n; ++i) o[i] = pc[i * sc] ? x[i * sa] : y[i * sb];
}

template <class D>
void run_cast(DType from, int64_t n, void* d, Operand a) {
  using kernels::cpu::convert;
  switch (from) {
    case DType::f32: map1<D, float>(n, d, a, [](float v) { return convert<D, float>(v); }); break;
    case DType::f64: map1<D, double>(n, d, a, [](double v) { return convert<D, double>(v); }); break;
    case DType::bool_: map1<D, bool>(n, d, a, [](bool v) { return convert<D, bool>(v); }); break;
    default: throw InternalError("fused cast from an unsupported dtype", "f32, f64 or bool", std::string(dtype_name(from)));
  }
}

// Instruction `in` over compute dtypes: its result's `res`, its first operand's `arg0` (f32, f64 or bool).
void run_instr(const Instr& in, DType res, DType arg0, int64_t n, void* d, const Operand* a) {
  switch (in.kind) {
    case Instr::Kind::unary:
      if (res == DType::f32) run_unary<float>(in.unary, n, d, a[0]);
      else run_unary<double>(in.unary, n, d, a[0]);
      return;
    case Instr::Kind::binary:
      if (arg0 == DType::f32) run_binary<float>(in.binary, n, d, a[0], a[1]);
      else run_binary<double>(in.binary, n, d, a[0], a[1]);
      return;
    case Instr::Kind::where:
      if (res == DType::f32) run_where<float>(n, d, a[0], a[1], a[2]);
      else run_where<double>(n, d, a[0], a[1], a[2]);
      return;
    case Instr::Kind::clamp:
      if (res == DType::f32) {
        const float l = float(in.lo), h = float(in.hi);
        map1<float, float>(n, d, a[0], [l, h](float v) { return kernels::cpu::clamp_fn(v, l, h); });
      } else {
        const double l = in.lo, h = in.hi;
        map1<double, double>(n, d, a[0], [l, h](double v) { return kernels::cpu::clamp_fn(v, l, h); });
      }
      return;
    case Instr::Kind::cast:
      if (res == DType::f32) run_cast<float>(arg0, n, d, a[0]);
      else if (res == DType::f64) run_cast<double>(arg0, n, d, a[0]);
      else run_cast<bool>(arg0, n, d, a[0]);
      return;
  }
}

// 16-bit storage of f16 / bf16 registers: body(H{}) with H = bf16_t or f16_t for dtype t, whose
// conversions (core/dtype.h) are the CPU's, as the eager kernels' run_in_f32 rounds.
template <class Body>
void with_half(DType t, Body body) {
  if (t == DType::bf16) body(bf16_t{});
  else body(f16_t{});
}
void widen16(DType t, const void* src, int64_t n, float* dst) {
  with_half(t, [&](auto h) {
    const auto* x = static_cast<const decltype(h)*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = float(x[i]);
  });
}
// v rounded to dtype t in place (values stay f32).
void round16(DType t, float* v, int64_t n) {
  with_half(t, [&](auto h) {
    for (int64_t i = 0; i < n; ++i) v[i] = float(decltype(h)(v[i]));
  });
}
// n 16-bit values from v (one value repeated when scalar).
void narrow16(DType t, const float* v, int64_t n, bool scalar, void* dst) {
  with_half(t, [&](auto h) {
    auto* o = static_cast<decltype(h)*>(dst);
    for (int64_t i = 0; i < n; ++i) o[i] = decltype(h)(v[scalar ? 0 : i]);
  });
}

// Copies n elements of `size` bytes from src (byte stride `stride`, possibly 0) to the contiguous dst.
void gather(char* dst, const char* src, int64_t stride, int64_t n, int64_t size) {
  if (stride == size) {
    std::memcpy(dst, src, size_t(n * size));
  } else if (stride == 0) {
    for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * size, src, size_t(size));
  } else {
    for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * size, src + i * stride, size_t(size));
  }
}

// A program bound to the input tensors of one run: evaluates any range of the output.
class Bound {
 public:
  // force_copy: an input (or -1) whose chunks must be copied before the outputs are written, because an
  // output aliases it (the in-place GEMM epilogue).
  Bound(const Program& p, const TensorList& in, int force_copy = -1) : p_(p), in_(size_t(p.nin())) {
    for (int i = 0; i < p.nin(); ++i) {
      const Tensor& t = in[size_t(i)];
      In& b = in_[size_t(i)];
      b.base = static_cast<char*>(t.raw_data());
      b.size = int64_t(itemsize(t.dtype()));
      b.force_copy = i == force_copy;
      if (!p.reg_scalar[size_t(i)])
        b.L = kernels::cpu::make_layout<1>(p.shape, {kernels::cpu::broadcast_strides(t, p.shape)}, {b.size});
    }
  }

  // Elements [start, start + n) (n <= kFusedChunk) of every output; dst[k] points at output k's element
  // `start` (outputs are contiguous).
  void eval(int64_t start, int64_t n, char* const* dst) const {
    const size_t cells = size_t(p_.nregs());
    thread_local std::vector<double> scratch;  // slots of kFusedChunk values, then one cell per register
    const size_t need = size_t(p_.nslots) * size_t(kFusedChunk) + cells;
    if (scratch.size() < need) scratch.resize(need);
    double* buf = scratch.data();
    double* cell = buf + size_t(p_.nslots) * size_t(kFusedChunk);
    auto slot_ptr = [&](int r) { return reinterpret_cast<char*>(buf + size_t(p_.slot[size_t(r)]) * size_t(kFusedChunk)); };
    thread_local std::vector<Operand> reg;
    reg.resize(cells);
    for (int i = 0; i < p_.nin(); ++i) {
      const bool scalar = p_.reg_scalar[size_t(i)];
      const DType t = p_.reg_dtype[size_t(i)];
      if (!is_half(t)) {
        if (scalar && in_[size_t(i)].force_copy) {  // a one-element GEMM result: its output is written before
          std::memcpy(cell + i, in_[size_t(i)].base, size_t(in_[size_t(i)].size));  // a later instruction reads it
          reg[size_t(i)] = {cell + i, true};
        } else {
          reg[size_t(i)] = {scalar ? in_[size_t(i)].base : load(i, start, n, slot_ptr(i)), scalar};
        }
        continue;
      }
      // Widened into the register's f32 buffer; gathered, when strided, into the slot's upper half.
      float* w = scalar ? reinterpret_cast<float*>(cell + i) : reinterpret_cast<float*>(slot_ptr(i));
      const char* raw = scalar ? in_[size_t(i)].base : load(i, start, n, slot_ptr(i) + kFusedChunk * sizeof(float));
      widen16(t, raw, scalar ? 1 : n, w);
      reg[size_t(i)] = {w, scalar};
    }
    Operand args[3];
    for (size_t k = 0; k < p_.code.size(); ++k) {
      const Instr& ins = p_.code[k];
      const int r = p_.nin() + int(k);
      const bool scalar = p_.reg_scalar[size_t(r)];
      const int out = p_.out_index[size_t(r)];
      void* d = scalar ? static_cast<void*>(cell + r) : p_.slot[size_t(r)] >= 0 ? slot_ptr(r) : static_cast<void*>(dst[out]);
      for (size_t j = 0; j < ins.args.size(); ++j) args[j] = reg[size_t(ins.args[j])];
      run_instr(ins, compute_dtype(ins.dtype), compute_dtype(p_.reg_dtype[size_t(ins.args[0])]), n, d, args);
      reg[size_t(r)] = {d, scalar};
      if (is_half(ins.dtype)) {
        round16(ins.dtype, static_cast<float*>(d), scalar ? 1 : n);
        if (out >= 0) narrow16(ins.dtype, static_cast<const float*>(d), n, scalar, dst[out]);
      } else if (scalar && out >= 0) {
        gather(dst[out], static_cast<const char*>(d), 0, n, int64_t(itemsize(ins.dtype)));
      }
    }
  }

 private:
  struct In {
    char* base = nullptr;
    int64_t size = 0;
    bool force_copy = false;
    kernels::cpu::Layout<1> L;
  };

  // Input i's values for output elements [start, start + n): a pointer into the tensor when they are
  // contiguous there, else gathered into buf.
  const char* load(int i, int64_t start, int64_t n, char* buf) const {
    const In& b = in_[size_t(i)];
    const auto& L = b.L;
    const int last = L.rank - 1;
    const int64_t inner = L.size[last], istr = L.stride[0][last];
    int64_t idx[kMaxRank] = {};
    int64_t rem = start / inner, j = start % inner;
    const char* p = b.base;
    for (int r = last - 1; r >= 0; --r) {
      idx[r] = rem % L.size[r];
      rem /= L.size[r];
      p += idx[r] * L.stride[0][r];
    }
    if (!b.force_copy && istr == b.size && n <= inner - j) return p + j * istr;
    char* o = buf;
    for (int64_t left = n; left > 0;) {
      const int64_t m = std::min(inner - j, left);
      gather(o, p + j * istr, istr, m, b.size);
      o += m * b.size;
      left -= m;
      j = 0;
      for (int r = last - 1; r >= 0; --r) {  // odometer step over the outer axes
        p += L.stride[0][r];
        if (++idx[r] < L.size[r]) break;
        p -= L.stride[0][r] * L.size[r];
        idx[r] = 0;
      }
    }
    return buf;
  }

  const Program& p_;
  std::vector<In> in_;
};

// Evaluates the whole output (numel of the program's shape) into `outs` (contiguous, one per program
// output), chunk by chunk, chunks spread over the OpenMP threads.
void run_chunks(const Program& p, const Bound& b, const TensorList& outs) {
  const int64_t total = p.shape.numel();
  const int64_t nchunks = (total + kFusedChunk - 1) / kFusedChunk;
  std::vector<char*> base(outs.size());
  std::vector<int64_t> size(outs.size());
  for (size_t k = 0; k < outs.size(); ++k) {
    base[k] = static_cast<char*>(outs[k].raw_data());
    size[k] = int64_t(itemsize(outs[k].dtype()));
  }
  const int64_t cost = kFusedChunk * std::max<int64_t>(1, int64_t(p.code.size()));
  kernels::cpu::parallel_for(nchunks, cost, [&](int64_t s, int64_t e) {
    std::vector<char*> dst(outs.size());
    for (int64_t c = s; c < e; ++c) {
      const int64_t start = c * kFusedChunk, n = std::min(kFusedChunk, total - start);
      for (size_t k = 0; k < outs.size(); ++k) dst[k] = base[k] + start * size[k];
      b.eval(start, n, dst.data());
    }
  });
}

// ------------------------------------------------------------------------------------ the fused ops

// What a fused op computes, as public ops: registers 0..nin-1 are its inputs, each step applies `op` to
// registers and appends one register; `outs` are its outputs. Used by the vjp.
struct Step {
  OpPtr op;
  std::vector<int> args;
};

class FusedOp : public Op {
 public:
  FusedOp(std::vector<TensorSpec> in, std::vector<TensorSpec> out, std::vector<Step> steps, std::vector<int> outs)
      : in_(std::move(in)), out_(std::move(out)), steps_(std::move(steps)), outs_(std::move(outs)) {}

  bool differentiable() const override {
    return std::any_of(steps_.begin(), steps_.end(), [](const Step& s) { return s.op->differentiable(); });
  }

  // The inputs must have the shapes and dtypes the program was made for.
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    if (in.size() != in_.size())
      throw ValueError(std::string(name()) + ": wrong number of inputs", std::to_string(in_.size()), std::to_string(in.size()));
    for (size_t i = 0; i < in.size(); ++i) {
      const std::string what = std::string(name()) + " input " + std::to_string(i);
      if (in[i].shape() != in_[i].shape)
        throw ShapeError(what + " has another shape than the program was fused for", in_[i].shape.str(), in[i].shape().str(),
                         "fuse the graph again for these shapes");
      if (in[i].dtype() != in_[i].dtype)
        throw DTypeError(what + " has another dtype than the program was fused for", std::string(dtype_name(in_[i].dtype)),
                         std::string(dtype_name(in[i].dtype())), "fuse the graph again for these dtypes");
    }
    std::vector<TensorSpec> out = out_;
    for (auto& s : out) s.device = in.empty() ? Device::cpu() : in[0].device();
    return out;
  }

  // Re-runs the steps with the public ops (recorded on the tape when grad mode is on) and applies each
  // step's vjp in reverse, summing the cotangents of registers read more than once.
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    const size_t nin = in.size();
    const TensorList reg = registers(in);
    std::vector<bool> need(nin + steps_.size(), false);
    for (size_t i = 0; i < nin; ++i) need[i] = needs[i] && is_fusable_float(in[i].dtype());
    for (size_t s = 0; s < steps_.size(); ++s) {
      for (int a : steps_[s].args) need[nin + s] = need[nin + s] || need[size_t(a)];
      need[nin + s] = need[nin + s] && steps_[s].op->differentiable();
    }
    TensorList grad(reg.size());
    auto accumulate = [&](int r, const Tensor& g) { grad[size_t(r)] = grad[size_t(r)].defined() ? add(grad[size_t(r)], g) : g; };
    for (size_t k = 0; k < outs_.size(); ++k) accumulate(outs_[k], ct[k]);
    for (size_t s = steps_.size(); s-- > 0;) {
      const size_t r = nin + s;
      if (!need[r] || !grad[r].defined()) continue;
      const Step& st = steps_[s];
      TensorList args;
      std::vector<bool> nd;
      for (int a : st.args) {
        args.push_back(reg[size_t(a)]);
        nd.push_back(need[size_t(a)]);
      }
      TensorList g = st.op->vjp(args, {reg[r]}, {grad[r]}, nd);
      for (size_t j = 0; j < st.args.size(); ++j)
        if (nd[j] && g[j].defined()) accumulate(st.args[j], g[j]);
    }
    TensorList res(nin);
    for (size_t i = 0; i < nin; ++i)
      if (needs[i]) res[i] = grad[i];
    return res;
  }

  TensorList run_unfused(const TensorList& in) const override {
    const TensorList reg = registers(in);
    TensorList out;
    for (int r : outs_) out.push_back(reg[size_t(r)]);
    return out;
  }

 protected:
  // The inputs, then each step's result: the steps run with the public ops (through apply()).
  TensorList registers(const TensorList& in) const {
    TensorList reg(in.begin(), in.end());
    for (const Step& st : steps_) {
      TensorList args;
      for (int a : st.args) args.push_back(reg[size_t(a)]);
      reg.push_back(apply1(st.op, args));
    }
    return reg;
  }

  std::vector<TensorSpec> in_, out_;
  std::vector<Step> steps_;
  std::vector<int> outs_;
};

std::vector<Step> program_steps(const Program& p, int first_reg = 0) {
  std::vector<Step> steps;
  for (const Instr& in : p.code) {
    Step s{in.op, {}};
    for (int a : in.args) s.args.push_back(a + first_reg);
    steps.push_back(std::move(s));
  }
  return steps;
}

std::vector<TensorSpec> program_out_specs(const Program& p) {
  std::vector<TensorSpec> out;
  for (int r : p.outputs) out.push_back({p.shape, p.reg_dtype[size_t(r)], Device::cpu()});
  return out;
}

// A program's generated CUDA kernel (jit/codegen.h): the source is made on first use, the loaded kernel
// kept per device, so a replay costs one launch and no lookups.
class GeneratedKernel {
 public:
  // may_alias: an output may share memory with an input (the in-place GEMM epilogue), so the source
  // must not declare its pointers __restrict__.
  GeneratedKernel(const Program& p, bool may_alias) : p_(p), may_alias_(may_alias) {}

  const std::string& source() const {
    std::call_once(once_, [this] { source_ = cuda_source(p_, may_alias_); });
    return source_;
  }

  // Runs the program over CUDA tensors `in` (any strides, broadcasting to the program's shape) into the
  // contiguous outputs `out`.
  void run(const TensorList& in, const TensorList& out) const {
    const int dev = out[0].device().index;
    if (dev < 0 || dev >= kMaxDevices)
      throw DeviceError("fused CUDA kernel: device index out of range", "cuda:0 .. cuda:" + std::to_string(kMaxDevices - 1),
                        out[0].device().str());
    const void* k = kernel_[size_t(dev)].load(std::memory_order_acquire);
    if (!k) {
      k = detail::load_fused_kernel(source(), dev);
      kernel_[size_t(dev)].store(k, std::memory_order_release);
    }
    const int rank = std::max(1, p_.shape.rank());
    const Shape dense = p_.shape.contiguous_strides();
    std::vector<const void*> ip;
    std::vector<void*> op;
    std::vector<int64_t> st;
    bool all_dense = true;
    for (int i = 0; i < p_.nin(); ++i) {
      const Tensor& t = in[size_t(i)];
      ip.push_back(t.raw_data());
      const Shape s = kernels::cpu::broadcast_strides(t, p_.shape);
      for (int d = 0; d < rank; ++d) st.push_back(d < p_.shape.rank() ? s[d] : 0);
      if (p_.reg_scalar[size_t(i)]) continue;
      for (int d = 0; d < p_.shape.rank(); ++d)
        if (p_.shape[d] != 1 && s[d] != dense[d]) all_dense = false;
    }
    for (const Tensor& t : out) op.push_back(t.raw_data());
    detail::launch_fused_kernel(k, dev, ip, op, st, p_.shape.numel(), all_dense);
  }

 private:
  static constexpr int kMaxDevices = 16;
  const Program& p_;
  bool may_alias_;
  mutable std::once_flag once_;
  mutable std::string source_;
  mutable std::array<std::atomic<const void*>, kMaxDevices> kernel_{};
};

class FusedElementwise final : public FusedOp {
 public:
  explicit FusedElementwise(Program p)
      : FusedOp(p.inputs, program_out_specs(p), program_steps(p), p.outputs), p_(std::move(p)), kernel_(p_, false) {}
  const char* name() const override { return "fused"; }
  std::string attrs() const override { return p_.text; }
  void cpu(const TensorList& in, TensorList& out) const override { run_chunks(p_, Bound(p_, in), out); }
  void cuda(const TensorList& in, TensorList& out) const override { kernel_.run(in, out); }
  const Program& program() const { return p_; }
  const GeneratedKernel& kernel() const { return kernel_; }

 private:
  Program p_;
  GeneratedKernel kernel_;
};

// Inputs: the GEMM op's inputs, then the program's inputs except `k`, which is the GEMM's result.
// Outputs: the GEMM's result when `keep` (it is used elsewhere too), then the program's outputs.
class FusedMatmulEpilogue final : public FusedOp {
 public:
  FusedMatmulEpilogue(OpPtr gemm, std::vector<TensorSpec> gemm_in, TensorSpec gemm_out, Program p, int k, bool keep)
      : FusedOp(inputs_of(gemm_in, p, k), outputs_of(gemm_out, p, keep), steps_of(gemm, gemm_in.size(), p, k), outs_of(gemm_in.size(), p, k, keep)),
        gemm_(std::move(gemm)), ngemm_(int(gemm_in.size())), gemm_out_(gemm_out), p_(std::move(p)), k_(k), keep_(keep),
        kernel_(p_, true) {}
  const char* name() const override { return "fused_matmul"; }
  std::string attrs() const override {
    std::string s = std::string("gemm=") + gemm_->name();
    if (const std::string a = gemm_->attrs(); !a.empty()) s += "[" + a + "]";
    return s + " result=r" + std::to_string(k_) + (keep_ ? " kept" : "") + " epilogue=" + p_.text;
  }
  void cpu(const TensorList& in, TensorList& out) const override { run(in, out, false); }
  void cuda(const TensorList& in, TensorList& out) const override { run(in, out, true); }
  const GeneratedKernel& kernel() const { return kernel_; }

 private:
  void run(const TensorList& in, TensorList& out, bool on_cuda) const {
    const TensorList gin(in.begin(), in.begin() + ngemm_);
    // The GEMM writes into an output of its shape and dtype, which the epilogue then rewrites in place.
    Tensor target;
    int alias = -1;
    if (keep_) {
      target = out[0];
    } else {
      for (size_t j = 0; j < out.size() && alias < 0; ++j)
        if (out[j].dtype() == gemm_out_.dtype) alias = int(j);
      target = alias >= 0 ? out[size_t(alias)] : empty(gemm_out_.shape, gemm_out_.dtype, in[0].device());
    }
    TensorList gout{target};
    if (on_cuda) gemm_->cuda(gin, gout);
    else gemm_->cpu(gin, gout);
    TensorList pin;
    for (int j = 0; j < p_.nin(); ++j) pin.push_back(j == k_ ? target : in[size_t(ngemm_ + (j < k_ ? j : j - 1))]);
    const TensorList pout(out.begin() + (keep_ ? 1 : 0), out.end());
    // On CUDA each thread reads every input of its element before writing its outputs, so the epilogue
    // may run in place without a copy (the kernel is generated without __restrict__ for that).
    if (on_cuda) kernel_.run(pin, pout);
    else run_chunks(p_, Bound(p_, pin, alias >= 0 ? k_ : -1), pout);
  }

  static std::vector<TensorSpec> inputs_of(const std::vector<TensorSpec>& gemm_in, const Program& p, int k) {
    std::vector<TensorSpec> in = gemm_in;
    for (int j = 0; j < p.nin(); ++j)
      if (j != k) in.push_back(p.inputs[size_t(j)]);
    return in;
  }
  static std::vector<TensorSpec> outputs_of(const TensorSpec& gemm_out, const Program& p, bool keep) {
    std::vector<TensorSpec> out;
    if (keep) out.push_back(gemm_out);
    for (const auto& s : program_out_specs(p)) out.push_back(s);
    return out;
  }
  // Registers of the op's vjp sequence: its inputs (GEMM's, then the program's but k), the GEMM's result,
  // then the program's instructions.
  static int program_reg(int r, size_t ngemm, const Program& p, int k) {
    const int nin = int(ngemm) + p.nin() - 1;
    if (r == k) return nin;
    if (r < p.nin()) return int(ngemm) + (r < k ? r : r - 1);
    return nin + 1 + (r - p.nin());
  }
  static std::vector<Step> steps_of(const OpPtr& gemm, size_t ngemm, const Program& p, int k) {
    std::vector<Step> steps{{gemm, {}}};
    for (size_t j = 0; j < ngemm; ++j) steps[0].args.push_back(int(j));
    for (const Instr& in : p.code) {
      Step s{in.op, {}};
      for (int a : in.args) s.args.push_back(program_reg(a, ngemm, p, k));
      steps.push_back(std::move(s));
    }
    return steps;
  }
  static std::vector<int> outs_of(size_t ngemm, const Program& p, int k, bool keep) {
    std::vector<int> outs;
    if (keep) outs.push_back(program_reg(k, ngemm, p, k));
    for (int r : p.outputs) outs.push_back(program_reg(r, ngemm, p, k));
    return outs;
  }

  OpPtr gemm_;
  int ngemm_;
  TensorSpec gemm_out_;
  Program p_;
  int k_;
  bool keep_;
  GeneratedKernel kernel_;
};

// sum(program's one output) over the reduced axes, never materialising the program's result.
class FusedReduce final : public FusedOp {
 public:
  FusedReduce(Program p, OpPtr sum, std::vector<bool> reduced, TensorSpec out)
      : FusedOp(p.inputs, {out}, with_sum(program_steps(p), sum, p.outputs[0]), {p.nregs()}),
        sum_(std::move(sum)), p_(std::move(p)), reduced_(std::move(reduced)) {}
  const char* name() const override { return "fused_sum"; }
  std::string attrs() const override { return sum_->attrs() + " of=" + p_.text; }
  void cpu(const TensorList& in, TensorList& out) const override {
    const Bound b(p_, in);
    kernels::cpu::reduce_sum_generated(out[0].dtype(), p_.shape, reduced_, out[0], [&b](int64_t s, int64_t n, void* dst) {
      char* d = static_cast<char*>(dst);
      b.eval(s, n, &d);
    });
  }

 private:
  static std::vector<Step> with_sum(std::vector<Step> steps, const OpPtr& sum, int arg) {
    steps.push_back({sum, {arg}});
    return steps;
  }

  OpPtr sum_;
  Program p_;
  std::vector<bool> reduced_;
};

// ------------------------------------------------------------------------------------ graph helpers

const TensorSpec& spec(const Graph& g, int v) { return g.values[size_t(v)].spec; }

// The node producing each value (-1 for inputs and constants).
std::vector<int> producers(const Graph& g) {
  std::vector<int> p(g.values.size(), -1);
  for (size_t i = 0; i < g.nodes.size(); ++i)
    for (int o : g.nodes[i].outputs) p[size_t(o)] = int(i);
  return p;
}

// The nodes reading each value (ascending, once per node), and whether the graph reads it after the
// last node (a graph output, or the value an update writes).
struct Uses {
  std::vector<std::vector<int>> consumers;
  std::vector<bool> graph_output;
};
Uses uses_of(const Graph& g) {
  Uses u{std::vector<std::vector<int>>(g.values.size()), std::vector<bool>(g.values.size(), false)};
  for (size_t i = 0; i < g.nodes.size(); ++i)
    for (int v : g.nodes[i].inputs) {
      auto& c = u.consumers[size_t(v)];
      if (c.empty() || c.back() != int(i)) c.push_back(int(i));
    }
  for (int o : g.outputs) u.graph_output[size_t(o)] = true;
  for (const Update& w : g.updates) u.graph_output[size_t(w.value)] = true;
  return u;
}

// Reorders g.nodes topologically (Kahn's algorithm, ready nodes taken in their current order, so nodes
// move only as far as their inputs require) and renumbers producers.
void topo_sort(Graph& g) {
  const size_t n = g.nodes.size();
  const std::vector<int> prod = producers(g);
  std::vector<std::vector<int>> succ(n);
  std::vector<int> indeg(n, 0);
  for (size_t i = 0; i < n; ++i)
    for (int v : g.nodes[i].inputs)
      if (const int p = prod[size_t(v)]; p >= 0) {
        succ[size_t(p)].push_back(int(i));
        ++indeg[i];
      }
  std::priority_queue<int, std::vector<int>, std::greater<int>> ready;
  for (size_t i = 0; i < n; ++i)
    if (indeg[i] == 0) ready.push(int(i));
  std::vector<Node> order;
  order.reserve(n);
  while (!ready.empty()) {
    const int i = ready.top();
    ready.pop();
    for (int s : succ[size_t(i)])
      if (--indeg[size_t(s)] == 0) ready.push(s);
    order.push_back(std::move(g.nodes[size_t(i)]));
  }
  if (order.size() != n)
    throw InternalError("jit fusion made the graph cyclic", "an acyclic graph after fusion",
                        std::to_string(n - order.size()) + " nodes on a cycle");
  g.nodes = std::move(order);
  for (size_t i = 0; i < n; ++i)
    for (size_t k = 0; k < g.nodes[i].outputs.size(); ++k) {
      Value& v = g.values[size_t(g.nodes[i].outputs[k])];
      v.producer = int(i);
      v.index = int(k);
    }
}

// Whether contracting the node set M (in_m) into one node makes the graph cyclic, i.e. whether a path
// leaves M and comes back. Nodes of `group` (when given) are contracted too: reaching one member reaches
// them all. Only nodes before `hi` (M's last node) can be on such a path.
bool creates_cycle(const Graph& g, const Uses& u, const std::vector<int>& seeds, const std::function<bool(int)>& in_m,
                   int hi, const std::vector<int>* group = nullptr, const std::vector<std::vector<int>>* members = nullptr) {
  std::vector<bool> seen(size_t(hi), false);
  std::vector<int> stack;
  auto visit = [&](int x) {
    if (seen[size_t(x)]) return;
    if (group && (*group)[size_t(x)] >= 0) {
      for (int m : (*members)[size_t((*group)[size_t(x)])]) {
        seen[size_t(m)] = true;
        stack.push_back(m);
      }
    } else {
      seen[size_t(x)] = true;
      stack.push_back(x);
    }
  };
  // Returns true when a consumer of x's outputs is in M (only checked once x is outside M).
  auto step = [&](int x, bool outside) {
    for (int o : g.nodes[size_t(x)].outputs)
      for (int c : u.consumers[size_t(o)]) {
        if (in_m(c)) {
          if (outside) return true;
        } else if (c < hi) {
          visit(c);
        }
      }
    return false;
  };
  for (int m : seeds) step(m, false);
  while (!stack.empty()) {
    const int x = stack.back();
    stack.pop_back();
    if (step(x, true)) return true;
  }
  return false;
}

// The instruction a node computes, if it is a fusable elementwise CPU node (see fusion.h); args unset.
std::optional<Instr> as_instr(const Graph& g, const Node& n) {
  if (n.outputs.size() != 1 || n.inputs.empty() || n.inputs.size() > 3) return std::nullopt;
  const TensorSpec& o = spec(g, n.outputs[0]);
  if (!o.device.is_cpu() && !o.device.is_cuda()) return std::nullopt;
  std::vector<DType> dt;
  for (int v : n.inputs) {
    if (spec(g, v).device != o.device) return std::nullopt;
    dt.push_back(spec(g, v).dtype);
  }
  const std::string name = n.op->name();
  Instr in;
  in.op = n.op;
  in.dtype = o.dtype;
  if (n.inputs.size() == 1) {
    for (int k = 0; k <= int(UnaryOp::sign); ++k)
      if (name == kernels::cpu::unary_name(UnaryOp(k))) {
        if (!is_fusable_float(dt[0]) || o.dtype != dt[0]) return std::nullopt;
        in.kind = Instr::Kind::unary;
        in.unary = UnaryOp(k);
        return in;
      }
    if (name == "clamp" && is_fusable_float(dt[0]) && o.dtype == dt[0]) {
      // The bounds, exactly as the clamp kernel rounds them (to the compute dtype): clamp(-inf) = lo,
      // clamp(+inf) = hi.
      const double inf = std::numeric_limits<double>::infinity();
      const Tensor probe = compute_dtype(dt[0]) == DType::f32 ? from_vector(std::vector<float>{-float(inf), float(inf)}, Shape{2})
                                                              : from_vector(std::vector<double>{-inf, inf}, Shape{2});
      const std::vector<double> b = n.op->forward({probe})[0].to_vector<double>();
      in.kind = Instr::Kind::clamp;
      in.lo = b[0];
      in.hi = b[1];
      return in;
    }
    if ((name == "astype" || name == "copy") && is_register_dtype(dt[0]) && is_register_dtype(o.dtype)) {
      in.kind = Instr::Kind::cast;
      return in;
    }
    return std::nullopt;
  }
  if (n.inputs.size() == 2) {
    for (int k = 0; k <= int(BinaryOp::gelu_erf_backward); ++k)
      if (name == kernels::cpu::binary_name(BinaryOp(k))) {
        const bool cmp = kernels::cpu::is_comparison(BinaryOp(k));
        if (!is_fusable_float(dt[0]) || dt[1] != dt[0] || o.dtype != (cmp ? DType::bool_ : dt[0])) return std::nullopt;
        in.kind = Instr::Kind::binary;
        in.binary = BinaryOp(k);
        return in;
      }
    return std::nullopt;
  }
  if (name == "where" && dt[0] == DType::bool_ && is_fusable_float(dt[1]) && dt[2] == dt[1] && o.dtype == dt[1]) {
    in.kind = Instr::Kind::where;
    return in;
  }
  return std::nullopt;
}

// A program for the nodes `members` (ascending; each computes instrs[j]); a member's output becomes a
// program output when used_outside says so. Fills the node's input and output value ids.
Program build_program(const Graph& g, const std::vector<int>& members, std::vector<Instr> instrs,
                      const std::function<bool(int)>& used_outside, std::vector<int>& in_values, std::vector<int>& out_values) {
  Program p;
  p.shape = spec(g, g.nodes[size_t(members[0])].outputs[0]).shape;
  std::vector<std::pair<int, int>> reg;  // value id -> register (members' outputs and inputs)
  auto find = [&](int v) {
    for (const auto& [val, r] : reg)
      if (val == v) return r;
    return -1;
  };
  // Inputs first (registers 0..nin-1), in order of first use.
  for (int m : members)
    for (int v : g.nodes[size_t(m)].inputs) {
      const int prod = g.values[size_t(v)].kind == Value::Kind::node_output ? g.values[size_t(v)].producer : -1;
      if (std::find(members.begin(), members.end(), prod) != members.end() || find(v) >= 0) continue;
      reg.push_back({v, int(p.inputs.size())});
      in_values.push_back(v);
      p.inputs.push_back(spec(g, v));
    }
  for (size_t j = 0; j < members.size(); ++j) {
    Instr in = std::move(instrs[j]);
    for (int v : g.nodes[size_t(members[j])].inputs) in.args.push_back(find(v));
    const int out = g.nodes[size_t(members[j])].outputs[0];
    const int r = p.nin() + int(p.code.size());
    reg.push_back({out, r});
    p.code.push_back(std::move(in));
    if (used_outside(out)) {
      p.outputs.push_back(r);
      out_values.push_back(out);
    }
  }
  p.finalize();
  return p;
}

// Gives node `at` the fused node `fused` and drops the nodes in `drop`, then restores a topological order.
void replace_nodes(Graph& g, int at, Node fused, const std::vector<int>& drop) {
  g.nodes[size_t(at)] = std::move(fused);
  std::vector<Node> kept;
  for (size_t i = 0; i < g.nodes.size(); ++i)
    if (std::find(drop.begin(), drop.end(), int(i)) == drop.end()) kept.push_back(std::move(g.nodes[i]));
  g.nodes = std::move(kept);
  topo_sort(g);
}

// "key=[1,-2]" or "key=3" in an attrs string, as integers; nullopt when absent or malformed.
std::optional<std::vector<int64_t>> attr_ints(const std::string& attrs, const std::string& key) {
  size_t at = 0;
  while ((at = attrs.find(key + "=", at)) != std::string::npos && at > 0 && attrs[at - 1] != ' ') ++at;
  if (at == std::string::npos) return std::nullopt;
  const char* p = attrs.c_str() + at + key.size() + 1;
  const bool list = *p == '[';
  if (list) ++p;
  std::vector<int64_t> out;
  while (*p != '\0' && *p != ']' && *p != ' ') {
    char* end = nullptr;
    out.push_back(std::strtoll(p, &end, 10));
    if (end == p) return std::nullopt;
    p = end;
    if (!list) break;
    if (*p == ',') ++p;
  }
  return out;
}

}  // namespace

// ------------------------------------------------------------------------------------ passes

int fuse_elementwise(Graph& g) {
  const int n = int(g.nodes.size());
  std::vector<std::optional<Instr>> instr(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) instr[size_t(i)] = as_instr(g, g.nodes[size_t(i)]);
  const Uses u = uses_of(g);
  const std::vector<int> prod = producers(g);
  std::vector<int> group(size_t(n), -1);
  std::vector<std::vector<int>> members;
  std::vector<bool> merging;  // per group: part of the merge being checked

  for (int i = 0; i < n; ++i) {
    if (!instr[size_t(i)]) continue;
    const Shape& shape = spec(g, g.nodes[size_t(i)].outputs[0]).shape;
    std::vector<int> cand;  // groups of i's producers with i's shape
    for (int v : g.nodes[size_t(i)].inputs) {
      const int p = prod[size_t(v)];
      if (p < 0 || group[size_t(p)] < 0) continue;
      const int gp = group[size_t(p)];
      if (spec(g, g.nodes[size_t(members[size_t(gp)][0])].outputs[0]).shape == shape &&
          g.nodes[size_t(members[size_t(gp)][0])].remat == g.nodes[size_t(i)].remat &&  // a recomputation stays apart
          std::find(cand.begin(), cand.end(), gp) == cand.end())
        cand.push_back(gp);
    }
    auto acyclic = [&](const std::vector<int>& gs) {
      std::vector<int> seeds;
      for (int gp : gs) {
        merging[size_t(gp)] = true;
        seeds.insert(seeds.end(), members[size_t(gp)].begin(), members[size_t(gp)].end());
      }
      auto in_m = [&](int x) { return x == i || (group[size_t(x)] >= 0 && merging[size_t(group[size_t(x)])]); };
      const bool ok = !creates_cycle(g, u, seeds, in_m, i, &group, &members);
      for (int gp : gs) merging[size_t(gp)] = false;
      return ok;
    };
    // Memory: a fused node runs at its last member's place, so i joining group gp keeps gp's inputs alive
    // until i and spares materialising gp's values that only i reads. Across intervening nodes (the
    // gradient contributions a traced backward accumulates far apart) that kept every contribution alive
    // to the last add. Join only when the bytes kept alive longer, times the intervening nodes they span,
    // do not exceed the bytes spared, times theirs (adjacent nodes: nothing either way).
    auto worth = [&](int gp) {
      const auto& mem = members[size_t(gp)];
      const int last = mem.back();
      auto inside = [&](int node) { return node == i || (node >= 0 && group[size_t(node)] == gp); };
      double extended = 0, spared = 0;
      std::vector<int> seen;
      for (int m : mem)
        for (int v : g.nodes[size_t(m)].inputs) {
          const int p = prod[size_t(v)];
          if (p < 0 || inside(p) || u.graph_output[size_t(v)] || std::find(seen.begin(), seen.end(), v) != seen.end()) continue;
          seen.push_back(v);
          const int from = std::max(last, u.consumers[size_t(v)].back());
          if (from < i) extended += double(spec(g, v).nbytes()) * double(i - from - 1);
        }
      for (int m : mem)
        for (int w : g.nodes[size_t(m)].outputs) {
          const auto& c = u.consumers[size_t(w)];
          if (u.graph_output[size_t(w)] || std::find(c.begin(), c.end(), i) == c.end() ||
              !std::all_of(c.begin(), c.end(), inside))
            continue;
          spared += double(spec(g, w).nbytes()) * double(i - last - 1);
        }
      return extended <= spared;
    };
    // Take each candidate group in turn while the union stays acyclic (all of them when possible).
    std::vector<int> take;
    for (int c : cand) {
      if (!worth(c)) continue;
      take.push_back(c);
      if (!acyclic(take)) take.pop_back();
    }
    int target = take.empty() ? -1 : take[0];
    for (size_t c = 1; c < take.size(); ++c) {
      for (int m : members[size_t(take[c])]) group[size_t(m)] = target;
      auto& dst = members[size_t(target)];
      dst.insert(dst.end(), members[size_t(take[c])].begin(), members[size_t(take[c])].end());
      members[size_t(take[c])].clear();
    }
    if (target >= 0) std::sort(members[size_t(target)].begin(), members[size_t(target)].end());
    if (target < 0) {
      target = int(members.size());
      members.emplace_back();
      merging.push_back(false);
    }
    members[size_t(target)].push_back(i);
    group[size_t(i)] = target;
  }

  // One fused node per group of two or more, at its last member's place.
  std::vector<std::optional<Node>> fused_at(static_cast<size_t>(n));
  std::vector<bool> drop(size_t(n), false);
  int removed = 0;
  for (size_t gi = 0; gi < members.size(); ++gi) {
    const auto& mem = members[gi];
    if (mem.size() < 2) continue;
    auto used_outside = [&](int v) {
      if (u.graph_output[size_t(v)]) return true;
      for (int c : u.consumers[size_t(v)])
        if (group[size_t(c)] != int(gi)) return true;
      return false;
    };
    std::vector<Instr> code;
    for (int m : mem) code.push_back(*instr[size_t(m)]);
    Node node;
    Program p = build_program(g, mem, std::move(code), used_outside, node.inputs, node.outputs);
    if (p.outputs.empty()) continue;  // dead: left to eliminate_dead_code
    node.op = std::make_shared<FusedElementwise>(std::move(p));
    node.scope = g.nodes[size_t(mem.front())].scope;
    for (int m : mem) node.scope = common_scope(node.scope, g.nodes[size_t(m)].scope);
    node.remat = g.nodes[size_t(mem.front())].remat;
    for (int m : mem) drop[size_t(m)] = true;
    fused_at[size_t(mem.back())] = std::move(node);
    removed += int(mem.size()) - 1;
  }
  if (removed == 0) return 0;
  std::vector<Node> nodes;
  for (int i = 0; i < n; ++i) {
    if (fused_at[size_t(i)]) nodes.push_back(std::move(*fused_at[size_t(i)]));
    else if (!drop[size_t(i)]) nodes.push_back(std::move(g.nodes[size_t(i)]));
  }
  g.nodes = std::move(nodes);
  topo_sort(g);
  return removed;
}

namespace {
// The program of node c when it is a fused elementwise node or one fusable elementwise node (then a
// one-instruction program whose output is the node's output), with its input / output value ids.
std::optional<Program> program_of(const Graph& g, int c, std::vector<int>& in_values, std::vector<int>& out_values) {
  const Node& node = g.nodes[size_t(c)];
  if (const auto* fe = dynamic_cast<const FusedElementwise*>(node.op.get())) {
    in_values = node.inputs;
    out_values = node.outputs;
    return fe->program();
  }
  auto in = as_instr(g, node);
  if (!in) return std::nullopt;
  in_values.clear();
  out_values.clear();
  return build_program(g, {c}, {*in}, [](int) { return true; }, in_values, out_values);
}
}  // namespace

int fuse_matmul_epilogues(Graph& g) {
  int removed = 0;
  for (bool changed = true; changed;) {
    changed = false;
    const Uses u = uses_of(g);
    for (size_t i = 0; i < g.nodes.size() && !changed; ++i) {
      const Node& mm = g.nodes[i];
      const std::string name = mm.op->name();
      if ((name != "matmul" && name != "linear") || mm.outputs.size() != 1) continue;
      const int v = mm.outputs[0];
      const TensorSpec& vs = spec(g, v);
      if ((!vs.device.is_cpu() && !vs.device.is_cuda()) || !is_fusable_float(vs.dtype)) continue;
      for (int c : u.consumers[size_t(v)]) {
        std::vector<int> pin, pout;
        std::optional<Program> p = program_of(g, c, pin, pout);
        if (!p || p->shape != vs.shape) continue;
        auto in_m = [&](int x) { return x == int(i) || x == c; };
        if (creates_cycle(g, u, {int(i)}, in_m, c)) continue;
        const int k = int(std::find(pin.begin(), pin.end(), v) - pin.begin());
        const bool keep = u.graph_output[size_t(v)] || u.consumers[size_t(v)].size() > 1;
        std::vector<TensorSpec> gin;
        for (int a : mm.inputs) gin.push_back(spec(g, a));
        Node node;
        node.inputs = mm.inputs;
        for (int a : pin)
          if (a != v) node.inputs.push_back(a);
        if (keep) node.outputs.push_back(v);
        node.outputs.insert(node.outputs.end(), pout.begin(), pout.end());
        node.op = std::make_shared<FusedMatmulEpilogue>(mm.op, gin, vs, std::move(*p), k, keep);
        node.scope = mm.scope;
        node.remat = mm.remat;
        replace_nodes(g, c, std::move(node), {int(i)});
        ++removed;
        changed = true;
        break;
      }
    }
  }
  return removed;
}

int fuse_reduction_prologues(Graph& g) {
  const Uses u = uses_of(g);
  const std::vector<int> prod = producers(g);
  std::vector<int> drop;
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& r = g.nodes[i];
    if (std::string(r.op->name()) != "sum" || r.inputs.size() != 1 || r.outputs.size() != 1) continue;
    const int v = r.inputs[0], c = prod[size_t(v)];
    const TensorSpec& out = spec(g, r.outputs[0]);
    if (c < 0 || !out.device.is_cpu() || !is_float(out.dtype) || u.graph_output[size_t(v)] || u.consumers[size_t(v)].size() != 1)
      continue;
    std::vector<int> pin, pout;
    std::optional<Program> p = program_of(g, c, pin, pout);
    if (!p || pout.size() != 1 || p->reg_dtype[size_t(p->outputs[0])] != out.dtype) continue;
    const auto axes = attr_ints(r.op->attrs(), "axes");
    if (!axes) continue;
    const int rank = p->shape.rank();
    std::vector<bool> reduced(size_t(rank), axes->empty());
    for (int64_t a : *axes) reduced[size_t(normalize_axis(int(a), rank))] = true;
    Node node{std::make_shared<FusedReduce>(std::move(*p), r.op, std::move(reduced), out), pin, r.outputs, {}, r.scope, r.remat};
    g.nodes[i] = std::move(node);
    drop.push_back(c);
  }
  if (drop.empty()) return 0;
  std::vector<Node> kept;
  for (size_t i = 0; i < g.nodes.size(); ++i)
    if (std::find(drop.begin(), drop.end(), int(i)) == drop.end()) kept.push_back(std::move(g.nodes[i]));
  g.nodes = std::move(kept);
  topo_sort(g);
  return int(drop.size());
}

void precompile_fused_kernels(const Graph& g) {
  std::map<int, std::vector<std::string>> by_device;  // CUDA device index -> sources
  for (const Node& n : g.nodes) {
    const GeneratedKernel* k = nullptr;
    if (const auto* fe = dynamic_cast<const FusedElementwise*>(n.op.get())) k = &fe->kernel();
    else if (const auto* fm = dynamic_cast<const FusedMatmulEpilogue*>(n.op.get())) k = &fm->kernel();
    const Device d = n.outputs.empty() ? Device::cpu() : g.values[size_t(n.outputs[0])].spec.device;
    if (k && d.is_cuda()) by_device[d.index].push_back(k->source());
  }
  for (const auto& [dev, sources] : by_device) compile_cuda_parallel(sources, detail::device_arch(dev));
}

std::vector<std::string> fused_kernel_sources(const Graph& g) {
  std::vector<std::string> out;
  for (const Node& n : g.nodes) {
    if (const auto* fe = dynamic_cast<const FusedElementwise*>(n.op.get())) out.push_back(fe->kernel().source());
    else if (const auto* fm = dynamic_cast<const FusedMatmulEpilogue*>(n.op.get())) out.push_back(fm->kernel().source());
  }
  return out;
}

namespace {
// Whether value v is computed from value w (v == w included).
bool depends_on(const Graph& g, const std::vector<int>& prod, int v, int w) {
  std::vector<int> stack{v};
  std::vector<bool> seen(g.values.size(), false);
  while (!stack.empty()) {
    const int x = stack.back();
    stack.pop_back();
    if (x == w) return true;
    if (seen[size_t(x)] || prod[size_t(x)] < 0) continue;
    seen[size_t(x)] = true;
    for (int in : g.nodes[size_t(prod[size_t(x)])].inputs) stack.push_back(in);
  }
  return false;
}

// Removes the nodes marked in `dropped` (a pass folded them into others), restores a topological order
// (a fused node may have to move after an input's producer) and returns `fused`, the pass's count.
int remove_nodes(Graph& g, const std::vector<bool>& dropped, int fused) {
  if (fused == 0) return 0;
  std::vector<Node> kept;
  for (size_t i = 0; i < g.nodes.size(); ++i)
    if (!dropped[i]) kept.push_back(std::move(g.nodes[i]));
  g.nodes = std::move(kept);
  topo_sort(g);
  return fused;
}
}  // namespace

int fuse_cross_entropy(Graph& g) {
  const std::vector<int> prod = producers(g);
  std::vector<bool> dropped(g.nodes.size(), false);
  int fused = 0;
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const Node f = g.nodes[i];
    if (dropped[i] || std::string(f.op->name()) != "cross_entropy" || f.inputs.size() != 2) continue;
    for (size_t j = i + 1; j < g.nodes.size(); ++j) {
      const Node& b = g.nodes[j];
      if (dropped[j] || b.inputs.size() != 3 || b.inputs[0] != f.inputs[0] || b.inputs[1] != f.inputs[1]) continue;
      // The cotangent must not come from the loss (a seed, a loss scale, a weighting: topo_sort then
      // places the fused node after its producer).
      if (depends_on(g, prod, b.inputs[2], f.outputs[0])) continue;
      OpPtr op = fused_cross_entropy_op(*f.op, *b.op);
      if (!op) continue;
      g.nodes[i] = Node{std::move(op), b.inputs, {f.outputs[0], b.outputs[0]}, {}, common_scope(f.scope, b.scope), f.remat};
      dropped[j] = true;
      ++fused;
      break;
    }
  }
  return remove_nodes(g, dropped, fused);
}

int fuse_layer_norm_backward_add(Graph& g) {
  const std::vector<int> prod = producers(g);
  const Uses u = uses_of(g);
  auto same = [&](int v, const TensorSpec& s) {
    const TensorSpec& t = spec(g, v);
    return t.shape == s.shape && t.dtype == s.dtype && t.device == s.device;
  };
  std::vector<bool> dropped(g.nodes.size(), false);
  int fused = 0;
  for (size_t a = 0; a < g.nodes.size(); ++a) {
    const Node& add = g.nodes[a];
    if (std::string(add.op->name()) != "add" || add.inputs.size() != 2 || add.outputs.size() != 1) continue;
    const TensorSpec& out = spec(g, add.outputs[0]);
    for (int side = 0; side < 2; ++side) {
      const int dx = add.inputs[size_t(side)], res = add.inputs[size_t(1 - side)];
      const int l = prod[size_t(dx)];
      if (l < 0 || dropped[size_t(l)] || dx == res) continue;
      Node& ln = g.nodes[size_t(l)];
      // dx read by this add alone, no broadcast on either side, and the residual gradient not computed
      // from the norm's own outputs (the fused node reads it).
      if (ln.outputs[0] != dx || !ln.in_place.empty() || u.graph_output[size_t(dx)] || u.consumers[size_t(dx)].size() != 1 ||
          !same(dx, out) || !same(res, out))
        continue;
      bool cyclic = false;
      for (int o : ln.outputs) cyclic = cyclic || depends_on(g, prod, res, o);
      OpPtr op = cyclic ? nullptr : layer_norm_backward_residual_op(*ln.op);
      if (!op) continue;
      std::vector<int> in = ln.inputs, outs = ln.outputs;
      in.push_back(res);
      outs[0] = add.outputs[0];
      ln = Node{std::move(op), std::move(in), std::move(outs), {}, common_scope(ln.scope, add.scope), ln.remat};
      dropped[a] = true;
      ++fused;
      break;
    }
  }
  return remove_nodes(g, dropped, fused);
}

int fuse(Graph& g) {
  return fuse_cross_entropy(g) + fuse_layer_norm_backward_add(g) + fuse_elementwise(g) + fuse_matmul_epilogues(g) +
         fuse_reduction_prologues(g);
}

int kernel_launches(const Graph& g) {
  std::vector<Shape> strides(g.values.size());
  for (size_t v = 0; v < g.values.size(); ++v)
    strides[v] = g.values[v].constant.defined() ? g.values[v].constant.strides()  // constants and state
                                                : g.values[v].spec.shape.contiguous_strides();
  auto contiguous = [](const Shape& s, const Shape& st) {
    int64_t expect = 1;
    for (int i = s.rank() - 1; i >= 0; --i) {
      if (s[i] != 1 && st[i] != expect) return false;
      expect *= s[i];
    }
    return true;
  };
  int launches = 0;
  for (const Node& n : g.nodes) {
    const std::string name = n.op->name();
    if (name == "unbind" && n.inputs.size() == 1) {  // views: the input's strides without the axis
      const auto axis = attr_ints(n.op->attrs(), "axis");
      Shape st = strides[size_t(n.inputs[0])];
      st.erase(normalize_axis(int(axis.value_or(std::vector<int64_t>{0}).at(0)), st.rank()));
      for (int y : n.outputs) strides[size_t(y)] = st;
      continue;
    }
    if (n.inputs.size() == 1 && n.outputs.size() == 1) {
      const int x = n.inputs[0], y = n.outputs[0];
      const Shape &xs = spec(g, x).shape, &xst = strides[size_t(x)], &ys = spec(g, y).shape;
      Shape yst;
      bool view = true;
      if (name == "permute") {
        const auto axes = attr_ints(n.op->attrs(), "axes");
        for (int64_t a : axes.value_or(std::vector<int64_t>{})) yst.push_back(xst[size_t(normalize_axis(int(a), xs.rank()))]);
      } else if (name == "expand") {
        yst.resize(ys.rank());
        const int off = ys.rank() - xs.rank();
        for (int d = off; d < ys.rank(); ++d) yst[size_t(d)] = xs[size_t(d - off)] == 1 ? 0 : xst[size_t(d - off)];
      } else if (name == "slice") {
        const auto axis = attr_ints(n.op->attrs(), "axis"), step = attr_ints(n.op->attrs(), "step");
        yst = xst;
        if (axis && step && !axis->empty() && !step->empty()) yst[size_t(normalize_axis(int((*axis)[0]), xs.rank()))] *= (*step)[0];
      } else if (name == "reshape") {
        view = contiguous(xs, xst);  // else reshape copies
        yst = ys.contiguous_strides();
      } else {
        view = false;
      }
      if (view && yst.rank() == ys.rank()) {
        strides[size_t(y)] = yst;
        continue;
      }
    }
    ++launches;
  }
  return launches;
}

}  // namespace titanax::jit
