// `unshackle attn` and `unshackle make-case`: one attention step from a SPEC §9 case file,
// and seeded random case files to feed it.
#pragma once

#include <CLI/CLI.hpp>

#include "unshackle/kernels/reference_step.h"

namespace unshackle {

struct AttnOptions {
  std::string input, output;
  int ranks = 1;           // in-process ranks; under mpirun the MPI world is used instead
  int64_t kv_block = 64;   // placement block of the distributed path
};

// One rank: the reference (the oracle). P > 1 or under mpirun: the distributed layer step.
// Returns the result on every rank; `writes` is true on the rank that writes the output.
StepResult run_attention_case(const StepCase& step, const AttnOptions& options, bool& writes);

void add_attn_commands(CLI::App& app);

}  // namespace unshackle
