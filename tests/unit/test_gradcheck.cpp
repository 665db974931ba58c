// Every op in the op table (tests/op_cases.cpp): vjp against central finite differences in float64,
// on fresh random inputs.
#include <catch2/catch.hpp>

#include "op_cases.h"

using namespace titanax;

TEST_CASE("every op's vjp matches finite differences (f64)", "[autodiff][gradcheck]") {
  uint64_t seed = 1;
  for (const auto& c : testing::op_cases()) {
    if (!c.check_grad) continue;
    SECTION(c.name) {
      TensorList in = c.inputs(RngKey::from_seed(0x5eed0000 + seed));
      GradcheckResult r = gradcheck(c.fn, in);
      INFO(c.name << ": max abs err " << r.max_abs_error << "\n" << r.report);
      CHECK(r.ok);
    }
    ++seed;
  }
}

TEST_CASE("gradcheck catches a wrong vjp", "[autodiff][gradcheck]") {
  // A deliberately wrong derivative: the forward is x^2, the backward says 3x. gradcheck must fail.
  struct Wrong final : Op {
    const char* name() const override { return "wrong_square"; }
    std::vector<TensorSpec> infer(const TensorList& in) const override { return {{in[0].shape(), in[0].dtype(), in[0].device()}}; }
    void cpu(const TensorList& in, TensorList& out) const override {
      NoGradGuard ng;
      Tensor y = square(in[0]);
      copy_(out[0], y);
    }
    TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>&) const override {
      return {mul(ct[0], mul(in[0], scalar_like(3.0, in[0])))};
    }
  };
  Tensor x = testing::randn64(RngKey::from_seed(7), Shape{4});
  auto r = gradcheck([](const TensorList& in) { return apply1(std::make_shared<Wrong>(), {in[0]}); }, {x});
  CHECK_FALSE(r.ok);
}
