#include "peer.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>

#include "core/error.h"

namespace titanax::bench {

std::string peers_dir() {
  if (const char* e = std::getenv("TITANAX_PEERS")) return e;
  namespace fs = std::filesystem;
  for (const char* rel : {"/../shared/peers", "/shared/peers"}) {
    fs::path p = fs::path(TITANAX_SOURCE_DIR + std::string(rel));
    if (fs::exists(p)) return fs::canonical(p).string();
  }
  return "";
}

bool python_has_torch(const std::string& python) {
  std::string cmd = python + " -c 'import torch' >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

std::string peer_python() {
  if (const char* e = std::getenv("TITANAX_PEER_PYTHON"); e && *e) return e;
  for (const char* py : {"/usr/bin/python3", "python3"})
    if (python_has_torch(py)) return py;
  return "";
}

std::map<std::string, std::string> run_peer(const std::string& python, const std::string& script,
                                            const std::string& args, std::string& why) {
  std::map<std::string, std::string> kv;
  std::string cmd = python + " " + script + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) {
    why = "popen failed";
    return kv;
  }
  std::string out, last;
  char buf[4096];
  while (fgets(buf, sizeof buf, p)) out += buf;
  int rc = pclose(p);
  std::istringstream is(out);
  for (std::string line; std::getline(is, line);)
    if (line.find('=') != std::string::npos) last = line;
  if (rc != 0 || last.empty()) {
    why = "peer exited with " + std::to_string(rc) + ": " + out.substr(out.size() > 300 ? out.size() - 300 : 0);
    return {};
  }
  std::istringstream ls(last);
  for (std::string tok; ls >> tok;) {
    auto eq = tok.find('=');
    if (eq != std::string::npos) kv[tok.substr(0, eq)] = tok.substr(eq + 1);
  }
  return kv;
}

std::map<std::string, std::string> peer_figures(bool enabled, const std::string& script, const std::string& args,
                                                const std::vector<std::string>& required, std::string& line) {
  if (!enabled) {
    line += " peer=skipped";
    return {};
  }
  std::string py;
  if (!std::filesystem::exists(script) || (py = peer_python()).empty()) {
    line += " peer=unavailable";
    return {};
  }
  std::string why;
  auto kv = run_peer(py, script, args, why);
  bool complete = !kv.empty();
  for (const auto& k : required) complete = complete && kv.count(k);
  if (complete) return kv;
  if (kv.count("peer")) {
    line += " peer=" + kv["peer"];
  } else {
    line += " peer=failed";
    std::fprintf(stderr, "peer failed: %s\n", why.empty() ? ("no " + required.front() + " in its output").c_str() : why.c_str());
  }
  return {};
}

double time_ms(const std::function<void()>& f, int64_t iters, const std::function<void()>& sync) {
  for (int i = 0; i < 2; ++i) f();
  sync();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) f();
  sync();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / double(iters);
}

int guarded(const std::function<int()>& body) {
  try {
    return body();
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}

}  // namespace titanax::bench
