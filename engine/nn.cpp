#include "engine/nn.h"

#include <cmath>
#include <functional>

#include "autodiff/autodiff.h"
#include "autodiff/tape.h"
#include "parallel/sharding.h"

namespace titanax::nn {

// ------------------------------------------------------------------------------ RngContext
namespace {
thread_local RngKey g_step_key = RngKey::from_seed(0);
thread_local uint64_t g_counter = 0;
thread_local Tensor g_step;

uint64_t path_hash(const std::string& s) {  // FNV-1a: stable across runs and platforms
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}
}  // namespace

void RngContext::set(RngKey key, const Tensor& step) {
  g_step_key = key;
  g_counter = 0;
  g_step = step;
}
RngKey RngContext::next_key() { return fold_in(g_step_key, g_counter++); }
const Tensor& RngContext::step() { return g_step; }

// ------------------------------------------------------------------------------ Module
HookHandle Module::register_forward_hook(ForwardHook hook) {
  if (!hook) throw ValueError("register_forward_hook: an empty hook", "a callable", "an empty std::function");
  return hooks_.add(std::move(hook));
}

HookHandle Module::register_full_backward_hook(BackwardHook hook) {
  if (!hook) throw ValueError("register_full_backward_hook: an empty hook", "a callable", "an empty std::function");
  return backward_hooks_.add(std::move(hook));
}

namespace {
// A view of t recorded as an op of its own (unsqueeze, squeeze): a tape node whose output's gradient is
// exactly this use's.
Tensor own_node(const Tensor& t) { return t.unsqueeze(0).squeeze(0); }
}  // namespace

// PyTorch's BackwardHookFunction: the call's input and output pass through nodes of their own; the
// output's gradient (computed first: it is downstream) is kept until the input's arrives, then the hooks
// run with both. Without an input gradient, they run when the output's arrives.
Tensor Module::call_with_backward_hooks(const Tensor& x) {
  const bool track_in = x.requires_grad();
  const Tensor in = track_in ? own_node(x) : x;
  Tensor y = forward(in);
  if (!hooks_.empty()) y = run_forward_hooks(x, std::move(y));
  if (!y.requires_grad()) return y;
  y = own_node(y);
  auto grad_output = std::make_shared<Tensor>();
  const std::string path = current_scope();
  const Hooks<BackwardHook> hooks = backward_hooks_;  // shares the registry: later removals count
  (void)y.register_hook([grad_output, track_in, hooks, path](const Tensor& g) {
    *grad_output = g;
    if (!track_in)
      for (const BackwardHook& h : hooks.snapshot()) (void)h(path, Tensor(), g);
    return Tensor();
  });
  if (track_in)
    (void)in.register_hook([grad_output, hooks, path](const Tensor& g) {
      Tensor gi = g;
      for (const BackwardHook& h : hooks.snapshot()) {
        Tensor r = h(path, gi, *grad_output);
        if (!r.defined()) continue;
        detail::check_hook_result(gi, r, "a backward hook of '" + path + "'");
        gi = std::move(r);
      }
      *grad_output = Tensor();
      return gi;
    });
  return y;
}

Tensor Module::run_forward_hooks(const Tensor& x, Tensor y) {
  for (const ForwardHook& hook : hooks_.snapshot()) {
    Tensor r = hook(*this, x, y);
    if (!r.defined()) continue;
    if (r.shape() != y.shape())
      throw ShapeError("a forward hook of " + name() + " returned another shape than the output",
                       y.shape().str(), r.shape().str(), "return a tensor of the output's shape, or Tensor() to keep it");
    y = std::move(r);
  }
  return y;
}

ParamTree Module::parameters() const {
  ParamTree out;
  collect("", out, false);
  return out;
}

ParamTree Module::trainable_parameters() const {
  ParamTree out;
  collect("", out, true);
  return out;
}

void Module::collect(const std::string& prefix, ParamTree& out, bool trainable_only) const {
  for (const auto& p : params_) {
    // The tensor takes the longest path it is listed under, the root's: errors and graphs name it so.
    if (Tensor t = p.tensor; t.name().size() < prefix.size() + p.name.size()) t.set_name(prefix + p.name);
    if (p.trainable || !trainable_only) out.insert(prefix + p.name, p.tensor);
  }
  for (const auto& [n, c] : children_) c->collect(prefix + n + "/", out, trainable_only);
}

int64_t Module::set_trainable(const std::string& pattern, bool trainable) {
  const int64_t n = set_trainable_rec("", pattern, trainable);
  if (n == 0) {
    std::string some;
    for (const auto& [p, t] : parameters()) {
      if (some.size() > 200) {
        some += ", ...";
        break;
      }
      some += (some.empty() ? "" : ", ") + p;
    }
    throw ValueError("set_trainable: no parameter of " + name() + " matches '" + pattern + "'",
                     "a glob over parameter paths (one of: " + some + ")", "'" + pattern + "'",
                     "use `*` for one path segment and `**` for any number of them, e.g. \"blocks/*/attn/**\"");
  }
  return n;
}

int64_t Module::set_trainable_rec(const std::string& prefix, const std::string& pattern, bool trainable) {
  int64_t n = 0;
  for (auto& p : params_)
    if (glob_match(pattern, prefix + p.name)) p.trainable = trainable, ++n;
  for (auto& [name, c] : children_) n += c->set_trainable_rec(prefix + name + "/", pattern, trainable);
  return n;
}

void Module::to(Device device) {
  NoGradGuard ng;
  for (auto& p : params_) {
    TensorImpl& impl = *p.tensor.get();
    if (p.tensor.device() == device) continue;  // also a tensor registered twice, moved on its first visit
    Tensor moved = p.tensor.detach().to(device).contiguous();
    impl.storage = moved.storage();
    impl.strides = moved.strides();
    impl.offset = moved.offset();
    impl.grad.reset();
  }
  for (auto& [n, c] : children_) c->to(device);
}

Device Module::device() const {
  ParamTree ps = parameters();
  return ps.size() ? ps[0].second.device() : Device::cpu();
}

void Module::train(bool on) {
  training_ = on;
  for (auto& [n, c] : children_) c->train(on);
}

bool Module::stochastic() const {
  for (const auto& [n, c] : children_)
    if (c->stochastic()) return true;
  return false;
}

Tensor NamedModules::forward(const Tensor&) {
  throw InternalError("NamedModules::forward: the owner runs the children", "the owning module's forward",
                      "NamedModules::forward");
}

std::string Module::describe(int indent) const {
  std::string pad(size_t(indent) * 2, ' ');
  std::string s = pad + name();
  int64_t own = 0, frozen = 0;
  for (const auto& p : params_) own += p.tensor.numel(), frozen += p.trainable ? 0 : p.tensor.numel();
  if (own)
    s += "  [" + std::to_string(own) + " params" +
         (frozen == own ? ", frozen" : frozen ? ", " + std::to_string(frozen) + " frozen" : "") + "]";
  s += "\n";
  for (const auto& [n, c] : children_) s += pad + "  (" + n + ") " + c->describe(indent + 1).substr(size_t(indent + 1) * 2);
  return s;
}

std::map<std::string, PartitionSpec> Module::partition_specs() const {
  std::map<std::string, PartitionSpec> out;
  for (const auto& [n, c] : children_)
    for (auto& [p, s] : c->partition_specs()) out[n + "/" + p] = s;
  return out;
}

void Module::init_parameters(uint64_t seed) { init_rec("", RngKey::from_seed(seed)); }

void Module::init_rec(const std::string& prefix, RngKey base) {
  NoGradGuard ng;
  for (auto& p : params_)
    if (p.init) p.init(p.tensor, fold_in(base, path_hash(prefix + p.name)));
  for (auto& [n, c] : children_) c->init_rec(prefix + n + "/", base);
}

void Module::init_parameter(const std::string& name, uint64_t seed) {
  for (auto& p : params_)
    if (p.name == name) {
      NoGradGuard ng;
      if (p.init) p.init(p.tensor, fold_in(RngKey::from_seed(seed), path_hash(name)));
      return;
    }
  throw ValueError("init_parameter: " + this->name() + " has no parameter '" + name + "'", "a name given to register_parameter",
                   "'" + name + "'");
}

Tensor& Module::register_parameter(const std::string& name, Tensor t, std::function<void(Tensor&, RngKey)> init) {
  for (const auto& p : params_)
    if (p.name == name) throw ValueError("parameter registered twice", "unique names", "'" + name + "'");
  params_.push_back({name, t, std::move(init)});
  return params_.back().tensor;
}

void uniform_(Tensor& t, RngKey key, double bound) {
  NoGradGuard ng;
  Tensor u = random_uniform(key, t.shape(), DType::f64);
  Tensor v = u * (2 * bound) - bound;
  copy_(t, v);
}

void normal_(Tensor& t, RngKey key, double std) {
  NoGradGuard ng;
  Tensor v = random_normal(key, t.shape(), DType::f64) * std;
  copy_(t, v);
}

namespace {
std::function<void(Tensor&, RngKey)> uniform_init(double bound) {
  return [bound](Tensor& t, RngKey k) { uniform_(t, k, bound); };
}
std::function<void(Tensor&, RngKey)> const_init(double v) {
  return [v](Tensor& t, RngKey) { fill_(t, v); };
}
void check_positive(int64_t v, const char* what, const char* module) {
  if (v <= 0)
    throw ValueError(std::string(module) + ": " + what + " must be positive", "> 0", std::to_string(v));
}
}  // namespace

// ------------------------------------------------------------------------------ layers
Linear::Linear(int64_t in, int64_t out, bool has_bias, DType dtype) : in_(in), out_(out) {
  check_positive(in, "in_features", "Linear");
  check_positive(out, "out_features", "Linear");
  double bound = 1.0 / std::sqrt(double(in));
  weight = register_parameter("weight", empty(Shape{out, in}, dtype), uniform_init(bound));
  if (has_bias) bias = register_parameter("bias", empty(Shape{out}, dtype), uniform_init(bound));
  init_parameters(0);
}
Tensor Linear::forward(const Tensor& x) { return linear(x, weight, bias); }
std::string Linear::name() const {
  return "Linear(" + std::to_string(in_) + " -> " + std::to_string(out_) + (bias.defined() ? ", bias)" : ")");
}

Conv2d::Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride, int64_t padding, bool has_bias,
               DType dtype)
    : in_(in_channels), out_(out_channels), k_(kernel), stride_(stride), pad_(padding) {
  check_positive(in_channels, "in_channels", "Conv2d");
  check_positive(out_channels, "out_channels", "Conv2d");
  check_positive(kernel, "kernel", "Conv2d");
  double bound = 1.0 / std::sqrt(double(in_channels * kernel * kernel));
  weight = register_parameter("weight", empty(Shape{out_channels, in_channels, kernel, kernel}, dtype), uniform_init(bound));
  if (has_bias) bias = register_parameter("bias", empty(Shape{out_channels}, dtype), uniform_init(bound));
  init_parameters(0);
}
Tensor Conv2d::forward(const Tensor& x) { return conv2d(x, weight, bias, {stride_, stride_}, {pad_, pad_}); }
std::string Conv2d::name() const {
  return "Conv2d(" + std::to_string(in_) + " -> " + std::to_string(out_) + ", k=" + std::to_string(k_) +
         ", stride=" + std::to_string(stride_) + ", pad=" + std::to_string(pad_) + ")";
}

