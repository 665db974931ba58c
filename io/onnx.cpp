// ONNX export (io/onnx.h): a traced graph's nodes through their ops' export rules (Op::to_onnx) into the
// bytes of an onnx.proto ModelProto.
#include "io/onnx.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string_view>

#include "autodiff/tape.h"
#include "core/error.h"
#include "core/onnx_builder.h"
#include "io/npm.h"
#include "ops/ops.h"

namespace titanax {

namespace {

constexpr int64_t kIrVersion = 8;  // onnx.proto's IR_VERSION of ONNX 1.12 (opset 17)
constexpr int64_t kOpset = 17;

// Protocol Buffers' wire format (https://protobuf.dev/programming-guides/encoding/), the few pieces an
// ONNX model needs: varints (int64 fields, negative ones as ten bytes), length-delimited fields (strings,
// bytes, embedded messages) and fixed32 floats. Written by hand rather than through libprotobuf: in one
// process with Debian's libsentencepiece (which exports its own copy of protobuf-lite) libprotobuf
// crashes while loading.
class Proto {
 public:
  Proto& varint(int field, int64_t v) {
    key(field, 0);
    put_varint(uint64_t(v));
    return *this;
  }
  Proto& bytes(int field, std::string_view b) {
    header(field, b.size());
    buf_ += b;
    return *this;
  }
  // The key and length of a length-delimited field whose `len` bytes the caller appends next.
  Proto& header(int field, size_t len) {
    key(field, 2);
    put_varint(len);
    return *this;
  }
  Proto& message(int field, const Proto& m) { return bytes(field, m.buf_); }
  Proto& fixed32(int field, float f) {
    key(field, 5);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    for (int i = 0; i < 4; ++i) buf_ += char((u >> (8 * i)) & 0xff);
    return *this;
  }
  const std::string& str() const { return buf_; }
  std::string& str() { return buf_; }

 private:
  void key(int field, int wire_type) { put_varint(uint64_t(field) << 3 | uint64_t(wire_type)); }
  void put_varint(uint64_t v) {
    while (v >= 0x80) {
      buf_ += char((v & 0x7f) | 0x80);
      v >>= 7;
    }
    buf_ += char(v);
  }
  std::string buf_;
};

// onnx.proto's field numbers.
namespace f {
constexpr int model_ir_version = 1, model_producer_name = 2, model_graph = 7, model_opset_import = 8;
constexpr int opset_domain = 1, opset_version = 2;
constexpr int graph_node = 1, graph_name = 2, graph_initializer = 5, graph_input = 11, graph_output = 12, graph_value_info = 13;
constexpr int node_input = 1, node_output = 2, node_name = 3, node_op_type = 4, node_attribute = 5;
constexpr int attr_name = 1, attr_f = 2, attr_i = 3, attr_s = 4, attr_ints = 8, attr_type = 20;
constexpr int attr_type_float = 1, attr_type_int = 2, attr_type_string = 3, attr_type_ints = 7;
constexpr int tensor_dims = 1, tensor_data_type = 2, tensor_name = 8, tensor_raw_data = 9, tensor_external_data = 13,
              tensor_data_location = 14, entry_key = 1, entry_value = 2;
constexpr int value_info_name = 1, value_info_type = 2;
constexpr int type_tensor_type = 1, tensor_type_elem_type = 1, tensor_type_shape = 2, shape_dim = 1, dim_value = 1, dim_param = 2;
}  // namespace f

// How each value's axes scale with a dynamic batch: scale[value][axis] = k for an axis of k times the
// batch size, 0 for a static one. Empty: a static export.
using BatchScale = std::vector<std::vector<int64_t>>;

// ValueInfoProto: a name with its tensor type: element type and shape, whose axes of `scale` (k per
// axis, 0 static; may be empty) are the symbolic `batch` (k = 1) or of unknown size (k > 1).
Proto value_info(const std::string& name, const TensorSpec& s, const std::vector<int64_t>& scale = {},
                 const std::string& batch = {}) {
  Proto shape;
  for (int i = 0; i < s.shape.rank(); ++i) {
    const int64_t k = size_t(i) < scale.size() ? scale[size_t(i)] : 0;
    shape.message(f::shape_dim, k == 0 ? Proto().varint(f::dim_value, s.shape[i]) : k == 1 ? Proto().bytes(f::dim_param, batch) : Proto());
  }
  Proto tensor;
  tensor.varint(f::tensor_type_elem_type, onnx_dtype(s.dtype)).message(f::tensor_type_shape, shape);
  Proto vi;
  vi.bytes(f::value_info_name, name).message(f::value_info_type, Proto().message(f::type_tensor_type, tensor));
  return vi;
}

// ONNX's external data (onnx.ai, "External Data"): initializers of 1 KiB or more written to one file
// beside the model, each at a 64-byte aligned offset; their TensorProtos hold location, offset and
// length instead of raw_data. For models over protobuf's 2 GiB limit.
struct ExternalData {
  std::string path;      // the data file
  std::string location;  // its name as the model records it: relative to the model's folder
  std::ofstream out;
  int64_t offset = 0;
};

// protobuf's limit on one message: a ModelProto at or above it cannot be parsed.
constexpr uint64_t kProtobufLimit = (uint64_t(1) << 31) - 1;

class ModelBuilder final : public OnnxBuilder {
 public:
  explicit ModelBuilder(ExternalData* external) : external_(external) {}

