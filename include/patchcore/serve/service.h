#pragma once
// The inspection service: every model under one folder loaded once and answered over HTTP (docs/service.md).
//   GET  /v1/models                  the models with their options and thresholds, and folders refused
//   POST /v1/models/{name}/predict   image bytes (PNG, JPEG, BMP or TIFF) → score, normalised score and label where
//                                    the model has a threshold, ms; ?overlay=1 and ?map=1 add them as base64
//   POST /v1/models/{name}/reload    reloads one model; a folder that fails its checks is refused, the old one serves
//   GET  /healthz, /readyz, /metrics liveness, readiness, Prometheus text
// SIGHUP reloads every model folder; SIGTERM and SIGINT stop the service after the requests in flight.
#include <cstddef>
#include <string>

#include "patchcore/io/image.h"
#include "patchcore/serve/inference_queue.h"

namespace patchcore::serve {

struct ServiceOptions {
  std::string models;  // the folder whose model directories are served
  std::string host = "0.0.0.0";
  int port = 8080;
  QueueOptions queue;                 // workers, waiting images, images per forward pass
  size_t max_body_bytes = 16u << 20;  // larger bodies get 413; http_threads of them may be held at once
  ImageLimits limits{50'000'000};     // decoded pixels per image, checked before any pixel is allocated
  double timeout_seconds = 30;        // a request not scored by then gets 503 and its image is dropped
  int http_threads = 16;              // connections served at once; more wait for one to close
  int threads = 1;                    // each model's search threads (the process's thread setting)
};

// Runs the service until SIGTERM or SIGINT, then returns. Listens first (so /healthz answers while models load),
// then loads the models; /readyz answers 200 once they are loaded. Throws std::runtime_error when the port cannot
// be bound or no model under `models` loads. Blocks SIGHUP, SIGTERM and SIGINT in the calling thread, and so in
// every thread it starts, to receive them in one place.
void serve(const ServiceOptions& options);

}  // namespace patchcore::serve
