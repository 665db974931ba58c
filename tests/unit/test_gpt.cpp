// engine/gpt.h, parallel/sharding.h, parallel/tp.h and Plan{TP} on one rank: GPT shapes, gradients
// against finite differences (f64), the causal property, sharding-rule matching and precedence, plan
// validation, and the tensor-parallel code path on a model axis of size 1.
#include <catch2/catch.hpp>

#include "test_util.h"
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>

#include "engine/engine.h"
#include "engine/gpt.h"
#include "op_cases.h"
#include "parallel/sharding.h"
#include "parallel/tp.h"

using namespace titanax;
using Catch::Matchers::Contains;

namespace {

Mesh local_mesh(std::vector<std::string> axes, std::vector<int> shape) {
  return MeshSpec{std::move(axes), std::move(shape)}.build(make_local_communicator());
}

using testing::catch_error;

nn::GPTConfig tiny(DType dt = DType::f32) {
  nn::GPTConfig c;
  c.vocab = 16;
  c.layers = 2;
  c.heads = 2;
  c.dim = 8;
  c.seq_len = 6;
  c.dtype = dt;
  return c;
}

Tensor tokens(uint64_t seed, int64_t B, int64_t T, int64_t vocab) { return testing::randint(RngKey::from_seed(seed), Shape{B, T}, vocab); }

/// Binds the model's parameters to given tensors (as torch.func.functional_call): each parameter's
/// TensorImpl becomes a differentiable copy of its tensor, so gradients of what the model computes reach
/// those tensors. The parameters are restored when the binder dies (after any backward pass).
class ParamBinder {
 public:
  explicit ParamBinder(nn::Module& m) : p_(m.parameters()) {
    for (auto& [path, t] : p_) saved_.push_back(*t.get());
  }
  ~ParamBinder() {
    for (size_t i = 0; i < p_.size(); ++i) *p_[i].second.get() = saved_[i];
  }
  void bind(const TensorList& args) {
    REQUIRE(p_.size() == args.size());
    for (size_t i = 0; i < p_.size(); ++i) {
      Tensor bound = args[i].clone();  // a node whose input is the arg
      *p_[i].second.get() = *bound.get();
    }
  }

 private:
  ParamTree p_;
  std::vector<TensorImpl> saved_;
};

}  // namespace

// ------------------------------------------------------------------------------------------ GPT

TEST_CASE("GPT parameters, shapes and init", "[gpt]") {
  nn::GPTConfig c = tiny();
  nn::GPT m(c);
  ParamTree p = m.parameters();
  CHECK(p.size() == 2 + 12 * 2 + 2);
  CHECK(p.paths()[0] == "wte/weight");
  CHECK(p.at("wte/weight").shape() == Shape{16, 8});
  CHECK(p.at("wpe/weight").shape() == Shape{6, 8});
  CHECK(p.at("blocks/0/attn/qkv/weight").shape() == Shape{3, 8, 8});
  CHECK(p.at("blocks/0/attn/qkv/bias").shape() == Shape{3, 8});
  CHECK(p.at("blocks/1/attn/proj/weight").shape() == Shape{8, 8});
  CHECK(p.at("blocks/1/mlp/fc/weight").shape() == Shape{32, 8});
  CHECK(p.at("blocks/1/mlp/out/weight").shape() == Shape{8, 32});
  CHECK(p.at("lnf/bias").shape() == Shape{8});
  CHECK(m.num_parameters() == 16 * 8 + 6 * 8 + 2 * (4 * 8 + 3 * 8 * 8 + 3 * 8 + 8 * 8 + 8 + 32 * 8 + 32 + 8 * 32 + 8) + 2 * 8);
  // The layout (no model needed) lists the same paths and shapes.
  auto lay = nn::GPT::layout(c);
  REQUIRE(lay.size() == p.size());
  for (size_t i = 0; i < lay.size(); ++i) {
    CHECK(lay[i].path == p[i].first);
    CHECK(lay[i].global_shape == p[i].second.shape());
  }
  // Init: N(0, 0.02) weights, zero biases, LayerNorm 1 / 0; deterministic; layers differ.
  auto w = p.at("blocks/0/mlp/fc/weight").to_vector<double>();
  double s2 = 0;
  for (double v : w) s2 += v * v;
  CHECK(std::sqrt(s2 / double(w.size())) == Approx(0.02).epsilon(0.15));
  for (double v : p.at("blocks/0/mlp/fc/bias").to_vector<double>()) CHECK(v == 0.0);
  for (double v : p.at("blocks/0/ln1/weight").to_vector<double>()) CHECK(v == 1.0);
  CHECK(p.at("blocks/1/mlp/fc/weight").to_vector<double>() != w);
  nn::GPT again(c);
  CHECK(again.parameters().at("blocks/0/mlp/fc/weight").to_vector<double>() == w);
  // Unsplit: every spec replicated.
  for (const auto& [path, s] : m.partition_specs()) CHECK(!is_sharded(s));

  // Forward: logits [B, T, vocab]; shorter sequences work.
  Tensor logits = m(tokens(1, 3, 6, 16));
  CHECK(logits.shape() == Shape{3, 6, 16});
  CHECK(m(tokens(2, 2, 4, 16)).shape() == Shape{2, 4, 16});
  Tensor l = m.loss(tokens(1, 3, 6, 16), tokens(3, 3, 6, 16));
  CHECK(l.dim() == 0);
  CHECK(l.item() == Approx(std::log(16.0)).epsilon(0.05));  // near-uniform predictions at init

  CHECK_THROWS_AS(m(tokens(1, 2, 7, 16)), ShapeError);            // T > seq_len
  CHECK_THROWS_AS(m(tokens(1, 6, 1, 16).reshape(Shape{6})), ShapeError);
  CHECK_THROWS_AS(m(ones(Shape{2, 3})), DTypeError);
  CHECK_THROWS_AS(m(full(Shape{2, 3}, 16, DType::i64)), ValueError);  // id out of range
  CHECK_THROWS_AS(m.loss(tokens(1, 2, 6, 16), tokens(1, 2, 5, 16)), ShapeError);
  nn::GPTConfig bad = tiny();
  bad.dim = 10;
  bad.heads = 4;
  CHECK_THROWS_AS(nn::GPT(bad), ValueError);
}

