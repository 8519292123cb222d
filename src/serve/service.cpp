// The one file that includes cpp-httplib: its header is large, and only the HTTP layer needs it.
#include "patchcore/serve/service.h"

#include <ATen/ATen.h>
#include <httplib.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <nlohmann/json.hpp>
#include <thread>

#include "patchcore/evaluation/report.h"
#include "patchcore/io/npy.h"
#include "patchcore/serve/metrics.h"
#include "patchcore/serve/model_registry.h"

namespace patchcore::serve {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

void answer(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump() + "\n", "application/json");
}

void error(httplib::Response& res, int status, const std::string& message) {
  answer(res, status, {{"error", message}});
}

// 503: the client may try again after a second (or another replica may answer).
void unavailable(httplib::Response& res, const std::string& message) {
  res.set_header("Retry-After", "1");
  error(res, 503, message);
}

bool flag(const httplib::Request& req, const std::string& key) {
  if (!req.has_param(key.c_str())) return false;
  const std::string v = req.get_param_value(key.c_str());
  return v.empty() || v == "1" || v == "true";
}

json model_json(const ServedModel& m) {
  const PatchCoreParams& p = m.model.params();
  const PatchCore& first = *m.model.members().front();
  json j = {{"name", m.name},
            {"dir", m.dir},
            {"loaded_at", m.loaded_at},
            {"members", m.model.members().size()},
            {"backbone", first.backbone().architecture()},
            {"layers", p.layers_to_extract_from},
            {"embed_dimension", p.target_embed_dimension},
            {"patchsize", p.patchsize},
            {"k", p.anomaly_scorer_num_nn},
            {"nn", first.anomaly_scorer().nn_method().kind()},
            {"memory_bank_size", first.memory_bank_size()},
            {"view", view_name(p.transform.view)},
            {"resize", p.transform.resize},
            {"crop", p.transform.crop},
            {"trained_on", first.provenance().data},
            {"created", first.provenance().created}};
  j.update(json::parse(thresholds_json(m.calibration())));
  return j;
}

// Everything the handlers share.
class Service {
 public:
  explicit Service(const ServiceOptions& options)
      : options_(options), registry_(options.models, options.threads), queue_(options.queue) {}

