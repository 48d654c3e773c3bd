// fuzz_multipart: POST /v1/files, the multipart/form-data upload. The input is
//   Content-Type value\n
//   body
// handled by the Router as the server would. When the upload is accepted, the stored file
// must read back (GET /v1/files/{id}/content) exactly as the "file" part that
// parse_multipart found, and be listed and deletable.
#include <cstddef>
#include <cstdint>
#include <string>

#include "coordinator_harness.h"

using namespace unshackle;
using namespace unshackle::coord;
using nlohmann::json;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t line_end = input.find('\n');
  HttpRequest upload{"POST", "/v1/files", "", input.substr(0, line_end),
                     line_end == std::string::npos ? std::string() : input.substr(line_end + 1)};

  fuzz::Coordinator& c = fuzz::Coordinator::get();
  BatchStore batches(c.scheduler, BatchOptions{});
  Router router(c.scheduler, c.registry, c.metrics, batches, RouterOptions{});
  const Reply reply = router.handle(upload);
  fuzz::check_reply(reply);
  if (reply.response.status != 200) return 0;

  const auto parts = parse_multipart(upload.content_type, upload.body);  // accepted above, so it parses
  FUZZ_CHECK(parts.count("file") && parts.count("purpose"), "an upload without file or purpose was accepted");
  const json file = json::parse(reply.response.body);
  FUZZ_CHECK(file.value("bytes", size_t{0}) == parts.at("file").content.size(), "bytes {} for a part of {}", file.dump(),
             parts.at("file").content.size());
  const std::string id = file.at("id").get<std::string>();
  const Reply content = router.handle({"GET", "/v1/files/" + id + "/content", "", "", ""});
  fuzz::check_reply(content);
  FUZZ_CHECK(content.response.status == 200 && content.response.body == parts.at("file").content,
             "the stored file does not read back as uploaded");
  const Reply list = router.handle({"GET", "/v1/files", "", "", ""});
  fuzz::check_reply(list);
  FUZZ_CHECK(json::parse(list.response.body).at("data").size() == 1, "listed: {}", list.response.body);
  const Reply deleted = router.handle({"DELETE", "/v1/files/" + id, "", "", ""});
  fuzz::check_reply(deleted);
  FUZZ_CHECK(deleted.response.status == 200, "delete: {}", deleted.response.body);
  return 0;
}
