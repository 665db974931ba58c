// io/config: schema-checked YAML with defaults, types, suggestions, env substitution and overrides.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <typeinfo>
#include <random>

#include <titanax/titanax.h>

#include "io/config.h"
#include "io_test_util.h"

using namespace titanax;

namespace {

bool contains(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

// A sample schema (the engine defines the real one).
ConfigSchema sample_schema() {
  ConfigSchema s;
  s.add_float("optimizer.learning_rate", 1e-3, "peak learning rate")
      .add_float_list("optimizer.betas", std::vector<double>{0.9, 0.95}, "Adam betas")
      .add_string("optimizer.name", "adamw", "optimizer", {"adamw", "sgd", "lion"})
      .add_int("train.steps", 1000, "optimizer steps")
      .add_bool("train.bf16", false, "bf16 autocast")
      .add_int_list("model.hidden", std::vector<int64_t>{512, 512}, "hidden widths")
      .add_map("mesh", std::map<std::string, int64_t>{{"data", -1}}, "mesh axes and sizes")
      .add_string("run.name", std::nullopt, "run name (optional)")
      .add_required("data.dir", ConfigType::string, "dataset directory");
  return s;
}

// Runs fn, expecting a ConfigError whose message holds every word.
template <class F>
void expect_config_error(F&& fn, const std::vector<std::string>& words) {
  try {
    fn();
    FAIL("expected ConfigError");
  } catch (const ConfigError& e) {
    INFO(e.what());
    for (const auto& w : words) CHECK(contains(e.what(), w));
  }
}

}  // namespace

TEST_CASE("Config: defaults, types and nested keys", "[io]") {
  ConfigSchema schema = sample_schema();
  Config c = Config::from_string(
      "optimizer:\n"
      "  learning_rate: 3e-4\n"
      "  betas: [0.8, 0.99]\n"
      "train:\n"
      "  bf16: yes\n"
      "data:\n"
      "  dir: /tmp/mnist\n"
      "model.hidden: [64, 32, 16]\n",  // a dotted key works as well
      {}, schema, "run.yaml");
  CHECK(c.get_float("optimizer.learning_rate") == 3e-4);
  CHECK(c.get_float_list("optimizer.betas") == std::vector<double>{0.8, 0.99});
  CHECK(c.get_string("optimizer.name") == "adamw");  // default
  CHECK(c.get_int("train.steps") == 1000);           // default
  CHECK(c.get_bool("train.bf16"));
  CHECK(c.get_int_list("model.hidden") == std::vector<int64_t>{64, 32, 16});
  CHECK(c.get_map("mesh") == std::map<std::string, int64_t>{{"data", -1}});
  CHECK(c.get_string("data.dir") == "/tmp/mnist");
  CHECK(c.has("train.steps"));
  CHECK_FALSE(c.has("run.name"));
  CHECK(c.source("train.steps") == "default");
  CHECK(c.source("optimizer.learning_rate") == "run.yaml:2:3");
  CHECK(c.source("data.dir") == "run.yaml:7:3");

  // An int is a fine float; a float is not an int.
  Config d = Config::from_string("optimizer: {learning_rate: 1}\ndata: {dir: x}\n", {}, schema);
  CHECK(d.get_float("optimizer.learning_rate") == 1.0);
  expect_config_error([&] { Config::from_string("train: {steps: 1.5}\ndata: {dir: x}\n", {}, schema, "a.yaml"); },
                      {"expected int at train.steps", "'1.5'", "a.yaml:1:9"});
  expect_config_error([&] { Config::from_string("optimizer:\n  learning_rate: abc\ndata: {dir: x}\n", {}, schema, "b.yaml"); },
                      {"expected float at optimizer.learning_rate", "found 'abc'", "b.yaml:2:3"});
  expect_config_error([&] { Config::from_string("train: {bf16: maybe}\ndata: {dir: x}\n", {}, schema); },
                      {"expected bool at train.bf16", "'maybe'"});
  expect_config_error([&] { Config::from_string("model: {hidden: 5}\ndata: {dir: x}\n", {}, schema); },
                      {"expected int_list at model.hidden"});
  expect_config_error([&] { Config::from_string("model: {hidden: [1, x]}\ndata: {dir: x}\n", {}, schema); },
                      {"expected int_list at model.hidden", "'x'"});
  expect_config_error([&] { Config::from_string("mesh: {data: two}\ndata: {dir: x}\n", {}, schema); },
                      {"mesh.data", "'two'"});
  expect_config_error([&] { Config::from_string("data: {dir: [a, b]}\n", {}, schema); }, {"expected string at data.dir"});
  expect_config_error([&] { Config::from_string("train: 5\ndata: {dir: x}\n", {}, schema); },
                      {"'train' is a section", "train.steps"});
  expect_config_error([&] { Config::from_string("train:\n  steps:\ndata: {dir: x}\n", {}, schema); },
                      {"found null"});
  expect_config_error([&] { Config::from_string("train: {steps: 99999999999999999999}\ndata: {dir: x}\n", {}, schema); },
                      {"expected int at train.steps"});
  // Getter misuse.
  expect_config_error([&] { (void)c.get_int("optimizer.learning_rate"); }, {"of type float"});
  expect_config_error([&] { (void)c.get_string("run.name"); }, {"not set"});
  expect_config_error([&] { (void)c.get_int("train.step"); }, {"unknown config key 'train.step'", "did you mean 'train.steps'?"});
}

TEST_CASE("Config: unknown keys name the file, line and nearest key", "[io]") {
  ConfigSchema schema;
  schema.add_float("optimizer.learning_rate", 0.1, "lr").add_int("optimizer.warmup", 0, "warmup steps");
  expect_config_error(
      [&] { Config::from_string("optimizer:\n  warmup: 10\n  lerning_rate: 0.3\n", {}, schema, "cfg.yaml"); },
      {"unknown config key 'optimizer.lerning_rate'", "cfg.yaml:3:3", "did you mean 'optimizer.learning_rate'?"});
  // A misspelt section: the suggestion is still the full key.
  expect_config_error([&] { Config::from_string("optimzer:\n  learning_rate: 0.3\n", {}, schema, "cfg.yaml"); },
                      {"'optimzer.learning_rate'", "cfg.yaml:2:3", "did you mean 'optimizer.learning_rate'?"});
  // Nothing near: the known keys are listed.
  expect_config_error([&] { Config::from_string("completely_different: 1\n", {}, schema); },
                      {"'completely_different'", "known: optimizer.learning_rate, optimizer.warmup"});
  expect_config_error([&] { Config::from_string("optimizer:\n  warmup: 1\n  warmup: 2\n", {}, schema, "d.yaml"); },
                      {"duplicate config key 'optimizer.warmup'", "d.yaml:3:3"});
  expect_config_error([&] { Config::from_string("optimizer: [1, 2\n", {}, schema, "e.yaml"); }, {"YAML syntax error", "e.yaml"});
  expect_config_error([&] { Config::from_string("- a\n- b\n", {}, schema); }, {"not a mapping"});
  // Empty documents are fine.
  CHECK(Config::from_string("", {}, schema).get_float("optimizer.learning_rate") == 0.1);
  CHECK(Config::from_string("# only a comment\n", {}, schema).get_int("optimizer.warmup") == 0);
}

TEST_CASE("Config: allowed values and required keys", "[io]") {
  ConfigSchema schema = sample_schema();
  Config c = Config::from_string("optimizer: {name: lion}\ndata: {dir: d}\n", {}, schema);
  CHECK(c.get_string("optimizer.name") == "lion");
  expect_config_error([&] { Config::from_string("optimizer: {name: adamm}\ndata: {dir: d}\n", {}, schema, "f.yaml"); },
                      {"'adamm' is not allowed for optimizer.name", "one of: adamw, sgd, lion", "did you mean 'adamw'?",
                       "f.yaml:1:13"});
  expect_config_error([&] { Config::from_string("train: {steps: 1}\n", {}, schema); },
                      {"required config key 'data.dir'", "--set data.dir="});
  // Schema mistakes are the programmer's: ValueError.
  ConfigSchema bad;
  bad.add_int("a.b", 1, "");
  CHECK_THROWS_AS(bad.add_int("a.b", 2, ""), ValueError);
  CHECK_THROWS_AS(bad.add_int("a", 2, ""), ValueError);        // "a" is a section
  CHECK_THROWS_AS(bad.add_int("a.b.c", 2, ""), ValueError);    // under a leaf
  CHECK_THROWS_AS(bad.add_int("a..c", 2, ""), ValueError);
  CHECK_THROWS_AS(bad.add_string("s", "x", "", {"y", "z"}), ValueError);
  CHECK_THROWS_AS(bad.add({"i", ConfigType::int_, ConfigValue(1.5), false, "", {}}), ValueError);
  CHECK_THROWS_AS(bad.add({"j", ConfigType::int_, std::nullopt, false, "", {"a"}}), ValueError);
}

TEST_CASE("Config: numeric ranges bound ints, floats and list elements", "[io]") {
  ConfigSchema schema;
  schema.add_int("train.steps", 0, "optimizer steps (0 = epochs)", ConfigRange::at_least(0))
      .add_float("model.dropout", 0.0, "dropout probability", ConfigRange::between(0, 1, /*hi_open=*/true))
      .add_float("optimizer.eps", 1e-8, "epsilon", ConfigRange::above(0))
      .add_int_list("model.sizes", std::vector<int64_t>{784, 10}, "layer widths", ConfigRange::at_least(1))
      .add_float_list("optimizer.betas", std::vector<double>{0.9, 0.95}, "betas", ConfigRange::between(0, 1, true))
      .add_int("runtime.threads", 0, "threads", ConfigRange::between(0, 1024));
  // Every bound itself, inside or out as it is closed or open.
  Config ok = Config::from_string("train: {steps: 0}\nmodel: {dropout: 0, sizes: [1, 1]}\n",
                                  {"optimizer.eps=1e-300", "runtime.threads=1024", "optimizer.betas=[0, 0.999]"}, schema);
  CHECK(ok.get_int("train.steps") == 0);
  CHECK(ok.get_int("runtime.threads") == 1024);
  expect_config_error([&] { Config::from_string("train: {steps: -1}\n", {}, schema, "f.yaml"); },
                      {"'-1' is out of range for train.steps", "f.yaml:1:9", "a value >= 0",
                       "optimizer steps (0 = epochs)", "set train.steps to a value >= 0"});
  expect_config_error([&] { Config::from_string("", {"model.dropout=1"}, schema); },
                      {"'1' is out of range for model.dropout", "--set model.dropout=1", "in [0, 1)"});
  expect_config_error([&] { Config::from_string("", {"model.dropout=.nan"}, schema); }, {"out of range", "in [0, 1)"});
  expect_config_error([&] { Config::from_string("", {"model.dropout=-0.1"}, schema); }, {"out of range"});
  expect_config_error([&] { Config::from_string("", {"optimizer.eps=0"}, schema); }, {"'0' is out of range", "> 0"});
  expect_config_error([&] { Config::from_string("", {"runtime.threads=1025"}, schema); }, {"in [0, 1024]"});
  expect_config_error([&] { Config::from_string("model:\n  sizes: [784, 0, 10]\n", {}, schema, "g.yaml"); },
                      {"'0' is out of range for model.sizes", "g.yaml:2:16", ">= 1"});
  expect_config_error([&] { Config::from_string("", {"optimizer.betas=[0.9, 1]"}, schema); },
                      {"'1' is out of range for optimizer.betas"});
  // describe() shows the range beside the description.
  const std::string doc = schema.describe();
  INFO(doc);
  CHECK(contains(doc, "optimizer steps (0 = epochs) [>= 0]"));
  CHECK(contains(doc, "dropout probability [in [0, 1)]"));
  CHECK(contains(doc, "epsilon [> 0]"));
  CHECK(contains(doc, "threads [in [0, 1024]]"));
  // Schema mistakes are the programmer's: ValueError.
  ConfigSchema bad;
  CHECK_THROWS_AS(bad.add_int("a", -1, "", ConfigRange::at_least(0)), ValueError);                  // default outside
  CHECK_THROWS_AS(bad.add_int_list("b", std::vector<int64_t>{1, 0}, "", ConfigRange::at_least(1)), ValueError);
  CHECK_THROWS_AS(bad.add_int("c", std::nullopt, "", ConfigRange::between(1, 0)), ValueError);      // empty
  CHECK_THROWS_AS(bad.add({"d", ConfigType::string, ConfigValue(std::string("x")), false, "", {}, ConfigRange::at_least(0)}),
                  ValueError);
  CHECK(ConfigRange::between(0, 1).text() == "in [0, 1]");
  CHECK(ConfigRange{-INFINITY, 5, false, true}.text() == "< 5");
  CHECK_FALSE(ConfigRange{}.contains(NAN));
  CHECK(ConfigRange{}.contains(INFINITY));
}

TEST_CASE("Config: ${ENV} and ${ENV:default} substitution", "[io]") {
  ConfigSchema schema = sample_schema();
  ::setenv("TITANAX_CFG_TEST_LR", "0.25", 1);
  ::setenv("TITANAX_CFG_TEST_DIR", "/data/x", 1);
  ::unsetenv("TITANAX_CFG_TEST_UNSET");
  Config c = Config::from_string(
      "optimizer:\n"
      "  learning_rate: ${TITANAX_CFG_TEST_LR}\n"
      "  betas: [\"${TITANAX_CFG_TEST_UNSET:0.5}\", 0.75]\n"
      "train: {steps: \"${TITANAX_CFG_TEST_UNSET:12}\"}\n"
      "data: {dir: \"${TITANAX_CFG_TEST_DIR}/train\"}\n"
      "run: {name: \"cost $${NOT_A_VAR} ${TITANAX_CFG_TEST_UNSET:}\"}\n",
      {}, schema);
  CHECK(c.get_float("optimizer.learning_rate") == 0.25);
  CHECK(c.get_float_list("optimizer.betas") == std::vector<double>{0.5, 0.75});
  CHECK(c.get_int("train.steps") == 12);
  CHECK(c.get_string("data.dir") == "/data/x/train");
  CHECK(c.get_string("run.name") == "cost ${NOT_A_VAR} ");
  expect_config_error([&] { Config::from_string("data: {dir: \"${TITANAX_CFG_TEST_UNSET}\"}\n", {}, schema, "g.yaml"); },
                      {"TITANAX_CFG_TEST_UNSET is not set", "data.dir", "g.yaml:1:8"});
  expect_config_error([&] { Config::from_string("data: {dir: \"${OOPS\"}\n", {}, schema); }, {"unterminated"});
  ::setenv("TITANAX_CFG_TEST_LR", "fast", 1);
  expect_config_error([&] { Config::from_string("optimizer: {learning_rate: \"${TITANAX_CFG_TEST_LR}\"}\ndata: {dir: d}\n", {}, schema); },
                      {"expected float at optimizer.learning_rate", "'fast'"});
  ::unsetenv("TITANAX_CFG_TEST_LR");
  ::unsetenv("TITANAX_CFG_TEST_DIR");
}

TEST_CASE("Config: --set overrides", "[io]") {
  ConfigSchema schema = sample_schema();
  io_test::TempDir d;
  const std::string path = d / "run.yaml";
  {
    std::ofstream f(path);
    f << "optimizer:\n  learning_rate: 0.01\ndata:\n  dir: /a\nmesh: {data: 2, model: 2}\n";
  }
  Config c = Config::load(path,
                          {"optimizer.learning_rate=0.5", "model.hidden=[8, 4]", "train.bf16=true", "mesh.model=4",
                           "run.name=exp: one", "data.dir='/b'", "optimizer.betas=[0.1,0.2]"},
                          schema);
  CHECK(c.get_float("optimizer.learning_rate") == 0.5);
  CHECK(c.get_int_list("model.hidden") == std::vector<int64_t>{8, 4});
  CHECK(c.get_bool("train.bf16"));
  CHECK(c.get_map("mesh") == std::map<std::string, int64_t>{{"data", 2}, {"model", 4}});
  CHECK(c.get_string("run.name") == "exp: one");  // string keys take the text as is
  CHECK(c.get_string("data.dir") == "/b");         // quotes removed
  CHECK(c.get_float_list("optimizer.betas") == std::vector<double>{0.1, 0.2});
  CHECK(c.source("optimizer.learning_rate") == "--set optimizer.learning_rate=0.5");
  // A whole map replaces; an entry of the default map refines it.
  CHECK(Config::from_string("data: {dir: a}", {"mesh={pipe: 3}"}, schema).get_map("mesh") ==
        std::map<std::string, int64_t>{{"pipe", 3}});
  CHECK(Config::from_string("data: {dir: a}", {"mesh.model=2"}, schema).get_map("mesh") ==
        std::map<std::string, int64_t>{{"data", -1}, {"model", 2}});
  // Later overrides win; the required key can come from an override.
  CHECK(Config::from_string("", {"data.dir=x", "data.dir=y"}, schema).get_string("data.dir") == "y");

  expect_config_error([&] { Config::load(path, {"optimizer.lerning_rate=0.1"}, schema); },
                      {"unknown config key 'optimizer.lerning_rate'", "--set optimizer.lerning_rate=0.1",
                       "did you mean 'optimizer.learning_rate'?"});
  expect_config_error([&] { Config::load(path, {"train.steps=many"}, schema); },
                      {"expected int at train.steps", "'many'", "--set train.steps=many"});
  expect_config_error([&] { Config::load(path, {"model.hidden=[1, b]"}, schema); }, {"'b'", "--set model.hidden"});
  expect_config_error([&] { Config::load(path, {"train.steps"}, schema); }, {"without '='"});
  expect_config_error([&] { Config::load(path, {"optimizer.name=adam"}, schema); }, {"not allowed", "adamw"});
  CHECK_THROWS_AS(Config::load(d / "missing.yaml", {}, schema), IOError);
}

TEST_CASE("Config: dump() round-trips and the schema documents itself", "[io]") {
  ConfigSchema schema = sample_schema();
  schema.add_float("x.tiny", 1e-300, "").add_float("x.inf", INFINITY, "").add_string("x.tricky", "true", "")
      .add_string("x.empty", "", "").add_string("x.colon", "a: b # c", "");
  Config c = Config::from_string("data: {dir: \"/p q\"}\noptimizer: {learning_rate: 0.1}\n",
                                 {"run.name=${TITANAX_CFG_NOPE:lit}", "mesh.model=3"}, schema);
  const std::string y = c.dump();
  INFO(y);
  CHECK(contains(y, "optimizer:\n  learning_rate: 0.1\n"));
  CHECK(contains(y, "mesh: {data: -1, model: 3}"));
  CHECK(contains(y, "hidden: [512, 512]"));
  Config r = Config::from_string(y, {}, schema);
  for (const auto& key : schema.keys()) {
    INFO(key);
    REQUIRE(r.has(key) == c.has(key));
    if (c.has(key)) CHECK(r.get(key) == c.get(key));
  }
  CHECK(r.get_string("run.name") == "lit");
  CHECK(r.get_string("x.tricky") == "true");
  CHECK(r.get_float("x.tiny") == 1e-300);
  CHECK(std::isinf(r.get_float("x.inf")));
  CHECK(r.dump() == y);

  const std::string doc = schema.describe();
  INFO(doc);
  CHECK(contains(doc, "optimizer.learning_rate"));
  CHECK(contains(doc, "peak learning rate"));
  CHECK(contains(doc, "0.001"));
  CHECK(contains(doc, "(required)"));
  CHECK(contains(doc, "one of: adamw, sgd, lion"));
  CHECK(contains(doc, "string_int_map"));
  CHECK(config_type_name(ConfigType::float_list) == "float_list");
}

TEST_CASE("Config from randomly damaged YAML and overrides: a config or a ConfigError, nothing else", "[io][fuzz]") {
  // 4000 damaged copies of a valid config (YAML's special characters inserted, ranges deleted, lines
  // duplicated or swapped) and as many random --set overrides. yaml-cpp throws its own exceptions from
  // parsing and from node access; every one must reach the user as a ConfigError naming the source.
  ConfigSchema schema = sample_schema();
  schema.add_int("train.workers", 2, "loader threads", ConfigRange::between(0, 64));
  const std::string valid =
      "optimizer:\n  learning_rate: ${TITANAX_FUZZ_LR:3e-4}\n  betas: [0.8, 0.99]\n  name: sgd\n"
      "train: {steps: 10, bf16: yes, workers: 4}\nmodel.hidden: [64, 32]\nmesh: {data: 2, model: -1}\n"
      "run:\n  name: \"a: b\"\ndata:\n  dir: /tmp/x   # a comment\n";
  REQUIRE_NOTHROW(Config::from_string(valid, {}, schema));
  const std::string special = ":{}[],-#&*!|>'\"%@` \n\t$~?.0123456789abcdefghijklmnopqrstuvwxyz";
  std::mt19937_64 g(std::getenv("FUZZ_SEED") ? std::stoull(std::getenv("FUZZ_SEED")) : 5);
  auto pick = [&](size_t n) { return size_t(std::uniform_int_distribution<size_t>(0, n - 1)(g)); };
  int refused = 0, accepted = 0;
  auto attempt = [&](const std::string& text, const std::vector<std::string>& sets) {
    try {
      Config c = Config::from_string(text, sets, schema, "fuzz.yaml");
      (void)Config::from_string(c.dump(), {}, schema);  // what loads also dumps to what loads
      ++accepted;
    } catch (const ConfigError&) {
      ++refused;
    } catch (const std::exception& e) {
      FAIL("a " << typeid(e).name() << " that is not a ConfigError: " << e.what() << "\n--- text:\n"
                << text << "\n--- overrides: " << sets.size());
    }
  };
  for (int trial = 0; trial < 4000; ++trial) {
    std::string t = valid;
    for (size_t k = 0, n = 1 + pick(3); k < n; ++k) {
      switch (pick(4)) {
        case 0: t.insert(pick(t.size() + 1), 1 + pick(2), special[pick(special.size())]); break;
        case 1: if (!t.empty()) { const size_t at = pick(t.size()); t.erase(at, 1 + pick(8)); } break;
        case 2: {  // duplicate a line
          const size_t at = t.rfind('\n', pick(t.size()));
          const size_t from = at == std::string::npos ? 0 : at + 1, to = t.find('\n', from);
          if (to != std::string::npos) t.insert(from, t.substr(from, to - from + 1));
          break;
        }
        default: if (!t.empty()) t[pick(t.size())] = special[pick(special.size())];
      }
    }
    attempt(t, {});
    std::string ov;
    const char* keys[] = {"optimizer.betas", "mesh", "mesh.data", "train.steps", "train.workers", "model.hidden", "run.name", "nope"};
    ov = std::string(keys[pick(8)]) + (pick(8) ? "=" : "");
    for (size_t k = 0, n = pick(10); k < n; ++k) ov += special[pick(special.size())];
    attempt(valid, {ov});
  }
  INFO(accepted << " accepted, " << refused << " refused");
  CHECK(accepted > 100);
  CHECK(refused > 100);
}

TEST_CASE("Config: string lists, their allowed values, overrides and dump", "[io]") {
  ConfigSchema schema;
  schema.add_string_list("model.targets", std::vector<std::string>{"qkv"}, "layers", {"qkv", "proj", "fc"})
      .add_string_list("train.freeze", std::vector<std::string>{}, "globs")
      .add_string_list("x.note", std::nullopt, "optional");
  Config d = Config::from_string("{}", {}, schema);
  CHECK(d.get_string_list("model.targets") == std::vector<std::string>{"qkv"});
  CHECK(d.get_string_list("train.freeze").empty());
  CHECK_FALSE(d.has("x.note"));
  Config c = Config::from_string("model:\n  targets: [proj, fc]\ntrain:\n  freeze:\n    - \"blocks/0/**\"\n    - '**/bias'\n",
                                 {"x.note=[\"${TITANAX_CFG_NOPE:a b}\", 'true']"}, schema);
  CHECK(c.get_string_list("model.targets") == std::vector<std::string>{"proj", "fc"});
  CHECK(c.get_string_list("train.freeze") == std::vector<std::string>{"blocks/0/**", "**/bias"});
  CHECK(c.get_string_list("x.note") == std::vector<std::string>{"a b", "true"});
  Config o = Config::from_string("{}", {"model.targets=[fc]", "train.freeze=[]"}, schema);
  CHECK(o.get_string_list("model.targets") == std::vector<std::string>{"fc"});
  CHECK(o.source("model.targets") == "--set model.targets=[fc]");
  expect_config_error([&] { Config::from_string("model: {targets: [qkv, prj]}\n", {}, schema, "f.yaml"); },
                      {"'prj' is not allowed for model.targets", "one of: qkv, proj, fc", "did you mean 'proj'?", "f.yaml:1"});
  expect_config_error([&] { Config::from_string("model: {targets: qkv}\n", {}, schema); },
                      {"expected string_list at model.targets", "'qkv'", "[a, b]"});
  expect_config_error([&] { Config::from_string("model: {targets: [[qkv]]}\n", {}, schema); },
                      {"expected string_list at model.targets", "sequence"});
  CHECK_THROWS_AS(c.get_string("model.targets"), ConfigError);
  // The dump reloads to the same values, quoting what YAML would read otherwise.
  const std::string y = c.dump();
  INFO(y);
  Config r = Config::from_string(y, {}, schema);
  for (const auto& key : schema.keys()) CHECK(r.get(key) == c.get(key));
  CHECK(contains(schema.describe(), "string_list"));
  CHECK(contains(schema.describe(), "one of: qkv, proj, fc"));
  // A default outside the allowed values is the schema's mistake.
  ConfigSchema bad;
  CHECK_THROWS_AS(bad.add_string_list("a", std::vector<std::string>{"x", "w"}, "", {"x", "y"}), ValueError);
  CHECK_THROWS_AS(bad.add_int_list("b", std::vector<int64_t>{1}, "", std::nullopt).add({"c", ConfigType::int_list, std::nullopt, false, "", {"a"}}),
                  ValueError);
}
