// ONNX export (io/onnx.h) and .npy files (io/npy.h). The oracle is independent of Titanax: the exported
// models are checked by ONNX's checker (full check: shape inference against the declared shapes) and
// evaluated by tests/onnx/onnx_reference.py, numpy code written
// from the ONNX operator specification, run by /usr/bin/python3 (python3-onnx, python3-numpy:
// scripts/install-deps.sh); .npy files are written and read by numpy itself.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>

#include "io_test_util.h"
#include "test_util.h"

#include "engine/gpt.h"
#include "engine/nn.h"
#include "io/npm.h"
#include "io/npy.h"
#include "io/onnx.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
using Catch::Matchers::Contains;
using testing::catch_error;

namespace {

const std::string kReference = std::string(TITANAX_SOURCE_DIR) + "/tests/onnx/onnx_reference.py";
using io_test::kPython;
using io_test::shell;

// One model to evaluate with the numpy reference.
struct Job {
  std::string name;
  std::string model;   // serialized ModelProto, or empty: the file `path` (beside its external data)
  TensorList inputs;
  TensorList expected;  // Titanax's eager outputs
  double tol;           // on max |onnx - eager| / max(1, max |eager|); 0: exact
  std::string path = {};
};

// Evaluates every job's model in one Python process and checks its outputs against the eager ones.
void check_with_reference(const std::vector<Job>& jobs) {
  detail::TempDir dir("titanax-onnx-test");
  std::ofstream list(dir.path() / "jobs.txt");
  for (size_t j = 0; j < jobs.size(); ++j) {
    const auto d = dir.path() / std::to_string(j);
    std::filesystem::create_directories(d);
    if (jobs[j].path.empty()) std::ofstream(d / "model.onnx", std::ios::binary) << jobs[j].model;
    list << (jobs[j].path.empty() ? (d / "model.onnx").string() : jobs[j].path) << '\t' << (d / "out").string();
    for (size_t i = 0; i < jobs[j].inputs.size(); ++i) {
      save_npy((d / ("in" + std::to_string(i) + ".npy")).string(), jobs[j].inputs[i]);
      list << '\t' << (d / ("in" + std::to_string(i) + ".npy")).string();
    }
    list << '\n';
  }
  list.close();
  const auto log = dir.path() / "log.txt";
  const int rc = shell(kPython + " " + kReference + " --jobs " + (dir.path() / "jobs.txt").string(), log);
  INFO(io_test::read_text(log));
  REQUIRE(rc == 0);  // python3-onnx and python3-numpy missing? scripts/install-deps.sh installs them
  for (size_t j = 0; j < jobs.size(); ++j) {
    const auto out = dir.path() / std::to_string(j) / "out";
    INFO("model " << jobs[j].name << ": " << io_test::read_text(out / "error.txt"));
    REQUIRE(io_test::read_text(out / "rc") == "0\n");
    for (size_t k = 0; k < jobs[j].expected.size(); ++k) {
      const Tensor& want = jobs[j].expected[k];
      const Tensor got = load_npy((out / ("output" + std::to_string(k) + ".npy")).string());
      INFO("output " << k << ": " << spec_str(got) << " against " << spec_str(want));
      REQUIRE(got.dtype() == want.dtype());
      REQUIRE(got.shape() == want.shape());
      if (want.numel() == 0) continue;
      const Tensor w = want.astype(DType::f64), g = got.astype(DType::f64);
      const double scale = std::max(1.0, max(abs(w)).item());
      const double err = max(abs(g - w)).item() / scale;
      CHECK(err <= jobs[j].tol);
    }
  }
}

// The op that a refusal names: "ONNX export: op NAME(attrs) has no ONNX form", or dropout's own.
std::string refused_op(const std::string& what) {
  if (what.find("dropout in a function exported to ONNX") != std::string::npos) return "dropout";
  const std::string key = "ONNX export: op ";
  const size_t at = what.find(key);
  if (at == std::string::npos) return "";
  const size_t b = at + key.size();
  return what.substr(b, what.find_first_of("( ", b) - b);
}

}  // namespace