  void node(const std::string& op_type, const std::vector<std::string>& inputs, const std::vector<std::string>& outputs,
            const std::vector<OnnxAttr>& attrs) override {
    Proto n;
    for (const std::string& i : inputs) n.bytes(f::node_input, i);
    for (const std::string& o : outputs) {
      n.bytes(f::node_output, o);
      defined_.insert(o);
    }
    n.bytes(f::node_name, (scope_.empty() ? "" : scope_ + "/") + op_type + "_" + std::to_string(nodes_++));
    n.bytes(f::node_op_type, op_type);
    for (const OnnxAttr& a : attrs) {
      Proto p;
      p.bytes(f::attr_name, a.name);
      if (const auto* i = std::get_if<int64_t>(&a.value)) {
        p.varint(f::attr_i, *i).varint(f::attr_type, f::attr_type_int);
      } else if (const auto* x = std::get_if<double>(&a.value)) {
        p.fixed32(f::attr_f, float(*x)).varint(f::attr_type, f::attr_type_float);
      } else if (const auto* v = std::get_if<std::vector<int64_t>>(&a.value)) {
        for (int64_t e : *v) p.varint(f::attr_ints, e);
        p.varint(f::attr_type, f::attr_type_ints);
      } else {
        p.bytes(f::attr_s, std::get<std::string>(a.value)).varint(f::attr_type, f::attr_type_string);
      }
      n.message(f::node_attribute, p);
    }
    graph_.message(f::graph_node, n);
  }
  std::string fresh() override {
    std::string n;
    do n = "t" + std::to_string(next_++);
    while (!claim(n));
    return n;
  }
  std::string constant(const Tensor& t) override { return initializer(fresh(), t); }

