#include "rmoe/platform/cpu_features.h"

#include <sched.h>
#include <strings.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace rmoe {

std::string CpuFeatures::FlagList() const {
  std::string out;
  const std::pair<bool, const char*> flags[] = {
      {avx, "avx"},           {avx2, "avx2"},           {fma, "fma"},
      {avx512f, "avx512f"},   {avx512bw, "avx512bw"},   {avx512vl, "avx512vl"},
      {avx512dq, "avx512dq"}, {avx512_vnni, "avx512_vnni"}, {avx512_bf16, "avx512_bf16"},
      {amx_bf16, "amx_bf16"}};
  for (const auto& [set, name] : flags) {
    if (!set) continue;
    if (!out.empty()) out += ' ';
    out += name;
  }
  return out.empty() ? "(none of avx avx2 fma avx512*)" : out;
}

int CpuFeatures::Fp32FlopsPerCycle() const {
  if (avx512f) return 64;
  if (avx2 && fma) return 32;
  if (avx) return 16;
  return 8;
}

namespace {

std::string ModelNameFromProcCpuinfo() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) != 0) continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos) break;
    const auto start = line.find_first_not_of(' ', colon + 1);
    return start == std::string::npos ? "" : line.substr(start);
  }
  return "";
}

}  // namespace

CpuFeatures DetectCpu() {
  CpuFeatures cpu;
  cpu.model_name = ModelNameFromProcCpuinfo();
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return cpu;
  const unsigned max_leaf = a;
  char vendor[13] = {};
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  cpu.vendor = vendor;
  __get_cpuid(1, &a, &b, &c, &d);
  const int base_family = (a >> 8) & 0xf, base_model = (a >> 4) & 0xf;
  cpu.family = base_family == 0xf ? base_family + ((a >> 20) & 0xff) : base_family;
  cpu.model = (base_family == 0x6 || base_family == 0xf) ? base_model + (((a >> 16) & 0xf) << 4)
                                                          : base_model;
  cpu.fma = c & (1u << 12);
  const bool osxsave = c & (1u << 27);
  cpu.avx = osxsave && (c & (1u << 28));
  // The OS must save the vector registers (XCR0) for the wider instructions to be usable.
  unsigned long long xcr0 = 0;
  if (osxsave) {
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  const bool ymm = (xcr0 & 0x6) == 0x6, zmm = (xcr0 & 0xe6) == 0xe6;
  const bool tiles = (xcr0 & 0x60000) == 0x60000;
  cpu.avx = cpu.avx && ymm;
  cpu.fma = cpu.fma && ymm;
  if (max_leaf >= 7) {
    __get_cpuid_count(7, 0, &a, &b, &c, &d);
    cpu.avx2 = ymm && (b & (1u << 5));
    cpu.avx512f = zmm && (b & (1u << 16));
    cpu.avx512dq = zmm && (b & (1u << 17));
    cpu.avx512bw = zmm && (b & (1u << 30));
    cpu.avx512vl = zmm && (b & (1u << 31));
    cpu.avx512_vnni = zmm && (c & (1u << 11));
    cpu.amx_bf16 = tiles && (d & (1u << 22));
    __get_cpuid_count(7, 1, &a, &b, &c, &d);
    cpu.avx512_bf16 = zmm && (a & (1u << 5));
  }
  if (cpu.model_name.empty()) cpu.model_name = cpu.vendor;
#endif
  return cpu;
}

int UsableCores() {
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) return std::max(1, CPU_COUNT(&cpus));
  return std::max(1u, std::thread::hardware_concurrency());
}

std::string OpenBlasCoreFor(const CpuFeatures& cpu) {
  if (cpu.avx512f && cpu.avx512bw && cpu.avx512vl && cpu.avx512dq) return "SkylakeX";
  if (cpu.avx2 && cpu.fma) return cpu.vendor == "AuthenticAMD" ? "Zen" : "Haswell";
  if (cpu.avx) return "Sandybridge";
  return "Prescott";
}

BlasCoreDecision DecideBlasCore(const CpuFeatures& cpu, BlasLibrary library,
                                const char* user_coretype, const std::string& loaded_core) {
  switch (library) {
    case BlasLibrary::kMkl:
      return {"", "MKL dispatches on the CPU itself"};
    case BlasLibrary::kOther:
      return {"", "neither OpenBLAS nor MKL: left as it is"};
    case BlasLibrary::kOpenBlas:
      break;
  }
  if (user_coretype != nullptr && *user_coretype != '\0') {
    return {"", std::string("OPENBLAS_CORETYPE=") + user_coretype + " set by the user"};
  }
  const std::string best = OpenBlasCoreFor(cpu);
  if (strcasecmp(best.c_str(), loaded_core.c_str()) == 0) {
    return {"", "OpenBLAS chose " + loaded_core + " itself"};
  }
  // Cooperlake and SapphireRapids kernels are SkylakeX's plus bf16 ones: keep them.
  if (best == "SkylakeX" && (strcasecmp(loaded_core.c_str(), "Cooperlake") == 0 ||
                             strcasecmp(loaded_core.c_str(), "SapphireRapids") == 0)) {
    return {"", "OpenBLAS chose " + loaded_core + " itself"};
  }
  return {best, "OpenBLAS chose " + (loaded_core.empty() ? "?" : loaded_core) + " on a CPU with " +
                    cpu.FlagList() + "; " + best + " kernels suit it"};
}

std::string FallbackOpenBlasCore(const CpuFeatures& cpu, const std::string& failed_core) {
  if (strcasecmp(failed_core.c_str(), "Prescott") == 0) return "";
  const bool avx512_core = strcasecmp(failed_core.c_str(), "SkylakeX") == 0 ||
                           strcasecmp(failed_core.c_str(), "Cooperlake") == 0 ||
                           strcasecmp(failed_core.c_str(), "SapphireRapids") == 0;
  if (avx512_core && cpu.avx2 && cpu.fma) return "Haswell";
  return "Prescott";
}

}  // namespace rmoe
