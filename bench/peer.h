// Runs a peer benchmark script (../shared/peers/*.py) in the same run and reads its key=value output.
#pragma once

#include <map>
#include <string>

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

}  // namespace titanax::bench