  // Adds t as an initializer named `name` (already claimed); returns the name.
  std::string initializer(const std::string& name, const Tensor& t) {
    const Tensor host = t.to(Device::cpu()).contiguous();
    Proto p;  // the TensorProto; inline data is appended after it, straight into the graph
    for (int64_t d : host.shape()) p.varint(f::tensor_dims, d);
    p.varint(f::tensor_data_type, onnx_dtype(host.dtype())).bytes(f::tensor_name, name);
    const char* data = static_cast<const char*>(host.raw_data());
    const int64_t n = int64_t(host.nbytes());
    const bool inline_data = !external_ || n < 1024;
    if (inline_data) {
      p.header(f::tensor_raw_data, size_t(n));
    } else {
      ExternalData& e = *external_;
      const int64_t at = (e.offset + 63) / 64 * 64;
      e.out.write(std::string(size_t(at - e.offset), '\0').data(), at - e.offset).write(data, n);
      if (!e.out) throw IOError("cannot write '" + e.path + "'", "the ONNX model's external data written", "the write failed");
      e.offset = at + n;
      for (const auto& [key, value] : {std::pair<std::string, std::string>{"location", e.location},
                                       {"offset", std::to_string(at)}, {"length", std::to_string(n)}})
        p.message(f::tensor_external_data, Proto().bytes(f::entry_key, key).bytes(f::entry_value, value));
      p.varint(f::tensor_data_location, 1);  // EXTERNAL
    }
    graph_.header(f::graph_initializer, p.str().size() + (inline_data ? size_t(n) : 0));
    graph_.str() += p.str();
    if (inline_data) graph_.str().append(data, size_t(n));  // the weights' one copy
    defined_.insert(name);
    return name;
  }
  void input(const Proto& vi, const std::string& name) {
    graph_.message(f::graph_input, vi);
    defined_.insert(name);
  }
  void output(const Proto& vi) { graph_.message(f::graph_output, vi); }
  void declare(const Proto& vi) { graph_.message(f::graph_value_info, vi); }
  // Reserves a name; false when it is taken.
  bool claim(const std::string& n) { return used_.insert(n).second; }
  bool defined(const std::string& n) const { return defined_.count(n) > 0; }
  void set_scope(const std::string& s) { scope_ = s; }
  // The ModelProto bytes, built around the graph's buffer (the weights are not copied again).
  std::string model(const std::string& graph_name) {
    graph_.bytes(f::graph_name, graph_name);
    Proto head;
    head.varint(f::model_ir_version, kIrVersion).bytes(f::model_producer_name, "titanax").header(f::model_graph, graph_.str().size());
    std::string m = std::move(graph_.str());
    m.insert(0, head.str());
    m += Proto().message(f::model_opset_import, Proto().bytes(f::opset_domain, "").varint(f::opset_version, kOpset)).str();
    return m;
  }

