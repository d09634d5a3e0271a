// What a run computes on: CPU, BLAS library and kernels, threads, torch, and the measured
// speed of fp32 and bf16 matrix products. Printed at the top of every run and written as
// the first metrics record, so that two runs' speeds can be told apart by their machines;
// and the start-up guards against BLAS kernels that are slow or wrong for the CPU.
#pragma once

#include <string>
#include <vector>

#include <absl/status/status.h>
#include <torch/torch.h>

#include "rmoe/platform/cpu_features.h"
#include "rmoe/util/json.h"

namespace rmoe {

struct BlasInfo {
  BlasLibrary library = BlasLibrary::kOther;
  std::string name;    // "MKL 2024.2", "OpenBLAS", or why unknown
  std::string core;    // OpenBLAS's core (openblas_get_corename()); for MKL "own dispatch"
  std::string config;  // openblas_get_config(), or empty
};

// The BLAS this process runs torch's CPU products with (looked up at run time, so any
// LibTorch works).
BlasInfo DetectBlas();

// The vector ISA ATen's kernels run with here: DEFAULT, AVX2, AVX512 (its build summary).
std::string AtenCpuCapability();

// Called first in main(), before MPI and before any product. With OpenBLAS and no
// OPENBLAS_CORETYPE set, re-executes the program (same pid, arguments and environment) with
// the core DecideBlasCore chose, since OpenBLAS reads the variable only when it is loaded.
// Returns (without re-executing) in every other case.
void SelectBlasKernels(char** argv);

// A numerical self-check of the BLAS: fp32 products (plain and transposed) against a
// double-precision loop. When kernels that SelectBlasKernels chose compute wrong results,
// re-executes with FallbackOpenBlasCore's core; when the kernels are the library's own or
// the user's choice, or nothing is left to fall back to, returns an error that names them.
// Call before MPI starts, after SelectBlasKernels.
absl::Status VerifyBlasOrFallBack(char** argv);

// Largest |c - a b| (a b computed by a double-precision loop) relative to the largest |entry|
// of a b: the self-check's measure of a product `c` that the BLAS computed.
double ProductError(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& c);

// fp32 (or bf16) GFLOP/s of an n x n x n product on `device` (on the CPU, with the current
// torch threads): the best of as many products as fit in `budget_seconds` (at least two),
// each timed to its completion on the device. Leaves torch's global random generators
// untouched.
double ProbeMatmulGflops(torch::ScalarType dtype, int64_t n, double budget_seconds,
                         torch::Device device = torch::kCPU);

struct HostReport {
  CpuFeatures cpu;
  double cpu_mhz = 0;  // /proc/cpuinfo's "cpu MHz" (nominal under a hypervisor), 0 unknown
  BlasInfo blas;
  std::string blas_choice;  // how the kernels were chosen (DecideBlasCore's reason)
  std::string torch_version;
  std::string aten_capability;  // ATen's vector ISA: DEFAULT, AVX2, AVX512
  bool onednn = false;
  int threads = 0;       // torch intra-op threads of this process
  int usable_cores = 0;  // cores this process may run on
  int ranks_on_node = 1;
  double fp32_gflops = 0, bf16_gflops = 0;  // probe; 0 when not measured
  // Estimated fp32 peak of `threads` cores (flops per cycle x clock), 0 when unknown.
  double fp32_peak_gflops = 0;
  std::vector<std::string> warnings;

  std::vector<std::string> Lines() const;  // the header, for the log
  JsonObject Json() const;                 // the same, for metrics.jsonl
};

// Describes this process's host; with `probe`, measures fp32 and bf16 product speed (about
// 0.2 s) and warns when `bf16_requested` but bf16 is slower than fp32, or when fp32 runs far
// below the CPU's estimated peak.
HostReport DescribeHost(bool probe, bool bf16_requested, int ranks_on_node);

// The warnings DescribeHost adds, from a report's measured fields (pure, for tests).
std::vector<std::string> HostWarnings(const HostReport& report, bool bf16_requested);

}  // namespace rmoe
