// Checkpoints: a directory per step, step_00001000/, holding
//   metadata.json   format version, step, world size, mesh, plan, each tensor's global shape, dtype and
//                   PartitionSpec; per shard file the rank and mesh coordinates that wrote it, the slice of
//                   each global tensor it holds, and CRC-32 checksums; caller-provided JSON ("extra")
//   rank_00000.safetensors, rank_00001.safetensors, ...   one per rank of the saving group
// Written under step_XXXXXXXX.tmp/, each file flushed (fsync), then renamed into place, so a crash
// mid-save leaves the previous checkpoint intact. The shard files are plain safetensors files
// (io/safetensors.h): Python's safetensors reads them.
//
// metadata.json (format_version 3; version 2 files, which hold no flat parts, are read too; version 1
// files are refused with a CheckpointError):
//   {"format": "titanax-checkpoint", "format_version": 3, "step": 1000, "world_size": 4,
//    "mesh": <mesh_json as given>, "plan": <plan_json as given>,
//    "layout": {"axes": ["data", "model"], "shape": [2, 2]},      the mesh axes in order
//    "tensors": {"layers/0/w": {"dtype": "f32", "global_shape": [512, 784], "spec": ["model", ""]}, ...},
//    "shards": [{"file": "rank_00000.safetensors", "rank": 0, "coords": [0, 0],
//                "bytes": 123456, "crc32": "89abcdef",                 whole file
//                "header_bytes": 256, "header_crc32": "01234567",      8-byte length + JSON header
//                "chunk_bytes": 1048576,
//                "tensors": {"layers/0/w": {"dtype": "f32", "shape": [256, 784], "offsets": [0, 0],
//                                           "data_offsets": [0, 802816], "chunk_crc32": "89abcdef..."},
//                            "opt/m/layers/0/w": {"dtype": "f32", "shape": [256, 784], "offsets": [0, 0],
//                                                 "flat": [0, 100352], ...}}},
//               ...],
//    "extra": <extra_json>}
// "coords" are the rank's mesh coordinates, one per layout axis. "offsets" is the global index of the
// first element of the slice the shard holds (per dim), "shape" its extent, "data_offsets" its bytes
// relative to the safetensors data section, and "chunk_crc32" the CRC-32 of each chunk_bytes-long chunk
// of those bytes (8 hex digits per chunk, the last chunk shorter). A flat part (FlatPart below) adds
// "flat": [begin, end]: the shard holds elements [begin, end) of that slice's row-major flattening, as a
// 1-d safetensors tensor of end - begin elements.
//
// Layout rule (Megatron): a tensor whose spec splits dim d over axis a of size k is cut into k equal
// contiguous blocks along d, and the rank at coordinate c on a holds block c: global indices
// [c * local_d, (c + 1) * local_d) of that dim, where local_d = global_d / k. Unsplit dims are whole.
// The layout is taken from mesh_json ({"data": 2, "model": 2} as Mesh::to_json() writes it, keys in axis
// order, or {"axes": [...], "shape": [...]}); with the JSON save a rank's coordinates are its rank in
// the saving group laid out row-major over those axes (the last axis fastest, as MeshSpec::build does);
// the Mesh save records mesh.coords().
// Each block is written once: of the ranks holding the same block of a tensor (same coordinates on the
// axes its spec uses: a replicated tensor on every rank, a TP weight on every data-parallel replica),
// one writes it, so such tensors are not read k times either. The holders share the writing (Megatron-LM's
// fully parallel save): the blocks are dealt largest first, each to the holder with the fewest bytes so
// far (LPT scheduling, ties to the lowest rank), so with data parallelism every replica writes about
// 1 / k of the model rather than rank 0 all of it. A mesh_json naming no axes says nothing about what is
// replicated: then every rank writes every tensor it holds.
// Flat parts (ZeRO): a rank may hold only a run of its block's flattened elements (FlatPart). Ranks
// holding the same run of the same block write it once, as above; the runs of a block must not overlap,
// and when the mesh covers the saving group they must cover the block, so the checkpoint holds each
// element once. Nothing is gathered to save them: each rank writes its own part.
//
// Resharding load: load(step, into, specs, mesh) takes `into` in the NEW layout (each tensor's local
// shape under `specs` on `mesh`). For each tensor it computes the global slice this rank needs by the
// rule above, checks that local shape x axis sizes equals the saved global shape and that the dtypes
// agree, and assembles the slice from the saved pieces that overlap it: one shard per distinct saved
// block (this rank's own file when it holds that block, else the lowest rank's: with a mesh, each block
// is in one file). Only those files are
// opened, and from each only its header and the byte runs of the slice (contiguous row-major runs,
// read with pread) rounded out to whole checksum chunks. The world size, the mesh, the degree and the
// split dim may all differ from the save: TP 2 -> 4, TP 4 -> 1, TP -> DP, DP x TP -> TP, a dim-0 split
// loaded as a dim-1 split. load(step, into) is the same-layout case: same world size, this rank's saved
// coordinates and the saved specs.
// Flat parts load either way: into a flat part of any layout (another data-parallel degree, or the same)
// or into a whole block, from flat parts or whole blocks; the run of the slice each saved piece holds is
// read, nothing more.
//
// What is verified: every byte a load copies into `into` lies in a chunk whose CRC-32 it checked, and
// each shard's header is checked against its CRC-32 and must agree with metadata.json (dtype, shape,
// byte range of each tensor read); a shard whose size differs from the recorded one is reported as
// truncated (or grown) before anything is read. Trade-off: reads are rounded out to whole chunks
// (default 1 MiB, set_crc_chunk_bytes), so a contiguous run costs at most one extra chunk at each end
// (slices along dim 0 read ~ what they need), but a slice along an inner dim whose rows are shorter than
// a chunk reads the whole saved piece (TP 2 -> 4 of a dim-1 split reads its rank's 1/2 piece for a 1/4
// slice). Smaller chunks cut that at the cost of 8 hex digits per chunk in metadata.json. The whole-file
// CRC-32 is not checked by load (that would read every byte); verify(step) checks it.
// Nothing is written into `into` before every piece has been read and verified, so on error it is
// unchanged. Errors are CheckpointErrors naming the file and the failed check (expected / found / fix).
//
// Asynchronous save (save_async; PyTorch DCP's async_save, Megatron-LM's async checkpointing): phases up
// to the writer choice run at the call, as in save(); then each rank copies the blocks it writes to host
// memory and a background thread writes and fsyncs its shard. The commit (every rank's checksums,
// metadata.json, the rename) is collective and runs on the caller's thread: in the first poll() that
// finds every rank's write done, in wait(), or before the next save. One save is pending at a time.
//
// Test-only hook: when the environment variable TITANAX_TEST_KILL_DURING_SAVE=N is set, a rank saving
// its shard raises SIGKILL right after N bytes of that shard reached the disk (crash-safety tests).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/tree.h"
#include "parallel/communicator.h"
#include "parallel/mesh.h"

