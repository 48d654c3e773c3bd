// Client subcommands of `unshackle` against a running coordinator (docs/api.md):
//   submit  a file as context plus a question: prefill progress bar, then streamed tokens
//           (--detach: submit as a job and print its id)
//   jobs    the newest jobs;  status JOB  one job;  cancel JOB
// --url (default $UNSHACKLE_URL or http://127.0.0.1:8000) and --api-key (default $UNSHACKLE_API_KEY).
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace unshackle {

void add_client_commands(CLI::App& app);

// A minimal HTTP/1.1 client (Boost.Beast) for the commands and their tests.
struct ClientResponse {
  int status = 0;
  std::string body;
};
class ServiceClient {
 public:
  // url: http://HOST:PORT (a path after it is ignored). Error(kInvalidArgument) naming --url otherwise.
  ServiceClient(const std::string& url, std::string api_key);
  ClientResponse get(const std::string& target) const;
  ClientResponse post(const std::string& target, const std::string& json_body) const;
  ClientResponse del(const std::string& target) const;
  // POST with a streamed answer: on_data gets the body bytes as they arrive.
  ClientResponse post_stream(const std::string& target, const std::string& json_body,
                             const std::function<void(std::string_view)>& on_data) const;

 private:
  ClientResponse send(const std::string& method, const std::string& target, const std::string& body,
                      const std::function<void(std::string_view)>* on_data) const;
  std::string host_, port_, api_key_;
};

}  // namespace unshackle
