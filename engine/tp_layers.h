// Tensor-parallel layers (Megatron-LM: Shoeybi et al. 2019, arXiv:1909.08053): modules that hold this
// rank's block of a global weight and run the matching collectives of parallel/tp.h in forward.
//
// Every layer takes a TPGroup (parallel/tp.h): a mesh axis of size n, or the default group (no mesh,
// n = 1: whole tensors, plain linear / embedding, no collectives). Initialisation draws the FULL global
// tensor from the key of the parameter's path (Module::init_parameters) and keeps this rank's block, so
// a model split over n ranks starts as exactly the same model as the unsplit one, for any n.
// partition_specs() reports each parameter's spec on the mesh (all replicated without a mesh).
//
// LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685; the
// layout of Hugging Face PEFT's lora.Linear): add_lora(r, alpha) gives a linear layer two more
// parameters, lora_a [r, in] and lora_b [out, r], and its output becomes
//   y = x W^T + b + (alpha / r) (x lora_a^T) lora_b^T
// with lora_a ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_(a = sqrt(5))) and lora_b = 0, so a
// layer with a fresh adapter computes what it did without one. In training, PEFT's lora_dropout p drops
// the adapter's input x (inverted dropout, keys from RngContext, as nn::Dropout; the layer's own product
// sees all of x). Under tensor parallelism the adapter
// follows its layer's split: a column-parallel layer keeps lora_a whole and splits lora_b's rows as its
// weight's (the rank-r activation's gradient is summed over the axis, Megatron's f, so lora_a's gradient
// is whole on every rank); a row-parallel layer splits lora_a's columns as its weight's and sums the
// rank-r activation over the axis (Megatron's g: [..., r] values, not [..., out]) before the whole
// lora_b. Initialisation draws the global tensors, so every TP degree starts from the same adapter.
#pragma once

#include <map>
#include <string>

#include "engine/nn.h"
#include "parallel/tp.h"

namespace titanax::nn {

/// Column-parallel linear: y = x W^T + b with the output features split over the group's ranks.
/// groups == 1: global weight [out, in] split on dim 0 (spec {axis, ""}), bias [out] (spec {axis}).
/// groups > 1 (e.g. 3 for fused q, k, v): the output is `groups` independent blocks of out / groups
/// features, each split separately, so the global weight is [groups, out / groups, in] (spec
/// {"", axis, ""}; the same memory as PyTorch's [out, in] weight) and the bias [groups, out / groups]
/// (spec {"", axis}); rank i holds block i of every group, and its output [..., out / n] is its block of
/// group 0, then of group 1, ... (so each rank gets whole q, k and v for its attention heads).
/// forward: x [..., in], replicated over the axis (f before the matmul sums its gradient over the axis).
/// Init: weight N(0, init_std^2), bias 0. Throws ValueError for non-positive sizes or out not divisible
/// by groups, ShapeError when out / groups does not divide by n.
class ColumnParallelLinear final : public Module {
 public:
  ColumnParallelLinear(int64_t in, int64_t out, TPGroup tp = {}, bool bias = true, int64_t groups = 1,
                       double init_std = 0.02, DType dtype = DType::f32);
  Tensor forward(const Tensor& x) override;
  std::string name() const override;
  std::map<std::string, PartitionSpec> partition_specs() const override;
  /// Global shapes and specs of "weight" and "bias" (as if split over `axis`).
  static Shape weight_shape(int64_t in, int64_t out, int64_t groups);
  static PartitionSpec weight_spec(const std::string& axis, int64_t groups);
  static Shape bias_shape(int64_t out, int64_t groups);
  static PartitionSpec bias_spec(const std::string& axis, int64_t groups);
  /// Adds a LoRA adapter of rank r, scale alpha / r and input dropout p (see the top of this file):
  /// global lora_a [r, in] (replicated) and lora_b of weight_shape(r, out, groups) split as the weight
  /// (spec weight_spec). ValueError for r < 1, r above min(in, out / groups), alpha not finite and > 0, p
  /// outside [0, 1), or a second adapter.
  void add_lora(int64_t r, double alpha, double dropout = 0);
  bool stochastic() const override { return lora_dropout_ > 0; }
  Tensor weight, bias;  ///< this rank's blocks (weight [groups, out / (groups n), in] when groups > 1)
  Tensor lora_a, lora_b;  ///< the adapter's blocks (undefined without one)

 private:
  int64_t in_, out_, groups_;
  TPGroup tp_;
  double lora_scale_ = 0, lora_dropout_ = 0;
};

/// Row-parallel linear: y = g(x_local W_local^T) + b with the input features split over the ranks:
/// global weight [out, in] split on dim 1 (spec {"", axis}); bias [out] replicated, added after the
/// all-reduce. forward: x [..., in / n], this rank's block of the input features (the output of a
/// column-parallel layer); returns [..., out] on every rank. Init: weight N(0, init_std^2), bias 0.
class RowParallelLinear final : public Module {
 public:
  RowParallelLinear(int64_t in, int64_t out, TPGroup tp = {}, bool bias = true, double init_std = 0.02,
                    DType dtype = DType::f32);
  Tensor forward(const Tensor& x) override;
  std::string name() const override;
  std::map<std::string, PartitionSpec> partition_specs() const override;
  /// Adds a LoRA adapter of rank r, scale alpha / r and input dropout p (see the top of this file):
  /// global lora_a [r, in] split on dim 1 as the weight (spec {"", axis}) and lora_b [out, r]
  /// (replicated). The dropout mask of this rank's block of x is that block of the unsplit input's mask,
  /// so every TP degree drops the same features. ValueError as ColumnParallelLinear::add_lora.
  void add_lora(int64_t r, double alpha, double dropout = 0);
  bool stochastic() const override { return lora_dropout_ > 0; }
  Tensor weight, bias;
  Tensor lora_a, lora_b;  ///< the adapter's blocks (undefined without one)

 private:
  int64_t in_, out_;
  TPGroup tp_;
  double lora_scale_ = 0, lora_dropout_ = 0;
};

/// Vocabulary-parallel embedding: global table [num, dim] split on dim 0 (spec {axis, ""}); forward
/// takes global ids [...] and returns [..., dim] on every rank (vocab_parallel_embedding). Init
/// N(0, init_std^2).
class VocabParallelEmbedding final : public Module {
 public:
  VocabParallelEmbedding(int64_t num, int64_t dim, TPGroup tp = {}, double init_std = 0.02, DType dtype = DType::f32);
  Tensor forward(const Tensor& ids) override;
  std::string name() const override;
  std::map<std::string, PartitionSpec> partition_specs() const override;
  Tensor weight;

 private:
  int64_t num_, dim_;
  TPGroup tp_;
};

}  // namespace titanax::nn
