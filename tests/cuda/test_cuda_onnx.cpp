// ONNX export of a model that lives on the GPU (part of titanax_cuda_tests: skipped, exit 77, without a
// GPU; see test_cuda.cpp). The model holds no devices: the traced to_device ops are Identity and the
// initializers are the parameters copied to the host, which these tests check byte for byte against
// the parameters themselves. (The exported model's numbers are checked on the CPU by
// tests/unit/test_onnx.cpp.)
#include <catch2/catch.hpp>

#include <string>

#include "engine/gpt.h"
#include "io/onnx.h"
#include "ops/ops.h"
#include "op_cases.h"

using namespace titanax;

TEST_CASE("cuda: a GPT on the GPU exports to ONNX with its parameters' values, at a dynamic batch", "[onnx]") {
  nn::GPT gpt({.vocab = 16, .layers = 2, .heads = 2, .dim = 8, .seq_len = 6});
  gpt.to(Device::cuda(0));
  gpt.eval();
  const auto fn = [&](const TensorList& in) { return TensorList{gpt(in[0].to(Device::cuda(0)))}; };
  const Tensor ids = testing::randint(RngKey::from_seed(20), Shape{2, 6}, 16);
  const std::string model = export_onnx(fn, {ids}, {.named_tensors = gpt.parameters(), .dynamic_batch = "batch"});
  for (const auto& [path, p] : gpt.parameters()) {
    INFO(path);
    CHECK(p.device() == Device::cuda(0));
    const Tensor host = p.to(Device::cpu()).contiguous();
    const std::string bytes(static_cast<const char*>(host.raw_data()), host.nbytes());
    CHECK(model.find(path) != std::string::npos);
    CHECK(model.find(bytes) != std::string::npos);
  }
}
