// The MPI world of a multi-rank test binary (see mpi_test_main.cc), as the Communicator
// interface that the code under test takes.
#pragma once

#include <memory>

#include "distributed/mpi_communicator.h"

namespace rmoe::testing {

// Non-owning: the world lives as long as the process's MpiRuntime.
inline std::shared_ptr<distributed::Communicator> MpiWorld() {
  return std::shared_ptr<distributed::Communicator>(&distributed::MpiRuntime::Get().World(),
                                                    [](distributed::Communicator*) {});
}

}  // namespace rmoe::testing
