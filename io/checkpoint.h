// Checkpoints: a directory per step, step_00001000/, holding
//   metadata.json   format version, step, world size, mesh, plan, each tensor's global shape, dtype and
//                   PartitionSpec, a CRC-32 per shard file, and caller-provided JSON ("extra")
//   rank_00000.safetensors, rank_00001.safetensors, ...   one per rank: the tensors that rank holds
// Written under step_XXXXXXXX.tmp/, each file flushed (fsync), then renamed into place, so a crash
// mid-save leaves the previous checkpoint intact. Loading verifies the checksum and every tensor, and
// throws CheckpointError naming the file and the check that failed.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/tree.h"
#include "parallel/communicator.h"
#include "parallel/mesh.h"

namespace titanax {

struct CheckpointInfo {
  int64_t step = 0;
  int world_size = 1;
  std::string path;        ///< the checkpoint directory
  std::string extra_json;  ///< the caller's JSON as saved (e.g. loader position, config)
};

class Checkpointer {
 public:
  /// `dir` holds the step_* directories; keep_last >= 1 checkpoints are kept (older ones deleted).
  /// `comm` is the group that saves together (the world); nullptr means a single rank.
  Checkpointer(std::string dir, int keep_last = 3, std::shared_ptr<Communicator> comm = nullptr);

  /// Collective: every rank writes its `tensors`; rank 0 writes metadata.json (with `extra_json`,
  /// `mesh_json` and `plan_json` verbatim, and `specs` by tensor name) and commits by renaming.
  void save(int64_t step, const ParamTree& tensors, const std::string& extra_json = "{}",
            const std::map<std::string, PartitionSpec>& specs = {}, const std::string& mesh_json = "{}",
            const std::string& plan_json = "{}");

  /// Steps of the complete checkpoints present, ascending.
  std::vector<int64_t> steps() const;
  /// The newest complete checkpoint's step, if any.
  std::optional<int64_t> latest() const;

  /// Reads this rank's shard of checkpoint `step` into the tensors of `into` (same names, shapes and
  /// dtypes; values copied in place, so optimizer state and parameters keep their identity).
  /// Throws CheckpointError: missing directory or file, world size differs, checksum mismatch,
  /// a tensor missing / unexpected / of another shape or dtype (naming the tensor and the file).
  CheckpointInfo load(int64_t step, ParamTree& into) const;

  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  int keep_last_;
  std::shared_ptr<Communicator> comm_;
};

}  // namespace titanax
