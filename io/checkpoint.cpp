#include "io/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"

namespace titanax {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

constexpr int kFormatVersion = 1;
constexpr const char* kFormatName = "titanax-checkpoint";

std::string step_name(int64_t step) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "step_%08lld", (long long)step);
  return buf;
}

std::string shard_name(int rank) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "rank_%05d.safetensors", rank);
  return buf;
}

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08x", v);
  return buf;
}

// fsync a file or a directory so that a rename / creation survives a power loss.
void fsync_path(const fs::path& p, bool directory) {
  int fd = ::open(p.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) throw IOError("cannot open '" + p.string() + "' to flush it", "an existing path", std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) throw IOError("cannot flush '" + p.string() + "' to disk", "fsync to succeed", std::strerror(err));
}

void write_file_synced(const fs::path& p, const std::string& text) {
  int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw IOError("cannot create '" + p.string() + "'", "a writable path", std::strerror(errno));
  const char* d = text.data();
  size_t n = text.size();
  while (n > 0) {
    ssize_t w = ::write(fd, d, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      int err = errno;
      ::close(fd);
      throw IOError("cannot write '" + p.string() + "'", "all bytes written", std::strerror(err));
    }
    d += w;
    n -= size_t(w);
  }
  if (::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    throw IOError("cannot flush '" + p.string() + "' to disk", "fsync to succeed", std::strerror(err));
  }
  ::close(fd);
}

json parse_arg(const std::string& text, const std::string& what) {
  try {
    return json::parse(text.empty() ? std::string("{}") : text);
  } catch (const std::exception& e) {
    throw ValueError("Checkpointer::save: " + what + " is not valid JSON", "a JSON document", e.what());
  }
}

// Axis sizes from the caller's mesh JSON: {"data": 2, "model": 2} or {"axes": [...], "shape": [...]}.
std::map<std::string, int64_t> axis_sizes(const json& mesh) {
  std::map<std::string, int64_t> out;
  if (!mesh.is_object()) return out;
  if (mesh.contains("axes") && mesh.contains("shape") && mesh["axes"].is_array() && mesh["shape"].is_array() &&
      mesh["axes"].size() == mesh["shape"].size()) {
    for (size_t i = 0; i < mesh["axes"].size(); ++i)
      if (mesh["axes"][i].is_string() && mesh["shape"][i].is_number_integer())
        out[mesh["axes"][i].get<std::string>()] = mesh["shape"][i].get<int64_t>();
    return out;
  }
  for (auto it = mesh.begin(); it != mesh.end(); ++it)
    if (it.value().is_number_integer()) out[it.key()] = it.value().get<int64_t>();
  return out;
}

int64_t test_kill_after_bytes() {
  const char* v = std::getenv("TITANAX_TEST_KILL_DURING_SAVE");
  if (!v || !*v) return -1;
  char* end = nullptr;
  long long n = std::strtoll(v, &end, 10);
  return (end && *end == '\0' && n >= 0) ? int64_t(n) : -1;
}

std::optional<json> read_metadata(const fs::path& file) {
  std::ifstream in(file);
  if (!in) return std::nullopt;
  try {
    json j = json::parse(in);
    if (j.is_object() && j.contains("format_version")) return j;
  } catch (const std::exception&) {
  }
  return std::nullopt;
}

}  // namespace

Checkpointer::Checkpointer(std::string dir, int keep_last, std::shared_ptr<Communicator> comm)
    : dir_(std::move(dir)), keep_last_(keep_last), comm_(std::move(comm)) {
  if (dir_.empty()) throw ValueError("Checkpointer needs a directory", "a path", "\"\"");
  if (keep_last_ < 1)
    throw ValueError("Checkpointer keep_last must be at least 1", "keep_last >= 1", std::to_string(keep_last_));
}

