// `unshackle generate` and `unshackle make-model`: text (or token ids) through a Hugging Face
// checkpoint with the attention of any mode, and small random checkpoints to feed it.
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

#include "unshackle/model/generate.h"
#include "unshackle/model/make_model.h"

namespace unshackle {

struct GenerateCommandOptions {
  std::string model_dir;
  std::string prompt, prompt_file, prompt_ids;  // exactly one; prompt_ids: "1,2,3"
  bool no_special = false;                      // encode without the BOS template
  AttentionConfig attention{.mode = AttentionMode::kFull};
  std::string compression;                      // SPEC §6 file (esa, block)
  GenerateOptions generate;
  bool ignore_eos = false;                      // do not stop at the model's eos ids
  int ranks = 1;                                // in-process ranks (run_local_ranks); under mpirun the MPI world
  std::string backend = "cpu";                  // cpu or cuda (rank r on device r % devices)
  std::string kv_dtype = "auto";                // K, V, k' storage: auto (bf16 on cuda, f32 on cpu), bf16, f32
  int64_t kv_block = 256;                       // SPEC §7 placement block
  bool json = false;                            // print a JSON object instead of the text
  std::string logits_out;                       // safetensors: prompt, tokens, prompt_logits, step_logits
};

struct GenerateCommandResult {
  std::vector<int32_t> prompt;
  GenerateResult result;
  bool root = true;  // false on MPI ranks other than 0 (they print nothing)
};

// Loads the model and tokenizer, runs every rank (identical hidden states; attention
// sharded), checks that all ranks produced the same tokens, and returns rank 0's result.
// Launched by mpirun, this process is one rank of the MPI world (--ranks is ignored).
// esa and block without a compression file are Error(kInvalidArgument) before anything loads.
GenerateCommandResult run_generate_command(const GenerateCommandOptions& options);

void add_model_commands(CLI::App& app);

}  // namespace unshackle
