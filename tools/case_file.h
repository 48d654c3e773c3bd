// SPEC §9 case files: read one into a StepCase, write a StepResult. Shapes are derived from
// the tensors and checked against each other; metadata strings are parsed strictly; every
// error names the tensor or field.
#pragma once

#include <string>
#include <vector>

#include "unshackle/kernels/reference_step.h"

namespace unshackle {

// Reads `path`. Tensors q [l_C,H,d], k and v [p+l_C,G,d], wq [d',H*d], wk [d',G*d] (F32,
// or BF16/F16 converted; wq/wk optional where the mode needs none). Metadata: mode, l_I,
// l_L, top_k, eps, w, rope_theta, block, lag, lag_ratio (AttentionConfig's defaults when
// absent). Validates with StepCase::validate().
StepCase read_case_file(const std::string& path);

// Writes o [l_C,H,d] F32, selected I64 [n], evicted I64 [n], and the settings as metadata.
void write_result_file(const std::string& path, const StepCase& step, const StepResult& result);

// Writes a case (used by make-case and tests). Extra I64 tensors (e.g. planted needles) may
// be added; readers ignore them.
void write_case_file(const std::string& path, const StepCase& step,
                     const std::vector<std::pair<std::string, std::vector<int64_t>>>& extra = {});

}  // namespace unshackle