TEST_CASE("ONNX export: every op-table case exports and matches the numpy reference (f64)", "[onnx]") {
  // Ops with no ONNX form by design: derivatives (an exported function is an inference function), the
  // fused loss (an ONNX model returns logits), the norm of gradients, random masks.
  const std::set<std::string> no_form = {
      "relu_backward", "gelu_tanh_backward", "gelu_erf_backward", "cross_entropy", "cross_entropy_with_grad",
      "cross_entropy_backward", "layer_norm_backward", "scaled_dot_product_attention_backward",
      "scaled_dot_product_attention_qkvpacked_backward", "take_backward", "embedding_backward", "slice_scatter",
      "conv2d_backward_input", "conv2d_backward_weight", "max_pool2d_backward", "max_pool2d_indices", "sum_squares",
      "dropout"};
  // max_pool2d is refused where its workspace (which element won each window) is read: by its backward.
  const std::set<std::string> refused_for_a_gradient = {"max_pool2d"};
  std::vector<Job> jobs;
  std::vector<std::string> refused;
  uint64_t seed = 0;
  for (const testing::OpCase& c : testing::op_cases()) {
    const TensorList in = c.inputs(RngKey::from_seed(9000 + seed++));
    const auto fn = [&](const TensorList& x) { return TensorList{c.fn(x)}; };
    try {
      const std::string model = export_onnx(fn, in);
      // ONNX stores float attributes as float32: layer norm's epsilon 1e-5 becomes 1e-5 (1 - 2.5e-8).
      const double tol = c.name.rfind("layer_norm", 0) == 0 ? 1e-8 : 1e-12;
      jobs.push_back({c.name, model, in, fn(in), tol});
    } catch (const ValueError& e) {
      INFO(c.name << ": " << e.what());
      const std::string op = refused_op(e.what());
      CHECK((no_form.count(op) == 1 || (refused_for_a_gradient.count(op) == 1 && c.name.find("second_order") != std::string::npos)));
      refused.push_back(c.name);
    }
  }
  std::string names;
  for (const std::string& r : refused) names += r + " ";
  INFO(jobs.size() << " cases exported, " << refused.size() << " refused: " << names);
  CHECK(jobs.size() >= 100);
  check_with_reference(jobs);
}

TEST_CASE("ONNX export: comparisons, argmax, one_hot, casts, clamps and slices match the numpy reference", "[onnx]") {
  const Tensor x = testing::randn64(RngKey::from_seed(1), Shape{3, 5});
  const Tensor y = testing::randn64(RngKey::from_seed(2), Shape{5});
  const Tensor labels = testing::randint(RngKey::from_seed(3), Shape{4}, 6);
  const auto fn = [](const TensorList& in) {
    const Tensor &a = in[0], &b = in[1];
    return TensorList{ne(a, b), eq(a, a), lt(a, b), le(a, b), gt(a, b), ge(a, b),
                      argmax(a, 1), argmax(a, 0, true), one_hot(in[2], 6, DType::f32),
                      a.astype(DType::i32), gt(a, b).astype(DType::f64), clamp(a, -INFINITY, 0.25), clamp(a, -0.5, INFINITY),
                      where(lt(a, b), a, b).to(Device::cpu()), a.slice(1, 1, 3), a.slice(0, -2, INT64_MAX),
                      a.slice(1, 4, 2)};
  };
  const TensorList in{x, y, labels};
  check_with_reference({{"mixed", export_onnx(fn, in), in, fn(in), 0.0}});
}

