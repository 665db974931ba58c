// Robustness of the op API: every op called with random shapes (empty dimensions and 0-d included),
// axes, dtypes, indices and scalars, compatible or not. A call must return a tensor whose values can be
// read, or throw a titanax::Error; any other exception, a crash or (under the asan preset) a memory error
// fails. When the result is floating and an input required a gradient, the backward pass is run too.
// The seed and the number of calls are fixed (CI runs the same calls every time); FUZZ_SEED and FUZZ_N
// explore further, e.g. `FUZZ_SEED=7 FUZZ_N=100000 titanax_tests "ops fuzzed*"` (under the asan preset).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <typeinfo>
#include <algorithm>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <titanax/titanax.h>

using namespace titanax;

namespace {

struct Fuzz {
  std::mt19937_64 g;
  std::vector<std::string> log;  // the arguments of the current call, for the failure message

  int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); }
  bool coin(double p = 0.5) { return std::bernoulli_distribution(p)(g); }

  Shape shape(int max_rank = 4) {
    std::vector<int64_t> d(size_t(pick(0, max_rank)));
    for (auto& x : d) x = coin(0.1) ? 0 : pick(1, 4);
    return Shape(d);
  }
  // A shape the op probably accepts with `s` (equal, broadcastable or unrelated).
  Shape like(const Shape& s) {
    const int64_t r = pick(0, 9);
    if (r < 5) return s;
    std::vector<int64_t> d = s.vec();
    if (r < 8 && !d.empty()) {
      d[size_t(pick(0, int64_t(d.size()) - 1))] = 1;  // broadcastable
      if (coin()) d.erase(d.begin());
      return Shape(d);
    }
    return shape();
  }
  DType dtype() {
    static const DType all[] = {DType::f32, DType::f32, DType::f64, DType::bf16, DType::f16, DType::i64, DType::i32, DType::bool_};
    return all[pick(0, 7)];
  }
  DType float_dtype() { return coin(0.7) ? DType::f32 : coin() ? DType::f64 : DType::bf16; }
  int axis(int rank) { return int(pick(-rank - 2, rank + 1)); }
  std::vector<int> axes(int rank) {
    std::vector<int> a(size_t(pick(0, 3)));
    for (auto& x : a) x = axis(rank);
    return a;
  }
  Tensor tensor(const Shape& s, DType dt) {
    Tensor t = random_normal(RngKey::from_seed(g()), s, DType::f32);
    if (dt == DType::i64 || dt == DType::i32) t = (t * 3.0).astype(dt);
    else if (dt == DType::bool_) t = gt(t, scalar_like(0.0, t));
    else t = t.astype(dt);
    if (is_floating(dt) && coin(0.4)) t.set_requires_grad();
    log.push_back(t.str() + (t.requires_grad() ? " (requires grad)" : ""));
    return t;
  }
  Tensor tensor() { return tensor(shape(), coin(0.8) ? float_dtype() : dtype()); }
  Tensor ids(const Shape& s, int64_t hi) {  // indices, sometimes out of range or negative
    std::vector<int64_t> v(size_t(s.numel()));
    for (auto& x : v) x = coin(0.95) ? pick(0, std::max<int64_t>(hi - 1, 0)) : pick(-2, hi + 2);
    log.push_back("ids " + s.str());
    return from_vector(v, s);
  }
  template <class T>
  T note(T v, const char* what) {
    std::ostringstream o;
    o << what << " " << v;
    log.push_back(o.str());
    return v;
  }
  Shape note(Shape v, const char* what) {
    log.push_back(std::string(what) + " " + v.str());
    return v;
  }
  std::vector<int> note(std::vector<int> v, const char* what) {
    std::string s = std::string(what) + " [";
    for (int x : v) s += std::to_string(x) + " ";
    log.push_back(s + "]");
    return v;
  }
};

using OpFn = std::function<Tensor(Fuzz&)>;

