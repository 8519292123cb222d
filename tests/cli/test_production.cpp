// The command line on a production line: it never deletes or overwrites a file it did not write, one bad image
// costs only itself, a model can stay loaded, and scripts get the conventions they expect.
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "patchcore/core/output_dir.h"
#include "support.h"

extern char** environ;

namespace fs = std::filesystem;
using patchcore::OutputDirectory;

namespace {

using patchcore::test::CliRun;
using patchcore::test::run_cli;
using patchcore::test::slurp;

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::stringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) lines.push_back(line);
  return lines;
}

// Every file under `dir` with its contents.
std::map<std::string, std::string> tree(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) files[fs::relative(e.path(), dir).string()] = slurp(e.path().string());
  return files;
}

// A small model fitted once for all tests of this file, on three tire images.
struct Fixture {
  std::string weights, data, model;
};

const Fixture* fixture() {
  static const Fixture* f = []() -> const Fixture* {
    const std::string weights = patchcore::test::shared("weights/resnet18-imagenet-stem-to-layer3.pth");
    const std::string tire = patchcore::test::shared("data/tire");
    if (weights.empty() || tire.empty()) return nullptr;
    auto* made = new Fixture{weights, "", ""};
    made->data = patchcore::test::linked_data_set(
        tire, {"train/good/000.png", "train/good/001.png", "train/good/002.png", "test/good/000.png",
               "test/good/001.png", "test/cut/000.png", "ground_truth/cut/000_mask.png"});
    made->model = patchcore::test::fit_with_cli(made->data, {"--sampler", "random", "--coreset", "0.1"});
    return made;
  }();
  return f;
}

#define REQUIRE_FIXTURE(f)      \
  const Fixture* f = fixture(); \
  if (!f) GTEST_SKIP() << "../shared is absent; test skipped"

}  // namespace

TEST(Production, UserFilesInsideOrBesideAnOutputSurviveEveryCommand) {
  REQUIRE_FIXTURE(f);
  const fs::path work = patchcore::test::temp_dir();
  // A user's folder, a note beside every output, and a previous output a user has added a file to.
  const fs::path user = work / "user";
  fs::create_directories(user);
  std::ofstream(user / "notes.txt") << "my notes";
  std::ofstream(work / "beside.txt") << "beside";
  const std::string images = f->data + "/test/good";
  ASSERT_EQ(run_cli({"predict", "--model", f->model, images, "--out", (work / "pred").string()}).status, 0);
  std::ofstream(work / "pred" / "mine.txt") << "mine";
  std::ofstream(work / "existing.json") << "{\"a\": 1}";
  const auto before = tree(work);

  struct Case {
    std::vector<std::string> args;
    std::string expected;
  } cases[] = {
      {{"predict", "--model", f->model, images, "--out", user.string()}, "patchcore did not write"},
      {{"predict", "--model", f->model, images, "--out", (work / "pred").string()}, "'mine.txt'"},
      {{"predict", "--model", f->model, images, "--out", images}, "lies inside the input"},
      {{"predict", "--model", f->model, images, "--out", f->data}, "contains the input"},
      {{"predict", "--model", f->model, images, "--out", (work / "beside.txt").string()}, "not a directory"},
      {{"evaluate", "--model", f->model, "--data", f->data, "--out", user.string()}, "patchcore did not write"},
      {{"evaluate", "--model", f->model, "--data", f->data, "--out", f->data + "/report"}, "lies inside the input"},
      {{"evaluate", "--model", f->model, "--data", f->data, "--json", (work / "existing.json").string()},
       "patchcore did not write it"},
      {{"fit", "--data", f->data, "--weights", f->weights, "--out", user.string()}, "patchcore did not write"},
      {{"fit", "--data", f->data, "--weights", f->weights, "--out", f->data + "/model"}, "lies inside the input"},
  };
  for (const auto& c : cases) {
    const CliRun r = run_cli(c.args);
    EXPECT_EQ(r.status, 1) << c.args[0] << " " << c.args.back() << "\n" << r.err;
    EXPECT_NE(r.err.find(c.expected), std::string::npos) << r.err;
  }
  EXPECT_EQ(tree(work), before);

  // What patchcore wrote it may write again, and nothing beside it moves.
  fs::remove(work / "pred" / "mine.txt");
  const CliRun again = run_cli({"predict", "--model", f->model, f->data + "/test/cut", "--out", (work / "pred").string()});
  ASSERT_EQ(again.status, 0) << again.err;
  EXPECT_FALSE(fs::exists(work / "pred" / "001_overlay.png"));  // the previous run's, from test/good
  EXPECT_TRUE(fs::exists(work / "pred" / "000_overlay.png"));
  EXPECT_EQ(slurp((work / "beside.txt").string()), "beside");
  EXPECT_EQ(slurp((user / "notes.txt").string()), "my notes");
  EXPECT_NO_THROW(OutputDirectory::check((work / "pred").string(), {}));
}

