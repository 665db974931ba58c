// Neural-network modules with named parameters ("layers/0/weight").
//
// A Module owns parameter tensors and child modules. parameters() returns a ParamTree whose tensors are
// the module's own (same storage): optimizers and checkpoint loading update them in place. Parameter
// initialisation is deterministic: each tensor draws from Philox keyed by (init seed, parameter path),
// so every rank and every world size gets the same initial model without communication.
#pragma once

#include <array>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "autodiff/anomaly.h"
#include "core/rng.h"
#include "core/tree.h"
#include "ops/ops.h"
#include "parallel/mesh.h"

namespace titanax::nn {

/// Per-thread randomness for stochastic layers (dropout), so runs are reproducible and resumable.
/// set(key) fixes the keys of what follows; set(base, step) (the Engine, at each step: the run seed and
/// the rank, and the optimizer's step counter) makes the layers draw with the key fold_in(next_key(),
/// step) read when each op runs, so a JIT-compiled step draws new masks at every replay. Each call to
/// next_key() returns a new key derived from the key and a counter.
struct RngContext {
  static void set(RngKey key, const Tensor& step = {});
  static RngKey next_key();
  /// The step tensor of set(base, step) (a 0-d i64 CPU tensor), or undefined.
  static const Tensor& step();
};

class Module;

/// A forward hook (PyTorch's Module.register_forward_hook): called by Module::operator() after forward()
/// with the module, its input and its output, inside the module's NameScope (current_scope() gives its
/// path). It may return a tensor to use as the output instead (same shape, ShapeError otherwise), or an
/// undefined Tensor to keep it. Hooks run when the forward runs: under jit, once, while tracing (their
/// ops become part of the graph; reading a value on the host there is a TraceError).
using ForwardHook = std::function<Tensor(Module& module, const Tensor& input, const Tensor& output)>;

/// A backward hook (PyTorch's Module.register_full_backward_hook), called during a backward pass through
/// one call of a module once the gradients with respect to that call's input (grad_input; undefined when
/// the input does not require grad) and output (grad_output) are computed, with the module's path at the
/// call (current_scope(): "blocks/1/attn"; PyTorch passes the module itself, which the tape here need not
/// outlive). It may return a replacement for grad_input (same shape, dtype and device; else
/// AutodiffError), or an undefined Tensor to keep it. It runs as a gradient hook on the call's output and
/// input (Tensor::register_hook), so it composes and traces as those do.
using BackwardHook = std::function<Tensor(const std::string& path, const Tensor& grad_input, const Tensor& grad_output)>;

/// Removes a hook (PyTorch's RemovableHandle; core/hooks.h). remove() is idempotent and safe after the
/// module is gone.
using HookHandle = titanax::HookHandle;

class Module {
 public:
  virtual ~Module() = default;
  /// The forward pass for single-input modules. Throws ShapeError on a mismatched input.
  virtual Tensor forward(const Tensor& x) = 0;
  /// forward(x) inside a NameScope (autodiff/anomaly.h) of the name this module has in its parent, so that
  /// anomaly reports give the module path ("blocks/1/attn/proj"), then the forward hooks in the order they
  /// were registered. Parents call their children this way.
  Tensor operator()(const Tensor& x) {
    NameScope scope(scope_name_);
    if (!backward_hooks_.empty()) return call_with_backward_hooks(x);
    Tensor y = forward(x);
    if (!hooks_.empty()) y = run_forward_hooks(x, std::move(y));
    return y;
  }
  /// Adds a hook that operator() calls after each forward of this module (not of its children: register
  /// on them). Returns its handle.
  HookHandle register_forward_hook(ForwardHook hook);
  /// Adds a backward hook (BackwardHook) for every later call of this module whose output requires grad.
  /// Each such call wraps its input and output in a view op of its own (recorded on the tape), so the
  /// hook sees that call's gradients, not those of other uses of the same tensors. Returns its handle;
  /// ValueError for an empty hook.
  HookHandle register_full_backward_hook(BackwardHook hook);