namespace titanax {

struct CheckpointInfo {
  int64_t step = 0;
  int world_size = 1;      ///< ranks that saved it
  std::string path;        ///< the checkpoint directory
  std::string extra_json;  ///< the caller's JSON as saved (e.g. loader position, config)
  std::vector<std::string> saved_tensors;  ///< every tensor the checkpoint holds (for subset loads)
  // Read statistics of this load (this rank only).
  uint64_t bytes_needed = 0;     ///< bytes of tensor data in this rank's slices (the least a load must read)
  uint64_t data_bytes_read = 0;  ///< tensor data read from shard files (bytes_needed rounded out to chunks)
  uint64_t bytes_read = 0;       ///< all bytes read from shard files (data + headers)
  int files_read = 0;            ///< shard files opened
};

/// A tensor held as a run of its block's flattened elements: how ZeRO keeps optimizer state
/// (parallel/zero.h: each data-parallel rank owns [begin, end) of every parameter's row-major elements,
/// and the moments of those only). `block` is the shape of the block this rank's PartitionSpec gives it
/// (the whole tensor when the spec splits nothing, the tensor-parallel block otherwise: the shape the
/// global shape is computed from); the tensor saved or loaded holds elements [begin, begin + numel) of
/// that block's row-major flattening, in any shape (ZeroShards' parts are 1-d). A checkpoint of flat parts
/// loads into whole tensors and into other flat parts (another data-parallel degree), and vice versa.
struct FlatPart {
  Shape block;
  int64_t begin = 0;
};
/// Flat parts by tensor name (tensors without an entry are whole blocks).
using FlatParts = std::map<std::string, FlatPart>;

/// Where one rank sits in a mesh: the axes in order, their sizes and this rank's coordinate on each,
/// plus its world rank (a load prefers this rank's own shard file). What the resharding load needs;
/// build it from a Mesh, or by hand to load "as rank r of n" (tools, tests).
struct MeshCoords {
  std::vector<std::string> axes;
  std::vector<int> shape;
  std::vector<int> coords;
  int rank = 0;
  static MeshCoords of(const Mesh& mesh);
  /// Rank `rank` placed row-major over `shape` (the last axis fastest, as MeshSpec::build does).
  /// Throws ValueError for mismatched sizes, a size < 1 or a rank outside the mesh.
  static MeshCoords at(std::vector<std::string> axes, std::vector<int> shape, int rank);
  /// "{data: 2, model: 2} at {data: 1, model: 0}".
  std::string describe() const;
};

class Checkpointer {
 public:
  static constexpr uint64_t kDefaultCrcChunkBytes = 1 << 20;