TEST(Production, PredictKilledAtAnyMomentLeavesOnlyItsOwnFilesAndCanRunAgain) {
  REQUIRE_FIXTURE(f);
  const fs::path work = patchcore::test::temp_dir();
  std::ofstream(work / "beside.txt") << "beside";
  // Forty images: links to the three test images under other names.
  const fs::path images = work / "images";
  fs::create_directories(images);
  const std::string sources[] = {f->data + "/test/good/000.png", f->data + "/test/good/001.png",
                                 f->data + "/test/cut/000.png"};
  for (int i = 0; i < 40; ++i) fs::create_symlink(sources[i % 3], images / ("img" + std::to_string(i) + ".png"));
  const fs::path out = work / "pred";
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> delay_ms(0, 2500);
  for (int round = 0; round < 6; ++round) {
    const std::string command =
        patchcore::test::cli() + " predict --model " + f->model + " " + images.string() + " --out " + out.string();
    std::vector<std::string> storage{"/bin/sh", "-c", "exec " + command + " > /dev/null 2>&1"};
    std::vector<char*> argv;
    for (auto& s : storage) argv.push_back(s.data());
    argv.push_back(nullptr);
    pid_t pid;
    ASSERT_EQ(posix_spawn(&pid, "/bin/sh", nullptr, nullptr, argv.data(), environ), 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms(rng)));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    SCOPED_TRACE("round " + std::to_string(round));
    EXPECT_EQ(slurp((work / "beside.txt").string()), "beside");
    // Whatever the kill left is patchcore's: a later run may use the directory.
    if (fs::exists(out)) EXPECT_NO_THROW(OutputDirectory::check(out.string(), {}));
    // Every scores.csv row written is whole: as many fields as the header.
    if (fs::exists(out / "scores.csv")) {
      const auto lines = lines_of(slurp((out / "scores.csv").string()));
      for (const auto& line : lines)
        EXPECT_EQ(std::count(line.begin(), line.end(), ','), std::count(lines[0].begin(), lines[0].end(), ','))
            << line;
    }
  }
  const CliRun finish = run_cli({"predict", "--model", f->model, images.string(), "--out", out.string()});
  ASSERT_EQ(finish.status, 0) << finish.err;
  EXPECT_EQ(lines_of(slurp((out / "scores.csv").string())).size(), 41u);
}

TEST(Production, BadImagesCostOnlyThemselvesAndTheExitStatusSaysSo) {
  REQUIRE_FIXTURE(f);
  const fs::path work = patchcore::test::temp_dir();
  const fs::path images = work / "batch";
  fs::create_directories(images);
  for (int i = 0; i < 45; ++i)
    fs::create_symlink(f->data + "/test/good/00" + std::to_string(i % 2) + ".png",
                       images / ("good" + std::to_string(i) + ".png"));
  const std::string png = slurp(f->data + "/test/good/000.png");
  std::ofstream(images / "bad_text.png") << "not an image";
  std::ofstream(images / "bad_truncated.png", std::ios::binary) << png.substr(0, png.size() / 3);
  std::ofstream(images / "bad_empty.png");
  std::string flipped = png;
  for (size_t i = 20; i < 40; ++i) flipped[i] = static_cast<char>(~flipped[i]);
  std::ofstream(images / "bad_header.png", std::ios::binary) << flipped;
  const std::string missing = (work / "missing.png").string();

  const CliRun r = run_cli({"predict", "--model", f->model, images.string(), missing, "--out", (work / "out").string()});
  EXPECT_EQ(r.status, 3) << r.err;
  const auto rows = lines_of(slurp((work / "out" / "scores.csv").string()));
  ASSERT_EQ(rows.size(), 51u);
  int scored = 0, failed = 0;
  for (size_t i = 1; i < rows.size(); ++i) {
    const bool bad = rows[i].find("bad_") != std::string::npos || rows[i].find("missing.png") != std::string::npos;
    const bool has_error = rows[i].back() != ',';
    EXPECT_EQ(bad, has_error) << rows[i];
    (has_error ? failed : scored) += 1;
  }
  EXPECT_EQ(scored, 45);
  EXPECT_EQ(failed, 5);
  // One stderr line per bad image, and stdout carries only the 45 results.
  int error_lines = 0;
  for (const auto& line : lines_of(r.err)) error_lines += line.rfind("patchcore: ", 0) == 0;
  EXPECT_EQ(error_lines, 5) << r.err;
  EXPECT_EQ(lines_of(r.out).size(), 45u);
  for (const auto& line : lines_of(r.out)) EXPECT_NE(line.find('\t'), std::string::npos) << line;
  std::ifstream summary_file(work / "out" / "summary.json");
  const auto summary = nlohmann::json::parse(summary_file);
  EXPECT_EQ(summary["scored"].get<int>(), 45);
  EXPECT_EQ(summary["failed"].get<int>(), 5);
}