TEST_CASE("GPT loss gradient matches finite differences (f64)", "[gpt][gradcheck]") {
  nn::GPTConfig c = tiny(DType::f64);
  c.vocab = 11;
  c.dim = 4;
  c.seq_len = 4;
  nn::GPT m(c);
  // Larger weights than the 0.02 init so every path (attention, GELU, LayerNorm) matters.
  for (auto& [path, t] : m.parameters()) {
    Tensor r = testing::randn64(RngKey::from_seed(std::hash<std::string>{}(path)), t.shape(), 0.5);
    copy_(t, r);
  }
  Tensor x = tokens(11, 2, 4, 11), y = tokens(12, 2, 4, 11);
  TensorList start = m.parameters().tensors();
  GradcheckResult r;
  {
    ParamBinder binder(m);
    auto fn = [&](const TensorList& args) {
      binder.bind(args);
      return m.loss(x, y);
    };
    r = gradcheck(fn, start, 1e-6, 1e-7, 1e-5);
  }
  INFO(r.report << " max abs " << r.max_abs_error);
  CHECK(r.ok);
  // The same gradient through value_and_grad (what the engine uses).
  auto [loss, g] = value_and_grad([&] { return m.loss(x, y); }, m.parameters());
  CHECK(g.at("wte/weight").shape() == Shape{11, 4});
}

TEST_CASE("GPT Hessian-vector product matches finite differences of the gradient (f64)", "[gpt][autodiff]") {
  // Second derivatives through every op of the model: embeddings, layer norm, the packed attention,
  // GELU, the tied output projection and cross-entropy.
  nn::GPTConfig c = tiny(DType::f64);
  c.vocab = 11;
  c.dim = 4;
  c.seq_len = 4;
  nn::GPT m(c);
  for (auto& [path, t] : m.parameters()) copy_(t, testing::randn64(RngKey::from_seed(std::hash<std::string>{}(path)), t.shape(), 0.5));
  const Tensor x = tokens(21, 2, 4, 11), y = tokens(22, 2, 4, 11);
  TensorList theta;  // copies: binding rewrites the parameters' own tensors
  for (const Tensor& t : m.parameters().tensors()) theta.push_back(t.clone().detach());
  TensorList v;
  for (size_t i = 0; i < theta.size(); ++i) v.push_back(testing::randn64(RngKey::from_seed(500 + i), theta[i].shape()));
  ParamBinder binder(m);
  auto loss = [&](const TensorList& args) {
    binder.bind(args);
    return m.loss(x, y);
  };
  const TensorList hv = hvp(loss, theta, v).second;
  auto gradient_at = [&](double t) {
    TensorList leaves;
    for (size_t i = 0; i < theta.size(); ++i) leaves.push_back((theta[i] + v[i] * t).detach().set_requires_grad());
    return grad(loss(leaves), leaves);
  };
  const double eps = 1e-5;
  const TensorList plus = gradient_at(eps), minus = gradient_at(-eps);
  double worst = 0, largest = 0;
  for (size_t i = 0; i < theta.size(); ++i) {
    const auto got = hv[i].to_vector<double>(), num = ((plus[i] - minus[i]) / (2 * eps)).to_vector<double>();
    for (size_t k = 0; k < got.size(); ++k) {
      worst = std::max(worst, std::fabs(got[k] - num[k]) / (1 + std::fabs(num[k])));
      largest = std::max(largest, std::fabs(num[k]));
    }
  }
  INFO("worst relative error " << worst << ", largest element " << largest);
  CHECK(largest > 0.1);  // the product is not trivially zero
  CHECK(worst < 1e-6);
}

TEST_CASE("GPT is causal: later tokens do not change earlier logits", "[gpt]") {
  nn::GPT m(tiny(DType::f64));
  for (auto& [path, t] : m.parameters())
    copy_(t, testing::randn64(RngKey::from_seed(std::hash<std::string>{}(path)), t.shape(), 0.3));
  std::vector<int64_t> ids = {1, 5, 9, 2, 7, 3};
  Tensor a = m(from_vector(ids, Shape{1, 6}));
  for (int64_t t = 0; t + 1 < 6; ++t) {
    std::vector<int64_t> changed = ids;
    changed[size_t(t + 1)] = (changed[size_t(t + 1)] + 4) % 16;
    Tensor b = m(from_vector(changed, Shape{1, 6}));
    auto va = a.slice(1, 0, t + 1).contiguous().to_vector<double>(), vb = b.slice(1, 0, t + 1).contiguous().to_vector<double>();
    CHECK(va == vb);  // bitwise: position <= t never sees position t + 1
    auto la = a.slice(1, t + 1, t + 2).contiguous().to_vector<double>(), lb = b.slice(1, t + 1, t + 2).contiguous().to_vector<double>();
    CHECK(la != lb);  // and position t + 1 does
  }
}