  /// `dir` holds the step_* directories; keep_last >= 1 checkpoints are kept (older ones deleted).
  /// `comm` is the group that saves together (the world); nullptr means a single rank.
  /// Throws ValueError for an empty dir or keep_last < 1. Touches no file.
  Checkpointer(std::string dir, int keep_last = 3, std::shared_ptr<Communicator> comm = nullptr);
  /// With an asynchronous save pending, waits for this rank's write and leaves the checkpoint
  /// uncommitted (logging a warning): committing is collective, so call wait() before this.
  ~Checkpointer();
  Checkpointer(Checkpointer&&) noexcept;
  Checkpointer& operator=(Checkpointer&&) noexcept;

  /// Collective: commits a pending asynchronous save first (wait()). Every rank passes its local
  /// `tensors`; rank 0 writes metadata.json (with `extra_json`,
  /// `mesh_json` and `plan_json` verbatim, and `specs` by tensor name; tensors without a spec are
  /// replicated) and commits by renaming.
  /// Steps: rank 0 creates step_XXXXXXXX.tmp/ (8-digit zero-padded step); ranks all-gather what they
  /// hold and agree who writes each block (see the header comment); every rank writes and fsyncs
  /// rank_RRRRR.safetensors there (its blocks, in any layout / device: copied to host; possibly none)
  /// and reports its checksums with all_gather_string; rank 0 writes and fsyncs metadata.json, fsyncs
  /// the directory, renames it to step_XXXXXXXX/ (replacing an earlier save of the same step), fsyncs
  /// `dir`, then deletes all but the keep_last newest complete checkpoints (never the one just written)
  /// and stale step_*.tmp/ directories. Each phase ends in an all-gather of every rank's outcome, so a
  /// failure on one rank makes every rank throw (the failing rank its own error, the others a
  /// CheckpointError naming it) instead of hanging; the .tmp directory is removed then.
  /// Throws ValueError: step < 0, extra_json / mesh_json / plan_json not JSON, an undefined tensor, a
  /// spec naming a tensor no rank saves, longer than its tensor's rank, naming an axis not in mesh_json
  /// or one axis twice, a rank outside the mesh, ranks holding one tensor with different dtypes,
  /// shapes or specs, or (when the mesh covers the group) a split tensor some block of which no rank
  /// holds; each tensor's spec is the one its holders pass (a rank need not know the specs of tensors
  /// it does not hold, as a pipeline stage does not). `flat` marks tensors this rank holds as flat parts
  /// (their block shape stands for the local shape above); ValueError also for a flat entry naming no
  /// tensor of `tensors`, a part outside its block, runs of one block that overlap, or (when the mesh
  /// covers the group) a block whose runs leave elements unsaved;
  /// IOError: a write failed.
  void save(int64_t step, const ParamTree& tensors, const std::string& extra_json = "{}",
            const std::map<std::string, PartitionSpec>& specs = {}, const std::string& mesh_json = "{}",
            const std::string& plan_json = "{}", const FlatParts& flat = {});
  /// The same, with the layout taken from `mesh` (mesh.to_json(), and each rank's mesh.coords());
  /// mesh.size() must equal the saving group's size (ValueError).
  void save(int64_t step, const ParamTree& tensors, const std::map<std::string, PartitionSpec>& specs,
            const Mesh& mesh, const std::string& extra_json = "{}", const std::string& plan_json = "{}",
            const FlatParts& flat = {});

