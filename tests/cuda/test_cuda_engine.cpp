// What the Engine needs on CUDA beyond the op cases (part of titanax_cuda_tests: skipped without a GPU):
// Optimizer::step on parameters living on cuda:0 takes the fused multi-tensor kernels (one group per
// setting, e.g. with and without weight decay) and must match the same steps on CPU copies, the global
// gradient norm too; argmax (classification accuracy) must equal the CPU's exactly, ties included;
// cross-entropy's labels and the embedding's / take's indices are checked on the device and a bad one is
// thrown at the next wait; the embedding backward's device-side sort sums each row in index order; layer
// norm's dw / db, summed over chunks of rows, match the CPU on more rows than one chunk; reductions at
// training sizes take every plan (column tiles, splits) and match the CPU; sampling, one-hot and the
// vocabulary-parallel cross-entropy (one rank) run on the device and match the CPU.
#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <cstring>

#include "autodiff/autodiff.h"
#include "core/cuda_runtime.h"
#include "cuda_test_util.h"
#include "engine/optim.h"
#include "op_cases.h"
#include "ops/ops.h"
#include "parallel/communicator.h"
#include "parallel/mesh.h"
#include "parallel/tp.h"

using namespace titanax;

namespace {
ParamTree make(uint64_t seed, Device d) {
  ParamTree p;
  int k = 0;
  for (const Shape& s : {Shape{33, 7}, Shape{7}, Shape{5, 5, 3}, Shape{1}, Shape{1000}}) {
    p.insert("p" + std::to_string(k) + (k % 2 ? "/bias" : "/w"),
             testing::randn64(RngKey::from_seed(seed + uint64_t(k)), s).astype(DType::f32).to(d));
    ++k;
  }
  return p;
}
double max_rel(const ParamTree& got, const ParamTree& want) {
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const auto g = got[i].second.to(Device::cpu()).to_vector<double>(), w = want[i].second.to_vector<double>();
    for (size_t j = 0; j < w.size(); ++j) worst = std::max(worst, std::fabs(g[j] - w[j]) / std::max(1.0, std::fabs(w[j])));
  }
  return worst;
}
}  // namespace

TEST_CASE("cuda optimizers: fused AdamW (two weight-decay groups) and SGD + Nesterov match the CPU over 5 steps") {
  for (int which = 0; which < 2; ++which) {
    INFO((which == 0 ? "adamw" : "sgd"));
    auto make_opt = [&] {
      optim::AdamOptions o{.weight_decay = 0.1, .decay_filter = [](const std::string& p, const Tensor&) {
                             return p.find("bias") == std::string::npos;
                           }};
      return which == 0 ? optim::adamw(optim::warmup_cosine(1e-2, 2, 5), o) : optim::sgd(optim::constant(0.05), 0.9, 1e-3, true);
    };
    ParamTree cpu = make(1, Device::cpu()), gpu = make(1, Device::cuda(0));
    auto oc = make_opt(), og = make_opt();
    for (int s = 0; s < 5; ++s) {
      ParamTree gc = make(100 + uint64_t(s) * 10, Device::cpu()), gg = make(100 + uint64_t(s) * 10, Device::cuda(0));
      CHECK(optim::global_norm(gg) == Approx(optim::global_norm(gc)).epsilon(1e-6));
      oc->step(cpu, gc);
      og->step(gpu, gg);
    }
    CHECK(og->steps() == 5);
    CHECK(max_rel(gpu, cpu) <= 1e-5);
    CHECK(max_rel(og->state(), oc->state()) <= 1e-5);
  }
}

TEST_CASE("cuda layer norm over many rows: y, dx, dw and db (summed by chunks of rows) match the CPU") {
  const uint64_t seed = uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  // GPT-2's width over 1000 rows (3 full chunks of 256 and a partial one): the warp-per-row kernels; a
  // width that is no multiple of 4 (the block-per-row kernels) with a partial 32-column tile.
  for (const Shape& s : {Shape{4, 250, 768}, Shape{1000, 102}}) {
    INFO("shape " << s.str());
    const int64_t D = s.back();
    auto f32 = [&](uint64_t i, const Shape& sh) { return testing::randn64(fold_in(key, i), sh).astype(DType::f32); };
    const Tensor x = f32(1, s) * 2.0 + 0.5, w = f32(2, Shape{D}), b = f32(3, Shape{D}), dy = f32(4, s);
    TensorList cpu{x.clone(), w.clone(), b.clone()}, gpu{x.to(Device::cuda(0)), w.to(Device::cuda(0)), b.to(Device::cuda(0))};
    Tensor y[2];
    for (int d = 0; d < 2; ++d) {
      TensorList& in = d == 0 ? cpu : gpu;
      for (Tensor& t : in) t.set_requires_grad(true);
      y[d] = layer_norm(in[0], in[1], in[2]);
      sum(y[d] * dy.to(in[0].device())).backward();
    }
    CHECK(testing::rel_error(y[1], y[0]) <= 1e-5);
    const char* names[3] = {"dx", "dw", "db"};
    for (int i = 0; i < 3; ++i) {
      INFO(names[i]);
      CHECK(testing::rel_error(gpu[size_t(i)].grad(), cpu[size_t(i)].grad()) <= 1e-4);
    }
  }
}

