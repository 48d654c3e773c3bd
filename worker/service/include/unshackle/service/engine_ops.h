// The calls the coordinator makes on a worker group, as JSON, and their execution on an
// Engine. Every rank executes the same call (rank 0 relays it); only rank 0's result is sent.
//
//   op              args                                          result
//   info            {}                                            ModelInfo
//   tokenize        {"text","continuation"?}                      {"tokens":[..]}
//                     continuation: the text continues a context, so no BOS is put before it
//   detokenize      {"tokens":[..]}                               {"text"}
//   create_context  {"context","attention":{..},"reserve"}        {}
//   fork_context    {"source","context","reserve"}                {}
//   prefill         {"context","tokens":[..]}                     {"stats":{..}}
//   decode          {"context","sampling":{temperature,top_p,     {"token","eos","text","stats":{..}}
//                     top_k,seed}}
//   release         {"context"}                                   {}
//   health          {}                                            {}
//
// decode's "text" is the new text of the tokens generated since the context was created or
// forked: bytes of a character whose tokens have not all arrived are held back.
#pragma once

#include <nlohmann/json.hpp>

#include <map>
#include <string>
#include <vector>

#include "unshackle/worker/engine.h"

namespace unshackle::wire {

nlohmann::json model_info_to_json(const ModelInfo& info);
ModelInfo model_info_from_json(const nlohmann::json& object);  // throws Error(kComm) when malformed
nlohmann::json stats_to_json(const StepStats& stats);
StepStats stats_from_json(const nlohmann::json& object);
nlohmann::json sampling_to_json(const SamplingParams& sampling);

// Executes calls on one rank's engine, keeping the per-context generated text for decode.
class EngineOps {
 public:
  explicit EngineOps(Engine& engine) : engine_(engine) {}
  // Throws what the engine throws, or Error(kInvalidArgument) for a malformed call.
  nlohmann::json execute(const std::string& op, const nlohmann::json& args);

 private:
  struct Generated {
    std::vector<int32_t> tokens;
    size_t emitted = 0;  // bytes of the detokenized text already returned
  };
  Engine& engine_;
  std::map<ContextId, Generated> generated_;
};

// The longest prefix of `text` that does not end inside an incomplete UTF-8 sequence or in a
// U+FFFD that a detokenizer writes for one.
size_t complete_utf8_prefix(const std::string& text);

}  // namespace unshackle::wire
