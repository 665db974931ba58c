// Linked into builds without CUDA (CUDA builds drop */no_cuda.cpp and compile kernels/cuda instead): the
// entry points of kernels/cuda/kernels.h, each throwing DeviceError, so the ops' cuda() methods need no
// #ifdefs. They are unreachable in practice: without CUDA no tensor can live on a CUDA device.
#include "kernels/cuda/kernels.h"

namespace titanax::kernels::cuda {
namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw DeviceError(std::string(what) + ": this Titanax was built without CUDA", "a build with CUDA", "the cpu build",
                    "configure with `cmake --preset cuda` on a machine with the CUDA toolkit");
}
}  // namespace

void copy_cast(const Tensor&, Tensor&) { no_cuda("copy"); }
void binary(BinaryOp op, const Tensor&, const Tensor&, Tensor&) { no_cuda(cpu::binary_name(op)); }
void unary(UnaryOp op, const Tensor&, Tensor&) { no_cuda(cpu::unary_name(op)); }
void clamp(const Tensor&, double, double, Tensor&) { no_cuda("clamp"); }
void where(const Tensor&, const Tensor&, const Tensor&, Tensor&) { no_cuda("where"); }
void reduce(ReduceOp, const Tensor&, const std::vector<bool>&, Tensor&) { no_cuda("reduce"); }
void argmax(const Tensor&, int, Tensor&) { no_cuda("argmax"); }
void ce_shard_max(const Tensor&, Tensor&) { no_cuda("vocab_parallel_cross_entropy"); }
void ce_shard_partials(const Tensor&, const Tensor&, int64_t, const Tensor&, Tensor&) { no_cuda("vocab_parallel_cross_entropy"); }
void ce_shard_backward(const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&, int64_t, LossReduction, int64_t,
                       Tensor&) {
  no_cuda("vocab_parallel_cross_entropy_backward");
}
void fill_random(bool, RngKey, Tensor&) { no_cuda("random fill"); }
void sum_squares(const std::vector<Tensor>&, Tensor&) { no_cuda("sum_squares"); }
void one_hot(const Tensor&, int64_t, Tensor&) { no_cuda("one_hot"); }
void dropout(const Tensor&, double, RngKey, Tensor&) { no_cuda("dropout"); }
void softmax(const Tensor&, int64_t, int64_t, int64_t, bool, Tensor&) { no_cuda("softmax"); }
void cross_entropy(const Tensor&, const Tensor&, int64_t, LossReduction, Tensor&) { no_cuda("cross_entropy"); }
void cross_entropy_fused(const Tensor&, const Tensor&, const Tensor&, int64_t, LossReduction, Tensor&, Tensor&) {
  no_cuda("cross_entropy");
}
void cross_entropy_backward(const Tensor&, const Tensor&, const Tensor&, int64_t, LossReduction, Tensor&) {
  no_cuda("cross_entropy_backward");
}
void layer_norm(const Tensor&, const Tensor*, const Tensor*, double, Tensor&) { no_cuda("layer_norm"); }
void layer_norm_backward(const Tensor&, const Tensor&, const Tensor*, double, Tensor&, Tensor*, Tensor*, const Tensor*) {
  no_cuda("layer_norm_backward");
}
void gather(const Tensor&, const Tensor&, int64_t, int64_t, int64_t, bool, Tensor&) { no_cuda("gather"); }
void scatter_add(const Tensor&, const Tensor&, int64_t, int64_t, int64_t, bool, Tensor&) { no_cuda("scatter_add"); }
void attention_forward(const Tensor&, const Tensor&, const Tensor&, bool, double, Tensor&, Tensor&) {
  no_cuda("attention");
}
void attention_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
                        double, Tensor&, Tensor&, Tensor&) {
  no_cuda("attention");
}
std::optional<AttnRows> attention_rows(const Tensor&) { return std::nullopt; }  // asked of CUDA tensors only
bool attention_tensor_cores() { return false; }  // no CUDA kernels at all
void set_attention_tensor_cores(bool) {}
bool attention_deterministic() { return true; }
void set_attention_deterministic(bool) {}
int attention_rows_per_warp() { return 32; }
void set_attention_rows_per_warp(int) {}
void matmul(const Tensor&, const Tensor&, Tensor&, bool) { no_cuda("matmul"); }
void linear(const Tensor&, const Tensor&, const Tensor*, Tensor&, bool) { no_cuda("linear"); }
void conv2d_forward(const Tensor&, const Tensor&, const Tensor*, const cpu::Conv2dGeom&, Tensor&) { no_cuda("conv2d"); }
void conv2d_backward_input(const Tensor&, const Tensor&, const cpu::Conv2dGeom&, Tensor&) {
  no_cuda("conv2d_backward_input");
}
void conv2d_backward_weight(const Tensor&, const Tensor&, const cpu::Conv2dGeom&, Tensor&, Tensor*) {
  no_cuda("conv2d_backward_weight");
}
int64_t max_pool2d_workspace_bytes(const cpu::Pool2dGeom& g) { return g.N * g.C * g.OH() * g.OW() * 4; }
void max_pool2d_forward(const Tensor&, const cpu::Pool2dGeom&, Tensor&, Tensor&) { no_cuda("max_pool2d"); }
void max_pool2d_backward(const Tensor&, const Tensor&, const cpu::Pool2dGeom&, Tensor&) { no_cuda("max_pool2d_backward"); }
bool allow_tf32() { return false; }
void set_allow_tf32(bool) {}
void adam_update(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>&,
                 const std::vector<Tensor>&, const UpdateScalars&, double, double, double, double, bool, const Tensor*) {
  no_cuda("adam_update");
}
void sgd_update(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>&, const UpdateScalars&,
                double, double, bool, const Tensor*) {
  no_cuda("sgd_update");
}
void set_update_scalars(Tensor&, const UpdateScalars&) { no_cuda("set_update_scalars"); }

}  // namespace titanax::kernels::cuda
