// fuzz_batch_jsonl: the Batch API's input file. The input is the JSONL file: stored with
// add_file, then POST /v1/batches validates every line (BatchStore::create_batch). The
// result must be a batch that either failed with line-numbered errors or is in progress with
// one request per valid line; it must read back, list, and cancel (a failed one: 409). Each
// valid line's body then goes through parse_completion, as the batch runner does when it
// submits the line (the runner's thread is not started: it would need a worker group).
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "coordinator_harness.h"

using namespace unshackle;
using namespace unshackle::coord;
using nlohmann::json;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string content(reinterpret_cast<const char*>(data), size);
  if (content.empty()) return 0;  // add_file refuses an empty file (400); the routes fuzzer covers that
  fuzz::Coordinator& c = fuzz::Coordinator::get();
  BatchStore batches(c.scheduler, BatchOptions{});
  const json file = batches.add_file("in.jsonl", "batch", content);
  json batch;
  try {
    batch = batches.create_batch(
        json{{"input_file_id", file["id"]}, {"endpoint", "/v1/completions"}, {"completion_window", "24h"}, {"metadata", {{"k", "v"}}}});
  } catch (const ApiError& e) {
    FUZZ_CHECK(false, "create_batch threw {} for a stored batch file: {}", e.status, e.message);
  }
  // The response as the router sends it.
  fuzz::check_response(json_response(200, batch));
  const std::string status = batch.at("status").get<std::string>();
  const size_t total = batch.at("request_counts").at("total").get<size_t>();
  if (status == "failed") {
    const json& errors = batch.at("errors").at("data");
    FUZZ_CHECK(!errors.empty() && errors.size() <= 100, "failed with {} errors", errors.size());
    for (const json& e : errors) FUZZ_CHECK(e.at("message").is_string() && e.contains("line"), "error entry {}", e.dump());
  } else {
    FUZZ_CHECK(status == "in_progress" && total > 0, "status {} with {} requests", status, total);
  }
  const auto again = batches.batch(batch.at("id").get<std::string>());
  FUZZ_CHECK(again && (*again)["id"] == batch["id"], "the batch does not read back");
  FUZZ_CHECK(batches.list_batches().at("data").size() == 1, "list");
  try {
    const auto cancelled = batches.cancel_batch(batch.at("id").get<std::string>());
    FUZZ_CHECK(cancelled && status == "in_progress" && (*cancelled)["status"] == "cancelling", "cancel of a {} batch", status);
  } catch (const ApiError& e) {
    FUZZ_CHECK(e.status == 409 && status == "failed", "cancel threw {} for a {} batch", e.status, status);
  }

  // What the runner does with each line it submits.
  std::istringstream in(content);
  std::string text;
  while (std::getline(in, text)) {
    const json line = json::parse(text, nullptr, false);
    if (line.is_discarded() || !line.is_object() || !line.contains("body") || !line["body"].is_object()) continue;
    try {
      parse_completion(line["body"], AttentionConfig{});
    } catch (const ApiError& e) {
      fuzz::check_response(error_response(e));
      FUZZ_CHECK(e.status == 400, "a line body gave {}: {}", e.status, e.message);
    }
  }
  return 0;
}
