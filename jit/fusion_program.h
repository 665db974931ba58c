// The program of a fused elementwise node (jit/fusion.h): what the CPU interpreter (jit/fusion.cpp) runs
// and the CUDA code generator (jit/codegen.h) translates. Internal to jit/.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/op.h"
#include "kernels/cpu/elementwise.h"

namespace titanax::jit::fused {

using kernels::cpu::BinaryOp;
using kernels::cpu::UnaryOp;

/// The dtype a register of dtype d is computed in: f32 for f16 / bf16 (whose values are rounded to their
/// dtype after every instruction and stored rounded, as the eager kernels round each op's result), d
/// itself otherwise.
inline DType compute_dtype(DType d) { return is_half(d) ? DType::f32 : d; }

// One instruction: its result has the program's shape and `dtype`; its operands are registers.
struct Instr {
  enum class Kind : uint8_t { unary, binary, where, clamp, cast };
  Kind kind = Kind::unary;
  UnaryOp unary = UnaryOp::neg;
  BinaryOp binary = BinaryOp::add;
  double lo = 0, hi = 0;  // clamp bounds, as the clamp kernel rounds them to compute_dtype(dtype)
  DType dtype = DType::f32;
  std::vector<int> args;
  OpPtr op;  // the op this instruction computes (its vjp, its name in the text)
};

// A straight-line elementwise program. Registers 0..nin-1 are the inputs, nin + k instruction k's result.
struct Program {
  Shape shape;                      // every instruction's result shape
  std::vector<TensorSpec> inputs;   // each broadcasts to shape
  std::vector<Instr> code;
  std::vector<int> outputs;         // registers, in output order

  // Derived by finalize().
  std::vector<DType> reg_dtype;     // as stored (compute_dtype(reg_dtype) in the registers)
  std::vector<bool> reg_scalar;     // one value for the whole program (inputs of one element and what only they feed)
  std::vector<int> out_index;       // output position of a register, or -1
  std::vector<int> slot;            // scratch buffer of a register, or -1 (scalars; outputs but 16-bit ones are
                                    // written in place)
  int nslots = 0;
  std::string text;

  int nin() const { return int(inputs.size()); }
  int nregs() const { return nin() + int(code.size()); }

  /// Derives the fields below `outputs` from the rest (call after filling them).
  void finalize();
};

}  // namespace titanax::jit::fused
