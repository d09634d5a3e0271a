#include "rmoe/platform/host_report.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include <ATen/DeviceAccelerator.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <torch/version.h>

namespace rmoe {
namespace {

// Set in the environment of a process that SelectBlasKernels re-executed: the core it chose,
// and (after a failed self-check) the core that computed wrong products.
constexpr char kChosenCoreEnv[] = "RMOE_BLAS_CORE_CHOSEN";
constexpr char kFailedCoreEnv[] = "RMOE_BLAS_FALLBACK_FROM";

std::string TrimRight(std::string s) {
  while (!s.empty() && (s.back() == ' ' || s.back() == '\n' || s.back() == '\t')) s.pop_back();
  return s;
}

// What follows `key` on its line of LibTorch's build summary (at::show_config()), or "?".
std::string SummaryValue(const std::string& summary, const std::string& key) {
  const auto at = summary.find(key);
  if (at == std::string::npos) return "?";
  const auto start = at + key.size();
  return TrimRight(summary.substr(start, summary.find('\n', start) - start));
}

double CpuMhz() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("cpu MHz", 0) != 0) continue;
    const auto colon = line.find(':');
    return colon == std::string::npos ? 0 : std::atof(line.c_str() + colon + 1);
  }
  return 0;
}

// The user's OPENBLAS_CORETYPE, or null when unset or set by SelectBlasKernels.
const char* UserCoreType() {
  const char* env = std::getenv("OPENBLAS_CORETYPE");
  const char* chosen = std::getenv(kChosenCoreEnv);
  if (env == nullptr || *env == '\0') return nullptr;
  if (chosen != nullptr && std::string(env) == chosen) return nullptr;
  return env;
}

[[noreturn]] void Reexecute(char** argv) {
  std::fflush(nullptr);
  execv("/proc/self/exe", argv);
  std::fprintf(stderr, "cannot re-execute %s to select BLAS kernels: %s\n", argv[0],
               std::strerror(errno));
  std::_Exit(1);
}

}  // namespace

double ProductError(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& c) {
  auto ad = a.to(torch::kDouble).contiguous(), bd = b.to(torch::kDouble).contiguous();
  const int64_t m = ad.size(0), k = ad.size(1), n = bd.size(1);
  const double *pa = ad.data_ptr<double>(), *pb = bd.data_ptr<double>();
  std::vector<double> exact(m * n, 0.0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) {
      const double aip = pa[i * k + p];
      for (int64_t j = 0; j < n; ++j) exact[i * n + j] += aip * pb[p * n + j];
    }
  }
  auto cd = c.to(torch::kDouble).contiguous();
  const double* pc = cd.data_ptr<double>();
  double max_error = 0, max_value = 0;
  for (int64_t i = 0; i < m * n; ++i) {
    max_error = std::max(max_error, std::abs(pc[i] - exact[i]));
    max_value = std::max(max_value, std::abs(exact[i]));
  }
  return max_error / std::max(max_value, 1e-30);
}

namespace {

// The worst relative error over fp32 products with the layouts training uses.
double BlasSelfCheckError() {
  torch::NoGradGuard no_grad;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(/*seed=*/12345);
  auto a = torch::randn({96, 80}, generator), b = torch::randn({80, 112}, generator);
  auto at_ = torch::randn({80, 96}, generator), bt = torch::randn({112, 80}, generator);
  return std::max({ProductError(a, b, a.mm(b)), ProductError(at_.t(), b, at_.t().mm(b)),
                   ProductError(a, bt.t(), a.mm(bt.t()))});
}

}  // namespace

BlasInfo DetectBlas() {
  BlasInfo info;
  using Query = char* (*)();
  // Both queries exist in every OpenBLAS since 0.2.x; another BLAS has neither.
  auto corename = reinterpret_cast<Query>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  auto config = reinterpret_cast<Query>(dlsym(RTLD_DEFAULT, "openblas_get_config"));
  if (corename != nullptr) {
    info.library = BlasLibrary::kOpenBlas;
    info.name = "OpenBLAS";
    info.core = TrimRight(corename());
    info.config = config ? TrimRight(config()) : "";
    return info;
  }
  if (at::hasMKL()) {
    // PyTorch's wheels link MKL statically and report its version in the build summary.
    const std::string mkl = SummaryValue(at::show_config(), "Math Kernel Library Version ");
    info.library = BlasLibrary::kMkl;
    info.name = "MKL " + mkl.substr(0, mkl.find(' '));
    info.core = "own dispatch";
    return info;
  }
  info.name = "unknown (neither OpenBLAS nor MKL)";
  return info;
}

std::string AtenCpuCapability() {
  return SummaryValue(at::show_config(), "CPU capability usage: ");
}