void Checkpointer::save(int64_t step, const ParamTree& tensors, const std::string& extra_json,
                        const std::map<std::string, PartitionSpec>& specs, const std::string& mesh_json,
                        const std::string& plan_json) {
  const int rank = comm_ ? comm_->rank() : 0;
  const int world = comm_ ? comm_->size() : 1;
  const fs::path root(dir_);
  const fs::path final_dir = root / step_name(step);
  const fs::path tmp_dir = root / (step_name(step) + ".tmp");

  // Every phase ends with an all-gather of each rank's outcome, so all ranks fail together instead of
  // some waiting forever in a barrier. A rank rethrows its own exception; the others get a summary.
  auto gather = [&](const std::string& s) {
    return comm_ ? comm_->all_gather_string(s) : std::vector<std::string>{s};
  };
  auto agree = [&](std::exception_ptr mine, const std::string& what, const std::string& phase) {
    auto all = gather(what);
    std::vector<std::string> failed;
    for (size_t r = 0; r < all.size(); ++r)
      if (!all[r].empty()) failed.push_back("rank " + std::to_string(r) + ": " + all[r]);
    if (failed.empty()) return;
    if (rank == 0) {
      std::error_code ec;
      fs::remove_all(tmp_dir, ec);
    }
    if (mine) std::rethrow_exception(mine);
    throw CheckpointError("saving checkpoint step " + std::to_string(step) + " failed on another rank (" + phase + ")",
                          "every rank to succeed", join(failed, "; "));
  };
  auto run_phase = [&](const std::string& phase, auto&& fn) {
    std::exception_ptr err;
    std::string msg;
    try {
      fn();
    } catch (const std::exception& e) {
      err = std::current_exception();
      msg = e.what();
      if (msg.empty()) msg = "error";
    } catch (...) {
      err = std::current_exception();
      msg = "unknown error";
    }
    agree(err, msg, phase);
  };

  // ---- 1. validate; rank 0 prepares step_XXXXXXXX.tmp/
  json extra, mesh, plan;
  run_phase("prepare", [&] {
    if (step < 0) throw ValueError("checkpoint step must be >= 0", "step >= 0", std::to_string(step));
    extra = parse_arg(extra_json, "extra_json");
    mesh = parse_arg(mesh_json, "mesh_json");
    plan = parse_arg(plan_json, "plan_json");
    for (const auto& [name, t] : tensors)
      if (!t.defined()) throw ValueError("Checkpointer::save: tensor '" + name + "' is undefined");
    if (rank == 0) {
      std::error_code ec;
      fs::create_directories(root, ec);
      if (ec) throw IOError("cannot create checkpoint directory '" + dir_ + "'", "a writable path", ec.message());
      fs::remove_all(tmp_dir, ec);
      if (!fs::create_directory(tmp_dir, ec) || ec)
        throw IOError("cannot create '" + tmp_dir.string() + "'", "a writable directory", ec.message());
    }
  });

  // ---- 2. every rank writes (and fsyncs) its shard; the outcome carries its checksum and listing
  json listing = json::object();
  for (const auto& [name, t] : tensors)
    listing[name] = {{"dtype", std::string(dtype_name(t.dtype()))}, {"shape", t.shape().vec()}};
  std::string shard_report, shard_error;
  std::exception_ptr shard_exc;
  try {
    const fs::path shard = tmp_dir / shard_name(rank);
    uint32_t crc = detail::write_safetensors(shard.string(), tensors,
                                             {{"titanax_step", std::to_string(step)}, {"rank", std::to_string(rank)}},
                                             /*fsync=*/true, test_kill_after_bytes());
    json rep = {{"file", shard_name(rank)}, {"crc32", hex32(crc)}, {"bytes", uint64_t(fs::file_size(shard))},
                {"tensors", listing}};
    shard_report = rep.dump();
  } catch (const std::exception& e) {
    shard_exc = std::current_exception();
    shard_error = e.what();
  }
  {
    auto all = gather(shard_exc ? "E" + shard_error : "R" + shard_report);
    std::exception_ptr none;
    std::vector<std::string> failed;
    for (size_t r = 0; r < all.size(); ++r)
      if (all[r].empty() || all[r][0] != 'R') failed.push_back("rank " + std::to_string(r) + ": " + all[r].substr(1));
    if (!failed.empty()) {
      if (rank == 0) {
        std::error_code ec;
        fs::remove_all(tmp_dir, ec);
      }
      if (shard_exc) std::rethrow_exception(shard_exc);
      throw CheckpointError("saving checkpoint step " + std::to_string(step) + " failed on another rank (write shard)",
                            "every rank to succeed", join(failed, "; "));
    }
    // ---- 3. rank 0 writes metadata.json and commits with a rename
    run_phase("commit", [&] {
      if (rank != 0) return;
      json shards = json::array();
      json global = json::object();
      const auto sizes = axis_sizes(mesh);
      std::set<std::string> names;
      for (const auto& s : all) {
        json rep = json::parse(s.substr(1));
        for (auto it = rep["tensors"].begin(); it != rep["tensors"].end(); ++it) {
          const std::string& name = it.key();
          if (!names.insert(name).second) continue;  // first rank holding it describes it
          json g = {{"dtype", it.value()["dtype"]}, {"local_shape", it.value()["shape"]}};
          auto sp = specs.find(name);
          PartitionSpec spec = sp == specs.end() ? PartitionSpec{} : sp->second;
          std::vector<int64_t> shape = it.value()["shape"].get<std::vector<int64_t>>();
          if (spec.size() > shape.size())
            throw ValueError("PartitionSpec of '" + name + "' has more entries than the tensor has dimensions",
                             "at most " + std::to_string(shape.size()) + " entries", std::to_string(spec.size()));
          bool known = true;
          for (size_t d = 0; d < spec.size(); ++d) {
            if (spec[d].empty()) continue;
            auto a = sizes.find(spec[d]);
            if (a == sizes.end()) known = false;
            else shape[d] *= a->second;
          }
          if (known) g["global_shape"] = shape;
          g["spec"] = spec;
          global[name] = g;
        }
        shards.push_back(rep);
      }
      for (const auto& [name, spec] : specs)
        if (!names.count(name))
          throw ValueError("a PartitionSpec names a tensor that no rank saves", "one of the saved tensors",
                           "'" + name + "'", did_you_mean(name, std::vector<std::string>(names.begin(), names.end())));
      json meta = json::object();
      meta["format"] = kFormatName;
      meta["format_version"] = kFormatVersion;
      meta["step"] = step;
      meta["world_size"] = world;
      meta["mesh"] = mesh;
      meta["plan"] = plan;
      meta["tensors"] = global;
      meta["shards"] = shards;
      meta["extra"] = extra;
      write_file_synced(tmp_dir / "metadata.json", meta.dump(2) + "\n");
      fsync_path(tmp_dir, true);

      std::error_code ec;
      fs::path replaced;
      if (fs::exists(final_dir, ec)) {  // the same step saved again: swap the new one in
        replaced = root / (step_name(step) + ".replaced.tmp");
        fs::remove_all(replaced, ec);
        fs::rename(final_dir, replaced, ec);
        if (ec) throw IOError("cannot move the old '" + final_dir.string() + "' aside", "a successful rename", ec.message());
      }
      fs::rename(tmp_dir, final_dir, ec);
      if (ec) throw IOError("cannot rename '" + tmp_dir.string() + "' to '" + final_dir.string() + "'",
                            "a successful rename", ec.message());
      fsync_path(root, true);
      if (!replaced.empty()) fs::remove_all(replaced, ec);

      // Prune: keep the keep_last newest complete checkpoints (never the one just written), and drop
      // leftovers of interrupted saves. Failures here do not fail the save.
      auto complete = steps();
      int64_t keep_from = complete.size() > size_t(keep_last_) ? complete[complete.size() - size_t(keep_last_)] : INT64_MIN;
      for (int64_t s : complete)
        if (s < keep_from && s != step) fs::remove_all(root / step_name(s), ec);
      static const std::regex tmp_re(R"(step_\d+(\.replaced)?\.tmp)");
      for (const auto& e : fs::directory_iterator(root, ec))
        if (e.is_directory(ec) && std::regex_match(e.path().filename().string(), tmp_re)) fs::remove_all(e.path(), ec);
    });
  }
}

