// One SPEC §9 case through the distributed layer step on this rank: the case's prefix is
// loaded as the context (K, V of tokens [0, p)), then the chunk runs one forward step.
// Every rank of `comm` calls it with the same case and gets the same result.
#pragma once

#include "unshackle/cluster/communicator.h"
#include "unshackle/kernels/backend.h"
#include "unshackle/kernels/reference_step.h"

namespace unshackle {

// kv_block: the SPEC §7 placement block (small blocks spread a small case over all ranks).
StepResult run_case_distributed(const StepCase& step, Backend& backend, Communicator& comm, int64_t kv_block = 64);

}  // namespace unshackle