TEST(Production, StdinModeAnswersEachPathWithAJsonLine) {
  REQUIRE_FIXTURE(f);
  const std::string input =
      f->data + "/test/good/000.png\n" + f->data + "/missing.png\n\n" + f->data + "/test/cut/000.png\n";
  const CliRun r = run_cli({"predict", "--model", f->model, "--stdin"}, input);
  EXPECT_EQ(r.status, 3) << r.err;
  const auto lines = lines_of(r.out);
  ASSERT_EQ(lines.size(), 3u) << r.out;
  const auto first = nlohmann::json::parse(lines[0]), second = nlohmann::json::parse(lines[1]),
             third = nlohmann::json::parse(lines[2]);
  EXPECT_EQ(first["image"], f->data + "/test/good/000.png");
  EXPECT_GT(first["score"].get<double>(), 0.0);
  EXPECT_GT(first["ms"].get<double>(), 0.0);
  EXPECT_NE(second["error"].get<std::string>().find("no such file"), std::string::npos);
  EXPECT_TRUE(third.contains("score"));
  // The same image scores the same in a batch run.
  const CliRun batch = run_cli({"predict", "--json", "--model", f->model, f->data + "/test/good/000.png"});
  ASSERT_EQ(batch.status, 0) << batch.err;
  EXPECT_EQ(nlohmann::json::parse(lines_of(batch.out).at(0))["score"], first["score"]);
  EXPECT_EQ(run_cli({"predict", "--model", f->model, "--stdin"}, f->data + "/test/good/001.png\n").status, 0);
}

TEST(Production, ConventionsScriptsExpect) {
  REQUIRE_FIXTURE(f);
  const CliRun bare = run_cli({});
  EXPECT_EQ(bare.status, 2);
  EXPECT_NE(bare.err.find("Subcommands:"), std::string::npos) << bare.err;
  EXPECT_NE(bare.err.find("Exit status"), std::string::npos);
  EXPECT_EQ(run_cli({"predict", "--bogus"}).status, 2);
  EXPECT_EQ(run_cli({"frobnicate"}).status, 2);
  EXPECT_EQ(run_cli({"predict", "--model", f->model}).status, 2);  // neither images nor --stdin
  const CliRun version = run_cli({"--version"});
  EXPECT_EQ(version.status, 0);
  EXPECT_EQ(version.out.rfind("patchcore ", 0), 0u) << version.out;
  EXPECT_EQ(run_cli({"evaluate", "--model", f->model, "--data", "/nonexistent"}).status, 2);
  const CliRun error = run_cli({"predict", "--model", f->data, f->data + "/test/good"});
  EXPECT_EQ(error.status, 1);
  EXPECT_EQ(lines_of(error.err).back().rfind("patchcore: error: ", 0), 0u) << error.err;
  // Global options are taken after the subcommand too, and logs stay off stdout.
  const CliRun threads = run_cli({"predict", "--threads", "1", "--model", f->model, f->data + "/test/good/000.png"});
  ASSERT_EQ(threads.status, 0) << threads.err;
  EXPECT_EQ(lines_of(threads.out).size(), 1u) << threads.out;
  EXPECT_NE(threads.err.find("[info]"), std::string::npos);
  // The model says where it came from.
  std::ifstream params(f->model + "/patchcore_params.json");
  const auto provenance = nlohmann::json::parse(params)["provenance"];
  EXPECT_EQ(provenance["tool"].get<std::string>().rfind("patchcore ", 0), 0u);
  EXPECT_EQ(provenance["train_images"].get<int>(), 3);
  EXPECT_EQ(provenance["data"].get<std::string>(), fs::absolute(f->data).lexically_normal().string());
  EXPECT_FALSE(provenance["created"].get<std::string>().empty());
}
