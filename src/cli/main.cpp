// moeserve: one binary, one subcommand per job. Errors reach the user as one line on stderr and
// exit status 1; --help works everywhere.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "cli/commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"moeserve: serve DeepSeek-V3/R1-architecture Mixture-of-Experts models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moeserve 0.1.0");
  moeserve::cli::register_model_commands(app);
  moeserve::cli::register_bench_command(app);
  moeserve::cli::register_text_commands(app);
  moeserve::cli::register_serve_command(app);
  moeserve::cli::register_placement_command(app);
  moeserve::cli::register_inspect_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moeserve::Error& e) {
    // Under mpirun every failure reaches all ranks through a collective check, so rank 0 alone
    // tells the user.
    const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
    if (!rank || std::string(rank) == "0") std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