TEST_CASE("ONNX export: the MNIST MLP and CNN and a GPT match the numpy reference, with named weights", "[onnx]") {
  std::vector<Job> jobs;
  auto add = [&](const std::string& name, nn::Module& m, const Tensor& x, double tol) {
    m.eval();
    const auto fn = [&](const TensorList& in) { return TensorList{m(in[0])}; };
    const std::string model = export_onnx(fn, {x}, {.input_names = {"x"}, .output_names = {"logits"}, .named_tensors = m.parameters()});
    for (const std::string& path : m.parameters().paths()) CHECK_THAT(model, Contains(path));  // an initializer's name
    jobs.push_back({name, model, {x}, fn({x}), tol});
  };
  nn::MLP mlp({784, 64, 32, 10}, {.activation = "gelu", .dtype = DType::f64});
  add("mlp_f64", mlp, testing::randn64(RngKey::from_seed(4), Shape{8, 784}), 1e-12);
  {  // an input named like a parameter that fn reads through two handles: one initializer (the trace gives
     // the memory one value), under another name
    const Tensor x = testing::randn64(RngKey::from_seed(4), Shape{8, 784});
    const Tensor w = mlp.parameters().at("layers/0/weight");
    const auto fn = [&](const TensorList& in) { return TensorList{linear(in[0], w) + linear(in[0] * 2.0, w.detach())}; };
    const std::string model = export_onnx(fn, {x}, {.input_names = {"layers/0/weight"}, .named_tensors = mlp.parameters()});
    const std::string wb(static_cast<const char*>(w.raw_data()), w.nbytes());
    const size_t at = model.find(wb);
    CHECK(at != std::string::npos);
    CHECK(model.find(wb, at + 1) == std::string::npos);  // one initializer, not one per read
    jobs.push_back({"name_clash", model, {x}, fn({x}), 1e-12});
  }
  nn::MLP mlp32({784, 64, 10}, {.activation = "tanh", .dropout = 0.5});
  add("mlp_f32_dropout_eval", mlp32, testing::randn64(RngKey::from_seed(5), Shape{8, 784}).astype(DType::f32), 1e-5);
  nn::CNN cnn({.channels = {4, 8}, .dropout = 0.25});
  add("cnn_f32", cnn, testing::randn64(RngKey::from_seed(6), Shape{3, 1, 28, 28}).astype(DType::f32), 1e-5);
  nn::GPT gpt({.vocab = 16, .layers = 2, .heads = 2, .dim = 8, .seq_len = 6, .dtype = DType::f64});
  // Its layer norms' epsilon 1e-5 is a float32 attribute in ONNX (1e-5 (1 - 2.5e-8)): hence 1e-8, not 1e-12.
  add("gpt_f64", gpt, testing::randint(RngKey::from_seed(7), Shape{2, 6}, 16), 1e-8);
  check_with_reference(jobs);
}

TEST_CASE("ONNX export under autocast: f16 compute with its casts matches the numpy reference", "[onnx]") {
  std::vector<Job> jobs;
  auto add = [&](const std::string& name, nn::Module& m, const Tensor& x) {
    m.eval();
    const auto fn = [&](const TensorList& in) {
      AutocastGuard f16(DType::f16);  // GEMMs and attention in f16, norms and softmax in f32 (torch.autocast's lists)
      return TensorList{m(in[0])};
    };
    // f16 results rounded once (ours) or per operation (numpy's f16 arithmetic): within four f16 units in
    // the last place (2^-11 = 4.9e-4) of the largest logit.
    jobs.push_back({name, export_onnx(fn, {x}), {x}, fn({x}), 2e-3});
  };
  nn::MLP mlp({32, 16, 4}, {.activation = "gelu"});
  add("mlp_autocast_f16", mlp, testing::randn64(RngKey::from_seed(18), Shape{4, 32}).astype(DType::f32));
  nn::GPT gpt({.vocab = 16, .layers = 2, .heads = 2, .dim = 8, .seq_len = 6});
  add("gpt_autocast_f16", gpt, testing::randint(RngKey::from_seed(19), Shape{2, 6}, 16));
  check_with_reference(jobs);
}

