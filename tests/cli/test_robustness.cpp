// Robustness of the whole program rather than of one loader: a fit killed at any moment leaves no
// half-written model, and bad command-line values are refused before anything is written.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <regex>
#include <set>
#include <thread>

#include "patchcore/core/file.h"
#include "patchcore/io/dataset.h"
#include "patchcore/patchcore.h"
#include "support.h"

extern char** environ;

namespace fs = std::filesystem;
using namespace patchcore;

namespace {

// The CLI as a child process, its stdout and stderr going to `log`. Returns the pid.
pid_t spawn_cli(const std::vector<std::string>& args, const std::string& log) {
  std::vector<std::string> argv_storage{test::cli(), "--threads", "2"};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  pid_t pid = -1;
  const int error = posix_spawn(&pid, test::cli().c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) throw std::runtime_error("cannot start " + test::cli() + ": " + std::strerror(error));
  return pid;
}

int wait_for(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

// An MVTec-layout folder of links to a few real tire images.
// Every file of a model directory by name, so two states of the directory can be compared byte for byte.
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& entry : fs::directory_iterator(dir))
    files[entry.path().filename().string()] = read_file(entry.path().string());
  return files;
}

}  // namespace

TEST(Robustness, FitKilledAtAnyMomentLeavesTheOldModelOrTheNewOneWhole) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(tire, "data/tire");
  const std::string data = test::linked_data_set(tire, {"train/good/000.png", "train/good/001.png"});
  const fs::path work = test::temp_dir();
  const fs::path model = work / "model";
  const std::string log = test::temp_dir() + "/fit.log";
  auto fit_args = [&](const fs::path& out, int seed) {
    return std::vector<std::string>{
        "fit",       "--data", data,     "--weights",         weights, "--out", out.string(), "--sampler", "random",
        "--coreset", "0.05",   "--seed", std::to_string(seed)};
  };
  // Bank rows of a complete model: int(2 images · 784 patches · 0.05).
  const int64_t bank_rows = 78;

  // A complete fit gives the previous model and the length of a whole run, over which the kills are spread.
  const auto start = std::chrono::steady_clock::now();
  const int first = wait_for(spawn_cli(fit_args(model, 0), log));
  const double run_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(WIFEXITED(first) && WEXITSTATUS(first) == 0) << read_file(log);
  auto previous = snapshot(model);

  std::mt19937 rng(20240607);
  std::uniform_real_distribution<double> delay(0.0, 1.1 * run_seconds);
  const std::regex leftover_name(R"((model|fresh\d)\.tmp-(\d+)-[0-9a-f]+)");
  std::set<pid_t> killed;  // runs that the kill stopped
  for (int run = 0; run < 10; ++run) {
    // The first runs write to a path that does not exist yet, the others replace `model`.
    const fs::path out = run < 3 ? work / ("fresh" + std::to_string(run)) : model;
    const double seconds = delay(rng);
    const pid_t pid = spawn_cli(fit_args(out, run + 1), log);
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    ::kill(pid, SIGKILL);
    const int status = wait_for(pid);
    const bool was_killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
    if (was_killed) killed.insert(pid);
    SCOPED_TRACE("run " + std::to_string(run) + ", killed after " + std::to_string(seconds) + " s" +
                 (was_killed ? "" : " (had finished)"));
    if (!was_killed) {
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file(log);
    }

    if (fs::exists(out)) {
      const auto now = snapshot(out);
      if (out != model || now != previous) {
        // Not the old model, so it must be the new one, whole.
        std::unique_ptr<PatchCore> loaded;
        ASSERT_NO_THROW(loaded = PatchCore::load_from_path(out.string(), "cpu", 1)) << out;
        EXPECT_EQ(loaded->memory_bank_size(), bank_rows);
        if (out == model) previous = now;
      }
    } else {
      EXPECT_NE(out, model) << "the previous model vanished";
      EXPECT_TRUE(was_killed);
    }
    // What a kill leaves behind is a temporary folder named after the output and the killed process. The
    // folders of earlier killed runs stay, so a leftover is checked against every run killed so far.
    for (const auto& entry : fs::directory_iterator(work)) {
      const std::string name = entry.path().filename().string();
      if (name == "model" || (name.rfind("fresh", 0) == 0 && name.size() == 6)) continue;
      std::smatch m;
      ASSERT_TRUE(std::regex_match(name, m, leftover_name)) << "unexpected file " << name;
      EXPECT_EQ(killed.count(static_cast<pid_t>(std::stol(m[2].str()))), 1u) << name << " left by a run that finished";
    }
  }
  EXPECT_FALSE(killed.empty()) << "every run finished before its kill, so nothing was tested";

  // Leftovers of killed runs do not stop a later fit from replacing the model.
  const int last = wait_for(spawn_cli(fit_args(model, 99), log));
  ASSERT_TRUE(WIFEXITED(last) && WEXITSTATUS(last) == 0) << read_file(log);
  EXPECT_NE(snapshot(model), previous);
  EXPECT_EQ(PatchCore::load_from_path(model.string(), "cpu", 1)->memory_bank_size(), bank_rows);
}

