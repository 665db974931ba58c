// Pipeline stages of a model (Plan::pp): the interface the engine drives (nn::PipelineModule), how
// layers are assigned to stages (by layer index or by parameter-path filters), and a generic stack of
// layers that runs as stages (nn::PipelineSequential). nn::GPT implements PipelineModule itself.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/op.h"
#include "engine/nn.h"
#include "io/data.h"

namespace titanax {

namespace nn {

/// A model that runs as a pipeline of stages (Plan::pp): built on a mesh with a pipe axis, each rank
/// holds only its stage's layers (nn::GPT). The engine drives it through these calls.
class PipelineModule {
 public:
  virtual ~PipelineModule() = default;
  /// The number of stages S the model is split into, and this rank's stage (0 <= stage < S).
  virtual int pipeline_stages() const = 0;
  virtual int pipeline_stage() const = 0;
  /// One microbatch through this stage. `input`: the previous stage's output (undefined on stage 0,
  /// which reads mb["x"]). Returns the activation for the next stage, or on the last stage the loss
  /// against mb["y"] with `reduction` (mean: the training loss; sum: evaluation).
  virtual Tensor stage_forward(const Tensor& input, const Batch& mb, Reduction reduction) = 0;
  /// Shape, dtype and device of the activation stage_forward receives for `mb` (stages > 0).
  virtual TensorSpec stage_input_spec(const Batch& mb) const = 0;
  /// Parameters of the whole model held by two stages (tied weights, e.g. GPT's token embedding on the
  /// first stage and its head on the last), with the other stage holding each: the engine sums their
  /// gradients between the two stages after backward, so both copies take the same update. A copy
  /// with counted == false is left out of the gradient norm (the parameter counts once).
  struct Tied {
    std::string path;
    int peer_stage;
    bool counted;
  };
  virtual std::vector<Tied> tied_parameters() const = 0;
  /// Activation recomputation inside the stage: checkpoint() every group of k consecutive layers
  /// (0 = off). Set by the engine from PP::recompute.
  virtual void set_recompute_layers(int k) = 0;
};

}  // namespace nn

namespace nn {

/// Which layers each stage holds. Give at most one of the two; neither = an even split by index.
struct StageSplit {
  /// The first layer of each stage after stage 0: S - 1 strictly ascending indices in (0, layers).
  /// {2, 3} over 4 layers: stage 0 = layers 0-1, stage 1 = layer 2, stage 2 = layer 3.
  std::vector<int64_t> boundaries;
  /// One list of glob patterns (parallel/sharding.h syntax) per stage: a layer goes to the stage one of
  /// whose patterns matches one of its parameter paths ("layers/<i>/weight"). Layers without
  /// parameters (activations) join the stage of the layer before them (stage 0 when first).
  std::vector<std::vector<std::string>> path_filters;
};

/// The stage of each layer, given each layer's parameter paths (global, e.g. "layers/3/weight") and S.
/// The even split gives stage s the layers [s L / S, (s + 1) L / S).
/// Throws PlanError (at `loc`) for S < 1, fewer layers than stages, both fields set, boundaries that are
/// not S - 1 ascending indices in (0, L), path_filters without S lists, a layer with parameters that no
/// filter matches or that filters of two stages match, stages out of order (a layer on an earlier
/// stage than the layer before it: stages must be contiguous), or a stage left without layers.
std::vector<int> assign_stages(const std::vector<std::vector<std::string>>& layer_params, int stages,
                               const StageSplit& split, Loc loc = Loc::current());

/// Runs `layers` in order on x. With k > 0 each group of k consecutive layers (the last one shorter) is
/// wrapped in checkpoint() with the group's parameters as the node's inputs, so only the group's input
/// is kept for the backward, where the group runs again (activation recomputation); the modules must
/// outlive that backward. k <= 0: plain.
Tensor run_layers(const std::vector<Module*>& layers, Tensor x, int k);

/// A stack of layers (x -> layer 0 -> layer 1 -> ... -> loss) run as pipeline stages over mesh axis
/// `axis`: the rank at stage s builds and holds only its layers, under their global paths
/// ("layers/<i>/..."), so any S starts from the same parameters (init keys come from the paths) and
/// checkpoints do not depend on S. Stage 0 reads mb["x"]; the last stage returns loss(output, mb, r).
/// The activation between stages has the shape `activation(s, mb)` gives for the input of stage s > 0
/// (what Megatron's schedules take as tensor_shape; the receiver allocates it before the data arrives).
class PipelineSequential final : public Module, public PipelineModule {
 public:
  using Factory = std::function<std::shared_ptr<Module>()>;
  using StageLoss = std::function<Tensor(const Tensor& output, const Batch& mb, Reduction reduction)>;
  using ActivationSpec = std::function<TensorSpec(int stage, const Batch& mb)>;
  /// Builds every layer once to read its parameter paths (for the split), keeps this stage's. Throws
  /// what assign_stages throws, and PlanError when `axis` is not in the mesh.
  PipelineSequential(std::vector<Factory> layers, const Mesh& mesh, const std::string& axis, StageSplit split,
                     StageLoss loss, ActivationSpec activation, Loc loc = Loc::current());
  /// Needs the whole stack (S = 1; PlanError otherwise): the layers applied to x (no loss).
  Tensor forward(const Tensor& x) override;
  std::string name() const override;
  int pipeline_stages() const override { return S_; }
  int pipeline_stage() const override { return s_; }
  Tensor stage_forward(const Tensor& input, const Batch& mb, Reduction reduction) override;
  TensorSpec stage_input_spec(const Batch& mb) const override { return activation_(s_, mb); }
  std::vector<Tied> tied_parameters() const override { return {}; }
  /// Recomputes groups of k of this stage's layers in the backward (0 = off; ValueError for k < 0).
  void set_recompute_layers(int k) override;
  /// Global indices of this stage's layers.
  const std::vector<int64_t>& layer_indices() const { return mine_; }

 private:
  std::vector<std::shared_ptr<Module>> layers_;  // this stage's, in order
  std::vector<int64_t> mine_;
  int S_ = 1, s_ = 0, recompute_ = 0;
  int64_t total_ = 0;
  StageLoss loss_;
  ActivationSpec activation_;
};

}  // namespace nn
}  // namespace titanax
