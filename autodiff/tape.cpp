#include "autodiff/tape.h"

#include <atomic>

#include "autodiff/anomaly.h"

namespace titanax {
namespace {
thread_local bool g_grad_enabled = true;
std::atomic<uint64_t> g_seq{0};
}  // namespace

bool GradMode::enabled() { return g_grad_enabled; }
void GradMode::set(bool on) { g_grad_enabled = on; }

namespace {
// What the backward walk needs of an input whose value the vjp does not read: its shape, dtype, device
// and place in the graph (grad_fn, output_index), over an empty storage, so the value itself is not
// kept alive by the tape.
Tensor metadata_only(const Tensor& t) {
  auto impl = std::make_shared<TensorImpl>(*t.get());
  impl->storage = std::make_shared<Storage>(nullptr, 0, t.device(), nullptr, nullptr);
  impl->offset = 0;
  return Tensor(std::move(impl));
}
}  // namespace

void record(const OpPtr& op, const TensorList& inputs, TensorList& outputs) {
  if (!g_grad_enabled || !op->differentiable()) return;
  bool any = false;
  for (const auto& t : inputs) any = any || t.requires_grad();
  if (!any) return;
  auto node = std::make_shared<Node>();
  node->op = op;
  node->inputs = inputs;
  if (!op->vjp_reads_inputs())
    for (Tensor& t : node->inputs)
      if (t.get()->grad_fn || !t.requires_grad()) t = metadata_only(t);  // a leaf's identity is kept
  node->input_versions.reserve(inputs.size());
  for (const auto& t : node->inputs) node->input_versions.push_back(t.storage()->version());
  node->out_specs.reserve(outputs.size());
  for (const auto& o : outputs) node->out_specs.push_back({o.shape(), o.dtype(), o.device()});
  if (op->saves_outputs()) {
    for (const auto& o : outputs) {
      node->outputs.push_back(o.detach());  // an alias without grad_fn: no reference cycle
      node->output_versions.push_back(o.storage()->version());
    }
  }
  node->seq = g_seq.fetch_add(1, std::memory_order_relaxed);
  if (anomaly_options()) node->scope = current_scope();
  for (size_t i = 0; i < outputs.size(); ++i) {
    TensorImpl* impl = outputs[i].get();
    if (!is_floating(impl->dtype)) continue;
    impl->requires_grad = true;
    impl->grad_fn = node;
    impl->output_index = uint32_t(i);
  }
}

}  // namespace titanax