TEST_CASE("generate: greedy is the argmax, top_k 1 is greedy, seeds repeat, bad options are refused", "[gpt]") {
  nn::GPT m(tiny());
  for (auto& [path, t] : m.parameters())
    copy_(t, testing::randn64(RngKey::from_seed(std::hash<std::string>{}(path)), t.shape(), 0.5).astype(DType::f32));
  const std::vector<int64_t> prompt = {3, 1, 4, 1, 5, 9, 2, 6};  // longer than seq_len 6: the window slides
  // Greedy: each new id is the argmax of the model's last logits over the last seq_len ids.
  const auto greedy = nn::generate(m, prompt, {.max_new_tokens = 5, .temperature = 0});
  REQUIRE(greedy.size() == prompt.size() + 5);
  CHECK(std::vector<int64_t>(greedy.begin(), greedy.begin() + 8) == prompt);
  for (size_t i = prompt.size(); i < greedy.size(); ++i) {
    std::vector<int64_t> window(greedy.begin() + int64_t(i) - 6, greedy.begin() + int64_t(i));
    auto l = m(from_vector(window, Shape{1, 6})).slice(1, 5, 6).contiguous().to_vector<float>();
    CHECK(greedy[i] == std::max_element(l.begin(), l.end()) - l.begin());
  }
  CHECK(nn::generate(m, prompt, {.max_new_tokens = 5, .temperature = 1.3, .top_k = 1, .seed = 4}) == greedy);
  // Draws: the same seed gives the same ids, another seed other ids (vocabulary 16, 12 draws).
  const nn::GenerateOptions drawn{.max_new_tokens = 12, .temperature = 2.0, .seed = 7};
  const auto a = nn::generate(m, prompt, drawn), b = nn::generate(m, prompt, drawn);
  CHECK(a == b);
  nn::GenerateOptions other = drawn;
  other.seed = 8;
  CHECK(nn::generate(m, prompt, other) != a);
  // The draws follow softmax(logits / temperature) over the top_k ids: frequencies of 4000 one-token
  // draws (seeds 0..3999) against the softmax computed here, within 4 binomial standard deviations.
  {
    auto l = m(from_vector(std::vector<int64_t>(prompt.end() - 6, prompt.end()), Shape{1, 6}))
                 .slice(1, 5, 6).contiguous().to_vector<float>();
    std::vector<size_t> order(l.size());
    std::iota(order.begin(), order.end(), size_t(0));
    std::sort(order.begin(), order.end(), [&](size_t x, size_t y) { return l[x] > l[y]; });
    auto softmax_top = [&](double temperature, size_t k) {
      std::vector<double> p(l.size(), 0.0);
      double total = 0;
      for (size_t j = 0; j < k; ++j) total += p[order[j]] = std::exp((l[order[j]] - l[order[0]]) / temperature);
      for (double& x : p) x /= total;
      return p;
    };
    const int N = 4000;
    const std::vector<double> want = softmax_top(0.5, 3), at_one = softmax_top(1.0, 3);
    std::vector<double> freq(l.size(), 0.0);
    for (int seed = 0; seed < N; ++seed)
      freq[size_t(nn::generate(m, prompt, {.max_new_tokens = 1, .temperature = 0.5, .top_k = 3, .seed = uint64_t(seed)}).back())] += 1.0 / N;
    double worst = 0, apart = 0;
    for (size_t v = 0; v < l.size(); ++v) {
      INFO("id " << v << ": drawn " << freq[v] << ", softmax " << want[v]);
      CHECK(std::fabs(freq[v] - want[v]) <= 4 * std::sqrt(want[v] * (1 - want[v]) / N) + 1e-12);
      worst = std::max(worst, std::fabs(freq[v] - want[v]));
      apart = std::max(apart, std::fabs(want[v] - at_one[v]));
    }
    CHECK(apart > 4 * worst);  // the test tells temperature 0.5 from 1: it can fail when the scale is lost
    // top_p 0.6: the fewest most likely ids whose softmax reaches 0.6, renormalised (computed here from
    // the full softmax), against 4000 draws.
    const std::vector<double> full = softmax_top(1.0, l.size());
    std::vector<double> nucleus(l.size(), 0.0);
    double mass = 0;
    for (size_t j = 0; j < l.size() && mass < 0.6; ++j) mass += nucleus[order[j]] = full[order[j]];
    for (double& x : nucleus) x /= mass;
    REQUIRE(std::count_if(nucleus.begin(), nucleus.end(), [](double x) { return x > 0; }) >= 2);  // a real choice
    std::vector<double> drawn_p(l.size(), 0.0);
    for (int seed = 0; seed < N; ++seed)
      drawn_p[size_t(nn::generate(m, prompt, {.max_new_tokens = 1, .temperature = 1.0, .top_p = 0.6, .seed = uint64_t(seed)}).back())] += 1.0 / N;
    for (size_t v = 0; v < l.size(); ++v) {
      INFO("top_p: id " << v << ": drawn " << drawn_p[v] << ", nucleus " << nucleus[v]);
      CHECK(std::fabs(drawn_p[v] - nucleus[v]) <= 4 * std::sqrt(nucleus[v] * (1 - nucleus[v]) / N) + 1e-12);
    }
  }
  // A nucleus of one id is greedy.
  CHECK(nn::generate(m, prompt, {.max_new_tokens = 5, .temperature = 1.3, .top_p = 1e-9, .seed = 4}) == greedy);
  // stop_token ends the output right after it; max_new_tokens 0 returns the prompt.
  CHECK(nn::generate(m, prompt, {.max_new_tokens = 5, .temperature = 0, .stop_token = greedy[8]}).size() == 9);
  CHECK(nn::generate(m, prompt, {.max_new_tokens = 0}) == prompt);
  for (const nn::GenerateOptions& bad :
       {nn::GenerateOptions{.temperature = -1}, nn::GenerateOptions{.temperature = std::nan("")},
        nn::GenerateOptions{.temperature = INFINITY}, nn::GenerateOptions{.top_k = -1},
        nn::GenerateOptions{.max_new_tokens = -1}, nn::GenerateOptions{.top_p = 0}, nn::GenerateOptions{.top_p = 1.5},
        nn::GenerateOptions{.top_p = std::nan("")}})
    CHECK_THROWS_AS(nn::generate(m, prompt, bad), ValueError);
  CHECK_THROWS_AS(nn::generate(m, {}, {}), ValueError);
  CHECK_THROWS_WITH(nn::generate(m, {3, 16}, {}), Contains("prompt id out of range"));
}

