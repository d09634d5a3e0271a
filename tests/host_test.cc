// The host a run computes on: CPU feature detection, the BLAS kernel decision (table-driven:
// CPU flags, library and environment in, decision out), its fallback, and the run header's
// warnings.
#include <fstream>
#include <sstream>
#include <string>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "rmoe/platform/cpu_features.h"
#include "rmoe/platform/host_report.h"

namespace rmoe {
namespace {

CpuFeatures Intel(bool avx512, bool bf16) {
  CpuFeatures cpu;
  cpu.vendor = "GenuineIntel";
  cpu.avx = cpu.avx2 = cpu.fma = true;
  cpu.avx512f = cpu.avx512bw = cpu.avx512vl = cpu.avx512dq = cpu.avx512_vnni = avx512;
  cpu.avx512_bf16 = cpu.amx_bf16 = bf16;
  return cpu;
}

CpuFeatures Amd() {
  CpuFeatures cpu;
  cpu.vendor = "AuthenticAMD";
  cpu.avx = cpu.avx2 = cpu.fma = true;
  return cpu;
}

CpuFeatures Old(bool avx) {
  CpuFeatures cpu;
  cpu.vendor = "GenuineIntel";
  cpu.avx = avx;
  return cpu;
}

struct DecisionCase {
  const char* name;
  CpuFeatures cpu;
  BlasLibrary library;
  const char* user_coretype;
  const char* loaded_core;
  const char* expected_core;    // "" = leave the library alone
  const char* reason_contains;
};

TEST(BlasCoreDecision, FollowsTheTable) {
  const DecisionCase cases[] = {
      // OpenBLAS 0.3.21 falls back to Prescott on CPUs newer than it (the trap).
      {"sapphire rapids on prescott", Intel(true, true), BlasLibrary::kOpenBlas, nullptr,
       "Prescott", "SkylakeX", "SkylakeX kernels suit it"},
      {"skylake-x recognised", Intel(true, false), BlasLibrary::kOpenBlas, nullptr, "SkylakeX", "",
       "chose SkylakeX itself"},
      {"cooperlake kept", Intel(true, true), BlasLibrary::kOpenBlas, nullptr, "Cooperlake", "",
       "chose Cooperlake itself"},
      {"case does not matter", Intel(false, false), BlasLibrary::kOpenBlas, nullptr, "haswell", "",
       "itself"},
      {"avx2 intel on prescott", Intel(false, false), BlasLibrary::kOpenBlas, nullptr, "Prescott",
       "Haswell", "Haswell"},
      {"zen recognised", Amd(), BlasLibrary::kOpenBlas, nullptr, "Zen", "", "chose Zen itself"},
      {"zen on prescott", Amd(), BlasLibrary::kOpenBlas, nullptr, "Prescott", "Zen", "Zen"},
      {"avx only", Old(true), BlasLibrary::kOpenBlas, nullptr, "Prescott", "Sandybridge",
       "Sandybridge"},
      {"sse only", Old(false), BlasLibrary::kOpenBlas, nullptr, "Prescott", "", "itself"},
      // A setting the user made always wins, even a slow one.
      {"user's prescott", Intel(true, true), BlasLibrary::kOpenBlas, "Prescott", "Prescott", "",
       "OPENBLAS_CORETYPE=Prescott set by the user"},
      {"empty variable is unset", Intel(true, false), BlasLibrary::kOpenBlas, "", "Prescott",
       "SkylakeX", "suit"},
      {"mkl", Amd(), BlasLibrary::kMkl, nullptr, "", "", "MKL dispatches"},
      {"mkl ignores openblas variable", Intel(true, true), BlasLibrary::kMkl, "Prescott", "", "",
       "MKL"},
      {"other blas", Intel(true, true), BlasLibrary::kOther, nullptr, "", "", "neither"},
  };
  for (const auto& c : cases) {
    const auto decision = DecideBlasCore(c.cpu, c.library, c.user_coretype, c.loaded_core);
    EXPECT_EQ(decision.openblas_core, c.expected_core) << c.name;
    EXPECT_NE(decision.reason.find(c.reason_contains), std::string::npos)
        << c.name << ": " << decision.reason;
  }
}

TEST(BlasCoreDecision, FallsBackToOlderCoresAndStopsAtPrescott) {
  EXPECT_EQ(FallbackOpenBlasCore(Intel(true, true), "SkylakeX"), "Haswell");
  EXPECT_EQ(FallbackOpenBlasCore(Intel(true, true), "cooperlake"), "Haswell");
  EXPECT_EQ(FallbackOpenBlasCore(Intel(false, false), "Haswell"), "Prescott");
  EXPECT_EQ(FallbackOpenBlasCore(Amd(), "Zen"), "Prescott");
  EXPECT_EQ(FallbackOpenBlasCore(Old(true), "Sandybridge"), "Prescott");
  EXPECT_EQ(FallbackOpenBlasCore(Intel(true, true), "Prescott"), "");
}

TEST(CpuFeatures, PeakAndNativeBf16FollowTheFlags) {
  EXPECT_EQ(Intel(true, true).Fp32FlopsPerCycle(), 64);
  EXPECT_EQ(Amd().Fp32FlopsPerCycle(), 32);
  EXPECT_EQ(Old(true).Fp32FlopsPerCycle(), 16);
  EXPECT_EQ(Old(false).Fp32FlopsPerCycle(), 8);
  EXPECT_TRUE(Intel(true, true).NativeBf16());
  EXPECT_FALSE(Amd().NativeBf16());
  EXPECT_EQ(Amd().FlagList(), "avx avx2 fma");
}

// What cpuid says agrees with the kernel's view of the same CPU (/proc/cpuinfo flags).
TEST(CpuFeatures, DetectionAgreesWithProcCpuinfo) {
  const CpuFeatures cpu = DetectCpu();
#if defined(__x86_64__)
  std::ifstream in("/proc/cpuinfo");
  std::string line, flags;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) == 0) {
      flags = " " + line.substr(line.find(':') + 1) + " ";
      break;
    }
  }
  ASSERT_FALSE(flags.empty());
  auto has = [&](const std::string& flag) { return flags.find(" " + flag + " ") != std::string::npos; };
  EXPECT_FALSE(cpu.vendor.empty());
  EXPECT_GT(cpu.family, 0);
  EXPECT_EQ(cpu.avx2, has("avx2"));
  EXPECT_EQ(cpu.fma, has("fma"));
  EXPECT_EQ(cpu.avx512f, has("avx512f"));
  EXPECT_EQ(cpu.avx512_bf16, has("avx512_bf16"));
  EXPECT_EQ(cpu.amx_bf16, has("amx_bf16"));
