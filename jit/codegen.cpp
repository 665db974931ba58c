// CUDA source generation for fused programs, and the kernel cache (memory and disk) in front of NVRTC.
// NVRTC itself and the CUDA loading / launching live in jit/cuda_codegen.cpp (CUDA builds) or
// jit/no_cuda.cpp (CPU builds, where they throw DeviceError).
#include "jit/codegen.h"

#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <atomic>
#include <exception>
#include <mutex>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include <spdlog/spdlog.h>

#include "core/error.h"
#include "jit/codegen_detail.h"
#include "jit/fusion_program.h"

namespace titanax::jit {
namespace {

using fused::BinaryOp;
using fused::UnaryOp;

// The C type of values of dtype d in memory: f16 / bf16 as their bits (the source includes no CUDA
// header; the conversions are tx_widen / tx_narrow below).
const char* c_type(DType d) {
  switch (d) {
    case DType::f32: return "float";
    case DType::f64: return "double";
    case DType::bool_: return "bool";
    case DType::f16:
    case DType::bf16: return "unsigned short";
    default:
      throw InternalError("fused CUDA kernel: a register of an unsupported dtype", "f32, f64, f16, bf16 or bool",
                          std::string(dtype_name(d)));
  }
}
// The C type a register of dtype d is computed in.
const char* reg_type(DType d) { return c_type(fused::compute_dtype(d)); }

// f16 / bf16 <-> f32 as cuda_fp16.h / cuda_bf16.h convert on sm_80 and later (cvt with round to nearest
// even; widening is exact), with cuda_bf16.h's integer rounding before sm_80 (no bf16 cvt there).
const char* kHalfConversions = R"(__device__ __forceinline__ float tx_widen_bf16(unsigned short h) { return __uint_as_float((unsigned)h << 16); }
__device__ __forceinline__ unsigned short tx_narrow_bf16(float f) {
#if __CUDA_ARCH__ >= 800
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
#endif
}
__device__ __forceinline__ float tx_widen_f16(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short tx_narrow_f16(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
)";

// Expression e (f32) rounded to 16-bit dtype d, as d's bits; and d's bits e widened to f32.
std::string narrow(DType d, const std::string& e) { return std::string(d == DType::bf16 ? "tx_narrow_bf16(" : "tx_narrow_f16(") + e + ")"; }
std::string widen(DType d, const std::string& e) { return std::string(d == DType::bf16 ? "tx_widen_bf16(" : "tx_widen_f16(") + e + ")"; }

const char* unary_fn(UnaryOp op) {
  switch (op) {
    case UnaryOp::neg: return "neg";
    case UnaryOp::exp: return "exp_";
    case UnaryOp::log: return "log_";
    case UnaryOp::sqrt: return "sqrt_";
    case UnaryOp::rsqrt: return "rsqrt_";
    case UnaryOp::tanh: return "tanh_";
    case UnaryOp::sigmoid: return "sigmoid";
    case UnaryOp::abs: return "abs_";
    case UnaryOp::square: return "square";
    case UnaryOp::reciprocal: return "reciprocal";
    case UnaryOp::relu: return "relu";
    case UnaryOp::gelu_tanh: return "gelu_tanh";
    case UnaryOp::gelu_erf: return "gelu_erf";
    case UnaryOp::sign: return "sign";
  }
  throw InternalError("fused CUDA kernel: unknown unary op", "a UnaryOp", std::to_string(int(op)));
}

const char* binary_fn(BinaryOp op) {
  switch (op) {
    case BinaryOp::add: return "add";
    case BinaryOp::sub: return "sub";
    case BinaryOp::mul: return "mul";
    case BinaryOp::div: return "div_";
    case BinaryOp::maximum: return "maximum";
    case BinaryOp::minimum: return "minimum";
    case BinaryOp::pow: return "pow_";
    case BinaryOp::eq: return "eq";
    case BinaryOp::ne: return "ne";
    case BinaryOp::lt: return "lt";
    case BinaryOp::le: return "le";
    case BinaryOp::gt: return "gt";
    case BinaryOp::ge: return "ge";
    case BinaryOp::relu_backward: return "relu_backward";
    case BinaryOp::gelu_tanh_backward: return "gelu_tanh_backward";
    case BinaryOp::gelu_erf_backward: return "gelu_erf_backward";
  }
  throw InternalError("fused CUDA kernel: unknown binary op", "a BinaryOp", std::to_string(int(op)));
}

// A constant of dtype d with exactly the value v (as the kernel would round it): its bit pattern.
std::string literal(double v, DType d) {
  char b[64];
  if (d == DType::f32) {
    const float f = float(v);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    std::snprintf(b, sizeof b, "__int_as_float(0x%08x)", unsigned(u));
  } else {
    uint64_t u;
    std::memcpy(&u, &v, 8);
    std::snprintf(b, sizeof b, "__longlong_as_double(0x%016llxLL)", static_cast<unsigned long long>(u));
  }
  return b;
}

std::string reg(int r) { return "r" + std::to_string(r); }

}  // namespace

std::string cuda_source(const fused::Program& p, bool may_alias) {
  using Kind = fused::Instr::Kind;
  const int nin = p.nin(), rank = std::max(1, p.shape.rank());
  const std::string restrict_ = may_alias ? "" : " __restrict__";
  std::string s;
  s += "// titanax fused kernel: " + p.text + "\n";
  s += "#include \"tx_ew_math.cuh\"\n";
  s += "namespace ewm = titanax::kernels::cuda::ewm;\n";
  if (std::any_of(p.reg_dtype.begin(), p.reg_dtype.end(), [](DType d) { return is_half(d); })) s += kHalfConversions;
  s += "struct TxStrides { long long s[" + std::to_string(std::max(1, nin * rank)) + "]; };\n";
  s += "extern \"C\" __global__ void __launch_bounds__(256) tx_fused(";
  for (int i = 0; i < nin; ++i) s += std::string("const ") + c_type(p.inputs[size_t(i)].dtype) + "*" + restrict_ + " in" + std::to_string(i) + ", ";
  for (size_t k = 0; k < p.outputs.size(); ++k)
    s += std::string(c_type(p.reg_dtype[size_t(p.outputs[k])])) + "*" + restrict_ + " out" + std::to_string(k) + ", ";
  s += "TxStrides st, long long n, int dense) {\n";
  s += "  const long long step = (long long)gridDim.x * blockDim.x;\n";
  s += "  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += step) {\n";
  // Offsets of the inputs of more than one element.
  std::vector<int> strided;
  for (int i = 0; i < nin; ++i)
    if (!p.reg_scalar[size_t(i)]) strided.push_back(i);
  for (int i : strided) s += "    long long o" + std::to_string(i) + " = i;\n";
  if (!strided.empty() && p.shape.rank() > 0) {
    s += "    if (!dense) {\n      long long rem = i, c;\n";
    for (int i : strided) s += "      o" + std::to_string(i) + " = 0;\n";
    for (int d = p.shape.rank() - 1; d >= 0; --d) {
      const std::string size = std::to_string(p.shape[d]) + "LL";
      s += "      c = rem % " + size + "; rem /= " + size + ";\n";
      for (int i : strided) s += "      o" + std::to_string(i) + " += c * st.s[" + std::to_string(i * rank + d) + "];\n";
    }
    s += "    }\n";
  }
  for (int i = 0; i < nin; ++i) {
    const DType t = p.inputs[size_t(i)].dtype;
    const std::string at = p.reg_scalar[size_t(i)] ? "0" : "o" + std::to_string(i);
    const std::string v = "in" + std::to_string(i) + "[" + at + "]";
    s += std::string("    const ") + reg_type(t) + " " + reg(i) + " = " + (is_half(t) ? widen(t, v) : v) + ";\n";
  }
  for (size_t k = 0; k < p.code.size(); ++k) {
    const fused::Instr& in = p.code[k];
    const int r = nin + int(k);
    const char* t = reg_type(in.dtype);
    const char* a0 = reg_type(p.reg_dtype[size_t(in.args[0])]);
    const DType ct = fused::compute_dtype(in.dtype);
    std::string e;
    switch (in.kind) {
      case Kind::unary: e = std::string("ewm::") + unary_fn(in.unary) + "<" + t + ">(" + reg(in.args[0]) + ")"; break;
      case Kind::binary:
        e = std::string("ewm::") + binary_fn(in.binary) + "<" + a0 + ">(" + reg(in.args[0]) + ", " + reg(in.args[1]) + ")";
        break;
      case Kind::where: e = reg(in.args[0]) + " ? " + reg(in.args[1]) + " : " + reg(in.args[2]); break;
      case Kind::clamp:
        e = std::string("ewm::clamp<") + t + ">(" + reg(in.args[0]) + ", " + literal(in.lo, ct) + ", " + literal(in.hi, ct) + ")";
        break;
      case Kind::cast: e = std::string("ewm::cast_to<") + t + ", " + a0 + ">::f(" + reg(in.args[0]) + ")"; break;
    }
    if (is_half(in.dtype)) e = widen(in.dtype, narrow(in.dtype, e));  // the eager kernel's rounding
    s += std::string("    const ") + t + " " + reg(r) + " = " + e + ";\n";
  }
  for (size_t k = 0; k < p.outputs.size(); ++k) {
    const DType t = p.reg_dtype[size_t(p.outputs[k])];
    const std::string v = reg(p.outputs[k]);
    s += "    out" + std::to_string(k) + "[i] = " + (is_half(t) ? narrow(t, v) : v) + ";\n";
  }
  s += "  }\n}\n";
  return s;
}

// ------------------------------------------------------------------------------------ the cache

namespace {

std::mutex g_mu;
KernelCacheStats g_stats;
// FNV-1a hash -> (key, CUBIN) entries with that hash.
std::unordered_map<uint64_t, std::vector<std::pair<std::string, std::shared_ptr<const std::string>>>> g_memory;

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

constexpr char kMagic[8] = {'T', 'X', 'K', 'C', '0', '0', '0', '1'};

uint32_t crc_of(const std::string& bytes) {
  return uint32_t(crc32(0L, reinterpret_cast<const Bytef*>(bytes.data()), uInt(bytes.size())));
}

void put_u64(std::string& s, uint64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); }
bool get_u64(const std::string& s, size_t& at, uint64_t& v) {
  if (at + 8 > s.size()) return false;
  std::memcpy(&v, s.data() + at, 8);
  at += 8;
  return true;
}

std::filesystem::path cache_file(const std::string& dir, uint64_t h, int arch) {
  char name[64];
  std::snprintf(name, sizeof name, "tx-%016llx-sm_%d.cubin", static_cast<unsigned long long>(h), arch);
  return std::filesystem::path(dir) / name;
}

// The CUBIN stored for `key` in `file`, or nullptr when the file is absent; a file that is corrupt,
// truncated or holds another key counts as rejected.
std::shared_ptr<const std::string> read_cache_file(const std::filesystem::path& file, const std::string& key, bool& rejected) {
  rejected = false;
  std::ifstream f(file, std::ios::binary);
  if (!f) return nullptr;
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  rejected = true;
  if (all.size() < sizeof kMagic + 8 + 8 + 4 || std::memcmp(all.data(), kMagic, sizeof kMagic) != 0) return nullptr;
  uint32_t crc;
  std::memcpy(&crc, all.data() + all.size() - 4, 4);
  const std::string body = all.substr(0, all.size() - 4);
  if (crc_of(body) != crc) return nullptr;
  size_t at = sizeof kMagic;
  uint64_t klen = 0, clen = 0;
  if (!get_u64(body, at, klen) || at + klen > body.size() || body.compare(at, klen, key) != 0) return nullptr;
  at += klen;
  if (!get_u64(body, at, clen) || at + clen != body.size()) return nullptr;
  rejected = false;
  return std::make_shared<const std::string>(body.substr(at, clen));
}

void write_cache_file(const std::filesystem::path& file, const std::string& key, const std::string& cubin) {
  std::string body(kMagic, sizeof kMagic);
  put_u64(body, key.size());
  body += key;
  put_u64(body, cubin.size());
  body += cubin;
  const uint32_t crc = crc_of(body);
  body.append(reinterpret_cast<const char*>(&crc), 4);
  std::error_code ec;
  std::filesystem::create_directories(file.parent_path(), ec);
  // A name no other process uses, then an atomic rename over the final name.
  const auto tmp = file.string() + ".tmp" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()) +
                   "-" + std::to_string(reinterpret_cast<uintptr_t>(&body));
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f || !f.write(body.data(), std::streamsize(body.size())) || !f.flush()) {
      spdlog::warn("jit: cannot write the kernel cache file {} (disk cache skipped for this kernel)", tmp);
      std::filesystem::remove(tmp, ec);
      return;
    }
  }
  std::filesystem::rename(tmp, file, ec);
  if (ec) {
    spdlog::warn("jit: cannot rename {} to {}: {}", tmp, file.string(), ec.message());
    std::filesystem::remove(tmp, ec);
  }
}

}  // namespace