std::vector<std::pair<std::string, OpFn>> ops() {
  std::vector<std::pair<std::string, OpFn>> o;
  using Bin = Tensor (*)(const Tensor&, const Tensor&);
  for (auto [name, f] : std::vector<std::pair<std::string, Bin>>{{"add", add}, {"sub", sub}, {"mul", mul}, {"div", div},
                                                                 {"maximum", maximum}, {"pow", pow}, {"lt", lt}, {"eq", eq}})
    o.push_back({name, [f = f](Fuzz& z) {
                   Tensor a = z.tensor();
                   return f(a, z.tensor(z.like(a.shape()), z.coin(0.8) ? a.dtype() : z.dtype()));
                 }});
  using Un = Tensor (*)(const Tensor&);
  for (auto [name, f] : std::vector<std::pair<std::string, Un>>{{"exp", exp}, {"log", log}, {"sqrt", sqrt}, {"tanh", tanh},
                                                                {"relu", relu}, {"neg", neg}, {"abs", abs}, {"sigmoid", sigmoid}})
    o.push_back({name, [f = f](Fuzz& z) { return f(z.tensor()); }});
  o.push_back({"gelu", [](Fuzz& z) { return gelu(z.tensor(), z.coin()); }});
  o.push_back({"clamp", [](Fuzz& z) { return clamp(z.tensor(), z.note(z.pick(-2, 1) * 0.5, "lo"), z.note(z.pick(-1, 2) * 0.5, "hi")); }});
  o.push_back({"where", [](Fuzz& z) {
                 Tensor c = z.tensor(z.shape(), z.coin(0.8) ? DType::bool_ : z.dtype());
                 return where(c, z.tensor(z.like(c.shape()), DType::f32), z.tensor(z.like(c.shape()), z.float_dtype()));
               }});
  o.push_back({"sum", [](Fuzz& z) { Tensor x = z.tensor(); return sum(x, z.note(z.axes(x.dim()), "axes"), z.coin()); }});
  o.push_back({"mean", [](Fuzz& z) { Tensor x = z.tensor(); return mean(x, z.note(z.axes(x.dim()), "axes"), z.coin()); }});
  o.push_back({"max", [](Fuzz& z) { Tensor x = z.tensor(); return max(x, z.note(z.axes(x.dim()), "axes"), z.coin()); }});
  o.push_back({"logsumexp", [](Fuzz& z) { Tensor x = z.tensor(); return logsumexp(x, z.note(z.axes(x.dim()), "axes"), z.coin()); }});
  o.push_back({"argmax", [](Fuzz& z) { Tensor x = z.tensor(); return argmax(x, z.note(z.axis(x.dim()), "axis"), z.coin()); }});
  o.push_back({"sum_squares", [](Fuzz& z) { return sum_squares({z.tensor(), z.tensor()}); }});
  o.push_back({"sum_to", [](Fuzz& z) { Tensor x = z.tensor(); return sum_to(x, z.like(x.shape())); }});
  o.push_back({"reshape", [](Fuzz& z) {
                 Tensor x = z.tensor();
                 std::vector<int64_t> d{z.coin() ? -1 : x.numel()};
                 if (z.coin()) d.push_back(z.pick(-2, 4));
                 return reshape(x, z.note(Shape(d), "to"));
               }});
  o.push_back({"permute", [](Fuzz& z) {
                 Tensor x = z.tensor();
                 std::vector<int> p(size_t(x.dim()));
                 for (size_t i = 0; i < p.size(); ++i) p[i] = int(i);
                 std::shuffle(p.begin(), p.end(), z.g);
                 if (z.coin(0.3) && !p.empty()) p[0] = z.axis(x.dim());
                 return permute(x, z.note(p, "axes"));
               }});
  o.push_back({"transpose", [](Fuzz& z) { Tensor x = z.tensor(); return transpose(x, z.axis(x.dim()), z.axis(x.dim())); }});
  o.push_back({"expand", [](Fuzz& z) { Tensor x = z.tensor(); return expand(x, z.note(z.like(x.shape()), "to")); }});
  o.push_back({"slice", [](Fuzz& z) {
                 Tensor x = z.tensor();
                 return slice(x, z.note(z.axis(x.dim()), "axis"), z.note(z.pick(-5, 5), "start"), z.note(z.pick(-5, 5), "stop"),
                              z.note(z.pick(-1, 3), "step"));
               }});
  o.push_back({"concat", [](Fuzz& z) {
                 Tensor a = z.tensor();
                 return concat({a, z.tensor(z.like(a.shape()), z.coin(0.8) ? a.dtype() : z.dtype())}, z.note(z.axis(a.dim()), "axis"));
               }});
  o.push_back({"unbind", [](Fuzz& z) {
                 Tensor x = z.tensor();
                 TensorList parts = unbind(x, z.note(z.axis(x.dim()), "axis"));
                 return parts.empty() ? x : parts.back();
               }});
  o.push_back({"pad", [](Fuzz& z) {
                 Tensor x = z.tensor();
                 return pad(x, z.note(z.axis(x.dim()), "axis"), z.note(z.pick(-1, 2), "before"), z.note(z.pick(-1, 2), "after"));
               }});
  o.push_back({"one_hot", [](Fuzz& z) { int64_t c = z.note(z.pick(-1, 4), "classes"); return one_hot(z.ids(z.shape(2), c), c); }});
  o.push_back({"take", [](Fuzz& z) {
                 Tensor x = z.tensor();
                 const int a = z.note(z.axis(x.dim()), "axis");
                 const int64_t n = x.dim() ? x.shape()[size_t((a % x.dim() + x.dim()) % x.dim())] : 1;
                 return take(x, z.ids(z.shape(2), n), a);
               }});
  o.push_back({"matmul", [](Fuzz& z) {
                 Tensor a = z.tensor(z.shape(3), z.float_dtype());
                 std::vector<int64_t> d = a.shape().vec();
                 if (d.size() >= 1 && z.coin(0.7)) {
                   std::vector<int64_t> bd{d.back(), z.pick(0, 4)};
                   if (d.size() == 3 && z.coin()) bd.insert(bd.begin(), d[0]);
                   return matmul(a, z.tensor(Shape(bd), z.coin(0.9) ? a.dtype() : z.dtype()));
                 }
                 return matmul(a, z.tensor(z.shape(3), a.dtype()));
               }});
  o.push_back({"linear", [](Fuzz& z) {
                 Tensor x = z.tensor(z.shape(3), DType::f32);
                 const int64_t in = x.dim() ? x.shape().back() : 1;
                 const int64_t out = z.pick(0, 3);
                 Tensor w = z.tensor(z.coin(0.8) ? Shape{out, in} : z.shape(2), DType::f32);
                 return linear(x, w, z.coin() ? z.tensor(z.coin(0.8) ? Shape{out} : z.shape(1), DType::f32) : Tensor());
               }});
  o.push_back({"softmax", [](Fuzz& z) { Tensor x = z.tensor(); return softmax(x, z.note(z.axis(x.dim()), "axis")); }});
  o.push_back({"log_softmax", [](Fuzz& z) { Tensor x = z.tensor(); return log_softmax(x, z.note(z.axis(x.dim()), "axis")); }});
  o.push_back({"cross_entropy", [](Fuzz& z) {
                 Tensor l = z.tensor(z.coin(0.8) ? Shape{z.pick(0, 4), z.pick(1, 5)} : z.shape(), z.float_dtype());
                 const int64_t c = l.dim() == 2 ? l.shape()[1] : 3;
                 return cross_entropy(l, z.ids(l.dim() == 2 && z.coin(0.8) ? Shape{l.shape()[0]} : z.shape(2), c),
                                      z.coin() ? Reduction::mean : Reduction::sum);
               }});
  o.push_back({"layer_norm", [](Fuzz& z) {
                 Tensor x = z.tensor(z.shape(), z.float_dtype());
                 const int64_t d = x.dim() ? x.shape().back() : 1;
                 Shape ws = z.coin(0.8) ? Shape{d} : z.shape(2);
                 return layer_norm(x, z.coin(0.8) ? z.tensor(ws, DType::f32) : Tensor(), z.coin(0.8) ? z.tensor(ws, DType::f32) : Tensor(),
                                   z.note(z.coin(0.9) ? 1e-5 : -1.0, "eps"));
               }});
  o.push_back({"attention", [](Fuzz& z) {
                 Shape s = z.coin(0.7) ? Shape{z.pick(1, 2), z.pick(1, 2), z.pick(0, 5), z.pick(1, 4)} : z.shape();
                 DType dt = z.float_dtype();
                 Tensor q = z.tensor(s, dt), k = z.tensor(z.like(s), dt), v = z.tensor(z.like(s), dt);
                 return scaled_dot_product_attention(q, k, v, z.coin());
               }});
  o.push_back({"attention_qkvpacked", [](Fuzz& z) {
                 Shape s = z.coin(0.7) ? Shape{z.pick(1, 2), z.pick(0, 5), z.coin(0.9) ? 3 : 2, z.pick(1, 2), z.pick(1, 4)} : z.shape();
                 return scaled_dot_product_attention_qkvpacked(z.tensor(s, z.float_dtype()), z.coin());
               }});
  o.push_back({"dropout", [](Fuzz& z) {
                 return dropout(z.tensor(), z.note(z.pick(-1, 4) * 0.3, "p"), RngKey::from_seed(z.g()), z.coin(0.8));
               }});
  o.push_back({"embedding", [](Fuzz& z) {
                 Tensor w = z.tensor(z.coin(0.8) ? Shape{z.pick(1, 5), z.pick(1, 3)} : z.shape(), DType::f32);
                 return embedding(w, z.ids(z.shape(2), w.dim() ? w.shape()[0] : 1));
               }});
  o.push_back({"conv2d", [](Fuzz& z) {
                 const int64_t cin = z.pick(1, 2), cout = z.pick(1, 2), k = z.pick(1, 3);
                 Tensor x = z.tensor(z.coin(0.8) ? Shape{z.pick(1, 2), cin, z.pick(0, 5), z.pick(1, 5)} : z.shape(), DType::f32);
                 Tensor w = z.tensor(z.coin(0.8) ? Shape{cout, cin, k, k} : z.shape(), DType::f32);
                 const int64_t st = z.note(z.pick(0, 2), "stride"), pd = z.note(z.pick(-1, 2), "padding");
                 return conv2d(x, w, z.coin() ? z.tensor(Shape{cout}, DType::f32) : Tensor(), {st, st}, {pd, pd});
               }});
  o.push_back({"max_pool2d", [](Fuzz& z) {
                 Tensor x = z.tensor(z.coin(0.8) ? Shape{1, z.pick(1, 2), z.pick(0, 5), z.pick(1, 5)} : z.shape(), DType::f32);
                 const int64_t k = z.note(z.pick(0, 3), "kernel"), st = z.note(z.pick(0, 2), "stride"), pd = z.note(z.pick(-1, 2), "padding");
                 return max_pool2d(x, {k, k}, {st, st}, {pd, pd});
               }});
  o.push_back({"max_pool2d_indices", [](Fuzz& z) {
                 Tensor x = z.tensor(z.coin(0.8) ? Shape{1, z.pick(1, 2), z.pick(0, 5), z.pick(1, 5)} : z.shape(), DType::f32);
                 const int64_t k = z.note(z.pick(0, 3), "kernel"), st = z.note(z.pick(0, 2), "stride"), pd = z.note(z.pick(-1, 2), "padding");
                 return max_pool2d_indices(x, {k, k}, {st, st}, {pd, pd});
               }});
  return o;
}

}  // namespace