void SelectBlasKernels(char** argv) {
  if (std::getenv(kChosenCoreEnv) != nullptr) return;  // already re-executed once
  const BlasInfo blas = DetectBlas();
  if (blas.library != BlasLibrary::kOpenBlas) return;
  const auto decision = DecideBlasCore(DetectCpu(), blas.library, UserCoreType(), blas.core);
  if (decision.openblas_core.empty()) return;
  setenv("OPENBLAS_CORETYPE", decision.openblas_core.c_str(), 1);
  setenv(kChosenCoreEnv, decision.openblas_core.c_str(), 1);
  Reexecute(argv);
}

absl::Status VerifyBlasOrFallBack(char** argv) {
  const double error = BlasSelfCheckError();
  if (error < 1e-4) return absl::OkStatus();
  const BlasInfo blas = DetectBlas();
  const char* chosen = std::getenv(kChosenCoreEnv);
  if (blas.library == BlasLibrary::kOpenBlas && chosen != nullptr && UserCoreType() == nullptr) {
    const std::string fallback = FallbackOpenBlasCore(DetectCpu(), blas.core);
    if (!fallback.empty()) {
      std::fprintf(stderr,
                   "warning: OpenBLAS's %s kernels computed wrong fp32 products here (relative "
                   "error %.2g); falling back to %s\n",
                   blas.core.c_str(), error, fallback.c_str());
      setenv("OPENBLAS_CORETYPE", fallback.c_str(), 1);
      setenv(kChosenCoreEnv, fallback.c_str(), 1);
      setenv(kFailedCoreEnv, blas.core.c_str(), 1);
      Reexecute(argv);
    }
  }
  return absl::InternalError(absl::StrFormat(
      "the BLAS library (%s, core %s) computes wrong fp32 matrix products on this CPU "
      "(relative error %.2g against a double-precision loop, at most 1e-4 expected); %s",
      blas.name, blas.core, error,
      blas.library == BlasLibrary::kOpenBlas
          ? "set OPENBLAS_CORETYPE to an older core (Haswell, or Prescott) and run again"
          : "use another LibTorch build (tools/setup.sh installs PyTorch's wheel)"));
}

double ProbeMatmulGflops(torch::ScalarType dtype, int64_t n, double budget_seconds,
                         torch::Device device) {
  torch::NoGradGuard no_grad;
  // Its own generator: the global one seeds the model, identically on every rank.
  auto generator = at::make_generator<at::CPUGeneratorImpl>(/*seed=*/n);
  auto a = torch::randn({n, n}, generator).to(device, dtype);
  auto b = torch::randn({n, n}, generator).to(device, dtype);
  auto c = torch::empty({n, n}, a.options());
  // A product on an accelerator is only queued by mm_out: wait for it.
  auto finish = [&] {
    if (!device.is_cpu()) at::accelerator::synchronizeDevice(device.index());
  };
  using Clock = std::chrono::steady_clock;
  torch::mm_out(c, a, b);  // first-touch and kernel selection
  finish();
  double best = 1e30, spent = 0;
  for (int i = 0; i < 2 || spent < budget_seconds; ++i) {
    const auto start = Clock::now();
    torch::mm_out(c, a, b);
    finish();
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    best = std::min(best, seconds);
    spent += seconds;
    if (i >= 1000) break;
  }
  return 2.0 * n * n * n / best / 1e9;
}

std::vector<std::string> HostWarnings(const HostReport& r, bool bf16_requested) {
  std::vector<std::string> warnings;
  if (bf16_requested && r.bf16_gflops > 0 && r.bf16_gflops < r.fp32_gflops) {
    warnings.push_back(absl::StrFormat(
        "runtime.precision is BF16, but bf16 products run at %.1f GFLOP/s here against %.1f "
        "for fp32 (%.2gx)%s: this run's products will be slower than in fp32; set "
        "runtime.precision: FP32 for speed on this CPU",
        r.bf16_gflops, r.fp32_gflops, r.bf16_gflops / r.fp32_gflops,
        r.cpu.NativeBf16() ? "" : " (the CPU has no AVX512_BF16 or AMX: bf16 is emulated)"));
  }
  if (r.fp32_peak_gflops > 0 && r.fp32_gflops > 0 && r.fp32_gflops < 0.3 * r.fp32_peak_gflops) {
    warnings.push_back(absl::StrFormat(
        "fp32 products reach %.1f GFLOP/s, %.0f%% of this CPU's estimated peak (%.0f GFLOP/s "
        "on %d thread%s): the BLAS kernels (%s, %s) may not suit this CPU (%s), or other work "
        "shares the cores",
        r.fp32_gflops, 100 * r.fp32_gflops / r.fp32_peak_gflops, r.fp32_peak_gflops, r.threads,
        r.threads == 1 ? "" : "s", r.blas.name, r.blas.core, r.cpu.FlagList()));
  }
  if (r.threads * r.ranks_on_node > r.usable_cores) {
    warnings.push_back(absl::StrFormat(
        "%d rank%s x %d threads on %d usable cores: oversubscribed, threads will time-share "
        "cores (set runtime.num_threads)",
        r.ranks_on_node, r.ranks_on_node == 1 ? "" : "s", r.threads, r.usable_cores));
  }
  return warnings;
}

