// Fits y = 3x - 1 with one Linear layer through the installed library: checks that the installed headers
// and package config are complete enough to train.
#include <titanax/titanax.h>

#include <cmath>
#include <cstdio>

namespace tx = titanax;

int main() {
  tx::Runtime rt;
  tx::Tensor x = tx::random_uniform(tx::RngKey::from_seed(1), {256, 1}) * 2.0 - 1.0;  // U[-1, 1)
  tx::Tensor y = x * 3.0 - 1.0;
  tx::nn::Linear layer(1, 1);
  layer.init_parameters(0);
  auto opt = tx::optim::sgd(tx::optim::constant(0.1));
  tx::ParamTree params = layer.parameters();
  opt->init(params);
  double loss = 0;
  for (int i = 0; i < 300; ++i) {
    auto [l, grads] = tx::value_and_grad([&] { return tx::mean(tx::square(layer(x) - y)); }, params);
    loss = l.item();
    opt->step(params, grads);
  }
  std::printf("loss %.3g weight %.4f bias %.4f\n", loss, layer.weight.item(), layer.bias.item());
  return std::abs(layer.weight.item() - 3.0) < 1e-3 && std::abs(layer.bias.item() + 1.0) < 1e-3 ? 0 : 1;
}
