#include "core/error.h"

#include <algorithm>

namespace titanax {
namespace {

std::string short_path(const char* file) {
  std::string_view f(file);
  // Keep the path readable: drop everything before the project's top folders when present.
  for (std::string_view top : {"/core/", "/kernels/", "/ops/", "/autodiff/", "/jit/", "/parallel/",
                               "/engine/", "/io/", "/apps/", "/tests/", "/bench/", "/examples/"}) {
    auto pos = f.rfind(top);
    if (pos != std::string_view::npos) return std::string(f.substr(pos + 1));
  }
  return std::string(f);
}

std::string render(const std::string& kind, const std::string& message, const std::string& expected,
                   const std::string& found, const std::string& suggestion, const Loc& loc) {
  std::string s = kind + ": " + message;
  if (!expected.empty()) s += "\n  expected: " + expected;
  if (!found.empty()) s += "\n  found:    " + found;
  if (loc.file_name() && *loc.file_name()) {
    s += "\n  at:       " + short_path(loc.file_name()) + ":" + std::to_string(loc.line());
    if (loc.function_name() && *loc.function_name()) s += std::string(" (") + loc.function_name() + ")";
  }
  if (!suggestion.empty()) s += "\n  fix:      " + suggestion;
  return s;
}

}  // namespace

Error::Error(std::string kind, std::string message, std::string expected, std::string found,
             std::string suggestion, Loc loc)
    : std::runtime_error(render(kind, message, expected, found, suggestion, loc)),
      kind_(std::move(kind)),
      message_(std::move(message)),
      expected_(std::move(expected)),
      found_(std::move(found)),
      suggestion_(std::move(suggestion)),
      loc_(loc) {}

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string nearest(std::string_view name, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::max<size_t>(2, name.size() / 3) + 1;
  for (const auto& c : candidates) {
    size_t d = edit_distance(name, c);
    if (d < best_d) best_d = d, best = c;
  }
  return best;
}

std::string did_you_mean(std::string_view name, const std::vector<std::string>& candidates) {
  std::string n = nearest(name, candidates);
  if (!n.empty()) return "did you mean '" + n + "'?";
  return "known: " + join(candidates);
}

std::string join(const std::vector<std::string>& items, std::string_view sep) {
  std::string s;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i) s += sep;
    s += items[i];
  }
  return s;
}

}  // namespace titanax