TEST_CASE("cuda reductions at training sizes: column tiles, split reductions and 16-bit inputs match the CPU, and repeat bitwise") {
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  const Device g = Device::cuda(0);
  // A bias gradient (the sum over rows of [4096, 3072]: column tiles in splits), the same over [B, T, C]
  // (axes 0 and 1 merge), a full reduction of 8M elements (1024 splits of blocks), a row reduction (a warp
  // per row) and a transposed input; max / min too (NaN-free inputs: exact).
  const Tensor a = testing::randn64(fold_in(key, 1), Shape{4096, 3072}).astype(DType::f32);
  const Tensor b = testing::randn64(fold_in(key, 2), Shape{8, 512, 768}).astype(DType::f32);
  const Tensor ag = a.to(g), bg = b.to(g);
  CHECK(testing::rel_error(sum(ag, {0}), sum(a, {0})) <= 1e-4);
  CHECK(testing::rel_error(sum(bg, {0, 1}), sum(b, {0, 1})) <= 1e-4);
  CHECK(testing::rel_error(sum(ag), sum(a)) <= 1e-4);
  CHECK(testing::rel_error(sum(ag, {1}), sum(a, {1})) <= 1e-4);
  CHECK(testing::rel_error(sum(ag.T(), {1}), sum(a.T(), {1})) <= 1e-4);
  CHECK(testing::bitwise_equal(max(ag, {0}), max(a, {0})));
  CHECK(testing::bitwise_equal(min(bg, {0, 1}), min(b, {0, 1})));
  CHECK(testing::bitwise_equal(max(ag), max(a)));
  // The plan depends on the sizes only: a second run sums in the same order.
  CHECK(testing::bitwise_equal(sum(ag, {0}), sum(ag, {0})));
  CHECK(testing::bitwise_equal(sum(ag), sum(ag)));
  // 16-bit inputs: widened on load, accumulated in double, rounded once (the CPU: run_in_f32).
  for (DType t : {DType::bf16, DType::f16}) {
    INFO(dtype_name(t));
    const Tensor h = a.astype(t), hg = h.to(g);
    CHECK(testing::rel_error(sum(hg, {0}), sum(h, {0})) <= 1e-2);
    CHECK(testing::rel_error(sum(hg), sum(h)) <= 1e-2);
    CHECK(testing::bitwise_equal(max(hg, {1}), max(h, {1})));
  }
}

TEST_CASE("cuda sum_squares (the gradient norm's): 30 tensors of mixed sizes and dtypes in a few launches, as the CPU") {
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  TensorList host, dev;
  for (int i = 0; i < 30; ++i) {  // more than one launch's 24 tensors; a bf16 run in the middle
    const Shape s = i % 7 == 0 ? Shape{300, 777} : Shape{int64_t(1 + 37 * i)};
    const DType t = i >= 10 && i < 13 ? DType::bf16 : DType::f32;
    host.push_back(testing::randn64(fold_in(key, uint64_t(i)), s).astype(t));
    dev.push_back(host.back().to(Device::cuda(0)));
  }
  dev[3] = dev[3].reshape(Shape{2, -1}).T();  // a strided view
  host[3] = host[3].reshape(Shape{2, -1}).T();
  const Tensor got = sum_squares(dev);
  CHECK(got.device().is_cuda());
  CHECK(got.item() == Approx(sum_squares(host).item()).epsilon(1e-12));  // double sums in another order
  CHECK(testing::bitwise_equal(sum_squares(dev), got));                   // a fixed order: repeats bitwise
}

