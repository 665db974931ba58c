// ONNX export (https://onnx.ai, onnx.proto; operators of opset 17, the set ONNX 1.12 defines): a
// function traced once (jit/graph.h) is written as an ONNX model that onnxruntime, TensorRT or any other
// ONNX runtime loads, the way torch.onnx.export serves PyTorch models.
//
//   model->eval();                                               // no dropout in an inference graph
//   tx::OnnxExportOptions o{.input_names = {"pixels"}, .output_names = {"logits"},
//                           .named_tensors = model->parameters()};
//   tx::export_onnx([&](const tx::TensorList& in) { return tx::TensorList{(*model)(in[0])}; },
//                   {tx::zeros(tx::Shape{1, 1, 28, 28})}, "mnist_cnn.onnx", o);
//
// What is exported: the ops the function applies on its inputs, each by its own rule (Op::to_onnx,
// core/onnx_builder.h), in the order they ran; every other tensor it reads (the weights) becomes an
// initializer holding its value at export time. Shapes are static: those of the example inputs (export
// again for another batch size). Every dtype maps to its ONNX type (bf16 to BFLOAT16). Every value's
// type and shape is declared (value_info), so ONNX's shape inference (onnx.checker.check_model with
// full_check) compares its own result with Titanax's; the tests run that check and evaluate every
// exported op against numpy code written from the ONNX specification (tests/onnx/onnx_reference.py).
// The bytes are written without libprotobuf (see io/onnx.cpp), so the exporter has no dependency.
//
// Refused with a ValueError that names the op and the fix: an op without an ONNX form (the backward
// ops, optimizer updates, collectives, control flow), dropout (call eval() first), and a function with
// side effects (an in-place write into a tensor it did not create: an optimizer step is not an
// inference function).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "core/tree.h"
#include "jit/graph.h"

namespace titanax {

struct OnnxExportOptions {
  /// Names of the graph inputs, one per example input (default: input0, input1, ...).
  std::vector<std::string> input_names;
  /// Names of the graph outputs, one per output (default: output0, output1, ...).
  std::vector<std::string> output_names;
  /// Names for the initializers: a tensor the function reads that is the same memory as one of these
  /// (a model's parameters()) gets its path; the others are named const<N>.
  ParamTree named_tensors;
  /// The ONNX graph's name.
  std::string graph_name = "titanax";
  /// Empty: static shapes (the example inputs'). A name ("batch"): axis 0 of every input is the batch,
  /// of any size in the model (torch.onnx.export's dynamic_axes={name: {0: "batch"}} on every input):
  /// inputs, and outputs whose axis is the batch itself, declare it as this symbolic dimension. The
  /// function is traced at the example's batch B and at B + 1 (each input with its first row appended);
  /// the axes whose sizes differ scale with the batch and must be multiples of it. Refused with a
  /// ValueError: a function that traces differently at B + 1 (C++ branches on the size), a size that is
  /// not a multiple of B, a constant whose shape depends on B, and ops that would need a batch-dependent
  /// size baked in (a reshape with two batch-dependent axes, a slice or unbind of the batch axis).
  std::string dynamic_batch;
  /// Write every initializer of 1 KiB or more to path + ".data" beside the model (ONNX's external data;
  /// onnx.load and onnxruntime read it from the model's folder) instead of inside it. export_onnx to a
  /// path does so by itself when the weights exceed 1.5 GiB (a model must stay under protobuf's 2 GiB).
  /// Ignored by the overloads that return the model's bytes.
  bool external_data = false;
};

/// Traces fn on `example_inputs` (without recording a tape; its in-place effects are refused) and
/// returns the ONNX model (a serialized ModelProto); twice with opts.dynamic_batch (see there). Throws what fn throws, TraceError for what a
/// trace cannot capture (jit/graph.h), ValueError for an op without an ONNX form, a function with side
/// effects, names that are repeated or whose count differs from the inputs / outputs, or a model of 2 GiB
/// or more (export to a path, which writes the weights beside it); InternalError when an op's rule
/// leaves an output undefined.
std::string export_onnx(const std::function<TensorList(const TensorList&)>& fn, const TensorList& example_inputs,
                        const OnnxExportOptions& opts = {});
/// export_onnx written to `path` (under a temporary name beside it, then renamed), with the weights in
/// path + ".data" when opts.external_data is set or they exceed 1.5 GiB. IOError when a file cannot be
/// written.
void export_onnx(const std::function<TensorList(const TensorList&)>& fn, const TensorList& example_inputs,
                 const std::string& path, const OnnxExportOptions& opts = {});
/// The ONNX model of an already traced graph (jit::trace), as export_onnx builds it. Throws as
/// export_onnx does. Static shapes only (dynamic_batch must be empty: it needs a second trace).
std::string graph_to_onnx(const jit::Graph& g, const OnnxExportOptions& opts = {});

}  // namespace titanax
