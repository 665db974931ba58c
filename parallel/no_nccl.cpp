// Linked into builds without NCCL (CPU builds, and CUDA builds where cmake/cuda.cmake did not find it;
// CUDA builds with NCCL compile parallel/cuda_nccl_communicator.cpp instead): the factory never creates
// an NCCL communicator, so make_device_communicator always picks the MPI backend.
#include "parallel/nccl_communicator.h"

namespace titanax {

bool nccl_built() { return false; }

namespace detail {

std::string gpu_identity(int device) { return "cuda:" + std::to_string(device); }

std::shared_ptr<Communicator> make_nccl_communicator(std::shared_ptr<Communicator>, int, std::string* why_not) {
  if (why_not) *why_not = "this Titanax was built without NCCL";
  return nullptr;
}

}  // namespace detail
}  // namespace titanax