TEST_CASE("KV cache: forward_cached gives forward's logits, and generate the same tokens", "[gpt][kv_cache]") {
  nn::GPTConfig c = tiny(DType::f64);
  c.seq_len = 12;
  nn::GPT m(c);
  for (auto& [path, t] : m.parameters())
    copy_(t, testing::randn64(RngKey::from_seed(std::hash<std::string>{}(path) + 1), t.shape(), 0.5));
  NoGradGuard ng;
  // Two sequences: a prompt of 5 positions, then one position at a time up to seq_len.
  const Tensor ids = testing::randint(RngKey::from_seed(3), Shape{2, 12}, c.vocab);
  const Tensor full = m(ids);
  nn::KVCache cache;
  auto close = [](const Tensor& a, const Tensor& b) {
    REQUIRE(a.shape() == b.shape());
    auto x = a.contiguous().to_vector<double>(), y = b.contiguous().to_vector<double>();
    double err = 0;
    for (size_t i = 0; i < x.size(); ++i) err = std::max(err, std::fabs(x[i] - y[i]));
    return err;
  };
  CHECK(close(m.forward_cached(ids.slice(1, 0, 5).contiguous(), cache), full.slice(1, 0, 5)) < 1e-12);
  CHECK(cache.length == 5);
  CHECK(cache.k[0].shape() == Shape{2, 2, 5, 4});
  nn::KVCache last;
  CHECK(close(m.forward_cached(ids.slice(1, 0, 5).contiguous(), last, true), full.slice(1, 4, 5)) < 1e-12);
  for (int64_t t = 5; t < 12; ++t) {
    INFO("position " << t);
    CHECK(close(m.forward_cached(ids.slice(1, t, t + 1).contiguous(), cache), full.slice(1, t, t + 1)) < 1e-12);
  }
  // The cache is full: one more position is past seq_len. Two new positions at once, another batch: refused.
  CHECK_THROWS_WITH(m.forward_cached(ids.slice(1, 0, 1).contiguous(), cache), Contains("after 12 cached"));
  nn::KVCache two;
  m.forward_cached(ids.slice(1, 0, 3).contiguous(), two);
  CHECK_THROWS_WITH(m.forward_cached(ids.slice(1, 3, 5).contiguous(), two), Contains("one new position at a time"));
  CHECK_THROWS_WITH(m.forward_cached(ids.slice(0, 0, 1).slice(1, 3, 4).contiguous(), two), Contains("batch differs"));

  // generate: the same ids with and without the cache, greedy and drawn, across the seq_len boundary
  // (prompt 4 + 14 new > 12: the last tokens come from the cropped window).
  const std::vector<int64_t> prompt = {3, 1, 4, 1};
  for (double temperature : {0.0, 1.5}) {
    INFO("temperature " << temperature);
    nn::GenerateOptions o{.max_new_tokens = 14, .temperature = temperature, .seed = 11};
    const auto with = nn::generate(m, prompt, o);
    o.kv_cache = false;
    CHECK(with == nn::generate(m, prompt, o));
    CHECK(with.size() == 18);
  }
}

