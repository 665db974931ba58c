// Metric loggers. The engine logs on the main rank only (metrics are already averaged over ranks).
#pragma once

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>

namespace titanax {

using Metrics = std::map<std::string, double>;

class Logger {
 public:
  virtual ~Logger() = default;
  /// Records `metrics` ("train/loss", "eval/accuracy", ...) at `step`.
  virtual void log(int64_t step, const Metrics& metrics) = 0;
  virtual void flush() {}
};

/// One line per call through spdlog (rank-tagged by the Runtime):
/// "step 50/1000 | loss 0.3124 | lr 1.00e-03 | 8123 samples/s | eval/accuracy 0.9612".
class ConsoleLogger final : public Logger {
 public:
  explicit ConsoleLogger(int64_t total_steps = 0) : total_(total_steps) {}
  void log(int64_t step, const Metrics& metrics) override;

 private:
  int64_t total_;
};

/// Long-format CSV "step,metric,value" (one row per metric), appended and flushed every call, so a run
/// killed midway keeps what it logged and a resumed run continues the same file. Throws IOError when
/// the file cannot be opened, its directory cannot be created, or the path is a directory.
class CsvLogger final : public Logger {
 public:
  explicit CsvLogger(const std::string& path);
  ~CsvLogger() override;
  void log(int64_t step, const Metrics& metrics) override;
  void flush() override;

 private:
  std::FILE* f_ = nullptr;
};

}  // namespace titanax