  void route(httplib::Server& server) {
    server.Get("/healthz",
               [](const httplib::Request&, httplib::Response& res) { res.set_content("ok\n", "text/plain"); });
    server.Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
      if (ready_) return answer(res, 200, {{"ready", true}, {"models", registry_.models().size()}});
      unavailable(res, stopping_ ? "the service is stopping" : "the models are loading");
    });
    server.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      Metrics::Gauges g;
      g.queue_depth = queue_.depth();
      g.in_flight = in_flight_;
      g.scoring = queue_.in_flight();
      g.models = registry_.models().size();
      g.ready = ready_;
      res.set_content(metrics_.prometheus_text(g), "text/plain; version=0.0.4");
    });
    server.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      json models = json::array();
      for (const auto& m : registry_.models()) models.push_back(model_json(*m));
      answer(res, 200, {{"models", models}, {"refused", registry_.refused()}});
    });
    server.Post(R"(/v1/models/([^/]+)/predict)", [this](const httplib::Request& req, httplib::Response& res) {
      const auto start = Clock::now();
      ++in_flight_;
      std::string model;
      try {
        model = predict(req, res, start);
      } catch (const std::exception& e) {
        // Only a fault of the service itself gets here: bad input is answered 4xx above.
        spdlog::error("predict {}: {}", req.path, e.what());
        error(res, 500, e.what());
      }
      --in_flight_;
      metrics_.request(model, res.status, seconds_since(start));
    });
    server.Post(R"(/v1/models/([^/]+)/reload)", [this](const httplib::Request& req, httplib::Response& res) {
      const auto start = Clock::now();
      const std::string name = req.matches[1];
      try {
        const auto m = registry_.reload(name);
        spdlog::info("model {} reloaded from {}", name, m->dir);
        answer(res, 200, model_json(*m));
      } catch (const UnknownModel& e) {
        error(res, 404, e.what());
      } catch (const std::exception& e) {
        spdlog::error("model {} refused, the model loaded before keeps serving: {}", name, e.what());
        error(res, 422, std::string("reload refused, the model loaded before keeps serving: ") + e.what());
      }
      metrics_.request(registry_.find(name) ? name : "", res.status, seconds_since(start));
    });
    // Routing, body-size and protocol errors of the library, in the same JSON as ours.
    server.set_error_handler(
        httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
          if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
          std::string what = res.status == 404 ? "no such route: " + req.method + " " + req.path
                             : res.status == 413
                                 ? "the body is larger than the service accepts"
                                 : "the request could not be read (HTTP " + std::to_string(res.status) + ")";
          // cpp-httplib parses a form body (curl --data-binary's default type) and caps it at 8 KiB.
          if (res.status == 413 && req.get_header_value("Content-Type") == "application/x-www-form-urlencoded")
            what +=
                ": the image was sent as a form; send its bytes as Content-Type: application/octet-stream (curl: -H "
                "'Content-Type: application/octet-stream' --data-binary @FILE)";
          error(res, res.status, what);
          return httplib::Server::HandlerResponse::Handled;
        }));
  }

  void load_all(bool initial) {
    const auto report = registry_.load_all();
    for (const auto& name : report.loaded) spdlog::info("model {} loaded", name);
    for (const auto& [name, why] : report.refused)
      spdlog::error("model folder {} refused{}: {}", name, initial ? "" : " (a model loaded before keeps serving)",
                    why);
    if (initial && report.loaded.empty()) {
      std::string why = options_.models + ": no model could be loaded";
      for (const auto& [name, reason] : report.refused) why += "; " + reason;
      throw std::runtime_error(why);
    }
    ready_ = true;
  }
  void stop() {
    stopping_ = true;
    ready_ = false;
  }

 private:
  // Answers one predict request; returns the model's name for the metrics, or "" for a name not served.
  std::string predict(const httplib::Request& req, httplib::Response& res, Clock::time_point start) {
    const std::string name = req.matches[1];
    const std::shared_ptr<const ServedModel> model = registry_.find(name);
    if (!model) {
      if (!ready_)
        unavailable(res, "the models are loading");
      else
        error(res, 404, "no model named " + quote(name) + " is served; GET /v1/models lists them");
      return "";
    }
    const std::string image = req.has_param("image") ? req.get_param_value("image") : std::string("<body>");
    if (req.body.empty()) {
      error(res, 400, image + ": empty body; send the image file's bytes");
      return name;
    }
    const ImageTransform& transform = model->model.params().transform;
    cv::Mat rgb;
    at::Tensor tensor;
    try {
      rgb = decode_image_rgb(req.body, image, options_.limits);
      tensor = transform.view_tensor(rgb, image);
    } catch (const std::exception& e) {
      error(res, 400, e.what());
      return name;
    }
    const auto ticket = queue_.submit(
        model, [model](const std::vector<at::Tensor>& images) { return model->model.predict(images); }, tensor);
    if (!ticket) {
      unavailable(res, "the service is busy: " + std::to_string(options_.queue.capacity) +
                           " images are waiting to be scored; retry later or on another replica");
      return name;
    }
    const auto deadline =
        start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(options_.timeout_seconds));
    if (!ticket->wait_until(deadline)) {
      ticket->abandon();
      unavailable(res, "not scored within " + std::to_string(options_.timeout_seconds) +
                           " s: the service is overloaded; retry later or on another replica");
      return name;
    }
    ticket->rethrow_error();
    metrics_.scored(ticket->batch_size());
    const float score = ticket->score();
    json extra;
    if (flag(req, "overlay") || flag(req, "map")) {
      const cv::Mat map = prediction_map_on_original(ticket->map(), transform, rgb.size());
      if (flag(req, "map")) {
        const std::string npy = encode_npy(float_array(map.ptr<float>(), {map.rows, map.cols}));
        extra["map_npy"] = base64(npy);
      }
      if (flag(req, "overlay")) {
        const ColourScale scale = model->scale ? *model->scale : ColourScale{0.f, std::max(1e-6f, score)};
        const std::vector<uchar> png = encode_png(original_overlay(rgb, map, transform, scale), image);
        extra["overlay_png"] = base64(std::string_view(reinterpret_cast<const char*>(png.data()), png.size()));
      }
    }
    json body = json::parse(prediction_json(image, score, model->calibration().image, seconds_since(start) * 1000));
    body["model"] = name;
    if (!extra.is_null()) body.update(extra);
    answer(res, 200, body);
    return name;
  }

  static std::string quote(const std::string& s) { return "'" + s.substr(0, 200) + "'"; }

  ServiceOptions options_;
  ModelRegistry registry_;
  InferenceQueue queue_;
  Metrics metrics_;
  std::atomic<bool> ready_{false}, stopping_{false};
  std::atomic<size_t> in_flight_{0};
};

}  // namespace

void serve(const ServiceOptions& options) {
  // Signals are taken by sigwait below, in this thread only: every thread started from here inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  for (int s : {SIGHUP, SIGTERM, SIGINT}) sigaddset(&signals, s);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // A client that hangs up must not end the process when its answer is written.
  ::signal(SIGPIPE, SIG_IGN);

  Service service(options);
  httplib::Server server;
  service.route(server);
  const size_t http_threads = static_cast<size_t>(std::max(1, options.http_threads));
  server.new_task_queue = [http_threads] { return new httplib::ThreadPool(http_threads); };
  server.set_payload_max_length(options.max_body_bytes);
  server.set_read_timeout(10);
  server.set_write_timeout(10);
  server.set_keep_alive_timeout(5);
  if (!server.bind_to_port(options.host, options.port))
    throw std::runtime_error("cannot listen on " + options.host + ":" + std::to_string(options.port) +
                             " (in use, or not an address of this machine)");
  std::atomic<bool> http_returned{false};
  std::thread http([&] {
    server.listen_after_bind();
    http_returned = true;
  });
  // stop() only stops a server that is running, so the failure path below must not come before it runs.
  while (!server.is_running() && !http_returned) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  spdlog::info("listening on {}:{}; loading the models under {}", options.host, options.port, options.models);
  try {
    service.load_all(true);
  } catch (...) {
    server.stop();
    http.join();
    throw;
  }
  spdlog::info("ready: {} workers, {} images per forward pass at most, {} waiting at most", options.queue.workers,
               options.queue.max_batch, options.queue.capacity);
  for (;;) {
    int signal = 0;
    if (sigwait(&signals, &signal) != 0) continue;
    if (signal == SIGHUP) {
      spdlog::info("SIGHUP: reloading every model under {}", options.models);
      try {
        service.load_all(false);
      } catch (const std::exception& e) {
        spdlog::error("reload: {}; the models loaded before keep serving", e.what());
      }
      continue;
    }
    spdlog::info("{}: stopping after the requests in flight", signal == SIGTERM ? "SIGTERM" : "SIGINT");
    service.stop();
    break;
  }
  server.stop();
  http.join();
}

}  // namespace patchcore::serve
