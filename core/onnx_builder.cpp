// OnnxBuilder's helpers and the dtype numbers (core/onnx_builder.h).
#include "core/onnx_builder.h"

#include "core/error.h"

namespace titanax {

std::string OnnxBuilder::op(const std::string& op_type, const std::vector<std::string>& inputs,
                            const std::vector<OnnxAttr>& attrs) {
  std::string out = fresh();
  node(op_type, inputs, {out}, attrs);
  return out;
}

std::string OnnxBuilder::ints(const std::vector<int64_t>& v) {
  return constant(from_vector(v, Shape{int64_t(v.size())}, DType::i64));
}

std::string OnnxBuilder::scalar(double v, DType dtype) { return constant(titanax::scalar(v, dtype)); }

void onnx_batch_dependent(const char* op, const std::string& what) {
  throw ValueError(std::string("ONNX export with a dynamic batch: ") + op + "'s " + what + " depends on the batch size",
                   "sizes that do not scale with the batch where ONNX needs them constant", what,
                   "export with a static batch (leave OnnxExportOptions::dynamic_batch empty; one model per batch size)");
}

int onnx_dtype(DType t) {
  switch (t) {
    case DType::f32: return 1;
    case DType::u8: return 2;
    case DType::i32: return 6;
    case DType::i64: return 7;
    case DType::bool_: return 9;
    case DType::f16: return 10;
    case DType::f64: return 11;
    case DType::bf16: return 16;
  }
  return 0;
}

}  // namespace titanax