TEST_CASE("A padded vocabulary computes the unpadded model: -inf logits, the same loss, gradients and samples",
          "[gpt][pad_vocab]") {
  nn::GPTConfig c = tiny(DType::f64);
  c.vocab = 13;
  nn::GPT plain(c);
  c.pad_vocab_multiple = 8;
  REQUIRE(c.padded_vocab() == 16);
  nn::GPT padded(c);
  CHECK(padded.parameters().at("wte/weight").shape() == Shape{16, 8});
  {  // the same weights; the padding rows keep their random init (never read as embeddings, masked as logits)
    NoGradGuard ng;
    for (const auto& [p, t] : plain.parameters()) {
      Tensor dst = padded.parameters().at(p);
      if (p == "wte/weight") dst = dst.slice(0, 0, 13);
      copy_(dst, t);
    }
  }
  const Tensor x = testing::randint(RngKey::from_seed(1), Shape{2, 6}, 13), y = testing::randint(RngKey::from_seed(2), Shape{2, 6}, 13);
  const Tensor lp = padded(x), lu = plain(x);
  CHECK(lp.shape() == Shape{2, 6, 16});
  for (double v : lp.slice(2, 13, 16).contiguous().to_vector<double>()) CHECK(v == -INFINITY);
  // Equal to rounding (the head's GEMM has 16 columns instead of 13: another blocking).
  CHECK(max(abs(lp.slice(2, 0, 13) - lu)).item() <= 1e-14);
  auto [loss_p, g_p] = value_and_grad([&] { return padded.loss(x, y); }, padded.parameters());
  auto [loss_u, g_u] = value_and_grad([&] { return plain.loss(x, y); }, plain.parameters());
  CHECK(loss_p.item() == Approx(loss_u.item()).epsilon(1e-14));
  for (const auto& [p, g] : g_u) {
    INFO(p);
    const Tensor gp = p == "wte/weight" ? g_p.at(p).slice(0, 0, 13).contiguous() : g_p.at(p);
    CHECK(max(abs(gp - g)).item() <= 1e-14 * std::max(1.0, max(abs(g)).item()));
  }
  CHECK(max(abs(g_p.at("wte/weight").slice(0, 13, 16))).item() == 0.0);  // padding rows: no gradient
  const nn::GenerateOptions o{.max_new_tokens = 8, .temperature = 1.0, .seed = 3};
  CHECK(nn::generate(padded, {1, 2, 3}, o) == nn::generate(plain, {1, 2, 3}, o));
  // Under TP every rank's vocabulary block needs a real id; the vocabulary must then divide padded.
  c.vocab = 3;  // padded to 8: rank 1 of 2 would hold ids 4..7, all padding
  CHECK_THROWS_WITH(nn::GPT::check_tensor_parallel(c, 2, "model"), Contains("fills the last tensor-parallel rank's block"));
  c.vocab = 13, c.pad_vocab_multiple = 1;
  CHECK_THROWS_WITH(nn::GPT::check_tensor_parallel(c, 2, "model"), Contains("model.pad_vocab_to"));
}

TEST_CASE("A chunked loss head gives the whole logits' loss and gradients, and never holds them whole",
          "[gpt][loss_chunk][memory]") {
  nn::GPTConfig c = tiny(DType::f64);
  c.vocab = 13;
  c.pad_vocab_multiple = 8;  // the padding's -inf logits inside each chunk too
  nn::GPT whole(c);
  // Targets with cross_entropy's ignore_index in places: the mean is over the others.
  const Tensor x = tokens(1, 3, 6, 13);
  std::vector<int64_t> yv = tokens(2, 3, 6, 13).to_vector<int64_t>();
  yv[1] = yv[7] = yv[16] = -100;
  const Tensor y = from_vector(yv, Shape{3, 6});
  for (int64_t chunk : {1, 5, 18, 40}) {  // one token, chunks not dividing the 18 tokens, one chunk, more than all
    nn::GPTConfig cc = c;
    cc.loss_chunk_tokens = chunk;
    nn::GPT chunked(cc);  // the same init: the same weights
    for (Reduction r : {Reduction::mean, Reduction::sum, Reduction::none}) {
      INFO("chunk " << chunk << ", reduction " << int(r));
      auto [lw, gw] = value_and_grad([&] { return sum(whole.loss(x, y, r)); }, whole.parameters());
      auto [lc, gc] = value_and_grad([&] { return sum(chunked.loss(x, y, r)); }, chunked.parameters());
      CHECK(lc.item() == Approx(lw.item()).epsilon(1e-13));
      CHECK(chunked.loss(x, y, r).shape() == whole.loss(x, y, r).shape());
      for (const auto& [p, g] : gw) {
        INFO(p);
        CHECK(max(abs(gc.at(p) - g)).item() <= 1e-13 * std::max(1.0, max(abs(g)).item()));
      }
    }
    nn::GPTConfig bad = c;
    bad.loss_chunk_tokens = -1;
    CHECK_THROWS_WITH(nn::GPT(bad), Contains("loss_chunk_tokens"));
  }
  // Memory: the peak over a loss and its backward. The whole head holds the [tokens, vocab] logits (and
  // their gradient); chunks of 64 tokens hold a 64-token slice at a time.
  nn::GPTConfig m = tiny(DType::f32);
  m.vocab = 2048;
  m.seq_len = 64;
  const Tensor mx = tokens(3, 8, 64, 2048), my = tokens(4, 8, 64, 2048);
  Allocator& alloc = allocator_for(Device::cpu());
  auto peak = [&](int64_t chunk) {
    nn::GPTConfig mc = m;
    mc.loss_chunk_tokens = chunk;
    nn::GPT model(mc);
    const int64_t before = alloc.stats().current_bytes;
    alloc.reset_peak();
    value_and_grad([&] { return model.loss(mx, my); }, model.parameters());
    return alloc.stats().peak_bytes - before;
  };
  const int64_t logits_bytes = 8 * 64 * 2048 * 4, full = peak(0), chunked = peak(64);
  INFO("peak over the step: whole logits " << full << " bytes, chunked " << chunked << ", one logits tensor " << logits_bytes);
  CHECK(full >= 2 * logits_bytes);
  CHECK(chunked <= full - logits_bytes);
}