std::vector<int64_t> Checkpointer::steps() const {
  std::vector<int64_t> out;
  std::error_code ec;
  if (!fs::is_directory(dir_, ec)) return out;
  static const std::regex re(R"(step_(\d{8,18}))");
  for (const auto& e : fs::directory_iterator(dir_, ec)) {
    std::smatch m;
    const std::string name = e.path().filename().string();
    if (!e.is_directory(ec) || !std::regex_match(name, m, re)) continue;
    if (!read_metadata(e.path() / "metadata.json")) continue;  // incomplete or foreign
    out.push_back(std::stoll(m[1].str()));
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::optional<int64_t> Checkpointer::latest() const {
  auto s = steps();
  if (s.empty()) return std::nullopt;
  return s.back();
}

CheckpointInfo Checkpointer::load(int64_t step, ParamTree& into) const {
  const int rank = comm_ ? comm_->rank() : 0;
  const int world = comm_ ? comm_->size() : 1;
  const fs::path cdir = fs::path(dir_) / step_name(step);
  std::error_code ec;
  if (!fs::is_directory(cdir, ec)) {
    std::vector<std::string> have;
    for (auto s : steps()) have.push_back(std::to_string(s));
    throw CheckpointError("checkpoint directory '" + cdir.string() + "' not found",
                          have.empty() ? "a checkpoint in '" + dir_ + "'" : "one of the saved steps [" + join(have) + "]",
                          "no step " + std::to_string(step));
  }
  const fs::path meta_path = cdir / "metadata.json";
  std::ifstream in(meta_path);
  if (!in) throw CheckpointError("checkpoint file '" + meta_path.string() + "' is missing", "metadata.json", "no such file");
  json meta;
  try {
    meta = json::parse(in);
  } catch (const std::exception& e) {
    throw CheckpointError("checkpoint file '" + meta_path.string() + "' is not valid JSON", "a JSON object", e.what());
  }
  auto field = [&](const char* key, bool (json::*is)() const noexcept, const char* kind) -> const json& {
    if (!meta.is_object() || !meta.contains(key) || !(meta[key].*is)())
      throw CheckpointError("checkpoint file '" + meta_path.string() + "' lacks a valid \"" + key + "\"", kind,
                            meta.is_object() && meta.contains(key) ? meta[key].dump() : "missing");
    return meta[key];
  };
  const int64_t version = field("format_version", &json::is_number_integer, "an integer").get<int64_t>();
  if (version != kFormatVersion)
    throw CheckpointError("checkpoint '" + meta_path.string() + "' has an unknown format version",
                          "format_version " + std::to_string(kFormatVersion), std::to_string(version),
                          "load it with the Titanax version that wrote it");
  if (field("step", &json::is_number_integer, "an integer").get<int64_t>() != step)
    throw CheckpointError("checkpoint '" + meta_path.string() + "' holds another step", std::to_string(step),
                          meta["step"].dump());
  const int64_t saved_world = field("world_size", &json::is_number_integer, "an integer").get<int64_t>();
  if (saved_world != world)
    throw CheckpointError("checkpoint '" + cdir.string() + "' was saved by another number of ranks",
                          std::to_string(world) + " ranks (this run)", std::to_string(saved_world) + " ranks",
                          "resume with the world size it was saved with");
  const json& shards = field("shards", &json::is_array, "an array of shards");
  if (shards.size() != size_t(saved_world) || !shards[size_t(rank)].is_object())
    throw CheckpointError("checkpoint file '" + meta_path.string() + "' lists the wrong shards",
                          std::to_string(saved_world) + " shard entries", std::to_string(shards.size()));
  const json& shard = shards[size_t(rank)];
  if (!shard.contains("file") || !shard["file"].is_string() || !shard.contains("crc32") || !shard["crc32"].is_string())
    throw CheckpointError("checkpoint file '" + meta_path.string() + "' has a malformed shard entry for rank " +
                              std::to_string(rank),
                          "{file, crc32, ...}", shard.dump());
  const std::string file_name = shard["file"].get<std::string>();
  if (file_name != shard_name(rank))
    throw CheckpointError("checkpoint file '" + meta_path.string() + "' names an unexpected shard file",
                          shard_name(rank), file_name);
  const fs::path shard_path = cdir / file_name;
  if (!fs::is_regular_file(shard_path, ec))
    throw CheckpointError("checkpoint shard '" + shard_path.string() + "' is missing", "the file", "no such file");
  const std::string want_crc = shard["crc32"].get<std::string>();
  const std::string got_crc = hex32(detail::crc32_file(shard_path.string()));
  if (got_crc != want_crc)
    throw CheckpointError("checksum mismatch in checkpoint shard '" + shard_path.string() + "' (corrupt file)",
                          "CRC-32 " + want_crc + " (metadata.json)", "CRC-32 " + got_crc,
                          "the file changed after it was saved; load an older step");

  SafetensorsFile f = read_safetensors(shard_path.string());
  for (const auto& [name, t] : into) {
    if (!f.tensors.contains(name))
      throw CheckpointError("tensor '" + name + "' is missing from checkpoint shard '" + shard_path.string() + "'",
                            "a tensor named '" + name + "'", "tensors [" + join(f.tensors.paths()) + "]",
                            did_you_mean(name, f.tensors.paths()));
    const Tensor& src = f.tensors.at(name);
    if (src.shape() != t.shape())
      throw CheckpointError("tensor '" + name + "' in checkpoint shard '" + shard_path.string() + "' has another shape",
                            t.shape().str() + " (the model's)", src.shape().str() + " (saved)");
    if (src.dtype() != t.dtype())
      throw CheckpointError("tensor '" + name + "' in checkpoint shard '" + shard_path.string() + "' has another dtype",
                            std::string(dtype_name(t.dtype())) + " (the model's)",
                            std::string(dtype_name(src.dtype())) + " (saved)");
  }
  for (const auto& [name, t] : f.tensors)
    if (!into.contains(name))
      throw CheckpointError("checkpoint shard '" + shard_path.string() + "' holds an unexpected tensor '" + name + "'",
                            "only the tensors [" + join(into.paths()) + "]", "'" + name + "'",
                            did_you_mean(name, into.paths()));
  for (auto& [name, t] : into)
    if (t.numel() > 0) copy_(t, f.tensors.at(name));

  CheckpointInfo info;
  info.step = step;
  info.world_size = int(saved_world);
  info.path = cdir.string();
  info.extra_json = meta.contains("extra") ? meta["extra"].dump() : "{}";
  return info;
}

}  // namespace titanax