TEST_CASE("cuda argmax equals the CPU exactly: any axis, strided input, ties take the first index") {
  for (DType t : {DType::f32, DType::f64, DType::i64}) {
    // Values rounded to a few levels, so rows have ties.
    const Tensor x = (testing::randn64(RngKey::from_seed(uint64_t(t) + 9), Shape{37, 11, 5}) * 2.0).astype(DType::i64).astype(t);
    for (int axis : {0, 1, 2, -1}) {
      INFO("dtype " << dtype_name(t) << " axis " << axis);
      const Tensor want = argmax(x, axis);
      const Tensor got = argmax(x.to(Device::cuda(0)), axis);
      CHECK(got.device().is_cuda());
      CHECK(got.to(Device::cpu()).to_vector<int64_t>() == want.to_vector<int64_t>());
      // A strided (transposed) view on the device.
      CHECK(argmax(x.to(Device::cuda(0)).transpose(0, 2), axis).to(Device::cpu()).to_vector<int64_t>() ==
            argmax(x.transpose(0, 2), axis).to_vector<int64_t>());
    }
  }
}

TEST_CASE("cuda dropout draws the CPU's mask: bitwise equal outputs and gradients for the same key") {
  for (DType t : {DType::f32, DType::f64}) {
    for (int64_t n : {int64_t(1), int64_t(7), int64_t(4099), int64_t(37 * 1000)}) {
      INFO("dtype " << dtype_name(t) << " n " << n);
      const Tensor x = testing::randn64(RngKey::from_seed(uint64_t(n)), Shape{n}).astype(t);
      const RngKey key = fold_in(RngKey::from_seed(3), uint64_t(n));
      const Tensor want = dropout(x, 0.3, key);
      const Tensor got = dropout(x.to(Device::cuda(0)), 0.3, key).to(Device::cpu());
      CHECK(std::memcmp(got.raw_data(), want.raw_data(), want.nbytes()) == 0);
    }
  }
  // A strided input on the device (made contiguous first), and the vjp (the same mask on the cotangent).
  const Tensor x = testing::randn64(RngKey::from_seed(11), Shape{64, 48}).astype(DType::f32);
  const RngKey key = RngKey::from_seed(12);
  CHECK(dropout(x.to(Device::cuda(0)).T(), 0.5, key).to(Device::cpu()).to_vector<float>() ==
        dropout(x.T(), 0.5, key).to_vector<float>());
  Tensor xc = x.clone(), xg = x.to(Device::cuda(0));
  xc.set_requires_grad(true);
  xg.set_requires_grad(true);
  sum(dropout(xc, 0.25, key) * 3.0).backward();
  sum(dropout(xg, 0.25, key) * 3.0).backward();
  CHECK(xg.grad().to(Device::cpu()).to_vector<float>() == xc.grad().to_vector<float>());
}

TEST_CASE("cuda sampling and one-hot on the device: the CPU's values for the same key and labels; a bad label at the next wait") {
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  const Device g = Device::cuda(0);
  // 3000 elements (whole Philox blocks of 4) and 35 (a partial last block).
  for (const Shape& sh : {Shape{1000, 3}, Shape{7, 5}}) {
    for (DType t : {DType::f32, DType::f64, DType::bf16}) {
      INFO(sh.str() << " " << dtype_name(t));
      CHECK(testing::bitwise_equal(random_uniform(key, sh, t, g), random_uniform(key, sh, t)));
      // Box-Muller through the device's logf / cosf / sinf: their last bit may differ from the host's,
      // so the f32 samples agree within a few ulps (bf16: within one rounding step).
      CHECK(testing::rel_error(random_normal(key, sh, t, g), random_normal(key, sh, t)) <= (t == DType::bf16 ? 1e-2 : 1e-5));
    }
  }
  const Tensor lab = from_vector(std::vector<int64_t>{3, 0, 9, 9, 1}, Shape{5});
  for (DType t : {DType::f32, DType::bf16, DType::i64, DType::bool_})
    CHECK(testing::bitwise_equal(one_hot(lab.to(g), 10, t), one_hot(lab, 10, t)));
  CHECK(testing::bitwise_equal(one_hot(lab.astype(DType::i32).to(g), 10, DType::f32), one_hot(lab, 10, DType::f32)));
  const Tensor bad = one_hot(from_vector(std::vector<int64_t>{3, 10}, Shape{2}).to(g), 10, DType::f32);  // queued
  CHECK_THROWS_WITH(bad.to(Device::cpu()), Catch::Matchers::Contains("one_hot") && Catch::Matchers::Contains("index 10 at position 1"));
  CHECK_NOTHROW(cuda_rt::synchronize(0));  // cleared
}