TEST_CASE("ONNX export with a dynamic batch: models traced at batch 2 run at batch 5", "[onnx]") {
  std::vector<Job> jobs;
  auto add = [&](const std::string& name, nn::Module& m, const Tensor& x2, const Tensor& x5, double tol) {
    m.eval();
    const auto fn = [&](const TensorList& in) { return TensorList{m(in[0])}; };
    const std::string model = export_onnx(fn, {x2}, {.named_tensors = m.parameters(), .dynamic_batch = "batch"});
    CHECK_THAT(model, Contains("batch"));  // the inputs' and outputs' symbolic axis
    jobs.push_back({name, model, {x5}, fn({x5}), tol});
  };
  const auto images = [](uint64_t seed, int64_t B) {
    return testing::randn64(RngKey::from_seed(seed), Shape{B, 1, 28, 28}).astype(DType::f32);
  };
  nn::MLP mlp({784, 32, 10}, {.activation = "gelu", .dtype = DType::f64});
  add("mlp_f64", mlp, testing::randn64(RngKey::from_seed(10), Shape{2, 784}), testing::randn64(RngKey::from_seed(11), Shape{5, 784}),
      1e-12);
  nn::CNN cnn({.channels = {4, 8}});
  add("cnn_f32", cnn, images(12, 2), images(13, 5), 1e-5);
  nn::GPT gpt({.vocab = 16, .layers = 2, .heads = 2, .dim = 8, .seq_len = 6, .dtype = DType::f64});
  add("gpt_f64", gpt, testing::randint(RngKey::from_seed(14), Shape{2, 6}, 16), testing::randint(RngKey::from_seed(15), Shape{5, 6}, 16),
      1e-8);  // layer norm's float32 epsilon, as above
  check_with_reference(jobs);
}

TEST_CASE("ONNX export with a dynamic batch refuses sizes it cannot express, naming them", "[onnx]") {
  const OnnxExportOptions dyn{.dynamic_batch = "batch"};
  const TensorList x{testing::randn64(RngKey::from_seed(16), Shape{2, 3})};
  const auto refusal = [&](const std::function<Tensor(const Tensor&)>& f) {
    return std::string(catch_error<ValueError>([&] {
      export_onnx([&](const TensorList& in) { return TensorList{f(in[0])}; }, x, dyn);
    }).what());
  };
  CHECK_THAT(refusal([](const Tensor& a) { return unbind(a, 0)[0]; }), Contains("unbind with 2 and 3 outputs"));
  CHECK_THAT(refusal([](const Tensor& a) { return a.slice(0, 0, 1); }), Contains("slice"));
  CHECK_THAT(refusal([](const Tensor& a) { return a.slice(0, 1, INT64_MAX); }), Contains("not a multiple of the batch size"));
  CHECK_THAT(refusal([](const Tensor& a) { return a + from_vector(std::vector<double>(size_t(a.numel()), 1.0), a.shape()); }),
             Contains("constant's shape"));
  CHECK_THAT(refusal([](const Tensor& a) { return a.shape()[0] > 2 ? exp(a) : a * 2.0; }),
             Contains("traces differently") && Contains("mul and exp"));
  CHECK_THAT(refusal([](const Tensor& a) { return a.reshape(Shape{a.shape()[0], 3, 1}).expand(Shape{a.shape()[0], 3, a.shape()[0]}); }),
             Contains("expand"));
  // Still exportable: the batch axis sliced whole, reshaped with one batch-dependent axis, expanded from itself.
  const auto ok = [](const TensorList& in) {
    const Tensor& a = in[0];
    return TensorList{a.slice(0, 0, INT64_MAX).reshape(Shape{-1}), a.unsqueeze(1).expand(Shape{a.shape()[0], 4, 3})};
  };
  const TensorList x5{testing::randn64(RngKey::from_seed(17), Shape{5, 3})};
  check_with_reference({{"ok", export_onnx(ok, x, dyn), x5, ok(x5), 0.0}});
  CHECK_THROWS_AS(export_onnx(ok, {x[0], ones(Shape{3, 3})}, dyn), ShapeError);  // inputs of two batch sizes
}