HostReport DescribeHost(bool probe, bool bf16_requested, int ranks_on_node) {
  HostReport r;
  r.cpu = DetectCpu();
  r.cpu_mhz = CpuMhz();
  r.blas = DetectBlas();
  r.blas_choice = DecideBlasCore(r.cpu, r.blas.library, UserCoreType(), r.blas.core).reason;
  if (const char* chosen = std::getenv(kChosenCoreEnv); chosen != nullptr) {
    r.blas_choice = absl::StrCat("OPENBLAS_CORETYPE=", chosen, " chosen from cpuid");
    if (const char* failed = std::getenv(kFailedCoreEnv); failed != nullptr) {
      absl::StrAppend(&r.blas_choice, " after ", failed, " failed the self-check");
    }
  }
  r.torch_version = TORCH_VERSION;
  r.aten_capability = AtenCpuCapability();
  r.onednn = at::hasMKLDNN();
  r.threads = torch::get_num_threads();
  r.usable_cores = UsableCores();
  r.ranks_on_node = ranks_on_node;
  if (r.cpu_mhz > 0) r.fp32_peak_gflops = r.threads * r.cpu.Fp32FlopsPerCycle() * r.cpu_mhz / 1e3;
  if (probe) {
    r.fp32_gflops = ProbeMatmulGflops(torch::kFloat, 256, 0.05);
    r.bf16_gflops = ProbeMatmulGflops(torch::kBFloat16, 256, 0.05);
  }
  r.warnings = HostWarnings(r, bf16_requested);
  return r;
}

std::vector<std::string> HostReport::Lines() const {
  std::vector<std::string> lines;
  lines.push_back(absl::StrFormat("host: %s (%s family %d model %d, %.0f MHz) | %s", cpu.model_name,
                                  cpu.vendor, cpu.family, cpu.model, cpu_mhz, cpu.FlagList()));
  lines.push_back(absl::StrFormat(
      "host: torch %s, ATen %s, oneDNN %s | BLAS %s, core %s (%s) | %d thread%s x %d rank%s "
      "on %d usable cores",
      torch_version, aten_capability, onednn ? "yes" : "no", blas.name, blas.core, blas_choice,
      threads, threads == 1 ? "" : "s", ranks_on_node, ranks_on_node == 1 ? "" : "s",
      usable_cores));
  if (fp32_gflops > 0) {
    lines.push_back(absl::StrFormat(
        "host: 256^3 products: fp32 %.1f GFLOP/s%s, bf16 %.1f GFLOP/s (%.2gx fp32)", fp32_gflops,
        fp32_peak_gflops > 0
            ? absl::StrFormat(" (%.0f%% of an estimated %.0f peak)", 100 * fp32_gflops / fp32_peak_gflops,
                              fp32_peak_gflops)
            : "",
        bf16_gflops, bf16_gflops / fp32_gflops));
  }
  for (const auto& warning : warnings) lines.push_back("warning: " + warning);
  return lines;
}

JsonObject HostReport::Json() const {
  JsonObject o;
  o.Add("type", std::string("host"))
      .Add("cpu_model", cpu.model_name)
      .Add("cpu_vendor", cpu.vendor)
      .Add("cpu_family", static_cast<int64_t>(cpu.family))
      .Add("cpu_model_number", static_cast<int64_t>(cpu.model))
      .Add("cpu_mhz", cpu_mhz)
      .Add("cpu_flags", cpu.FlagList())
      .Add("torch_version", torch_version)
      .Add("aten_capability", aten_capability)
      .AddRaw("onednn", onednn ? "true" : "false")
      .Add("blas", blas.name)
      .Add("blas_core", blas.core)
      .Add("blas_config", blas.config)
      .Add("blas_choice", blas_choice)
      .Add("threads", static_cast<int64_t>(threads))
      .Add("ranks_on_node", static_cast<int64_t>(ranks_on_node))
      .Add("usable_cores", static_cast<int64_t>(usable_cores))
      .Add("fp32_gflops", fp32_gflops)
      .Add("bf16_gflops", bf16_gflops)
      .Add("fp32_peak_gflops_estimate", fp32_peak_gflops);
  o.Add("warnings", warnings);
  return o;
}

}  // namespace rmoe