  /// Every parameter of this module and its children, in registration order, by "/"-joined path. Names
  /// each parameter tensor by its path (Tensor::name(): a longer path, the root's, replaces a shorter).
  ParamTree parameters() const;
  /// Number of parameter elements.
  int64_t num_parameters() const { return parameters().numel(); }
  /// The parameters training updates: parameters() without the frozen ones (set_trainable), in the same
  /// order and with the same paths. The Engine differentiates, all-reduces, clips and updates these
  /// only; a frozen parameter still takes part in the forward (a constant of the backward, which skips
  /// its gradient) and is saved and restored with checkpoints, as a PyTorch parameter after
  /// requires_grad_(False).
  ParamTree trainable_parameters() const;
  /// Freezes (trainable = false) or unfreezes every parameter whose path matches the glob `pattern`
  /// (parallel/sharding.h's syntax: `*` inside one segment, a `**` segment across segments, e.g.
  /// "blocks/*/attn/**" or "**/bias"). All parameters start trainable. Returns how many matched; throws
  /// ValueError when none does (a misspelt pattern), listing the first paths there are. Set it before the
  /// first training step: the optimizer's state, the gradient buckets and a compiled step are made for
  /// the parameters trainable then.
  int64_t set_trainable(const std::string& pattern, bool trainable);
  /// Moves every parameter (this module's and its children's) to `device` in place, as PyTorch's
  /// Module.to(device): each parameter keeps its identity (the handles the module, the parameters() tree
  /// and the user hold see the new storage), gets fresh contiguous storage on the device with its values,
  /// and loses its accumulated grad(). Parameters already there are left alone. Move the model before its
  /// first training step: optimizer state created earlier stays where it was (the optimizer then throws
  /// DeviceError), and a JIT-compiled step keeps the storages it was traced with. Throws DeviceError for a
  /// CUDA device the build or the machine does not have.
  void to(Device device);
  /// The device of the parameters (the first one's; the CPU for a module without parameters).
  Device device() const;
  /// Training mode (dropout active) or evaluation mode; recursive.
  void train(bool on = true);
  /// Whether the forward draws randomness (this module or a child: dropout with p > 0), so that running
  /// it twice gives different results (activation recomputation refuses such modules).
  virtual bool stochastic() const;
  void eval() { train(false); }
  bool training() const { return training_; }
  /// One line: "Linear(784 -> 512, bias)".
  virtual std::string name() const = 0;
  /// The module tree with parameter counts, one line per module ("[4096 params, frozen]" when none of a
  /// module's own parameters trains, "[4160 params, 4096 frozen]" when some do not).
  std::string describe(int indent = 0) const;
  /// (Re)initialises every parameter from `seed` (PyTorch's default schemes; see each module).
  void init_parameters(uint64_t seed);
  /// How the parameters are laid out over mesh axes (tensor parallelism), by path: a parameter whose
  /// spec names an axis holds only this rank's block of the global tensor (parallel/sharding.h).
  /// The default collects the children's specs under their prefixes and is empty for modules that hold
  /// whole tensors; an empty map means "the module does not say" (the engine then uses the plan's TP
  /// rules). Tensor-parallel models (nn::GPT) override it.
  virtual std::map<std::string, PartitionSpec> partition_specs() const;

 protected:
  /// Adds a parameter; `init` fills it (given a key derived from the seed and the full path).
  Tensor& register_parameter(const std::string& name, Tensor t,
                             std::function<void(Tensor&, RngKey)> init = nullptr);
  /// Initialises this module's own parameter `name` as init_parameters(seed) would with this module as
  /// the root, leaving the others as they are (a parameter added to a module already trained or
  /// loaded). ValueError for a name this module did not register.
  void init_parameter(const std::string& name, uint64_t seed);
  template <class M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> m) {
    children_.emplace_back(name, m);
    m->scope_name_ = name;
    return m;
  }
  /// Sets the name operator() scopes m's forward under (register_module sets it to m's name).
  static void set_scope_name(Module& m, std::string name) { m.scope_name_ = std::move(name); }
  /// The name this module was registered under in its parent ("" for a root).
  const std::string& scope_name() const { return scope_name_; }
  const std::vector<std::pair<std::string, std::shared_ptr<Module>>>& children() const { return children_; }

 private:
  void collect(const std::string& prefix, ParamTree& out, bool trainable_only) const;
  int64_t set_trainable_rec(const std::string& prefix, const std::string& pattern, bool trainable);
  void init_rec(const std::string& prefix, RngKey base);
  struct Param {
    std::string name;
    Tensor tensor;
    std::function<void(Tensor&, RngKey)> init;
    bool trainable = true;
  };
  std::vector<Param> params_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  Tensor run_forward_hooks(const Tensor& x, Tensor y);
  Tensor call_with_backward_hooks(const Tensor& x);
  std::string scope_name_;
  Hooks<ForwardHook> hooks_;
  Hooks<BackwardHook> backward_hooks_;
  bool training_ = true;
};

/// Fills t with U(-bound, bound) from key (f32 / f64).
void uniform_(Tensor& t, RngKey key, double bound);
/// Fills t with N(0, std^2) from key.
void normal_(Tensor& t, RngKey key, double std);

/// y = x w^T + b, w: [out, in]. Init as PyTorch: w, b ~ U(-1/sqrt(in), 1/sqrt(in)).
class Linear final : public Module {
 public:
  Linear(int64_t in, int64_t out, bool bias = true, DType dtype = DType::f32);
  Tensor forward(const Tensor& x) override;
  std::string name() const override;
  Tensor weight, bias;

 private:
  int64_t in_, out_;
};

/// 2-D convolution over [N, C, H, W]. Init as PyTorch: U(-1/sqrt(C*kh*kw), +) for weight and bias.
class Conv2d final : public Module {
 public:
  Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride = 1, int64_t padding = 0,
         bool bias = true, DType dtype = DType::f32);
  Tensor forward(const Tensor& x) override;
  std::string name() const override;
  Tensor weight, bias;

 private:
  int64_t in_, out_, k_, stride_, pad_;
};