TEST_CASE("ops fuzzed with random shapes, axes, dtypes and indices return or throw a titanax::Error", "[fuzz]") {
  const auto table = ops();
  Fuzz z{std::mt19937_64(std::getenv("FUZZ_SEED") ? std::stoull(std::getenv("FUZZ_SEED")) : 20261206), {}};
  std::map<std::string, std::pair<int, int>> outcomes;  // op -> (returned, refused)
  for (int it = 0; it < (std::getenv("FUZZ_N") ? std::stoi(std::getenv("FUZZ_N")) : 6000); ++it) {
    const auto& [name, fn] = table[size_t(z.pick(0, int64_t(table.size()) - 1))];
    z.log.clear();
    auto describe = [&] {
      std::string s = name + "(";
      for (const auto& a : z.log) s += a + "; ";
      return s + ")";
    };
    try {
      Tensor r = fn(z);
      // The result is readable, and its gradient computable when it has one.
      (void)r.contiguous().astype(DType::f64).to_vector<double>();
      if (r.requires_grad() && is_floating(r.dtype()) && z.coin()) backward(sum(r.astype(DType::f32)));
      ++outcomes[name].first;
    } catch (const Error&) {
      ++outcomes[name].second;
    } catch (const std::exception& e) {
      FAIL("call " << it << ": " << describe() << " threw a " << typeid(e).name() << " that is not a titanax::Error: " << e.what());
    }
  }
  // Every op returned at least once: the generators reach its valid inputs, not only its errors.
  for (const auto& [name, fn] : table) {
    INFO(name << ": " << outcomes[name].first << " returned, " << outcomes[name].second << " refused");
    CHECK(outcomes[name].first > 0);
    if (std::getenv("FUZZ_N"))
      std::printf("%-22s %6d returned %6d refused\n", name.c_str(), outcomes[name].first, outcomes[name].second);
  }
}
