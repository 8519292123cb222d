#!/usr/bin/env python3
"""Load test of `patchcore serve` on loopback (docs/service.md). Standard library only.

Fits and calibrates a model on DATA (or takes --models), starts the service, and drives it with concurrent clients
for --duration seconds: good and defective test images, corrupt files, oversized bodies and unknown models, while one
model is reloaded over HTTP and by SIGHUP. It checks that no answer is a 5xx other than 503, that the service never
dies, that every scored image has the CLI's `patchcore predict` score, and that resident memory and the thread count
at rest after the reloads are what they were after the warm-up; it prints throughput and latency percentiles. Exit
status 0 when every check passes, 1 otherwise, 77 when DATA is absent (a skip for ctest).

    scripts/load_test.py --cli build/patchcore --data ../shared/data/tire \\
        --weights ../shared/weights/resnet18-imagenet-stem-to-layer3.pth --duration 60
"""
import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def run(args, **kwargs):
    """Runs a command; raises with its stderr when it fails."""
    r = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def fit_calibrated_model(cli, data, weights, out, train_images=None, threads=2):
    """`patchcore fit` on DATA's train/good (or the first train_images of it), then `calibrate` on its test split."""
    source = data
    if train_images is not None:
        source = tempfile.mkdtemp(prefix="patchcore-train-")
        os.makedirs(os.path.join(source, "train", "good"))
        good = sorted(os.listdir(os.path.join(data, "train", "good")))[:train_images]
        for name in good:
            os.symlink(os.path.abspath(os.path.join(data, "train", "good", name)),
                       os.path.join(source, "train", "good", name))
    run([cli, "--threads", str(threads), "fit", "--data", source, "--weights", weights, "--out", out])
    run([cli, "--threads", str(threads), "calibrate", "--model", out, "--data", data])
    if source != data:
        shutil.rmtree(source)


def cli_scores(cli, model, images, threads=2):
    """The CLI's `predict --json` answer per image path."""
    out = run([cli, "--threads", str(threads), "predict", "--json", "--model", model] + images)
    return {j["image"]: j for j in map(json.loads, out.splitlines())}