class MaxPool2d final : public Module {
 public:
  explicit MaxPool2d(int64_t kernel, int64_t stride = 0, int64_t padding = 0);
  Tensor forward(const Tensor& x) override;
  std::string name() const override;

 private:
  int64_t k_, stride_, pad_;
};

class ReLU final : public Module {
 public:
  Tensor forward(const Tensor& x) override { return relu(x); }
  std::string name() const override { return "ReLU"; }
};

class GELU final : public Module {
 public:
  explicit GELU(bool approximate = true) : approximate_(approximate) {}
  Tensor forward(const Tensor& x) override { return gelu(x, approximate_); }
  std::string name() const override { return approximate_ ? "GELU(tanh)" : "GELU"; }

 private:
  bool approximate_;
};

/// Inverted dropout; identity in eval mode. Keys come from RngContext.
class Dropout final : public Module {
 public:
  explicit Dropout(double p);
  Tensor forward(const Tensor& x) override;
  std::string name() const override;
  bool stochastic() const override { return p_ > 0; }

 private:
  double p_;
};

/// Layer normalisation over the last axis; weight = 1, bias = 0 at init.
class LayerNorm final : public Module {
 public:
  explicit LayerNorm(int64_t dim, double eps = 1e-5, DType dtype = DType::f32);
  Tensor forward(const Tensor& x) override;
  std::string name() const override;
  Tensor weight, bias;

 private:
  int64_t dim_;
  double eps_;
};

/// Lookup table [num, dim]; forward takes integer ids. Init N(0, 1) as PyTorch (set std for GPT's 0.02).
class Embedding final : public Module {
 public:
  Embedding(int64_t num, int64_t dim, double init_std = 1.0, DType dtype = DType::f32);
  Tensor forward(const Tensor& ids) override;
  std::string name() const override;
  Tensor weight;

 private:
  int64_t num_, dim_;
};

/// Flattens axes [start, end] into one.
class Flatten final : public Module {
 public:
  explicit Flatten(int start = 1, int end = -1) : start_(start), end_(end) {}
  Tensor forward(const Tensor& x) override { return x.flatten(start_, end_); }
  std::string name() const override { return "Flatten"; }

 private:
  int start_, end_;
};

/// Children named "0", "1", ... applied in order.
class Sequential final : public Module {
 public:
  Sequential() = default;
  explicit Sequential(std::vector<std::shared_ptr<Module>> layers);
  Sequential& add(std::shared_ptr<Module> m);
  Tensor forward(const Tensor& x) override;
  std::string name() const override { return "Sequential"; }
  size_t size() const { return children().size(); }
};

/// Children under names the caller chooses (a pipeline stage's layers under their global indices:
/// "blocks/2", "blocks/3" on stage 1 of 2); a container only: its owner runs the children.
class NamedModules final : public Module {
 public:
  /// Adds `m` under `name`; returns m. Register the container first: since its owner runs m, m's module
  /// path (Module::operator()) is the container's name and `name` ("blocks/2").
  std::shared_ptr<Module> add(const std::string& name, std::shared_ptr<Module> m) {
    register_module(name, m);
    set_scope_name(*m, scope_name().empty() ? name : scope_name() + "/" + name);
    return m;
  }
  /// Throws InternalError: the owner runs the children itself.
  Tensor forward(const Tensor& x) override;
  std::string name() const override { return "Modules"; }
};

struct MLPOptions {
  std::string activation = "relu";  ///< "relu", "gelu", "tanh"
  double dropout = 0.0;             ///< after each hidden activation
  DType dtype = DType::f32;
};

/// Linear layers sizes[0] -> sizes[1] -> ... -> sizes.back() with the activation between them (none
/// after the last). Parameters "layers/<i>/weight", "layers/<i>/bias". Inputs of rank > 2 are flattened
/// from axis 1.
class MLP final : public Module {
 public:
  explicit MLP(std::vector<int64_t> sizes, MLPOptions opts = {});
  Tensor forward(const Tensor& x) override;
  std::string name() const override;

 private:
  std::vector<int64_t> sizes_;
  MLPOptions opts_;
  std::vector<std::shared_ptr<Linear>> layers_;
  std::vector<std::shared_ptr<Dropout>> drops_;
};

/// The MNIST CNN: [conv3x3(c_in->c1), ReLU, maxpool2] -> [conv3x3(c1->c2), ReLU, maxpool2] -> flatten ->
/// Linear(c2*7*7 -> hidden) -> ReLU -> [dropout] -> Linear(hidden -> classes). Padding 1 keeps 28 -> 14 -> 7.
struct CNNOptions {
  int64_t in_channels = 1, image_size = 28, classes = 10, hidden = 128;
  std::vector<int64_t> channels = {32, 64};
  double dropout = 0.0;
};
class CNN final : public Module {
 public:
  explicit CNN(CNNOptions opts = {});
  Tensor forward(const Tensor& x) override;
  std::string name() const override { return "CNN"; }

 private:
  CNNOptions opts_;
  std::shared_ptr<Sequential> features_, head_;
};

}  // namespace titanax::nn