#endif
  EXPECT_FALSE(cpu.model_name.empty());
}

HostReport Measured(double fp32, double bf16, double peak) {
  HostReport r;
  r.cpu = Amd();
  r.threads = 2;
  r.usable_cores = 2;
  r.fp32_gflops = fp32;
  r.bf16_gflops = bf16;
  r.fp32_peak_gflops = peak;
  return r;
}

TEST(HostWarnings, Bf16SlowerThanFp32WarnsOnlyWhenBf16WasChosen) {
  const auto slow_bf16 = Measured(140, 1.2, 157);
  const auto warnings = HostWarnings(slow_bf16, /*bf16_requested=*/true);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("runtime.precision: FP32"), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[0].find("emulated"), std::string::npos) << warnings[0];
  EXPECT_TRUE(HostWarnings(slow_bf16, /*bf16_requested=*/false).empty());
  EXPECT_TRUE(HostWarnings(Measured(140, 280, 157), /*bf16_requested=*/true).empty());
}

TEST(HostWarnings, Fp32FarBelowPeakAndOversubscriptionWarn) {
  auto trapped = Measured(62, 150, 333);  // OpenBLAS's Prescott kernels on AVX-512
  trapped.blas.name = "OpenBLAS";
  trapped.blas.core = "Prescott";
  const auto warnings = HostWarnings(trapped, false);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("19% of this CPU's estimated peak"), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[0].find("Prescott"), std::string::npos);

  auto crowded = Measured(140, 1, 157);
  crowded.ranks_on_node = 2;  // 2 ranks x 2 threads on 2 cores
  const auto crowd = HostWarnings(crowded, false);
  ASSERT_EQ(crowd.size(), 1u);
  EXPECT_NE(crowd[0].find("oversubscribed"), std::string::npos);
  EXPECT_TRUE(HostWarnings(Measured(0, 0, 157), true).empty());  // not measured: no claims
}

// Every rank seeds torch's generator and builds the same model; only the main rank probes.
// The probe must not move the generator, or replicated weights differ between ranks.
TEST(HostReport, ProbingLeavesTheGlobalGeneratorAlone) {
  torch::manual_seed(99);
  const auto expected = torch::randn({4});
  torch::manual_seed(99);
  char program[] = "host_test";
  char* argv[] = {program, nullptr};
  ASSERT_TRUE(VerifyBlasOrFallBack(argv).ok());
  DescribeHost(/*probe=*/true, /*bf16_requested=*/true, 1);
  EXPECT_TRUE(torch::equal(torch::randn({4}), expected));
}

TEST(HostReport, TheSelfCheckCatchesAWrongProduct) {
  auto a = torch::randn({24, 16}), b = torch::randn({16, 20});
  auto c = a.mm(b);
  EXPECT_LT(ProductError(a, b, c), 1e-5);
  auto wrong = c.clone();
  wrong[3][7] += 1e-2 * c.abs().max().item<float>();  // one entry off by 1% of the scale
  EXPECT_GT(ProductError(a, b, wrong), 1e-4);
  EXPECT_GT(ProductError(a, b, torch::zeros_like(c)), 0.99);  // a kernel that writes nothing
}

TEST(HostReport, DescribesThisHostAndPassesTheBlasSelfCheck) {
  char program[] = "host_test";
  char* argv[] = {program, nullptr};
  EXPECT_TRUE(VerifyBlasOrFallBack(argv).ok());
  const HostReport report = DescribeHost(/*probe=*/true, /*bf16_requested=*/false, 1);
  EXPECT_GT(report.fp32_gflops, 0.1);
  EXPECT_GT(report.bf16_gflops, 0.0);
  EXPECT_EQ(report.threads, torch::get_num_threads());
  EXPECT_NE(report.blas.library, BlasLibrary::kOther) << report.blas.name;
  const auto lines = report.Lines();
  ASSERT_GE(lines.size(), 3u);
  EXPECT_EQ(lines[0].rfind("host: ", 0), 0u);
  const std::string json = report.Json().str();
  EXPECT_NE(json.find("\"type\":\"host\""), std::string::npos);
  EXPECT_NE(json.find("\"fp32_gflops\":"), std::string::npos);
  EXPECT_NE(json.find("\"warnings\":["), std::string::npos);
}

}  // namespace
}  // namespace rmoe
