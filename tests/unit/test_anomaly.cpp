// Anomaly detection (autodiff/anomaly.h): the op that first produced a NaN / inf is named, with its module
// path, its inputs and, in the backward pass, the op being differentiated; jit graphs are checked node by
// node; nothing is reported, and nothing changes, where every value is finite.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <thread>

#include <titanax/titanax.h>

#include "../op_cases.h"
#include "../test_util.h"

using namespace titanax;
using testing::catch_error;

namespace {
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// log(x) as a module, so that a NaN has a module path.
class LogModule final : public nn::Module {
 public:
  Tensor forward(const Tensor& x) override { return log(x); }
  std::string name() const override { return "Log"; }
};
}  // namespace

TEST_CASE("count_non_finite counts NaN, +inf and -inf in every floating dtype and layout", "[anomaly]") {
  // [2, 3] with a NaN at [0, 1], +inf at [1, 0], -inf at [1, 2].
  const std::vector<double> v{1, kNaN, 2, kInf, 3, -kInf};
  for (DType dt : {DType::f64, DType::f32, DType::f16, DType::bf16}) {
    const Tensor t = from_vector(v, Shape{2, 3}).astype(dt);
    const NonFiniteCount c = count_non_finite(t);
    CHECK(c.nan == 1);
    CHECK(c.posinf == 1);
    CHECK(c.neginf == 1);
    CHECK(c.total() == 3);
    // Strided views see only their own elements: column 1 holds the NaN and 3; row 1 the infinities.
    const NonFiniteCount col = count_non_finite(t.slice(1, 1, 2));
    CHECK((col.nan == 1 && col.posinf == 0 && col.neginf == 0));
    const NonFiniteCount row = count_non_finite(t.T().slice(1, 1, 2));
    CHECK((row.nan == 0 && row.posinf == 1 && row.neginf == 1));
  }
  CHECK(count_non_finite(ones(Shape{4}, DType::i64)).total() == 0);
  CHECK(count_non_finite(zeros(Shape{0})).total() == 0);
  CHECK(count_non_finite(full(Shape{3}, 1e300, DType::f64) * 1e10).posinf == 3);
  // The counts are read on the host: a traced function cannot branch on them (a replay would not recount).
  CHECK_THROWS_AS(jit::trace([](const TensorList& in) { return TensorList{in[0] * double(count_non_finite(in[0]).nan)}; },
                             {ones(Shape{2})}),
                  TraceError);
}

TEST_CASE("anomaly detection is off unless asked for; guards nest and are per thread", "[anomaly]") {
  const Tensor neg = from_vector(std::vector<float>{-1.f, 2.f}, Shape{2});
  REQUIRE(anomaly_options() == nullptr);  // the test environment sets neither TITANAX_DEBUG_NANS nor _INFS
  CHECK(std::isnan(log(neg).to_vector<double>()[0]));  // off: a NaN, silently
  {
    DetectAnomalyGuard on;
    REQUIRE(anomaly_options() != nullptr);
    CHECK_THROWS_AS(log(neg), FloatingPointError);
    {
      DetectAnomalyGuard off(AnomalyOptions{.nans = false, .infs = false});
      CHECK(anomaly_options() == nullptr);
      CHECK_NOTHROW(log(neg));
    }
    CHECK_THROWS_AS(log(neg), FloatingPointError);  // the outer guard again
    bool other_thread_threw = false;
    std::thread t([&] {
      try {
        log(neg);
      } catch (const FloatingPointError&) {
        other_thread_threw = true;
      }
    });
    t.join();
    CHECK_FALSE(other_thread_threw);
  }
  CHECK(anomaly_options() == nullptr);
  CHECK_NOTHROW(log(neg));
}