TEST_CASE("GPT on a model axis of size 1 equals the unsplit model", "[gpt][tp]") {
  Mesh mesh = local_mesh({"data", "model"}, {1, 1});
  nn::GPT whole(tiny()), split(tiny(), mesh);
  CHECK(split.tp_size() == 1);
  CHECK(split.parameters().at("wte/weight").to_vector<float>() == whole.parameters().at("wte/weight").to_vector<float>());
  Tensor x = tokens(5, 2, 6, 16), y = tokens(6, 2, 6, 16);
  auto [l1, g1] = value_and_grad([&] { return whole.loss(x, y); }, whole.parameters());
  auto [l2, g2] = value_and_grad([&] { return split.loss(x, y); }, split.parameters());
  CHECK(l1.item() == l2.item());
  for (const auto& [p, g] : g1) CHECK(g.to_vector<float>() == g2.at(p).to_vector<float>());
  // Split specs name the axis even at size 1 (what checkpoints record).
  auto specs = split.partition_specs();
  CHECK(specs.at("wte/weight") == PartitionSpec{"model", ""});
  CHECK(specs.at("blocks/1/attn/qkv/weight") == PartitionSpec{"", "model", ""});
  CHECK(specs.at("blocks/1/attn/proj/bias").empty());
  CHECK(split.name().find("tensor parallel 1 on 'model'") != std::string::npos);

  // Errors: a missing axis (with did-you-mean), sizes that do not divide.
  Mesh dp_only = local_mesh({"data", "modle"}, {1, 1});
  auto e = catch_error<PlanError>([&] { nn::GPT(tiny(), dp_only); });
  CHECK_THAT(e.message(), Contains("did you mean 'modle'"));
  nn::GPTConfig c = tiny();
  c.heads = 2;
  e = catch_error<PlanError>([&] { nn::GPT::check_tensor_parallel(c, 4, "model"); });
  CHECK_THAT(e.message(), Contains("heads (2) does not divide by the tensor-parallel size 4"));
  c.heads = 4;
  c.vocab = 18;
  e = catch_error<PlanError>([&] { nn::GPT::check_tensor_parallel(c, 4, "model"); });
  CHECK_THAT(e.message(), Contains("vocab (18)"));
  CHECK_NOTHROW(nn::GPT::check_tensor_parallel(tiny(), 2, "model"));
}

TEST_CASE("vocab-parallel cross-entropy on one rank equals cross_entropy, gradient included", "[tp]") {
  Mesh mesh = local_mesh({"model"}, {1});
  Tensor logits = testing::randn64(RngKey::from_seed(3), Shape{5, 7}, 2.0);
  Tensor labels = from_vector(std::vector<int64_t>{0, 6, 3, -100, 2}, Shape{5});
  for (Reduction red : {Reduction::mean, Reduction::sum, Reduction::none}) {
    Tensor a = vocab_parallel_cross_entropy(mesh, logits, labels, "model", red);
    Tensor b = cross_entropy(logits, labels, red);
    auto va = a.to_vector<double>(), vb = b.to_vector<double>();
    REQUIRE(va.size() == vb.size());
    for (size_t i = 0; i < va.size(); ++i) CHECK(va[i] == Approx(vb[i]).epsilon(1e-12));
    auto r = gradcheck([&](const TensorList& in) { return vocab_parallel_cross_entropy(mesh, in[0], in[1], "model", red); },
                       {logits, labels});
    INFO(r.report);
    CHECK(r.ok);
  }
  CHECK_THROWS_AS(vocab_parallel_cross_entropy(mesh, logits, from_vector(std::vector<int64_t>{0, 7, 0, 0, 0}, Shape{5}), "model"),
                  ValueError);
  CHECK_THROWS_AS(vocab_parallel_cross_entropy(mesh, logits, labels.slice(0, 0, 4), "model"), ShapeError);
  CHECK_THROWS_AS(vocab_parallel_cross_entropy(mesh, logits, labels, "modl"), MeshError);
  // f and g are the identity on one rank.
  Tensor x = testing::randn64(RngKey::from_seed(4), Shape{3});
  CHECK(copy_to_tensor_parallel_region(mesh, x, "model").to_vector<double>() == x.to_vector<double>());
  CHECK(reduce_from_tensor_parallel_region(mesh, x, "model").to_vector<double>() == x.to_vector<double>());
}

// ------------------------------------------------------------------------------------------ sharding rules

TEST_CASE("glob patterns over parameter paths", "[sharding]") {
  CHECK(glob_match("blocks/*/attn/qkv/weight", "blocks/0/attn/qkv/weight"));
  CHECK(glob_match("blocks/*/attn/qkv/weight", "blocks/12/attn/qkv/weight"));
  CHECK_FALSE(glob_match("blocks/*/attn/qkv/weight", "blocks/0/1/attn/qkv/weight"));  // * stays in one segment
  CHECK_FALSE(glob_match("blocks/*/attn/qkv/weight", "blocks/0/attn/qkv/weights"));   // whole path only
  CHECK(glob_match("**/bias", "bias"));
  CHECK(glob_match("**/bias", "blocks/0/mlp/fc/bias"));
  CHECK(glob_match("blocks/**", "blocks/0/mlp/fc/bias"));
  CHECK(glob_match("blocks/**/fc/*", "blocks/0/mlp/fc/bias"));
  CHECK(glob_match("h*d/w*", "head/weight"));
  CHECK_FALSE(glob_match("h*d/w*", "heads/weight"));
  CHECK(glob_match("*", "wte"));
  CHECK_FALSE(glob_match("*", "wte/weight"));
  CHECK(glob_match("wte/weight", "wte/weight"));
  CHECK_FALSE(glob_match("wte/weight", "wpe/weight"));
}