MaxPool2d::MaxPool2d(int64_t kernel, int64_t stride, int64_t padding) : k_(kernel), stride_(stride ? stride : kernel), pad_(padding) {
  check_positive(kernel, "kernel", "MaxPool2d");
}
Tensor MaxPool2d::forward(const Tensor& x) { return max_pool2d(x, {k_, k_}, {stride_, stride_}, {pad_, pad_}); }
std::string MaxPool2d::name() const { return "MaxPool2d(k=" + std::to_string(k_) + ", stride=" + std::to_string(stride_) + ")"; }

Dropout::Dropout(double p) : p_(p) {
  if (!(p >= 0 && p < 1)) throw ValueError("Dropout probability out of range", "0 <= p < 1", std::to_string(p));
}
Tensor Dropout::forward(const Tensor& x) {
  if (!training() || p_ == 0) return x;
  const Tensor& step = RngContext::step();
  return step.defined() ? dropout(x, p_, RngContext::next_key(), step) : dropout(x, p_, RngContext::next_key());
}
std::string Dropout::name() const { return "Dropout(p=" + std::to_string(p_) + ")"; }

LayerNorm::LayerNorm(int64_t dim, double eps, DType dtype) : dim_(dim), eps_(eps) {
  check_positive(dim, "dim", "LayerNorm");
  weight = register_parameter("weight", empty(Shape{dim}, dtype), const_init(1.0));
  bias = register_parameter("bias", empty(Shape{dim}, dtype), const_init(0.0));
  init_parameters(0);
}
Tensor LayerNorm::forward(const Tensor& x) { return layer_norm(x, weight, bias, eps_); }
std::string LayerNorm::name() const { return "LayerNorm(" + std::to_string(dim_) + ")"; }

