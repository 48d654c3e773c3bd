// The `unshackle` command. Exit codes: 0 ok, 2 bad input (bad arguments, a malformed or
// missing case file, an unsupported setting: the message names the field or file), 1
// anything else (I/O failure, a failed collective, an internal error).
#include <CLI/CLI.hpp>
#include <cstdio>

#include "attn_command.h"
#include "calibrate_command.h"
#if UNS_HAVE_CLIENT_COMMANDS
#include "client_commands.h"
#endif
#include "model_commands.h"
#include "unshackle/common/check.h"

int main(int argc, char** argv) {
  CLI::App app{"unshackle: long-context attention that spends compute only on the tokens that matter"};
  app.require_subcommand(1);
  unshackle::add_attn_commands(app);
  unshackle::add_model_commands(app);
  unshackle::add_calibrate_command(app);
#if UNS_HAVE_CLIENT_COMMANDS
  unshackle::add_client_commands(app);
#endif
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  } catch (const unshackle::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    switch (e.kind()) {
      case unshackle::ErrorKind::kInvalidArgument:
      case unshackle::ErrorKind::kNotFound:
      case unshackle::ErrorKind::kUnsupported: return 2;
      default: return 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
