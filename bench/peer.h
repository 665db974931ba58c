// What the benchmarks share: running a peer benchmark script (../shared/peers/*.py) in the same run and
// reading its key=value output, timing a call, and the exit code of a run that throws.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace titanax::bench {

/// Directory of the peer scripts: $TITANAX_PEERS, else <source>/../shared/peers, else <source>/shared/peers.
std::string peers_dir();
/// True when `python` can import torch (quietly).
bool python_has_torch(const std::string& python);
/// The Python that runs the peers: $TITANAX_PEER_PYTHON when set; else the first of /usr/bin/python3
/// (Debian's, with python3-torch) and `python3` on the PATH (the GPU machines keep PyTorch in a venv
/// there) that imports torch; "" when none does.
std::string peer_python();
/// Runs `python script args` and parses the last line with key=value pairs; empty map on failure
/// (the reason goes to `why`).
std::map<std::string, std::string> run_peer(const std::string& python, const std::string& script,
                                            const std::string& args, std::string& why);

/// What every benchmark does with its peer: when `enabled`, runs `python script args` with peer_python()
/// and returns its key=value figures if they include every key of `required`. Otherwise returns an empty
/// map and appends to `line` why there are none: " peer=skipped" (not enabled), " peer=unavailable" (no
/// Python with torch, or no such script), " peer=<its value>" (the script ran and printed a peer= value
/// without the figures, as a peer that cannot measure here says why), or " peer=failed" (the reason on
/// stderr).
std::map<std::string, std::string> peer_figures(bool enabled, const std::string& script, const std::string& args,
                                                const std::vector<std::string>& required, std::string& line);

/// Milliseconds per call of f: 2 untimed calls first (a trace, a compile, a cache's first fill), then
/// `iters` timed ones; `sync` (waiting for a device's queued work) runs before the clock starts and stops.
double time_ms(const std::function<void()>& f, int64_t iters, const std::function<void()>& sync);

/// A benchmark's main body: its return value, or, when it throws a titanax::Error, the error on stderr and
/// exit code 2 (bad options or a failed run: no line of figures).
int guarded(const std::function<int()>& body);

}  // namespace titanax::bench
