// What the CPU can do, read once from cpuid, and the BLAS kernel choice that follows from
// it. Torch-free: the choice has to be made before a BLAS library initialises (OpenBLAS
// reads OPENBLAS_CORETYPE when it is loaded), and it is a pure function so that tests can
// drive it with any CPU.
#pragma once

#include <string>

namespace rmoe {

struct CpuFeatures {
  std::string vendor;      // cpuid leaf 0: "GenuineIntel", "AuthenticAMD", ...
  std::string model_name;  // the brand string, e.g. "AMD EPYC 7B13"
  int family = 0;          // display family (base + extended)
  int model = 0;           // display model
  bool avx = false, avx2 = false, fma = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false, amx_bf16 = false;

  // "avx2 fma avx512f ..." of the flags above that are set.
  std::string FlagList() const;
  // Peak fp32 FLOPs per cycle and core from the vector width: 2 FMA pipes x lanes x 2.
  // An estimate (some CPUs have one AVX-512 pipe), used only to flag kernels far below it.
  int Fp32FlopsPerCycle() const;
  // Whether bf16 products have a native instruction (AVX512_BF16 or AMX): without one, a
  // bf16 matrix product is emulated and typically slower than fp32.
  bool NativeBf16() const { return avx512_bf16 || amx_bf16; }
};

// This machine's CPU (x86 cpuid; elsewhere only model_name from /proc/cpuinfo).
CpuFeatures DetectCpu();

// The cores this process may run on (its affinity mask; mpirun binds ranks), at least 1.
int UsableCores();

enum class BlasLibrary { kOpenBlas, kMkl, kOther };

// What to do about the BLAS kernels before the first product.
struct BlasCoreDecision {
  // OpenBLAS core to run with (OPENBLAS_CORETYPE), or empty: leave the library as it is.
  std::string openblas_core;
  // Why, in a phrase for the run header: "set by the user", "MKL dispatches itself", ...
  std::string reason;
};

// The OpenBLAS core whose kernels suit `cpu` best for fp32 products: SkylakeX with AVX-512
// (F, BW, VL, DQ), Zen for AMD with AVX2, Haswell for other AVX2+FMA CPUs, Sandybridge with
// AVX, Prescott otherwise. OpenBLAS 0.3.21 does not know newer CPUs (Sapphire Rapids, Zen 4)
// and falls back to Prescott on them, at a fifth of the speed.
std::string OpenBlasCoreFor(const CpuFeatures& cpu);

// The decision for `library` on `cpu`. `user_coretype` is $OPENBLAS_CORETYPE (null when
// unset): a setting the user made always wins. `loaded_core` is the core OpenBLAS chose by
// itself (openblas_get_corename()); when it already is the best one nothing changes.
BlasCoreDecision DecideBlasCore(const CpuFeatures& cpu, BlasLibrary library,
                                const char* user_coretype, const std::string& loaded_core);

// The core to fall back to when `failed_core` computed wrong products: Haswell after an
// AVX-512 core (when the CPU has AVX2), Prescott after anything else, and empty when
// `failed_core` already is Prescott (nothing safer is left).
std::string FallbackOpenBlasCore(const CpuFeatures& cpu, const std::string& failed_core);

}  // namespace rmoe