TEST_CASE("the most specific sharding rule wins", "[sharding]") {
  auto sp = specificity("blocks/*/attn/qkv/weight");
  CHECK(sp.double_stars == 0);
  CHECK(sp.stars == 1);
  CHECK(sp.literal_chars == int(std::string("blocks//attn/qkv/weight").size()));
  CHECK(specificity("**/w").double_stars == 1);

  ShardingRules rules{{"**", {}},
                      {"**/weight", {"", "model"}},
                      {"blocks/*/mlp/*/weight", {"model", ""}},
                      {"blocks/*/mlp/fc/weight", {"model", "x"}},
                      {"blocks/0/mlp/fc/weight", {"", ""}}};
  CHECK(spec_for(rules, "blocks/0/mlp/fc/weight") == PartitionSpec{"", ""});         // no wildcard
  CHECK(spec_for(rules, "blocks/1/mlp/fc/weight") == PartitionSpec{"model", "x"});   // 1 star, longer
  CHECK(spec_for(rules, "blocks/1/mlp/out/weight") == PartitionSpec{"model", ""});   // 2 stars beat **
  CHECK(spec_for(rules, "lnf/weight") == PartitionSpec{"", "model"});                // 1 ** beats ** (literals)
  CHECK(spec_for(rules, "lnf/bias").empty());
  CHECK(spec_for({}, "anything").empty());                                            // unmatched: replicated
  CHECK(match_rule(rules, "blocks/1/mlp/out/weight")->pattern == "blocks/*/mlp/*/weight");

  // Equally specific rules with different specs are an error; with the same spec they are fine.
  ShardingRules amb{{"b*/0/fc", {"model"}}, {"*s/0/fc", {}}};
  auto e = catch_error<PlanError>([&] { spec_for(amb, "blocks/0/fc"); });
  CHECK_THAT(e.message(), Contains("ambiguous"));
  CHECK_THAT(e.found(), Contains("'b*/0/fc'"));
  ShardingRules same{{"b*/0/fc", {"model"}}, {"*s/0/fc", {"model"}}};
  CHECK(spec_for(same, "blocks/0/fc") == PartitionSpec{"model"});

  // partition_specs checks each spec against its tensor.
  ParamTree params{{"a/w", zeros(Shape{4, 2})}, {"b", zeros(Shape{4})}};
  auto specs = partition_specs(ShardingRules{{"a/*", {"model", ""}}}, params);
  CHECK(specs.at("a/w") == PartitionSpec{"model", ""});
  CHECK(specs.at("b").empty());
  CHECK_THROWS_AS(partition_specs(ShardingRules{{"b", {"model", ""}}}, params), PlanError);   // too many entries
  CHECK_THROWS_AS(partition_specs(ShardingRules{{"a/w", {"model", "model"}}}, params), PlanError);

  // GPT's rules give Megatron's layout.
  nn::GPTConfig c = tiny();
  for (const auto& l : nn::GPT::layout(c)) {
    INFO(l.path);
    if (l.path == "wte/weight" || l.path.find("mlp/fc/weight") != std::string::npos) CHECK(l.spec == PartitionSpec{"model", ""});
    else if (l.path.find("qkv/weight") != std::string::npos) CHECK(l.spec == PartitionSpec{"", "model", ""});
    else if (l.path.find("qkv/bias") != std::string::npos) CHECK(l.spec == PartitionSpec{"", "model"});
    else if (l.path.find("proj/weight") != std::string::npos || l.path.find("out/weight") != std::string::npos)
      CHECK(l.spec == PartitionSpec{"", "model"});
    else if (l.path.find("fc/bias") != std::string::npos) CHECK(l.spec == PartitionSpec{"model"});
    else CHECK(l.spec.empty());
  }
}

TEST_CASE("shapes and slices implied by a spec on a mesh", "[sharding]") {
  Mesh m = local_mesh({"data", "model"}, {1, 1});
  CHECK(local_shape(Shape{8, 4}, {"model", ""}, m) == Shape{8, 4});
  CHECK(global_shape(Shape{8, 4}, {"", "model"}, m) == Shape{8, 4});
  Tensor t = testing::randn64(RngKey::from_seed(1), Shape{4, 6});
  CHECK(shard_of(t, {"model", ""}, m).to_vector<double>() == t.to_vector<double>());
  CHECK(unshard(t, {"", "model"}, m).to_vector<double>() == t.to_vector<double>());
  CHECK_THROWS_AS(local_shape(Shape{8}, {"modl"}, m), MeshError);
  CHECK_THROWS_AS(local_shape(Shape{8}, {"model", ""}, m), PlanError);
  CHECK(spec_str({"model", ""}) == "[model, -]");
  CHECK(spec_axes({"", "model"}) == std::vector<std::string>{"model"});
  // TPGroup: the block this rank holds.
  TPGroup g(m, "model");
  CHECK(g.size() == 1);
  CHECK(g.local_shape(Shape{6, 3}, {"model", ""}) == Shape{6, 3});
  CHECK_THROWS_AS(g.local_shape(Shape{6, 3}, {"data", ""}), PlanError);
  CHECK_THROWS_AS(TPGroup(m, "modle"), MeshError);
  CHECK(TPGroup().local_shape(Shape{6, 3}, {"model", ""}) == Shape{6, 3});  // no mesh: whole
}

// ------------------------------------------------------------------------------------------ plan and engine