TEST_CASE("anomaly detection names the op that made a NaN, where, and why", "[anomaly]") {
  DetectAnomalyGuard on;
  const Tensor x = from_vector(std::vector<float>{1, 2, -3, 4, 5, -6}, Shape{2, 3});
  std::string what;
  {
    NameScope s1("encoder"), s2("norm");
    what = catch_error<FloatingPointError>([&] { log(x); }).what();
  }
  CAPTURE(what);
  CHECK(has(what, "FloatingPointError: op 'log' produced nan in output 0 in 'encoder/norm'"));
  CHECK(has(what, "2 nan of 6 elements, the first at [0, 2]"));
  CHECK(has(what, "its inputs were finite (input 0 f32[2, 3]: finite in [-6, 5])"));
  CHECK(has(what, "fix:      log is -inf at 0"));
  CHECK_FALSE(has(what, "  at:"));  // no source location of Titanax's own: the op and the module path say where

  // A value from outside the checked ops (a tensor made with a NaN, a parameter written by copy_) is
  // reported at the first op that reads it, naming the input.
  Tensor w = from_vector(std::vector<double>{0.5, kNaN, 1.5}, Shape{3});
  w.set_name("head/bias");
  what = catch_error<FloatingPointError>([&] { exp(w); }).what();
  CAPTURE(what);
  CHECK(has(what, "op 'exp' produced nan in output 0"));
  CHECK(has(what, "input 0 'head/bias' already held it: f64[3]: 1 nan of 3 elements, the first at [1]"));
  CHECK(has(what, "check input 0 'head/bias' where it is written"));
}

TEST_CASE("anomaly detection of infinities is separate from NaNs", "[anomaly]") {
  const Tensor z = from_vector(std::vector<float>{0.f, 1.f}, Shape{2});
  {
    DetectAnomalyGuard nans;  // log(0) = -inf is not a NaN
    CHECK(std::isinf(log(z).to_vector<double>()[0]));
  }
  DetectAnomalyGuard infs(AnomalyOptions{.nans = false, .infs = true});
  const std::string what = catch_error<FloatingPointError>([&] { log(z); }).what();
  CAPTURE(what);
  CHECK(has(what, "op 'log' produced inf in output 0"));
  CHECK(has(what, "expected: no inf (anomaly detection is on)"));
  CHECK(has(what, "1 -inf of 2 elements, the first at [0]"));
  const Tensor big = from_vector(std::vector<float>{1.f, 100.f}, Shape{2});
  CHECK(has(catch_error<FloatingPointError>([&] { exp(big); }).what(), "exp overflows f32 above 88"));
}

TEST_CASE("anomaly detection in the backward pass names the op being differentiated and its module", "[anomaly]") {
  // sqrt(x) * 0 at x = 0: the forward is finite (0), sqrt's vjp divides 0 by 2 sqrt(0).
  Tensor x = zeros(Shape{3}, DType::f64).set_requires_grad();
  DetectAnomalyGuard on;
  Tensor y;
  {
    NameScope s("block3");
    y = sum(sqrt(x) * 0.0);
  }
  REQUIRE(y.item() == 0);
  const std::string what = catch_error<FloatingPointError>([&] { y.backward(); }).what();
  CAPTURE(what);
  CHECK(has(what, "op 'div' produced nan in output 0, in the backward (vjp) of op 'sqrt' from 'block3'"));
  CHECK(has(what, "its inputs were finite"));
  CHECK(has(what, "fix:      the derivative of sqrt is not finite at the inputs its forward got"));
  CHECK_FALSE(x.grad().defined());  // nothing accumulated
  // The same backward without detection gives the NaN.
  DetectAnomalyGuard off(AnomalyOptions{.nans = false});
  Tensor y2 = sum(sqrt(x) * 0.0);
  y2.backward();
  CHECK(std::isnan(x.grad().to_vector<double>()[0]));
}

TEST_CASE("anomaly reports give the module path and the parameters' names", "[anomaly]") {
  // outer Sequential -> "block" (a Sequential: Linear, Log): the Log module's path is "block/1".
  auto inner = std::make_shared<nn::Sequential>();
  inner->add(std::make_shared<nn::Linear>(3, 4)).add(std::make_shared<LogModule>());
  nn::Sequential model;
  model.add(inner);
  const ParamTree params = model.parameters();
  REQUIRE(params.size() == 2);
  CHECK(params[0].second.name() == "0/0/weight");  // named by their path
  const Tensor xin = from_vector(std::vector<float>{1, -2, 3, -4, 5, -6}, Shape{2, 3});
  DetectAnomalyGuard on;
  std::string what = catch_error<FloatingPointError>([&] { model(xin); }).what();
  CAPTURE(what);
  CHECK(has(what, "op 'log' produced nan in output 0 in '0/1'"));

  // A GPT whose block-1 attention projection holds a NaN (written by copy_, as an optimizer or a loader
  // would): the first op reading it is named with its module path and the parameter's name.
  nn::GPTConfig c;
  c.vocab = 16, c.layers = 2, c.heads = 2, c.dim = 8, c.seq_len = 6;
  nn::GPT gpt(c);
  const ParamTree gp = gpt.parameters();
  Tensor w = gp.at("blocks/1/attn/proj/weight");
  Tensor bad = w.detach().clone();
  bad.data<float>()[5] = float(kNaN);
  copy_(w, bad);
  const Tensor ids = testing::randint(RngKey::from_seed(1), Shape{2, 6}, 16);
  what = catch_error<FloatingPointError>([&] { gpt.forward(ids); }).what();
  CAPTURE(what);
  CHECK(has(what, "in 'blocks/1/attn/proj'"));
  CHECK(has(what, "'blocks/1/attn/proj/weight' already held it"));
}

