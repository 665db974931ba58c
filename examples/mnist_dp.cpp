// The library API end to end (DESIGN.md section 6): data-parallel MNIST MLP training in ~30 lines.
//   mpirun -np 2 build/cpu/apps/mnist_dp [data/mnist]
#include <titanax/titanax.h>

namespace tx = titanax;

int main(int argc, char** argv) {
  tx::Runtime rt(argc, argv);                                     // MPI (under mpirun), threads, logging
  try {
    const std::string dir = argc > 1 ? argv[1] : "data/mnist";
    tx::fetch_mnist(dir);                                          // no-op when the IDX files exist
    auto mesh = tx::MeshSpec{{"data"}, {-1}}.build(rt);            // every rank on the "data" axis
    tx::Plan plan{.dp = tx::DP{"data"}};
    auto train = tx::load_mnist(dir, "train"), test = tx::load_mnist(dir, "test");
    tx::DataLoader loader(train, {.batch_size = 128, .seed = 0, .rank = mesh.axis_index("data"),
                                  .world = mesh.axis_size("data")});
    tx::nn::MLP model({784, 512, 512, 10});
    const int64_t steps = 10 * loader.steps_per_epoch();           // 10 epochs
    tx::Engine engine(mesh, plan, tx::optim::adamw(tx::optim::warmup_cosine(1e-3, 50, steps, 0.05)));
    auto result = engine.fit(model, tx::classification_loss, loader,
                             {.steps = steps, .log_every = 100, .eval = {.data = test, .every = 0}});
    if (rt.is_main()) std::printf("test accuracy %.4f\n", result.final_eval["eval/accuracy"]);
    return 0;
  } catch (const tx::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