Embedding::Embedding(int64_t num, int64_t dim, double init_std, DType dtype) : num_(num), dim_(dim) {
  check_positive(num, "num_embeddings", "Embedding");
  check_positive(dim, "dim", "Embedding");
  weight = register_parameter("weight", empty(Shape{num, dim}, dtype),
                              [init_std](Tensor& t, RngKey k) { normal_(t, k, init_std); });
  init_parameters(0);
}
Tensor Embedding::forward(const Tensor& ids) { return embedding(weight, ids); }
std::string Embedding::name() const { return "Embedding(" + std::to_string(num_) + ", " + std::to_string(dim_) + ")"; }

Sequential::Sequential(std::vector<std::shared_ptr<Module>> layers) {
  for (auto& l : layers) add(std::move(l));
}
Sequential& Sequential::add(std::shared_ptr<Module> m) {
  register_module(std::to_string(children().size()), std::move(m));
  return *this;
}
Tensor Sequential::forward(const Tensor& x) {
  Tensor h = x;
  for (const auto& [n, c] : children()) h = (*c)(h);
  return h;
}

namespace {
constexpr const char* kLayers = "layers";  // the name of MLP's Sequential of Linear layers
}  // namespace

MLP::MLP(std::vector<int64_t> sizes, MLPOptions opts) : sizes_(std::move(sizes)), opts_(std::move(opts)) {
  if (sizes_.size() < 2)
    throw ValueError("MLP needs at least an input and an output size", "sizes like [784, 512, 10]",
                     std::to_string(sizes_.size()) + " sizes");
  if (opts_.activation != "relu" && opts_.activation != "gelu" && opts_.activation != "tanh")
    throw ValueError("unknown MLP activation", "relu, gelu or tanh", "'" + opts_.activation + "'",
                     did_you_mean(opts_.activation, {"relu", "gelu", "tanh"}));
  auto layers = std::make_shared<Sequential>();
  for (size_t i = 0; i + 1 < sizes_.size(); ++i) {
    auto l = std::make_shared<Linear>(sizes_[i], sizes_[i + 1], true, opts_.dtype);
    layers_.push_back(l);
    layers->add(l);
    if (i + 2 < sizes_.size() && opts_.dropout > 0) drops_.push_back(std::make_shared<Dropout>(opts_.dropout));
  }
  register_module(kLayers, layers);
  // Children (no parameters), so that train() / eval() and stochastic() reach them.
  for (size_t i = 0; i < drops_.size(); ++i) register_module("dropout" + std::to_string(i), drops_[i]);
  init_parameters(0);  // keys from the full paths ("layers/1/weight"), so layers differ
}