TEST(Robustness, OutOfRangeFitOptionsAreRefusedBeforeAnythingIsWritten) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(tire, "data/tire");
  const std::string data = test::linked_data_set(tire, {"train/good/000.png", "train/good/001.png"});
  const fs::path work = test::temp_dir();
  const std::string out = (work / "model").string(), log = (work / "log").string();
  const std::vector<std::string> fit{"fit", "--data", data, "--weights", weights, "--out", out};
  struct Case {
    std::vector<std::string> args;
    std::string expected;
  } cases[] = {
      {{"--coreset", "-0.2"}, "--coreset"},
      {{"--sampler", "random", "--coreset", "1"}, "--coreset must be strictly between 0 and 1"},
      {{"--coreset", "nan"}, "--coreset"},
      {{"--k", "-3"}, "--k"},
      // int(2 · 784 · 0.01) = 15 rows kept, fewer than k.
      {{"--sampler", "random", "--coreset", "0.01", "--k", "16"},
       "memory bank of 15 rows is smaller than n_nearest_neighbours 16"},
      {{"--layers", "layer2,layer4"}, "layer4"},
      {{"--layers", ","}, "no layers"},
      {{"--backbone", "vgg16"}, "unknown backbone 'vgg16'"},
      {{"--backbone", "torchscript"}, weights},
      {{"--patchsize", "0"}, "--patchsize"},
      {{"--dim", "0"}, "--dim"},
      {{"--crop", "300", "--resize", "256"}, "crop"},
      {{"--batch-size", "0"}, "--batch-size"},
      {{"--nn", "approximate", "--dim", "100"}, "not divisible by 64"},
      {{"--sampler", "fastest"}, "--sampler"},
      {{"--memory-budget", "1MiB"}, "more than the memory budget of 1 MiB"},
      {{"--memory-budget", "lots"}, "--memory-budget"},
      {{"--scratch-dir", "/nonexistent/scratch"}, "--scratch-dir"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> args = fit;
    args.insert(args.end(), c.args.begin(), c.args.end());
    std::string shown;
    for (const auto& a : c.args) shown += a + " ";
    const int status = wait_for(spawn_cli(args, log));
    const std::string output = read_file(log);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0) << shown << "\n" << output;
    EXPECT_NE(output.find(c.expected), std::string::npos) << shown << "\n" << output;
    EXPECT_FALSE(fs::exists(out)) << "a failed run left a model behind: " << shown;
    // The error is one line at the end, followed at most by CLI11's pointer to --help.
    const size_t found = output.find(c.expected);
    if (found != std::string::npos) {
      const size_t eol = output.find('\n', found);
      const std::string rest = eol == std::string::npos ? "" : output.substr(eol + 1);
      EXPECT_TRUE(rest.empty() || rest == "Run with --help for more information.\n") << shown << "\n" << output;
    }
    for (const auto& entry : fs::directory_iterator(work))
      EXPECT_EQ(entry.path().filename(), "log") << "a failed run left " << entry.path() << " behind: " << shown;
  }
}
