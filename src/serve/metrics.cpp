#include "patchcore/serve/metrics.h"

#include <algorithm>
#include <sstream>

namespace patchcore::serve {
namespace {

// A label value in the exposition format: backslash, quote and line feed escaped.
std::string label(const std::string& value) {
  std::string escaped;
  for (char c : value) {
    if (c == '\\' || c == '"') escaped += '\\';
    escaped += c == '\n' ? std::string("\\n") : std::string(1, c);
  }
  return escaped;
}

}  // namespace

void Metrics::request(const std::string& model, int status, double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++requests_[{model, status}];
  Histogram& h = latency_[model];
  const auto bucket = std::lower_bound(kLatencyBuckets.begin(), kLatencyBuckets.end(), seconds);
  if (bucket != kLatencyBuckets.end()) ++h.buckets[static_cast<size_t>(bucket - kLatencyBuckets.begin())];
  ++h.count;
  h.sum += seconds;
}

void Metrics::scored(size_t batch_size) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++scored_[batch_size];
}

uint64_t Metrics::requests(const std::string& model, int status) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = requests_.find({model, status});
  return it == requests_.end() ? 0 : it->second;
}

std::string Metrics::prometheus_text(const Gauges& gauges) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::ostringstream out;
  out.precision(9);
  out << "# HELP patchcore_requests_total HTTP requests answered, by model (empty: no served model) and status.\n"
         "# TYPE patchcore_requests_total counter\n";
  for (const auto& [key, count] : requests_)
    out << "patchcore_requests_total{model=\"" << label(key.first) << "\",status=\"" << key.second << "\"} " << count
        << "\n";
  out << "# HELP patchcore_request_duration_seconds Time from a request's arrival to its answer, by model.\n"
         "# TYPE patchcore_request_duration_seconds histogram\n";
  for (const auto& [model, h] : latency_) {
    const std::string m = "model=\"" + label(model) + "\"";
    uint64_t cumulative = 0;
    for (size_t i = 0; i < kLatencyBuckets.size(); ++i) {
      cumulative += h.buckets[i];
      out << "patchcore_request_duration_seconds_bucket{" << m << ",le=\"" << kLatencyBuckets[i] << "\"} " << cumulative
          << "\n";
    }
    out << "patchcore_request_duration_seconds_bucket{" << m << ",le=\"+Inf\"} " << h.count << "\n"
        << "patchcore_request_duration_seconds_sum{" << m << "} " << h.sum << "\n"
        << "patchcore_request_duration_seconds_count{" << m << "} " << h.count << "\n";
  }
  out << "# HELP patchcore_images_scored_total Images scored, by the number of images in their forward pass.\n"
         "# TYPE patchcore_images_scored_total counter\n";
  for (const auto& [batch_size, count] : scored_)
    out << "patchcore_images_scored_total{batch_size=\"" << batch_size << "\"} " << count << "\n";
  out << "# HELP patchcore_queue_depth Images waiting for a worker.\n# TYPE patchcore_queue_depth gauge\n"
      << "patchcore_queue_depth " << gauges.queue_depth << "\n"
      << "# HELP patchcore_in_flight Predict requests between their arrival and their answer.\n"
         "# TYPE patchcore_in_flight gauge\n"
      << "patchcore_in_flight " << gauges.in_flight << "\n"
      << "# HELP patchcore_scoring Images in a forward pass now.\n# TYPE patchcore_scoring gauge\n"
      << "patchcore_scoring " << gauges.scoring << "\n"
      << "# HELP patchcore_models Models served.\n# TYPE patchcore_models gauge\n"
      << "patchcore_models " << gauges.models << "\n"
      << "# HELP patchcore_ready 1 when the service answers predictions.\n# TYPE patchcore_ready gauge\n"
      << "patchcore_ready " << (gauges.ready ? 1 : 0) << "\n";
  return out.str();
}

}  // namespace patchcore::serve