TEST_CASE("cuda vocabulary-parallel cross-entropy on one rank equals cross_entropy on the CPU (loss and gradient)") {
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  Mesh mesh = MeshSpec{{"model"}, {1}}.build(make_local_communicator());
  const Tensor logits = (testing::randn64(fold_in(key, 1), Shape{6, 5, 300}) * 3.0).astype(DType::f32);
  std::vector<int64_t> lv;
  for (int64_t i = 0; i < 30; ++i) lv.push_back(i % 7 == 3 ? -100 : (i * 53 + 11) % 300);
  const Tensor labels = from_vector(lv, Shape{6, 5});
  for (Reduction red : {Reduction::mean, Reduction::sum, Reduction::none}) {
    INFO("reduction " << int(red));
    Tensor xg = logits.to(Device::cuda(0)), xc = logits.clone();
    xg.set_requires_grad(true);
    xc.set_requires_grad(true);
    const Tensor lg = vocab_parallel_cross_entropy(mesh, xg, labels.to(Device::cuda(0)), "model", red);
    const Tensor lc = cross_entropy(xc, labels, red);
    CHECK(lg.device().is_cuda());
    CHECK(testing::rel_error(lg, lc) <= 1e-5);
    const Tensor w = testing::randn64(fold_in(key, 2), lc.shape()).astype(DType::f32);
    const Tensor gg = grad(sum(lg * w.to(Device::cuda(0))), {xg})[0], gc = grad(sum(lc * w), {xc})[0];
    CHECK(testing::rel_error(gg, gc) <= 1e-5);
  }
  // A label beyond the vocabulary: checked on the host, a ValueError right away.
  CHECK_THROWS_AS(vocab_parallel_cross_entropy(mesh, logits.to(Device::cuda(0)), full(Shape{6, 5}, 300.0, DType::i64).to(Device::cuda(0)), "model"),
                  ValueError);
}

TEST_CASE("cuda cross-entropy checks labels on the device: a bad one is a ValueError at the next wait, then cleared") {
  // cross_entropy on the GPU does not wait for the labels (so it can be captured into a CUDA graph): a
  // label out of range is reported by the kernel and thrown when the host next waits for the device.
  const Tensor logits = testing::randn64(RngKey::from_seed(77), Shape{4, 5}).astype(DType::f32);
  const Tensor good = from_vector(std::vector<int64_t>{0, 4, 2, 1}, Shape{4});
  const Tensor bad = from_vector(std::vector<int64_t>{0, 7, 2, 1}, Shape{4});
  const Tensor dl = logits.to(Device::cuda(0));
  const Tensor loss = cross_entropy(dl, bad.to(Device::cuda(0)));  // queued, not checked yet
  CHECK_THROWS_WITH(loss.to(Device::cpu()),
                    Catch::Matchers::Contains("label out of range") && Catch::Matchers::Contains("label 7 at position 1 (flat)"));
  // Cleared: the next loss reads back without an error and equals the CPU's.
  CHECK(std::fabs(cross_entropy(dl, good.to(Device::cuda(0))).to(Device::cpu()).item() - cross_entropy(logits, good).item()) < 1e-5);
  // The backward checks them too (an ignored label is fine: -100 is the default ignore_index).
  Tensor x = dl.detach();
  x.set_requires_grad(true);
  const Tensor l2 = cross_entropy(x, from_vector(std::vector<int64_t>{0, -100, 9, 1}, Shape{4}).to(Device::cuda(0)));
  const TensorList g = grad(l2, {x});
  CHECK_THROWS_AS(cuda_rt::synchronize(0), ValueError);
  CHECK_NOTHROW(cuda_rt::synchronize(0));
  const Tensor l3 = cross_entropy(dl, from_vector(std::vector<int64_t>{0, -100, 3, 1}, Shape{4}).to(Device::cuda(0)));
  CHECK(std::fabs(l3.to(Device::cpu()).item() -
                  cross_entropy(logits, from_vector(std::vector<int64_t>{0, -100, 3, 1}, Shape{4})).item()) < 1e-5);
}

