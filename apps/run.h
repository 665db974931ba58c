// The `titanax run` / `describe` configuration: its schema (every key, type, default and doc) and the
// builders that turn a validated Config into a mesh, a plan, a model, an optimizer and data.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <titanax/titanax.h>

namespace titanax::app {

/// The schema of run configs (examples/configs/*.yaml). `titanax describe --schema` prints it.
const ConfigSchema& run_schema();

/// Loads and validates a run config (ConfigError / IOError on bad input).
Config load_run_config(const std::string& path, const std::vector<std::string>& overrides);

/// The mesh spec from `mesh:`: axes in canonical order (data, then pipe, then model, others in name
/// order between), so the model axis varies fastest over consecutive ranks, as Megatron lays them out.
MeshSpec mesh_spec(const Config& c);
/// The plan from `plan:`.
Plan plan(const Config& c);
/// The model from `model:` (initialised from `seed`).
std::shared_ptr<nn::Module> model(const Config& c);
/// The learning-rate schedule and optimizer from `schedule:` and `optimizer:`; total_steps for decays.
std::unique_ptr<optim::Optimizer> optimizer(const Config& c, int64_t total_steps);

struct Data {
  std::shared_ptr<TensorDataset> train, test;
};
/// Loads (and, when data.fetch is set and the files are absent, fetches on the main rank) the dataset.
Data data(const Config& c, Communicator& world);
/// Optimizer steps of the run: train.steps, or train.epochs * (train examples / global batch).
int64_t total_steps(const Config& c, int64_t train_examples);

/// Everything `titanax run` does; returns the process exit code. Prints the test accuracy on rank 0.
int run(const Config& c, Runtime& rt);
/// Prints mesh, plan, model and parameter count without training.
int describe(const Config& c, Runtime& rt, int world_size);

}  // namespace titanax::app