def test_images(data, per_class):
    """The first per_class images of each test folder, good first."""
    test = os.path.join(data, "test")
    images = {}
    for kind in sorted(os.listdir(test), key=lambda k: (k != "good", k)):
        names = sorted(n for n in os.listdir(os.path.join(test, kind)) if not n.startswith("."))[:per_class]
        images[kind] = [os.path.join(test, kind, n) for n in names]
    return images


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_count(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Service:
    """`patchcore serve` in a child process, on a free loopback port; its log goes to a file."""

    def __init__(self, cli, models, extra=(), threads=2, log=None):
        self.port = free_port()
        self.log_path = log or tempfile.mktemp(prefix="patchcore-serve-", suffix=".log")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [cli, "--threads", str(threads), "serve", "--models", models, "--host", "127.0.0.1",
             "--port", str(self.port)] + list(extra), stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the service was not ready within {timeout} s:\n{self.log_text()}")

    def request(self, method, path, body=None, timeout=60, connection=None):
        """(status, headers, body bytes); a connection can be kept across calls."""
        conn = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body)
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            if connection is None:
                conn.close()

    def json(self, method, path, body=None):
        status, _, data = self.request(method, path, body)
        return status, json.loads(data)

    def log_text(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        """SIGTERM, then the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def load_test(args):
    work = tempfile.mkdtemp(prefix="patchcore-load-")
    try:
        models = args.models
        if models is None:
            models = os.path.join(work, "models")
            os.makedirs(models)
            print(f"fitting and calibrating a model on {args.data} ...", flush=True)
            fit_calibrated_model(args.cli, args.data, args.weights, os.path.join(models, "tire"),
                                 args.train_images, args.threads)
        model_names = sorted(n for n in os.listdir(models) if not n.startswith("."))
        name = model_names[0]
        images = test_images(args.data, args.per_class)
        good = images.pop("good")
        defective = [p for paths in images.values() for p in paths]
        expected = cli_scores(args.cli, os.path.join(models, name), good + defective, args.threads)
        bodies = {p: open(p, "rb").read() for p in good + defective}
        corrupt = bodies[good[0]][: len(bodies[good[0]]) // 3]  # a truncated PNG
        oversized = b"\0" * (args.max_body + 1)

        service = Service(args.cli, models, ["--max-body", str(args.max_body)] + args.serve_args, args.threads,
                          os.path.join(work, "serve.log"))
        failures, lock = [], threading.Lock()
        latencies, statuses = [], {}
        stop = threading.Event()

        def fail(message):
            with lock:
                if len(failures) < 20:
                    failures.append(message)

        def client(seed):
            rng = random.Random(seed)
            conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=120)
            while not stop.is_set():
                kind = rng.choices(["good", "defective", "corrupt", "oversized", "unknown"], [40, 35, 10, 5, 10])[0]
                path, body, url = None, None, f"/v1/models/{name}/predict"
                if kind in ("good", "defective"):
                    path = rng.choice(good if kind == "good" else defective)
                    body = bodies[path]
                    url += "?image=" + path
                elif kind == "corrupt":
                    body = corrupt
                elif kind == "oversized":
                    body = oversized
                else:
                    body = bodies[good[0]]
                    url = "/v1/models/no-such-model/predict"
                start = time.perf_counter()
                try:
                    status, headers, data = service.request("POST", url, body, connection=conn)
                except (OSError, http.client.HTTPException) as e:
                    fail(f"{kind}: {type(e).__name__}: {e}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=120)
                    continue
                seconds = time.perf_counter() - start
                if headers.get("Connection", "").lower() == "close":
                    conn.close()
                with lock:
                    statuses[(kind, status)] = statuses.get((kind, status), 0) + 1
                if status == 503:
                    if "Retry-After" not in headers:
                        fail(f"{kind}: 503 without Retry-After")
                    continue
                want = {"good": 200, "defective": 200, "corrupt": 400, "oversized": 413, "unknown": 404}[kind]
                if status != want:
                    fail(f"{kind}: status {status}, expected {want}: {data[:200]!r}")
                    continue
                answer = json.loads(data)
                if status != 200:
                    if not answer.get("error"):
                        fail(f"{kind}: {status} without an error message")
                    continue
                cli = expected[path]
                for key in ("score", "normalized_score", "label"):
                    if answer.get(key) != cli.get(key):
                        fail(f"{path}: {key} {answer.get(key)} from the service, {cli.get(key)} from the CLI")
                with lock:
                    latencies.append(seconds)
            conn.close()

        service.wait_ready()
        print(f"service ready on port {service.port}; {args.clients} clients for {args.duration:g} s", flush=True)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        start = time.time()
        for t in threads:
            t.start()
        rss, threads_seen, reloads = [], [], {"http": 0, "sighup": 0}
        warm_up = start + args.duration * 0.25
        next_reload = start + args.duration / 6
        sighup_sent = False
        while time.time() < start + args.duration:
            time.sleep(0.5)
            if service.process.poll() is not None:
                fail(f"the service died with status {service.process.returncode}")
                break
            rss.append((time.time(), rss_bytes(service.process.pid)))
            threads_seen.append((time.time(), thread_count(service.process.pid)))
            if time.time() >= next_reload:
                # One model reloaded while the clients run: over HTTP, and once by SIGHUP.
                if not sighup_sent and time.time() > start + args.duration / 2:
                    service.process.send_signal(signal.SIGHUP)
                    sighup_sent = True
                    reloads["sighup"] += 1
                else:
                    status, _, data = service.request("POST", f"/v1/models/{name}/reload")
                    if status != 200:
                        fail(f"reload: status {status}: {data[:200]!r}")
                    reloads["http"] += 1
                next_reload += args.duration / 6
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.time() - start
        # At rest: every request answered, so each replaced model has been freed by its last request (the last
        # reload is over HTTP, which answers once the new model serves).
        time.sleep(0.5)
        rest = []
        for _ in range(4):
            rest.append(rss_bytes(service.process.pid))
            time.sleep(0.25)
        threads_at_rest = thread_count(service.process.pid)
        metrics = service.request("GET", "/metrics")[2].decode()
        alive = service.process.poll() is None
        exit_status = service.stop()
        if not alive:
            fail("the service was not running at the end")
        elif exit_status != 0:
            fail(f"the service exited with {exit_status} after SIGTERM")

        # After the warm-up, the lowest sample of the second quarter (a reload holds two copies of a model for a
        # moment, and with reloads every duration / 6 seconds a median may fall on one), against the service at rest
        # after the last reload, which holds one model and no requests.
        quarter = args.duration / 4
        second = [r for t, r in rss if warm_up <= t < warm_up + quarter]
        rss_warm = min(second) if second else float("nan")
        rss_end = percentile(rest, 0.5)
        growth = rss_end - rss_warm
        if second and growth > max(args.rss_slack_mib * 2**20, 0.1 * rss_warm):
            fail(f"resident memory grew from {rss_warm / 2**20:.0f} MiB after warm-up to {rss_end / 2**20:.0f} MiB "
                 f"at rest after {sum(reloads.values())} reloads")
        # A reload's own threads end with it: a thread left behind by each would go unnoticed in memory for a while.
        threads_warm = min((n for t, n in threads_seen if warm_up <= t < warm_up + quarter), default=None)
        if threads_warm is not None and threads_at_rest > threads_warm:
            fail(f"the service ran {threads_warm} threads after warm-up and {threads_at_rest} at rest after "
                 f"{sum(reloads.values())} reloads")
        scored = len(latencies)
        if scored == 0:
            fail("no image was scored")
        summary = {
            "duration_s": round(elapsed, 1), "clients": args.clients, "scored": scored,
            "throughput_images_per_s": round(scored / elapsed, 2),
            "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
            "rss_after_warm_up_mib": round(rss_warm / 2**20, 1), "rss_at_rest_mib": round(rss_end / 2**20, 1),
            "rss_peak_mib": round(max(r for _, r in rss) / 2**20, 1) if rss else None,
            "rss_mib_every_5_s": " ".join(str(round(r / 2**20)) for _, r in rss[::10]),
            "threads_after_warm_up": threads_warm, "threads_at_rest": threads_at_rest,
            "reloads": reloads,
            "answers": {f"{k} {s}": n for (k, s), n in sorted(statuses.items())},
            "batches": {line.split('"')[1]: int(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("patchcore_images_scored_total{")},
        }
        print(json.dumps(summary, indent=1))
        print(f"throughput {summary['throughput_images_per_s']} images/s, latency p50 {summary['p50_ms']} ms, "
              f"p99 {summary['p99_ms']} ms; resident memory {summary['rss_after_warm_up_mib']} MiB after warm-up, "
              f"{summary['rss_at_rest_mib']} MiB at rest after the run")
        for f in failures:
            print("FAILED:", f)
        if failures:
            print(f"service log: {service.log_path}\n" + service.log_text()[-4000:])
            return 1
        print("load test passed: no 5xx but 503, no crash, every score the CLI's, memory and threads flat")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cli", required=True, help="the patchcore executable")
    parser.add_argument("--data", required=True, help="an MVTec-layout data set (train/good, test/<kind>)")
    parser.add_argument("--weights", help="backbone weights for fit (without --models)")
    parser.add_argument("--models", help="a folder of fitted, calibrated models (default: fit one on DATA)")
    parser.add_argument("--train-images", type=int, help="fit on the first N training images only")
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=4, help="test images of each folder in the mix")
    parser.add_argument("--max-body", type=int, default=4 << 20, help="the service's --max-body, in bytes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss-slack-mib", type=float, default=48, help="growth after warm-up still called flat")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (model, service log)")
    parser.add_argument("serve_args", nargs="*", help="more options for patchcore serve, after --")
    args = parser.parse_args()
    if not os.path.isdir(args.data) or (args.models is None and not (args.weights and os.path.isfile(args.weights))):
        print(f"load_test.py: {args.data} or the weights are absent; load test skipped")
        return 77
    return load_test(args)


if __name__ == "__main__":
    sys.exit(main())