TEST_CASE("ONNX export with external data: the weights beside the model, read back by onnx.load", "[onnx]") {
  detail::TempDir dir("titanax-onnx-external");
  nn::GPT gpt({.vocab = 64, .layers = 2, .heads = 2, .dim = 16, .seq_len = 8, .dtype = DType::f64});
  gpt.eval();
  const auto fn = [&](const TensorList& in) { return TensorList{gpt(in[0])}; };
  const Tensor ids = testing::randint(RngKey::from_seed(21), Shape{2, 8}, 64);
  const std::string path = (dir.path() / "gpt.onnx").string();
  export_onnx(fn, {ids}, path, {.named_tensors = gpt.parameters(), .external_data = true});
  uint64_t big = 0, count = 0;  // the parameters of 1 KiB or more: external, each at a 64-byte aligned offset
  for (const auto& [name, p] : gpt.parameters())
    if (p.nbytes() >= 1024) big += p.nbytes(), ++count;
  const uint64_t model = std::filesystem::file_size(path), data = std::filesystem::file_size(path + ".data");
  INFO("model " << model << " bytes, data " << data << " bytes, " << count << " parameters of " << big << " bytes");
  CHECK(data >= big);
  CHECK(data < big + 64 * count);
  CHECK(model < big / 4);
  // The model and its data, no temporary left behind.
  CHECK(std::distance(std::filesystem::directory_iterator(dir.path()), std::filesystem::directory_iterator{}) == 2);
  check_with_reference({{"gpt_external", "", {ids}, fn({ids}), 1e-8, path}});
  // Without the option, a small model stays in one file.
  export_onnx(fn, {ids}, (dir.path() / "inline.onnx").string());
  CHECK_FALSE(std::filesystem::exists(dir.path() / "inline.onnx.data"));
}

TEST_CASE("ONNX export refuses what an inference graph cannot hold, naming it", "[onnx]") {
  nn::MLP mlp({4, 8, 2}, {.dropout = 0.5});
  mlp.train();
  const auto forward = [&](const TensorList& in) { return TensorList{mlp(in[0])}; };
  const Tensor x = ones(Shape{2, 4});
  const ValueError drop = catch_error<ValueError>([&] { export_onnx(forward, {x}); });
  CHECK_THAT(drop.what(), Contains("dropout") && Contains("eval()"));

  Tensor w = ones(Shape{4});
  const ValueError step = catch_error<ValueError>([&] {
    export_onnx([&](const TensorList& in) {
      copy_(w, w - in[0]);  // an in-place update: a training step, not an inference function
      return TensorList{w * 2.0};
    }, {ones(Shape{4})});
  });
  CHECK_THAT(step.what(), Contains("side effects"));

  const ValueError loss = catch_error<ValueError>([&] {
    export_onnx([](const TensorList& in) { return TensorList{cross_entropy(in[0], in[1])}; },
                {ones(Shape{2, 3}), zeros(Shape{2}, DType::i64)});
  });
  CHECK_THAT(loss.what(), Contains("op cross_entropy") && Contains("no ONNX form"));

  const auto id = [](const TensorList& in) { return TensorList{exp(in[0])}; };
  CHECK_THROWS_AS(export_onnx(id, {x}, {.input_names = {"a", "b"}}), ValueError);
  CHECK_THROWS_AS(export_onnx(id, {x}, {.input_names = {"a"}, .output_names = {"a"}}), ValueError);
}

