#include "io/npm.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/error.h"

namespace titanax::detail {
namespace {

namespace fs = std::filesystem;

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'') q += "'\\''";
    else q += c;
  }
  return q + "'";
}

// Runs a shell command, returning its exit status and combined output.
std::pair<int, std::string> run_command(const std::string& cmd) {
  std::string full = cmd + " 2>&1";
  FILE* p = popen(full.c_str(), "r");
  if (!p) throw IOError("cannot run a command", "a working /bin/sh", std::strerror(errno));
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int status = pclose(p);
  int code = (status != -1 && WIFEXITED(status)) ? WEXITSTATUS(status) : -1;
  return {code, out};
}

bool on_path(const std::string& tool) { return run_command("command -v " + tool + " >/dev/null").first == 0; }

std::string tail(const std::string& s, size_t n = 2000) { return s.size() > n ? "..." + s.substr(s.size() - n) : s; }

}  // namespace

TempDir::TempDir(const std::string& prefix) {
  std::string tmpl = (fs::temp_directory_path() / (prefix + "-XXXXXX")).string();
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data()))
    throw IOError("cannot create a temporary directory", "a writable " + fs::temp_directory_path().string(),
                  std::strerror(errno));
  path_ = buf.data();
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

void npm_fetch(const std::string& spec, const fs::path& dest, const std::string& member, const std::string& who,
               const std::string& hint) {
  if (!on_path("npm"))
    throw IOError(who + " needs npm (the Node.js package manager) on PATH", "an `npm` executable", "none on PATH",
                  "install Node.js / npm, or " + hint);
  if (!on_path("tar")) throw IOError(who + " needs tar on PATH", "a `tar` executable", "none on PATH");

  auto [code, out] = run_command("npm pack " + shell_quote(spec) + " --silent --pack-destination " +
                                 shell_quote(dest.string()));
  // The tarball's name is <name>-<version>.tgz; take the one .tgz npm left in dest.
  fs::path tgz;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dest, ec))
    if (e.path().extension() == ".tgz") tgz = e.path();
  if (code != 0 || tgz.empty())
    throw IOError("`npm pack " + spec + "` failed", "exit status 0 and a .tgz in " + dest.string(),
                  "exit status " + std::to_string(code) + ": " + tail(out),
                  "check network access to the npm registry (npm config get registry)");
  auto [tcode, tout] = run_command("tar -xzf " + shell_quote(tgz.string()) + " -C " + shell_quote(dest.string()) +
                                   " " + shell_quote(member));
  if (tcode != 0)
    throw IOError("cannot extract '" + member + "' from " + tgz.string(), "tar exit status 0",
                  "exit status " + std::to_string(tcode) + ": " + tail(tout));
}

fs::path temp_path(const fs::path& final_path) {
  return fs::path(final_path.string() + ".tmp" + std::to_string(::getpid()));
}

void rename_into_place(const fs::path& tmp, const fs::path& final_path) {
  std::error_code ec;
  fs::rename(tmp, final_path, ec);
  if (ec) {
    std::error_code ec2;
    fs::remove(tmp, ec2);
    throw IOError("cannot rename '" + tmp.string() + "' to '" + final_path.string() + "'", "a successful rename",
                  ec.message());
  }
}

}  // namespace titanax::detail