  /// Asynchronous save (PyTorch DCP's async_save, Megatron-LM's async checkpointing): the checks, layout
  /// and writer choice of save() (collective), then this rank copies the blocks it writes to host memory
  /// and writes them in a background thread. Returns once the copy is made: the caller may update the
  /// tensors right away, and the checkpoint holds their values at the call. The checkpoint is committed
  /// (metadata.json, the rename, pruning) by the first poll() that finds every rank's write done, by
  /// wait(), or by the next save / save_async, which wait first. Until then steps() does not list it, and
  /// a crash leaves only its .tmp directory (removed by a later save). Memory: one host copy of the
  /// blocks this rank writes (with k data-parallel replicas, about 1 / k of the replicated state).
  /// Throws what save() throws for bad arguments, before anything is written, on every rank (and
  /// ValueError / std::bad_alloc when the copy fails); a failed write surfaces from the poll() or wait()
  /// that commits it.
  void save_async(int64_t step, const ParamTree& tensors, const std::string& extra_json = "{}",
                  const std::map<std::string, PartitionSpec>& specs = {}, const std::string& mesh_json = "{}",
                  const std::string& plan_json = "{}", const FlatParts& flat = {});
  /// save_async with the layout taken from `mesh`, as save(step, tensors, specs, mesh, ...).
  void save_async(int64_t step, const ParamTree& tensors, const std::map<std::string, PartitionSpec>& specs,
                  const Mesh& mesh, const std::string& extra_json = "{}", const std::string& plan_json = "{}",
                  const FlatParts& flat = {});
  /// Collective: commits the pending asynchronous save when every rank has finished writing it. Returns
  /// true when no save is pending afterwards. Costs one all-gather of a byte per rank while a save is
  /// pending, nothing otherwise; never blocks on the write. Throws, on every rank, what save() throws for
  /// a failed write or commit (IOError on the failing rank, CheckpointError naming it elsewhere); the save
  /// is then abandoned and its .tmp directory removed.
  bool poll();
  /// Collective: waits for the pending asynchronous save's write and commits it; nothing without one.
  /// Throws as poll().
  void wait();
  /// Whether an asynchronous save is started and not yet committed (the same on every rank).
  bool pending() const { return pending_ != nullptr; }

  /// Collective (every rank of `comm`): rank 0 creates `dir` and checks that it can write a file there
  /// (and removes it), so that a bad path fails before training rather than at the first save. Throws on
  /// every rank when it fails: IOError on rank 0 (the path and the system's reason), CheckpointError
  /// naming rank 0's failure elsewhere.
  void prepare() const;
  /// CRC-32 chunk size of later saves (>= 1; ValueError otherwise). See the trade-off above.
  void set_crc_chunk_bytes(uint64_t n);
  uint64_t crc_chunk_bytes() const { return chunk_bytes_; }

