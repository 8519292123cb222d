#pragma once
// What the inference service counts, rendered in Prometheus's text exposition format (version 0.0.4) for
// GET /metrics: requests by model and status, request latency as a histogram by model, images scored by the size of
// their forward pass, and
// the gauges the caller reads at render time (queue depth, requests in flight, images being scored, models served).
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace patchcore::serve {

class Metrics {
 public:
  // Upper bounds of the latency buckets, in seconds; +Inf is implied.
  static constexpr std::array<double, 12> kLatencyBuckets{0.005, 0.01, 0.025, 0.05, 0.1,  0.25,
                                                          0.5,   1.0,  2.5,   5.0,  10.0, 30.0};

  // One answered request. `model` must be a served model's name or empty (routes without a model, unknown names),
  // so that clients cannot grow the label set.
  void request(const std::string& model, int status, double seconds);
  // One image scored in a forward pass of `batch_size` images.
  void scored(size_t batch_size);

  struct Gauges {
    size_t queue_depth = 0;  // images waiting for a worker
    size_t in_flight = 0;    // predict requests between arrival and answer
    size_t scoring = 0;      // images in a forward pass now
    size_t models = 0;
    bool ready = false;
  };
  std::string prometheus_text(const Gauges& gauges) const;

  // Requests counted for (model, status), for tests and logs.
  uint64_t requests(const std::string& model, int status) const;

 private:
  struct Histogram {
    std::array<uint64_t, kLatencyBuckets.size()> buckets{};  // non-cumulative
    uint64_t count = 0;
    double sum = 0;
  };
  mutable std::mutex mutex_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  std::map<std::string, Histogram> latency_;
  std::map<size_t, uint64_t> scored_;  // images by batch size
};

}  // namespace patchcore::serve
