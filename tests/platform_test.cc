// The platform under the framework: PyTorch's LibTorch and the system's Protobuf in one
// process, and a CUDA-enabled LibTorch that runs on a machine without a GPU.
//
// PyTorch's libtorch_cpu.so carries its own Protobuf (for ONNX, in the onnx_torch
// namespace) with its symbols hidden, except a few that name ONNX types or are header
// templates. These tests check that what our code calls resolves to the system's
// libprotobuf, not to torch's copy, and that Protobuf's global state (the generated pool,
// text and binary formats) works while torch runs.
#include <dlfcn.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <string>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/stubs/common.h>
#include <google/protobuf/text_format.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "proto/job.pb.h"

namespace rmoe {
namespace {

// The shared object that holds the code at `address`.
std::string LibraryOf(const void* address) {
  Dl_info info{};
  if (dladdr(address, &info) == 0 || info.dli_fname == nullptr) return "(unknown)";
  return info.dli_fname;
}

TEST(Platform, ProtobufCallsResolveToTheSystemLibraryWhileTorchIsLoaded) {
  // Torch is loaded and has run (its static initialisers and its Protobuf copy with it).
  auto product = torch::mm(torch::ones({4, 4}), torch::ones({4, 4}));
  ASSERT_EQ(product.sum().item<float>(), 64.0f);
  const std::string torch_library = LibraryOf(reinterpret_cast<const void*>(&at::_ops::mm::call));
  EXPECT_NE(torch_library.find("libtorch_cpu"), std::string::npos) << torch_library;

  for (const auto& [name, address] :
       {std::pair{"TextFormat::ParseFromString",
                  reinterpret_cast<const void*>(&google::protobuf::TextFormat::ParseFromString)},
        std::pair{"DescriptorPool::generated_pool",
                  reinterpret_cast<const void*>(&google::protobuf::DescriptorPool::generated_pool)}}) {
    const std::string library = LibraryOf(address);
    EXPECT_NE(library.find("libprotobuf"), std::string::npos) << name << " resolved to " << library;
    EXPECT_EQ(library.find("torch"), std::string::npos) << name << " resolved to " << library;
  }
  // The headers we compiled against are the library we run with.
  EXPECT_NO_THROW(google::protobuf::internal::VerifyVersion(
      GOOGLE_PROTOBUF_VERSION, GOOGLE_PROTOBUF_MIN_LIBRARY_VERSION, __FILE__));
}

TEST(Platform, TheStandardLibraryIsTheSystemsNotTheCopyInsideLibTorch) {
  // libtorch.so exports std::filesystem functions from its build toolchain; ours must win.
  const auto remove_all =
      static_cast<std::uintmax_t (*)(const std::filesystem::path&)>(&std::filesystem::remove_all);
  const std::string library = LibraryOf(reinterpret_cast<const void*>(remove_all));
  EXPECT_NE(library.find("libstdc++"), std::string::npos) << "remove_all from " << library;
  const auto dir = std::filesystem::temp_directory_path() / ("rmoe_platform_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir / "a" / "b");
  std::ofstream(dir / "a" / "b" / "file") << "x";
  EXPECT_EQ(std::filesystem::remove_all(dir), 4u);
}

TEST(Platform, JobSpecsRoundTripThroughTextBinaryAndReflectionWithTorch) {
  auto warm = torch::randn({64, 64}).matmul(torch::randn({64, 64}));  // torch active
  const auto* descriptor =
      google::protobuf::DescriptorPool::generated_pool()->FindMessageTypeByName("rmoe.JobSpec");
  ASSERT_NE(descriptor, nullptr);
  EXPECT_NE(descriptor->FindFieldByName("model"), nullptr);

  JobSpec spec;
  ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(
      "model { d_model: 96 moe { num_experts: 6 top_k: 2 } router { kind: RECURRENT } } "
      "optimizer { lr: 0.003 }",
      &spec));
  JobSpec copy;
  ASSERT_TRUE(copy.ParseFromString(spec.SerializeAsString()));
  EXPECT_EQ(copy.model().d_model(), 96);
  EXPECT_EQ(copy.model().moe().num_experts(), 6);
  EXPECT_EQ(copy.model().router().kind(), RouterSpec::RECURRENT);
  EXPECT_FLOAT_EQ(copy.optimizer().lr(), 0.003f);
  std::string text;
  ASSERT_TRUE(google::protobuf::TextFormat::PrintToString(copy, &text));
  EXPECT_NE(text.find("num_experts: 6"), std::string::npos) << text;
  EXPECT_TRUE(torch::isfinite(warm).all().item<bool>());
}

TEST(Platform, ACudaBuildOfLibTorchRunsWhereCudaIsUnavailable) {
  // Querying CUDA never throws; without a device the answer is no, and tensors stay on the
  // CPU. (On a GPU machine the device count is simply positive.)
  const bool available = torch::cuda::is_available();
  EXPECT_EQ(available, torch::cuda::device_count() > 0);
  if (!available) {
    EXPECT_THROW(torch::ones({2}, torch::Device(torch::kCUDA)), c10::Error);
  }
  EXPECT_EQ(torch::ones({2}).device().type(), torch::kCPU);
}

}  // namespace
}  // namespace rmoe
