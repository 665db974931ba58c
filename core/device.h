// Devices: where a tensor's bytes live and which kernels run on it.
#pragma once

#include <cstdint>
#include <string>

namespace titanax {

enum class DeviceType : uint8_t { cpu, cuda };

/// A device: cpu:0, cuda:0, cuda:1, ...
struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;

  static constexpr Device cpu() { return {DeviceType::cpu, 0}; }
  static constexpr Device cuda(int index = 0) { return {DeviceType::cuda, index}; }
  constexpr bool is_cpu() const { return type == DeviceType::cpu; }
  constexpr bool is_cuda() const { return type == DeviceType::cuda; }
  friend constexpr bool operator==(Device a, Device b) { return a.type == b.type && a.index == b.index; }
  /// "cpu:0", "cuda:1".
  std::string str() const { return (is_cpu() ? "cpu:" : "cuda:") + std::to_string(index); }
};

/// Parses "cpu", "cpu:0", "cuda", "cuda:1"; throws DeviceError otherwise.
Device parse_device(const std::string& s);

/// Number of CUDA devices visible to this process (0 in a build without CUDA or on a machine without a GPU).
int cuda_device_count();

}  // namespace titanax
