// What an op's ONNX export rule (Op::to_onnx) writes into: the model io/onnx.h builds. Kept free of
// the encoding (io/onnx.cpp) so that ops/ state their ONNX form next to their kernels and vjp.
//
// Names are ONNX value names. A rule reads its inputs by name, adds nodes (operators of the default
// domain, opset 17: https://onnx.ai/onnx/operators/) and must define every output name it was given
// that is not empty (an empty name: the output is unused, leave it out).
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "core/op.h"

namespace titanax {

/// One node attribute (onnx.proto's AttributeProto): an int, a float, a list of ints or a string.
struct OnnxAttr {
  std::string name;
  std::variant<int64_t, double, std::vector<int64_t>, std::string> value;
};

class OnnxBuilder {
 public:
  virtual ~OnnxBuilder() = default;
  /// Adds the node `op_type`(inputs) -> outputs with `attrs`. An empty input name is an absent optional
  /// input (ONNX's convention). Nodes must be added in an order where each input is defined first.
  virtual void node(const std::string& op_type, const std::vector<std::string>& inputs,
                    const std::vector<std::string>& outputs, const std::vector<OnnxAttr>& attrs = {}) = 0;
  /// A value name not used anywhere else in the model.
  virtual std::string fresh() = 0;
  /// An initializer of the model holding t's values (any layout; copied to contiguous host memory);
  /// returns its name.
  virtual std::string constant(const Tensor& t) = 0;

  /// node() with one output of a fresh name, which it returns.
  std::string op(const std::string& op_type, const std::vector<std::string>& inputs, const std::vector<OnnxAttr>& attrs = {});
  /// A 1-D int64 initializer: the shape of Reshape / Expand, Slice's starts and ends, ReduceSum's axes.
  std::string ints(const std::vector<int64_t>& v);
  /// A 0-d initializer of `dtype` holding v (a floating constant of a decomposed op: gelu's 0.5).
  std::string scalar(double v, DType dtype);
};

/// The names and specs an export rule gets: its inputs (in, in_specs) and outputs (out, out_specs); an
/// empty out[i] marks an output nothing reads. With a dynamic batch (OnnxExportOptions::dynamic_batch),
/// in_dynamic / out_dynamic say which axes of each input / output scale with the batch size: the specs
/// hold the traced example's sizes there, and a rule must not bake those sizes into the model (a
/// Reshape writes -1 there). Empty: every axis is static.
struct OnnxNodeIO {
  std::vector<std::string> in, out;
  std::vector<TensorSpec> in_specs, out_specs;
  std::vector<std::vector<bool>> in_dynamic, out_dynamic;
  /// Whether axis `axis` (normalised) of input / output i scales with the batch size.
  bool in_dyn(size_t i, int axis) const { return dyn(in_dynamic, i, axis); }
  bool out_dyn(size_t i, int axis) const { return dyn(out_dynamic, i, axis); }

 private:
  static bool dyn(const std::vector<std::vector<bool>>& m, size_t i, int axis) {
    return i < m.size() && size_t(axis) < m[i].size() && m[i][size_t(axis)];
  }
};

/// Throws the ValueError of a rule that cannot express `what` of op `op` with a dynamic batch (a size
/// that depends on the batch where ONNX needs a constant): the fix is a static export.
[[noreturn]] void onnx_batch_dependent(const char* op, const std::string& what);

/// onnx.proto's TensorProto.DataType number of a dtype: f32 1 (FLOAT), u8 2, i32 6, i64 7, bool 9,
/// f16 10, f64 11, bf16 16. Throws nothing (every DType has one).
int onnx_dtype(DType t);

}  // namespace titanax