 private:
  ExternalData* external_;
  Proto graph_;
  std::set<std::string> used_, defined_;
  std::string scope_;
  int64_t next_ = 0, nodes_ = 0;
};

// The name for a constant or state tensor: its path in `named` when it is that tensor's memory.
std::string constant_name(const Tensor& t, const ParamTree& named, size_t& unnamed) {
  for (const auto& [path, p] : named)
    if (jit::same_memory(p, t)) return path;
  return "const" + std::to_string(unnamed++);
}

// The names a user gives, or prefix0, prefix1, ...; ValueError when their count is not `n`.
std::vector<std::string> io_names(const std::vector<std::string>& given, size_t n, const char* what) {
  if (given.empty()) {
    std::vector<std::string> r;
    for (size_t i = 0; i < n; ++i) r.push_back(std::string(what) + std::to_string(i));
    return r;
  }
  if (given.size() != n)
    throw ValueError(std::string("ONNX export: one name per ") + what, std::to_string(n) + " " + what + " names",
                     std::to_string(given.size()), std::string("set OnnxExportOptions::") + what + "_names to match, or leave it empty");
  return given;
}

// The model of graph g; `scale` (empty for static shapes) says which axes scale with the batch; with
// `external`, the larger initializers go to its file. ValueError when the model reaches 2 GiB inline.
std::string to_model(const jit::Graph& g, const OnnxExportOptions& opts, const BatchScale& scale, ExternalData* external) {
  const auto scale_of = [&](int v) { return scale.empty() ? std::vector<int64_t>{} : scale[size_t(v)]; };
  const auto info = [&](const std::string& name, int v) {
    return value_info(name, g.values[size_t(v)].spec, scale_of(v), opts.dynamic_batch);
  };
  if (!g.updates.empty())
    throw ValueError("ONNX export of a function with side effects", "a function that only computes its outputs",
                     std::to_string(g.updates.size()) + " in-place writes into tensors it did not create (" +
                         g.target_name(g.updates[0].target) + ", ...)",
                     "export the model's forward (an inference function), not a training step");
  const std::vector<std::string> in_names = io_names(opts.input_names, g.inputs.size(), "input");
  const std::vector<std::string> out_names = io_names(opts.output_names, g.outputs.size(), "output");
  ModelBuilder b(external);

  // Every name a value will have, claimed before any rule asks for a fresh one.
  const std::vector<int> last = g.last_uses();
  std::vector<std::string> name(g.values.size());
  for (size_t k = 0; k < g.inputs.size(); ++k) {
    const int v = g.inputs[k];
    if (!b.claim(in_names[k]))
      throw ValueError("ONNX export: two inputs named '" + in_names[k] + "'", "distinct input names", in_names[k]);
    name[size_t(v)] = in_names[k];
    b.input(info(in_names[k], v), in_names[k]);
  }
  std::vector<bool> renamed(g.outputs.size(), false);  // output k is its value's own name (no Identity)
  for (size_t k = 0; k < g.outputs.size(); ++k) {
    const int v = g.outputs[k];
    if (!b.claim(out_names[k]))
      throw ValueError("ONNX export: output name '" + out_names[k] + "' is taken", "names distinct from each other and the inputs",
                       out_names[k]);
    if (name[size_t(v)].empty() && g.values[size_t(v)].kind == jit::Value::Kind::node_output) {
      name[size_t(v)] = out_names[k];
      renamed[k] = true;
    }
  }
  // One initializer per constant value: the trace gives a tensor's memory one value however it is read.
  size_t unnamed = 0;
  for (size_t v = 0; v < g.values.size(); ++v) {
    const jit::Value& val = g.values[v];
    if (val.kind == jit::Value::Kind::constant || val.kind == jit::Value::Kind::state) {
      if (last[v] < 0) continue;
      std::string n = constant_name(val.constant, opts.named_tensors, unnamed);
      if (!b.claim(n)) n = b.fresh();  // the name of an input or output
      b.initializer(n, val.constant);
      name[v] = n;
    } else if (val.kind == jit::Value::Kind::node_output && name[v].empty() && last[v] >= 0) {
      name[v] = b.fresh();
    }
  }

  for (const jit::Node& n : g.nodes) {
    OnnxNodeIO io;
    const auto dynamic = [&](int v) {
      std::vector<bool> d;
      for (int64_t k : scale_of(v)) d.push_back(k > 0);
      return d;
    };
    for (int v : n.inputs) {
      io.in.push_back(name[size_t(v)]);
      io.in_specs.push_back(g.values[size_t(v)].spec);
      io.in_dynamic.push_back(dynamic(v));
    }
    for (int v : n.outputs) {
      io.out.push_back(name[size_t(v)]);
      io.out_specs.push_back(g.values[size_t(v)].spec);
      io.out_dynamic.push_back(dynamic(v));
    }
    b.set_scope(n.scope);
    const std::string what = std::string(n.op->name()) + (n.op->attrs().empty() ? "" : "(" + n.op->attrs() + ")") +
                             (n.scope.empty() ? "" : " in " + n.scope);
    if (!n.op->to_onnx(b, io))
      throw ValueError("ONNX export: op " + what + " has no ONNX form", "ops of an inference function", n.op->name(),
                       "export the model's forward only: backward ops, optimizer updates, collectives and control flow "
                       "are not exported");
    for (size_t i = 0; i < io.out.size(); ++i) {
      if (io.out[i].empty()) continue;
      if (!b.defined(io.out[i]))
        throw InternalError("ONNX export: the rule of " + what + " left its output '" + io.out[i] + "' undefined",
                            "every used output defined", "not defined");
      // Declared, so that ONNX's shape inference (onnx.checker's full check) compares its result with ours.
      if (std::find(g.outputs.begin(), g.outputs.end(), n.outputs[i]) == g.outputs.end()) b.declare(info(io.out[i], n.outputs[i]));
    }
  }
  b.set_scope("");
  for (size_t k = 0; k < g.outputs.size(); ++k) {
    const int v = g.outputs[k];
    if (!renamed[k]) b.node("Identity", {name[size_t(v)]}, {out_names[k]}, {});
    b.output(info(out_names[k], v));
  }
  std::string model = b.model(opts.graph_name);
  if (model.size() >= kProtobufLimit)
    throw ValueError("ONNX export: the model is over protobuf's 2 GiB limit", "a model under 2 GiB with its weights inline",
                     std::to_string(model.size()) + " bytes",
                     "export to a file (export_onnx(fn, inputs, path)): weights over 1.5 GiB in all go to path + \".data\"");
  return model;
}

// Bytes of g's constants and state read by its nodes: the initializers that hold its weights.
uint64_t weight_bytes(const jit::Graph& g) {
  const std::vector<int> last = g.last_uses();
  uint64_t n = 0;
  for (size_t v = 0; v < g.values.size(); ++v)
    if (last[v] >= 0 && (g.values[v].kind == jit::Value::Kind::constant || g.values[v].kind == jit::Value::Kind::state))
      n += g.values[v].constant.nbytes();
  return n;
}

// How g's values scale with the batch, from g (traced at batch B) and g2 (the same function at B + 1):
// an axis whose sizes differ must be k B at B and k (B + 1) at B + 1. ValueError otherwise, and when
// the graphs differ in structure or a constant's shape depends on B.
BatchScale batch_scale(const jit::Graph& g, const jit::Graph& g2, int64_t B) {
  const auto refuse = [](const std::string& what, const std::string& found) {
    return ValueError("ONNX export with a dynamic batch: " + what, "a function whose graph only scales with the batch", found,
                      "export with a static batch (leave OnnxExportOptions::dynamic_batch empty)");
  };
  const std::string differently = "the function traces differently at batch " + std::to_string(B) + " and " + std::to_string(B + 1);
  for (size_t i = 0; i < std::min(g.nodes.size(), g2.nodes.size()); ++i) {
    const jit::Node &n = g.nodes[i], &n2 = g2.nodes[i];
    if (std::string(n.op->name()) != n2.op->name() || n.inputs != n2.inputs)
      throw refuse(differently, std::string(n.op->name()) + " and " + n2.op->name() + " at node " + std::to_string(i) +
                                    " (a C++ branch or loop on a size)");
    if (n.outputs.size() != n2.outputs.size())
      throw refuse(differently, std::string(n.op->name()) + " with " + std::to_string(n.outputs.size()) + " and " +
                                    std::to_string(n2.outputs.size()) + " outputs (one per element of the batch axis)");
  }
  if (g.values.size() != g2.values.size() || g.nodes.size() != g2.nodes.size())
    throw refuse(differently, std::to_string(g.nodes.size()) + " and " + std::to_string(g2.nodes.size()) + " nodes");
  BatchScale scale(g.values.size());
  for (size_t v = 0; v < g.values.size(); ++v) {
    const Shape &a = g.values[v].spec.shape, &c = g2.values[v].spec.shape;
    scale[v].assign(size_t(a.rank()), 0);
    for (int i = 0; i < a.rank() && a.rank() == c.rank(); ++i) {
      if (a[i] == c[i]) continue;
      const int64_t k = c[i] - a[i];
      if (k <= 0 || a[i] != k * B)
        throw refuse("axis " + std::to_string(i) + " of a value is not a multiple of the batch size",
                     a.str() + " at batch " + std::to_string(B) + ", " + c.str() + " at " + std::to_string(B + 1));
      if (g.values[v].kind != jit::Value::Kind::node_output && g.values[v].kind != jit::Value::Kind::input)
        throw refuse("a constant's shape depends on the batch size", a.str() + " at batch " + std::to_string(B) +
                     " (build it from the inputs, e.g. with expand, or export with a static batch)");
      scale[v][size_t(i)] = k;
    }
  }
  return scale;
}

}  // namespace

std::string graph_to_onnx(const jit::Graph& g, const OnnxExportOptions& opts) {
  if (!opts.dynamic_batch.empty())
    throw ValueError("graph_to_onnx with a dynamic batch", "OnnxExportOptions::dynamic_batch empty", opts.dynamic_batch,
                     "use export_onnx(fn, ...), which traces the function at two batch sizes");
  return to_model(g, opts, {}, nullptr);
}

namespace {

// The model of fn traced on the example inputs (twice with a dynamic batch); the larger initializers go
// to `external` when it is given.
std::string traced_model(const std::function<TensorList(const TensorList&)>& fn, const TensorList& example_inputs,
                         const OnnxExportOptions& opts, const std::function<ExternalData*(const jit::Graph&)>& external) {
  const auto traced = [&](const TensorList& in) {
    NoGradGuard no_grad;
    jit::Graph g = jit::trace(fn, in);
    jit::eliminate_dead_code(g);
    return g;
  };
  const jit::Graph g = traced(example_inputs);
  if (opts.dynamic_batch.empty()) return to_model(g, opts, {}, external(g));
  if (example_inputs.empty()) throw ValueError("ONNX export with a dynamic batch of a function without inputs", "inputs", "none");
  const int64_t B = example_inputs[0].dim() > 0 ? example_inputs[0].shape()[0] : 0;
  TensorList bigger;  // each input with its first row appended: batch B + 1, values of the same kind
  for (size_t i = 0; i < example_inputs.size(); ++i) {
    const Tensor& x = example_inputs[i];
    if (x.dim() == 0 || x.shape()[0] != B || B == 0)
      throw ShapeError("ONNX export with a dynamic batch: input " + std::to_string(i) + " has no batch axis of the others' size",
                       "every input [B, ...] with one B >= 1", spec_str(x), "pass example inputs that share axis 0");
    bigger.push_back(concat({x, x.slice(0, 0, 1)}, 0));
  }
  const BatchScale scale = batch_scale(g, traced(bigger), B);
  return to_model(g, opts, scale, external(g));
}

}  // namespace

std::string export_onnx(const std::function<TensorList(const TensorList&)>& fn, const TensorList& example_inputs,
                        const OnnxExportOptions& opts) {
  return traced_model(fn, example_inputs, opts, [](const jit::Graph&) { return nullptr; });
}

void export_onnx(const std::function<TensorList(const TensorList&)>& fn, const TensorList& example_inputs,
                 const std::string& path, const OnnxExportOptions& opts) {
  ExternalData data;
  data.path = path + ".data";
  data.location = std::filesystem::path(data.path).filename().string();
  const std::filesystem::path data_tmp = detail::temp_path(data.path);
  const std::string bytes = traced_model(fn, example_inputs, opts, [&](const jit::Graph& g) -> ExternalData* {
    if (!opts.external_data && weight_bytes(g) <= (uint64_t(3) << 29)) return nullptr;  // 1.5 GiB
    data.out.open(data_tmp, std::ios::binary | std::ios::trunc);
    if (!data.out) throw IOError("cannot create '" + data_tmp.string() + "'", "a writable folder", "open failed");
    return &data;
  });
  if (data.out.is_open()) {
    data.out.close();
    if (!data.out) throw IOError("cannot write '" + data_tmp.string() + "'", "the external data written", "the write failed");
    detail::rename_into_place(data_tmp, data.path);
  }
  const std::filesystem::path tmp = detail::temp_path(path);
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f || !f.write(bytes.data(), std::streamsize(bytes.size())) || !f.flush())
      throw IOError("cannot write '" + tmp.string() + "'", "a writable path", "the write failed");
  }
  detail::rename_into_place(tmp, path);
}

}  // namespace titanax