Tensor MLP::forward(const Tensor& x) {
  Tensor h = x.dim() > 2 ? x.flatten(1) : x;
  if (h.shape()[h.dim() - 1] != sizes_[0])
    throw ShapeError("MLP input has the wrong number of features", std::to_string(sizes_[0]) + " features",
                     x.shape().str(), "check model.sizes[0] against the data");
  for (size_t i = 0; i < layers_.size(); ++i) {
    {
      NameScope scope(kLayers);  // the Sequential holding them: MLP runs its layers itself
      h = (*layers_[i])(h);
    }
    if (i + 1 == layers_.size()) break;
    h = opts_.activation == "relu" ? relu(h) : opts_.activation == "gelu" ? gelu(h) : tanh(h);
    if (!drops_.empty()) h = (*drops_[i])(h);
  }
  return h;
}

std::string MLP::name() const {
  std::string s = "MLP(";
  for (size_t i = 0; i < sizes_.size(); ++i) s += (i ? "-" : "") + std::to_string(sizes_[i]);
  return s + ", " + opts_.activation + ")";
}

CNN::CNN(CNNOptions opts) : opts_(std::move(opts)) {
  if (opts_.channels.size() != 2) throw ValueError("CNN takes two conv layers", "channels: [c1, c2]", std::to_string(opts_.channels.size()) + " values");
  if (opts_.image_size % 4 != 0)
    throw ValueError("CNN image size must divide by 4 (two 2x2 pools)", "a multiple of 4", std::to_string(opts_.image_size));
  features_ = std::make_shared<Sequential>();
  features_->add(std::make_shared<Conv2d>(opts_.in_channels, opts_.channels[0], 3, 1, 1))
      .add(std::make_shared<ReLU>())
      .add(std::make_shared<MaxPool2d>(2))
      .add(std::make_shared<Conv2d>(opts_.channels[0], opts_.channels[1], 3, 1, 1))
      .add(std::make_shared<ReLU>())
      .add(std::make_shared<MaxPool2d>(2))
      .add(std::make_shared<Flatten>(1));
  int64_t s = opts_.image_size / 4;
  head_ = std::make_shared<Sequential>();
  head_->add(std::make_shared<Linear>(opts_.channels[1] * s * s, opts_.hidden)).add(std::make_shared<ReLU>());
  if (opts_.dropout > 0) head_->add(std::make_shared<Dropout>(opts_.dropout));
  head_->add(std::make_shared<Linear>(opts_.hidden, opts_.classes));
  register_module("features", features_);
  register_module("head", head_);
  init_parameters(0);
}

Tensor CNN::forward(const Tensor& x) {
  Tensor h = x;
  if (h.dim() == 2) h = h.reshape(Shape{h.shape()[0], opts_.in_channels, opts_.image_size, opts_.image_size});
  return (*head_)((*features_)(h));
}

}  // namespace titanax::nn