  /// Steps of the complete checkpoints present, ascending: directories step_XXXXXXXX/ holding a
  /// metadata.json that parses (.tmp leftovers of interrupted saves are not listed). Not collective.
  std::vector<int64_t> steps() const;
  /// The newest complete checkpoint's step, if any.
  std::optional<int64_t> latest() const;

  /// Same-layout load (resume): reads this rank's slices of checkpoint `step` into the tensors of
  /// `into` (same names, local shapes and dtypes; values copied in place, so optimizer state and
  /// parameters keep their identity). Requires the world size it was saved with; this rank takes the
  /// coordinates its rank had then, and the saved specs. Not collective.
  /// Throws CheckpointError: missing directory or file, world size differs, checksum mismatch, a
  /// truncated shard, a tensor missing / unexpected / of another shape or dtype (naming the tensor and
  /// the file), metadata.json unparsable, malformed or of another format_version, a shard header that
  /// disagrees with metadata.json. On error `into` is unchanged.
  /// `flat`: the tensors of `into` that are flat parts, and which (as for the resharding load below).
  CheckpointInfo load(int64_t step, ParamTree& into, const FlatParts& flat = {}) const;

  /// Resharding load: `into` holds this rank's tensors in a new layout, `specs` their PartitionSpecs
  /// (absent = replicated) on `mesh`; any world size. Every saved tensor must be in `into` and vice
  /// versa, with the saved dtype and global shape (local shape x the sizes of the axes its spec
  /// splits). Not collective: each rank reads the pieces it needs. Throws ValueError for specs naming a
  /// tensor not in `into`, an axis not in the mesh or one axis twice, or longer than the tensor's rank;
  /// CheckpointError as load(step, into), plus a saved layout that leaves part of a needed slice in no
  /// shard. On error `into` is unchanged.
  /// subset = true: `into` may hold only some of the saved tensors (a pipeline stage loads its own
  /// layers); the rest are not read, and the caller checks that its ranks together load every one of
  /// CheckpointInfo::saved_tensors (Engine::restore does).
  /// `flat`: tensors of `into` that are flat parts of their blocks (the block's shape is then the local
  /// shape above); ValueError for an entry naming no tensor of `into` or a part outside its block.
  CheckpointInfo load(int64_t step, ParamTree& into, const std::map<std::string, PartitionSpec>& specs,
                      const Mesh& mesh, bool subset = false, const FlatParts& flat = {}) const;
  /// The same at an explicit position (load "as rank r of a mesh" without building it).
  CheckpointInfo load(int64_t step, ParamTree& into, const std::map<std::string, PartitionSpec>& specs,
                      const MeshCoords& where, bool subset = false, const FlatParts& flat = {}) const;

  /// Reads every shard file of checkpoint `step` whole and checks its size and CRC-32 against
  /// metadata.json (a full integrity check; load checks only what it reads). Not collective.
  /// Throws CheckpointError naming the first bad file.
  void verify(int64_t step) const;

  const std::string& dir() const { return dir_; }

 private:
  struct PendingSave;
  void save_impl(int64_t step, const ParamTree& tensors, const std::string& extra_json,
                 const std::map<std::string, PartitionSpec>& specs, const std::string& mesh_json,
                 const std::string& plan_json, const std::vector<int>* coords, const FlatParts& flat, bool async);
  /// Phases 3 and 4 of a save: every rank's write outcome, then rank 0's commit.
  void finish_save();
  CheckpointInfo load_impl(int64_t step, ParamTree& into, const std::map<std::string, PartitionSpec>* specs,
                           const MeshCoords* where, bool subset, const FlatParts& flat) const;

  std::string dir_;
  int keep_last_;
  std::shared_ptr<Communicator> comm_;
  uint64_t chunk_bytes_ = kDefaultCrcChunkBytes;
  std::unique_ptr<PendingSave> pending_;  ///< a save whose shard is being written (save_async) or not yet committed
};

}  // namespace titanax
