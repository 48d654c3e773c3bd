// fuzz_routes: the JSON bodies of every route, straight into Router::handle (no HTTP framing,
// so mutations reach the body parsers instead of breaking a Content-Length). The input is
//   METHOD TARGET\n
//   body
// Each input starts from a store holding one uploaded batch file and one batch made from
// it; "file-0" and "batch-0" in the target or body stand for their ids (which are random),
// so the file, batch and cancel routes reach real objects.
#include <cstddef>
#include <cstdint>
#include <string>

#include "coordinator_harness.h"

using namespace unshackle;
using namespace unshackle::coord;
using nlohmann::json;

namespace {

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t line_end = input.find('\n');
  const std::string line = input.substr(0, line_end);
  const size_t space = line.find(' ');
  if (space == std::string::npos) return 0;

  fuzz::Coordinator& c = fuzz::Coordinator::get();
  BatchStore batches(c.scheduler, BatchOptions{});
  Router router(c.scheduler, c.registry, c.metrics, batches, RouterOptions{});
  const json file = batches.add_file(
      "in.jsonl", "batch", R"({"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":"hi"}})" "\n");
  const json batch = batches.create_batch(
      json{{"input_file_id", file["id"]}, {"endpoint", "/v1/completions"}, {"completion_window", "24h"}});

  HttpRequest request;
  request.method = line.substr(0, space);
  request.target = line.substr(space + 1);
  request.content_type = "application/json";
  request.body = line_end == std::string::npos ? std::string() : input.substr(line_end + 1);
  for (std::string* s : {&request.target, &request.body}) {
    replace_all(*s, "file-0", file["id"].get<std::string>());
    replace_all(*s, "batch-0", batch["id"].get<std::string>());
  }
  fuzz::check_reply(router.handle(request));
  return 0;
}