TEST_CASE("cuda embedding / take: indices checked on the device; the backward sorts on the device and equals the CPU bitwise") {
  const RngKey key = RngKey::from_seed(uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count()));
  const Tensor w = testing::randn64(key, Shape{17, 33}).astype(DType::f32);
  const Tensor dw = w.to(Device::cuda(0));
  SECTION("the backward: heavily repeated ids (i64 and i32) sum in index order, as the CPU") {
    for (DType it : {DType::i64, DType::i32}) {
      INFO(dtype_name(it));
      const Tensor ids = (random_uniform(fold_in(key, 1), Shape{3, 1000}, DType::f64) * 17.0).astype(it);
      const Tensor g = testing::randn64(fold_in(key, 2), Shape{3, 1000, 33}).astype(DType::f32);
      auto grad_of = [&](const Tensor& table, const Tensor& i, const Tensor& ct) {
        Tensor t = table.detach();
        t.set_requires_grad(true);
        return grad(sum(embedding(t, i) * ct), {t})[0];
      };
      const Tensor want = grad_of(w, ids, g), got = grad_of(dw, ids.to(Device::cuda(0)), g.to(Device::cuda(0)));
      const Tensor gc = got.to(Device::cpu());
      CHECK(std::memcmp(gc.raw_data(), want.raw_data(), want.nbytes()) == 0);
      // And take along axis 1 (A = 17 rows of the gathered axis' outer part).
      const Tensor i1 = (random_uniform(fold_in(key, 3), Shape{50}, DType::f64) * 33.0).astype(it);
      const Tensor x = testing::randn64(fold_in(key, 4), Shape{17, 33, 2}).astype(DType::f32);
      const Tensor ct = testing::randn64(fold_in(key, 5), Shape{17, 50, 2}).astype(DType::f32);
      auto take_grad = [&](const Tensor& xx, const Tensor& i, const Tensor& c) {
        Tensor t = xx.detach();
        t.set_requires_grad(true);
        return grad(sum(take(t, i, 1) * c), {t})[0];
      };
      const Tensor tw = take_grad(x, i1, ct), tg = take_grad(x.to(Device::cuda(0)), i1.to(Device::cuda(0)), ct.to(Device::cuda(0)));
      CHECK(tg.to(Device::cpu()).to_vector<float>() == tw.to_vector<float>());
    }
  }
  SECTION("no ids: an all-zero gradient") {
    const Tensor none = from_vector(std::vector<int64_t>{}, Shape{0});
    Tensor t = dw.detach();
    t.set_requires_grad(true);
    const Tensor g = grad(sum(embedding(t, none.to(Device::cuda(0)))) + sum(t) * 0.0, {t})[0];
    for (float v : g.to(Device::cpu()).to_vector<float>()) CHECK(v == 0.0f);
  }
  SECTION("a bad id is a ValueError at the next wait, forward and backward, then cleared") {
    const Tensor bad = from_vector(std::vector<int64_t>{3, 0, 17, 5}, Shape{2, 2}).to(Device::cuda(0));
    Tensor t = dw.detach();
    t.set_requires_grad(true);
    const Tensor y = embedding(t, bad);  // queued, not checked yet
    CHECK_THROWS_WITH(y.to(Device::cpu()), Catch::Matchers::Contains("embedding") && Catch::Matchers::Contains("index out of range") &&
                                               Catch::Matchers::Contains("index 17 at position 2 (flat)"));
    auto backward = [&] {  // the backward's own check, thrown at the latest when the host waits
      const TensorList g = grad(sum(y), {t});
      cuda_rt::synchronize(0);
    };
    CHECK_THROWS_WITH(backward(), Catch::Matchers::Contains("embedding_backward") &&
                                      Catch::Matchers::Contains("index 17 at position 2 (flat)"));
    CHECK_NOTHROW(cuda_rt::synchronize(0));
    const Tensor neg = from_vector(std::vector<int64_t>{1, -1}, Shape{2}, DType::i32).to(Device::cuda(0));
    const Tensor z = take(dw, neg, 1);
    CHECK_THROWS_WITH(z.to(Device::cpu()), Catch::Matchers::Contains("ValueError: take (checked on cuda:0") &&
                                               Catch::Matchers::Contains("index -1 at position 1 (flat)"));
    // Cleared: a good lookup reads back and equals the CPU's.
    const Tensor ok = from_vector(std::vector<int64_t>{16, 0}, Shape{2});
    CHECK(embedding(dw, ok.to(Device::cuda(0))).to(Device::cpu()).to_vector<float>() == embedding(w, ok).to_vector<float>());
  }
}
