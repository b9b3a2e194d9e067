// moeserve: one binary, one subcommand per job. Errors reach the user as one line on stderr and
// exit status 1 (flag errors included); --help and --version exit 0. Under mpirun only rank 0
// prints.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/cpu_features.h"
#include "core/error.h"
#include "kernels/kernels.h"

int main(int argc, char** argv) {
  CLI::App app{"moeserve: serve DeepSeek-V3/R1-architecture Mixture-of-Experts models"};
  app.require_subcommand(1);
  // The kernels' instruction set too: the best the CPU has, capped by MOESERVE_ISA.
  app.set_version_flag("--version", std::string("moeserve 0.1.0 (kernels: ") +
                                        moeserve::isa_name(moeserve::kernels::active_isa()) + ")");
  moeserve::cli::register_model_commands(app);
  moeserve::cli::register_bench_command(app);
  moeserve::cli::register_text_commands(app);
  moeserve::cli::register_serve_command(app);
  moeserve::cli::register_placement_command(app);
  moeserve::cli::register_inspect_command(app);
  moeserve::cli::register_perplexity_command(app);
  moeserve::cli::register_quantize_command(app);
  moeserve::cli::finish_subcommands(app);
  // Every rank of an mpirun launch parses the same flags and fails the same way; a failure
  // after MPI starts reaches all ranks through a collective check. Either way rank 0 alone
  // tells the user.
  const bool root = moeserve::cli::launch_rank() == 0;
  // mpirun ends the job when the first rank exits with an error; the other ranks leave a moment
  // after rank 0 so that its message is out before that.
  const auto fail = [&](const std::string& msg) {
    if (root) {
      std::fprintf(stderr, "error: %s\n", msg.c_str());
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
    return 1;
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return root ? app.exit(e) : 0;  // --help, --version
    return fail(moeserve::cli::describe_parse_error(e, app));
  } catch (const moeserve::Error& e) {
    return fail(e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());  // not a collective failure: every rank says
    return 1;
  }
  return 0;
}
