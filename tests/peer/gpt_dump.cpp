// Writes a small GPT's parameters, a batch, its loss and every gradient as raw little-endian f32 files
// into argv[1] (index.txt lists the parameter paths), for gpt_parity.py to recompute with the PyTorch
// reference model (../shared/peers/gpt_small_torch.py) from the same weights.
#include <cstdio>
#include <fstream>

#include <titanax/titanax.h>

using namespace titanax;

namespace {
void dump(const std::string& path, const Tensor& t) {
  auto v = t.contiguous().to_vector<float>();
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * 4));
}
std::string flat(std::string p) {
  for (auto& ch : p)
    if (ch == '/') ch = '.';
  return p;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: gpt_dump DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  nn::GPTConfig c;
  c.vocab = 512, c.layers = 2, c.heads = 4, c.dim = 64, c.seq_len = 32;
  nn::GPT m(c);
  m.init_parameters(7);
  const int64_t B = 4, T = 32;
  auto u = random_uniform(RngKey::from_seed(3), Shape{2, B * T}, DType::f64).to_vector<double>();
  std::vector<int64_t> x(size_t(B * T)), y(size_t(B * T));
  for (size_t i = 0; i < x.size(); ++i) x[i] = int64_t(u[i] * 512), y[i] = int64_t(u[x.size() + i] * 512);
  Tensor X = from_vector(x, Shape{B, T}), Y = from_vector(y, Shape{B, T});
  auto [loss, g] = value_and_grad([&] { return m.loss(X, Y); }, m.parameters());
  std::ofstream idx(dir + "/index.txt");
  for (auto& [p, t] : m.parameters()) {
    dump(dir + "/p_" + flat(p), t);
    dump(dir + "/g_" + flat(p), g.at(p));
    idx << p << "\n";
  }
  dump(dir + "/x", X.astype(DType::f32));
  dump(dir + "/y", Y.astype(DType::f32));
  std::ofstream(dir + "/loss.txt") << std::to_string(loss.item()) << "\n";
  std::printf("titanax loss %.9f\n", loss.item());
  return 0;
}