TEST_CASE("anomaly detection changes nothing where every value is finite", "[anomaly]") {
  // A GPT's loss and gradients, with NaNs and infinities both reported, equal those without (bitwise).
  nn::GPTConfig c;
  c.vocab = 16, c.layers = 2, c.heads = 2, c.dim = 8, c.seq_len = 6;
  nn::GPT gpt(c);
  const Tensor ids = testing::randint(RngKey::from_seed(1), Shape{2, 6}, 16),
               tgt = testing::randint(RngKey::from_seed(2), Shape{2, 6}, 16);
  for (auto& [path, t] : gpt.parameters()) t.set_requires_grad();
  auto run = [&] {
    ParamTree p = gpt.parameters();
    for (auto& [path, t] : p) t.zero_grad();
    Tensor l = gpt.loss(ids, tgt);
    l.backward();
    std::vector<std::vector<float>> g{l.to_vector<float>()};
    for (auto& [path, t] : p) g.push_back(t.grad().to_vector<float>());
    return g;
  };
  const auto plain = run();
  DetectAnomalyGuard all(AnomalyOptions{.nans = true, .infs = true});
  CHECK(run() == plain);
}

TEST_CASE("anomaly detection checks every node of a jit graph's replay", "[anomaly][jit]") {
  // log(x) * 2 + 1: fused into one elementwise node.
  auto f = jit::jit([](const TensorList& in) {
    NameScope s("head");  // recorded on the traced nodes, and on the fused node they become
    return TensorList{log(in[0]) * 2.0 + 1.0};
  });
  const Tensor good = from_vector(std::vector<float>{1, 2, 3, 4}, Shape{4});
  const Tensor bad = from_vector(std::vector<float>{1, 2, -3, 4}, Shape{4});
  {
    DetectAnomalyGuard on;
    CHECK_NOTHROW(f({good}));  // traced: the eager run is checked op by op
  }
  CHECK(std::isnan(f({bad})[0].to_vector<double>()[2]));  // a replay without detection: the NaN
  REQUIRE(f.stats().misses == 1);
  CHECK(has(f.graph_for({good})->str(), ") : f32[4]   # head\n"));  // the graph prints the node's module path
  DetectAnomalyGuard on;
  NameScope called_from("caller");  // a replay reports the path the node was traced in, not this one
  const std::string what = catch_error<FloatingPointError>([&] { f({bad}); }).what();
  CAPTURE(what);
  CHECK(f.stats().misses == 1);  // a replay
  // The fused node (log, mul, add) ran again op by op: the report names its member op.
  CHECK(has(what, "op 'log' produced nan in output 0 in 'head', at node 0 of a jit graph (%"));
  CHECK(has(what, " = fused(%0, %"));
  CHECK(has(what, "run again op by op"));
  CHECK(has(what, "the first at [2]"));
  CHECK(has(what, "fix:      log is -inf at 0"));
}

TEST_CASE("common_scope: the longest module path two paths share, by whole names", "[anomaly][jit]") {
  CHECK(jit::common_scope("blocks/1/attn", "blocks/1/mlp") == "blocks/1");
  CHECK(jit::common_scope("blocks/1/attn", "blocks/12/attn") == "blocks");
  CHECK(jit::common_scope("blocks/1", "blocks/1/mlp/fc") == "blocks/1");
  CHECK(jit::common_scope("head", "head") == "head");
  CHECK(jit::common_scope("head", "") == "");
  CHECK(jit::common_scope("ab", "abc") == "");
}