TEST_CASE("Plan with TP: validation, describe, to_json", "[parallel][tp]") {
  Mesh m = local_mesh({"data", "model"}, {1, 1});
  Plan p{.dp = DP{"data"}, .tp = TP{"model", nn::GPT::sharding_rules("model")}};
  CHECK_NOTHROW(p.validate(m));
  CHECK_THAT(p.describe(), Contains("tensor parallel: axis 'model', 11 sharding rules"));
  CHECK_THAT(p.describe(), Contains("blocks/*/attn/qkv/weight -> [-, model, -]"));
  CHECK_THAT(p.describe(), Contains("blocks/*/mlp/out/lora_a -> [-, model]"));  // LoRA adapters split as their layer
  CHECK_THAT(p.describe(m), Contains("parameters split over 1 rank(s) on axis 'model'"));
  auto j = nlohmann::json::parse(p.to_json());
  CHECK(j["tp"]["axis"] == "model");
  CHECK(j["tp"]["rules"][0]["pattern"] == "wte/weight");
  CHECK(j["tp"]["rules"][0]["spec"] == nlohmann::json::array({"model", ""}));
  CHECK(nlohmann::json::parse(Plan{}.to_json())["tp"].is_null());

  auto e = catch_error<PlanError>([&] { Plan{.tp = TP{"modle"}}.validate(local_mesh({"data", "model"}, {1, 1})); });
  CHECK_THAT(e.message(), Contains("TP axis 'modle' is not in the mesh; did you mean 'model'?"));
  e = catch_error<PlanError>([&] { Plan{.tp = TP{"model"}}.validate(local_mesh({"data"}, {1})); });
  CHECK_THAT(e.suggestion(), Contains("add the axis to the mesh"));
  e = catch_error<PlanError>([&] { Plan{.dp = DP{"data"}, .tp = TP{"data"}}.validate(local_mesh({"data"}, {1})); });
  CHECK_THAT(e.message(), Contains("same mesh axis"));
  e = catch_error<PlanError>([&] { Plan{.tp = TP{"model", {{"w", {"data"}}}}}.validate(m); });
  CHECK_THAT(e.message(), Contains("splits over axis 'data'"));
  CHECK_THROWS_AS(Plan{.tp = TP{""}}.validate(m), PlanError);
}

TEST_CASE("Engine with a TP plan on one rank trains like the plain engine", "[engine][tp]") {
  Mesh m = local_mesh({"data", "model"}, {1, 1});
  nn::GPTConfig c = tiny();
  nn::GPT whole(c), split(c, m);
  auto opt = [] {
    return optim::adamw(optim::constant(1e-2), {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1,
                                                .decay_filter = [](const std::string&, const Tensor& t) { return t.dim() >= 2; }});
  };
  Engine plain(m, Plan{.dp = DP{"data"}}, opt(), {.grad_clip = 0.5});
  Engine tp(m, Plan{.dp = DP{"data"}, .tp = TP{"model", nn::GPT::sharding_rules("model")}}, opt(), {.grad_clip = 0.5});
  CHECK(tp.partition_specs(split).at("blocks/0/mlp/fc/weight") == PartitionSpec{"model", ""});
  for (int s = 0; s < 5; ++s) {
    Batch b{{{"x", tokens(100 + s, 4, 6, 16)}, {"y", tokens(200 + s, 4, 6, 16)}}};
    StepResult a = plain.step(whole, nn::lm_loss, b), t = tp.step(split, nn::lm_loss, b);
    CHECK(a.loss == t.loss);
    CHECK(a.grad_norm == Approx(t.grad_norm).epsilon(1e-12));
  }
  CHECK(whole.parameters().at("wte/weight").to_vector<float>() == split.parameters().at("wte/weight").to_vector<float>());
  // Evaluation with lm_metrics: mean per-token loss.
  auto data = std::make_shared<TensorDataset>(std::map<std::string, Tensor>{{"x", tokens(7, 10, 6, 16)}, {"y", tokens(8, 10, 6, 16)}});
  Metrics ev = tp.evaluate(split, {.data = data, .batch_size = 4, .fn = nn::lm_metrics});
  CHECK(ev.at("eval/loss") == Approx(split.loss(tokens(7, 10, 6, 16), tokens(8, 10, 6, 16)).item()).epsilon(1e-6));

  // Checkpoints record the spec of each split parameter and of its optimizer moments.
  namespace fs = std::filesystem;
  fs::path dir = fs::temp_directory_path() / ("titanax_gpt_ckpt_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  Engine saver(m, Plan{.dp = DP{"data"}, .tp = TP{"model"}}, opt(), {.checkpointer = std::make_shared<Checkpointer>(dir.string())});
  saver.step(split, nn::lm_loss, Batch{{{"x", tokens(1, 2, 6, 16)}, {"y", tokens(2, 2, 6, 16)}}});
  saver.save(split);
  std::ifstream mf(dir / "step_00000001" / "metadata.json");
  auto meta = nlohmann::json::parse(mf);
  CHECK(meta["tensors"]["params/wte/weight"]["spec"] == nlohmann::json::array({"model", ""}));
  CHECK(meta["tensors"]["opt/m/blocks/0/mlp/fc/weight"]["spec"] == nlohmann::json::array({"model", ""}));
  CHECK(meta["tensors"]["opt/v/blocks/1/attn/qkv/weight"]["spec"] == nlohmann::json::array({"", "model", ""}));
  CHECK(meta["plan"]["tp"]["axis"] == "model");
  fs::remove_all(dir);

  // A plan whose rules split parameters the model holds whole: PlanError naming the parameter.
  Engine bad(m, Plan{.tp = TP{"model", nn::GPT::sharding_rules("model")}}, opt());
  auto e = catch_error<PlanError>([&] { bad.partition_specs(whole); });
  CHECK_THAT(e.message(), Contains("'wte/weight'"));
  CHECK_THAT(e.suggestion(), Contains("build the model with the mesh"));
}
