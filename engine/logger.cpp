#include "engine/logger.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>

#include "core/error.h"

namespace titanax {

namespace {
std::string fmt_value(const std::string& key, double v) {
  char buf[64];
  if (key.find("lr") != std::string::npos) std::snprintf(buf, sizeof buf, "%.2e", v);
  else if (key.find("samples_per_s") != std::string::npos || key.find("tokens_per_s") != std::string::npos)
    std::snprintf(buf, sizeof buf, "%.0f", v);
  else if (key.find("_ms") != std::string::npos) std::snprintf(buf, sizeof buf, "%.2f", v);
  else std::snprintf(buf, sizeof buf, "%.4f", v);
  return buf;
}
std::string short_key(const std::string& k) { return k.rfind("train/", 0) == 0 ? k.substr(6) : k; }
}  // namespace

void ConsoleLogger::log(int64_t step, const Metrics& m) {
  std::string line = "step " + std::to_string(step);
  if (total_ > 0) line += "/" + std::to_string(total_);
  // The headline figures first, then the rest in name order.
  for (const char* k : {"train/loss", "train/lr", "train/samples_per_s"})
    if (auto it = m.find(k); it != m.end()) line += " | " + short_key(k) + " " + fmt_value(k, it->second);
  for (const auto& [k, v] : m) {
    if (k == "train/loss" || k == "train/lr" || k == "train/samples_per_s") continue;
    line += " | " + short_key(k) + " " + fmt_value(k, v);
  }
  spdlog::info("{}", line);
}

CsvLogger::CsvLogger(const std::string& path) {
  namespace fs = std::filesystem;
  fs::path p(path);
  std::error_code ec;
  if (p.has_parent_path() && !fs::create_directories(p.parent_path(), ec) && ec)
    throw IOError("cannot create the metrics CSV's directory", "a directory this process can create",
                  p.parent_path().string() + " (" + ec.message() + ")", "choose another logging.csv path");
  if (fs::is_directory(p, ec))
    throw IOError("the metrics CSV path is a directory", "a file path (e.g. runs/metrics.csv)", path,
                  "name a file inside that directory");
  const auto size = fs::file_size(p, ec);
  const bool fresh = ec || size == 0;  // absent or empty: write the header
  f_ = std::fopen(path.c_str(), "a");
  if (!f_) throw IOError("cannot open the metrics CSV for writing", "a writable path", path, "check the directory's permissions");
  if (fresh) std::fprintf(f_, "step,metric,value\n");
}

CsvLogger::~CsvLogger() {
  if (f_) std::fclose(f_);
}

void CsvLogger::log(int64_t step, const Metrics& m) {
  for (const auto& [k, v] : m) std::fprintf(f_, "%lld,%s,%.9g\n", static_cast<long long>(step), k.c_str(), v);
  std::fflush(f_);
}

void CsvLogger::flush() { std::fflush(f_); }

}  // namespace titanax