KernelCacheStats kernel_cache_stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_stats;
}

void reset_kernel_cache_stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_stats = {};
}

void clear_kernel_memory_cache() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_memory.clear();
}

std::string kernel_cache_dir() {
  if (const char* e = std::getenv("TITANAX_KERNEL_CACHE"); e && *e) return std::string(e) == "off" ? "" : e;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/titanax/kernels";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/titanax/kernels";
  return "";
}

std::shared_ptr<const std::string> compile_cuda(const std::string& source, int arch) {
  const std::string key = detail::nvrtc_key(arch) + "\n" + source;
  const uint64_t h = fnv1a(key);
  {
    std::lock_guard<std::mutex> lock(g_mu);
    for (const auto& [k, cubin] : g_memory[h])
      if (k == key) {
        ++g_stats.memory_hits;
        return cubin;
      }
  }
  const std::string dir = kernel_cache_dir();
  std::shared_ptr<const std::string> cubin;
  if (!dir.empty()) {
    bool rejected = false;
    cubin = read_cache_file(cache_file(dir, h, arch), key, rejected);
    std::lock_guard<std::mutex> lock(g_mu);
    if (cubin) ++g_stats.disk_hits;
    if (rejected) {
      ++g_stats.disk_rejected;
      spdlog::warn("jit: ignoring the kernel cache file {} (corrupt, truncated or for another source); recompiling",
                   cache_file(dir, h, arch).string());
    }
  }
  if (!cubin) {
    const auto t0 = std::chrono::steady_clock::now();
    cubin = std::make_shared<const std::string>(detail::nvrtc_compile(source, arch));
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    {
      std::lock_guard<std::mutex> lock(g_mu);
      ++g_stats.compiles;
      g_stats.compile_seconds += sec;
    }
    if (!dir.empty()) write_cache_file(cache_file(dir, h, arch), key, *cubin);
  }
  std::lock_guard<std::mutex> lock(g_mu);
  for (const auto& [k, c] : g_memory[h])
    if (k == key) return c;  // another thread got there first
  g_memory[h].push_back({key, cubin});
  return cubin;
}

int compile_cuda_parallel(const std::vector<std::string>& sources, int arch, int threads) {
  std::vector<const std::string*> todo;
  {
    std::unordered_set<std::string_view> seen;
    for (const auto& s : sources)
      if (seen.insert(s).second) todo.push_back(&s);
  }
  const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
  const int n = std::min<int>(threads > 0 ? threads : hw, int(todo.size()));
  std::atomic<size_t> next{0};
  std::exception_ptr first;
  std::mutex mu;
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < todo.size();) {
      try {
        compile_cuda(*todo[i], arch);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!first) first = std::current_exception();
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) pool.emplace_back(work);
  work();  // this thread takes a share too
  for (auto& t : pool) t.join();
  if (first) std::rethrow_exception(first);
  return int(todo.size());
}

}  // namespace titanax::jit