TEST_CASE(".npy files: every dtype round-trips, numpy reads ours and we read numpy's; datasets of arrays", "[onnx][npy]") {
  detail::TempDir dir("titanax-npy-test");
  const auto p = [&](const std::string& n) { return (dir.path() / n).string(); };
  const Tensor f = testing::randn64(RngKey::from_seed(8), Shape{3, 4});
  const TensorList ts{f.astype(DType::f32), f, f.astype(DType::f16), f.astype(DType::i32) , f.astype(DType::i64) * 7,
                      gt(f, zeros(Shape{}, DType::f64)), f.astype(DType::u8), scalar(2.5), f.slice(1, 1, 2).reshape(Shape{3}), f.T()};
  for (size_t i = 0; i < ts.size(); ++i) {
    save_npy(p("t" + std::to_string(i) + ".npy"), ts[i]);
    const Tensor back = load_npy(p("t" + std::to_string(i) + ".npy"));
    INFO("tensor " << i << " " << spec_str(ts[i]));
    CHECK(back.dtype() == ts[i].dtype());
    CHECK(back.shape() == ts[i].shape());
    CHECK(max(abs(back.astype(DType::f64) - ts[i].astype(DType::f64))).item() == 0.0);
  }
  CHECK_THROWS_AS(save_npy(p("bf16.npy"), f.astype(DType::bf16)), DTypeError);

  // numpy reads ours (f64 [3, 4], and the transposed view), writes what it computed in its own files.
  std::ofstream(p("interop.py")) << "import numpy as np, sys\n"
                                    "d = sys.argv[1]\n"
                                    "a = np.load(d + '/t1.npy'); t = np.load(d + '/t9.npy')\n"
                                    "assert a.dtype == np.float64 and a.shape == (3, 4) and (t == a.T).all()\n"
                                    "np.save(d + '/np_sum.npy', a.sum(axis=1, dtype=np.float64))\n"
                                    "np.save(d + '/np_scalar.npy', np.int64(-3))\n"
                                    "np.save(d + '/np_bool.npy', a > 0)\n"
                                    "np.save(d + '/np_fortran.npy', np.asfortranarray(a))\n"
                                    "np.save(d + '/np_big.npy', a.astype('>f8'))\n"
                                    "np.save(d + '/np_complex.npy', a.astype(np.complex64))\n";
  const int rc = shell(kPython + " " + p("interop.py") + " " + dir.path().string(), dir.path() / "log.txt");
  INFO(io_test::read_text(dir.path() / "log.txt"));
  REQUIRE(rc == 0);
  const Tensor row_sums = load_npy(p("np_sum.npy"));
  CHECK(row_sums.shape() == Shape{3});
  CHECK(max(abs(row_sums - sum(f, {1}))).item() < 1e-14);
  CHECK(load_npy(p("np_scalar.npy")).shape() == Shape{});
  CHECK(load_npy(p("np_scalar.npy")).item() == -3.0);
  CHECK(max(abs(load_npy(p("np_bool.npy")).astype(DType::f64) - gt(f, zeros(Shape{}, DType::f64)).astype(DType::f64))).item() == 0.0);
  CHECK_THAT(catch_error<DataError>([&] { load_npy(p("np_fortran.npy")); }).what(), Contains("Fortran order"));
  CHECK_THAT(catch_error<DataError>([&] { load_npy(p("np_big.npy")); }).what(), Contains("'>f8'"));
  CHECK_THAT(catch_error<DataError>([&] { load_npy(p("np_complex.npy")); }).what(), Contains("'<c8'"));

  // Damaged files: a wrong magic string, a short data section, trailing bytes.
  std::ofstream(p("bad.npy")) << "NUMPY not really";
  CHECK_THAT(catch_error<DataError>([&] { load_npy(p("bad.npy")); }).what(), Contains("magic"));
  const std::string good = io_test::read_text(dir.path() / "t1.npy");
  std::ofstream(p("short.npy"), std::ios::binary) << good.substr(0, good.size() - 8);
  CHECK_THAT(catch_error<DataError>([&] { load_npy(p("short.npy")); }).what(), Contains("shorter"));
  std::ofstream(p("long.npy"), std::ios::binary) << good << "x";
  CHECK_THAT(catch_error<DataError>([&] { load_npy(p("long.npy")); }).what(), Contains("longer"));
  CHECK_THROWS_AS(load_npy(p("missing.npy")), IOError);

  // A classification dataset from arrays: x f32 [N, ...], y integer [N].
  save_npy(p("train_x.npy"), f.astype(DType::f32));
  save_npy(p("train_y.npy"), from_vector(std::vector<int32_t>{2, 0, 1}, Shape{3}));
  const auto ds = load_npy_dataset(dir.path().string(), "train");
  CHECK(ds->size() == 3);
  CHECK(ds->items().at("y").dtype() == DType::i64);
  CHECK(ds->items().at("y").to_vector<int64_t>() == std::vector<int64_t>{2, 0, 1});
  save_npy(p("bad_x.npy"), f);
  save_npy(p("bad_y.npy"), from_vector(std::vector<int64_t>{1, 2}, Shape{2}));
  CHECK_THAT(catch_error<DataError>([&] { load_npy_dataset(dir.path().string(), "bad"); }).what(), Contains("f32"));
  save_npy(p("bad_x.npy"), f.astype(DType::f32));
  CHECK_THAT(catch_error<DataError>([&] { load_npy_dataset(dir.path().string(), "bad"); }).what(), Contains("different numbers"));
  save_npy(p("bad_y.npy"), from_vector(std::vector<int64_t>{1, -2, 0}, Shape{3}));
  CHECK_THAT(catch_error<DataError>([&] { load_npy_dataset(dir.path().string(), "bad"); }).what(), Contains("negative"));
}
