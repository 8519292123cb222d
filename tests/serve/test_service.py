#!/usr/bin/env python3
"""`patchcore serve` over HTTP: its routes, answers equal to the CLI's, bad input, overload, reloads and a kill -9
during a reload. Standard library only; run by ctest (exit status 77, a skip, without ../shared):

    PATCHCORE_CLI=build/patchcore PATCHCORE_SHARED=../shared python3 tests/serve/test_service.py
"""
import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from load_test import Service, cli_scores, fit_calibrated_model, run  # noqa: E402

CLI = os.environ.get("PATCHCORE_CLI", "build/patchcore")
SHARED = os.environ.get("PATCHCORE_SHARED", "../shared")
DATA = os.path.join(SHARED, "data", "tire")
WEIGHTS = os.path.join(SHARED, "weights", "resnet18-imagenet-stem-to-layer3.pth")
GOOD = [os.path.join(DATA, "test", "good", f"00{i}.png") for i in range(3)]
DEFECT = [os.path.join(DATA, "test", "hole", "000.png")]


def png_header_only(width, height):
    """A PNG whose header claims width x height and which holds no pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    return struct.unpack(">II", data[16:24])


def npy_shape(data):
    header = data[10:10 + struct.unpack("<H", data[8:10])[0]].decode()
    return tuple(int(v) for v in header.split("(")[1].split(")")[0].split(",") if v.strip())


class ServiceTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = tempfile.mkdtemp(prefix="patchcore-service-test-")
        cls.models = os.path.join(cls.work, "models")
        os.makedirs(cls.models)
        cls.model = os.path.join(cls.models, "tire")
        fit_calibrated_model(CLI, DATA, WEIGHTS, cls.model, train_images=10)
        cls.expected = cli_scores(CLI, cls.model, GOOD + DEFECT)
        cls.service = Service(CLI, cls.models, ["--max-body", "2MiB", "--max-pixels", "40000000"],
                              log=os.path.join(cls.work, "serve.log"))
        cls.service.wait_ready()

    @classmethod
    def tearDownClass(cls):
        status = cls.service.stop()
        shutil.rmtree(cls.work, ignore_errors=True)
        assert status == 0, f"the service exited with {status} after SIGTERM"

    def predict(self, image, model="tire", query=""):
        with open(image, "rb") as f:
            return self.service.request("POST", f"/v1/models/{model}/predict?image={image}{query}", f.read())

    def test_health_readiness_and_models(self):
        self.assertEqual(self.service.request("GET", "/healthz")[0], 200)
        self.assertEqual(self.service.json("GET", "/readyz"), (200, {"ready": True, "models": 1}))
        status, listing = self.service.json("GET", "/v1/models")
        self.assertEqual(status, 200)
        [m] = listing["models"]
        self.assertEqual((m["name"], m["view"], m["crop"], m["layers"]), ("tire", "crop", 224, ["layer2", "layer3"]))
        self.assertEqual(m["image_threshold"]["method"], "f1_max")
        self.assertEqual(listing["refused"], {})

    def test_scores_labels_and_normalised_scores_are_the_clis(self):
        for image in GOOD + DEFECT:
            status, _, data = self.predict(image)
            self.assertEqual(status, 200, data)
            answer = json.loads(data)
            for key in ("image", "score", "normalized_score", "label"):
                self.assertEqual(answer[key], self.expected[image][key], (image, key))
            self.assertEqual(answer["model"], "tire")
            self.assertGreater(answer["ms"], 0)

    def test_map_and_overlay_are_the_files_predict_writes(self):
        image = DEFECT[0]
        out = os.path.join(self.work, "predict-out")
        run([CLI, "--threads", "2", "predict", "--model", self.model, image, "--out", out])
        status, _, data = self.predict(image, query="&map=1&overlay=1")
        self.assertEqual(status, 200, data)
        answer = json.loads(data)
        npy, png = base64.b64decode(answer["map_npy"]), base64.b64decode(answer["overlay_png"])
        with open(os.path.join(out, "000_map.npy"), "rb") as f:
            self.assertEqual(npy, f.read())
        with open(os.path.join(out, "000_overlay.png"), "rb") as f:
            self.assertEqual(png, f.read())
        self.assertEqual(npy_shape(npy)[::-1], png_size(png))

    def test_bad_input_gets_a_4xx_naming_the_problem(self):
        with open(GOOD[0], "rb") as f:
            good = f.read()
        cases = [
            ("/v1/models/tire/predict?image=cut.png", good[:500], 400, "cut.png"),
            ("/v1/models/tire/predict", b"", 400, "empty body"),
            ("/v1/models/tire/predict?image=bomb.png", png_header_only(100000, 100000), 400, "pixel"),
            ("/v1/models/tire/predict", b"x" * (2 * 2**20 + 1), 413, "larger"),
            ("/v1/models/nothing/predict", good, 404, "GET /v1/models"),
            ("/v1/nothing", b"", 404, "no such route"),
        ]
        for path, body, want, words in cases:
            status, headers, data = self.service.request("POST", path, body)
            self.assertEqual(status, want, (path, data))
            self.assertIn(words, json.loads(data)["error"], path)
        self.assertEqual(self.predict(GOOD[0])[0], 200)  # and the service goes on

    def test_a_client_that_hangs_up_costs_nothing(self):
        import socket
        with open(GOOD[1], "rb") as f:
            body = f.read()
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", self.service.port))
            s.sendall(b"POST /v1/models/tire/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                      + body)
            s.close()
        deadline = time.time() + 30
        while time.time() < deadline:
            metrics = self.service.request("GET", "/metrics")[2].decode()
            if "patchcore_in_flight 0\n" in metrics and "patchcore_queue_depth 0\n" in metrics:
                break
            time.sleep(0.2)
        self.assertIn("patchcore_in_flight 0\n", metrics)
        self.assertEqual(self.service.process.poll(), None)
        self.assertEqual(self.predict(GOOD[1])[0], 200)

    def test_metrics_count_requests_by_model_and_status(self):
        self.predict(GOOD[0])
        self.service.request("POST", "/v1/models/nothing/predict", b"x")
        metrics = self.service.request("GET", "/metrics")[2].decode()
        self.assertRegex(metrics, r'patchcore_requests_total\{model="tire",status="200"\} [1-9]')
        self.assertRegex(metrics, r'patchcore_requests_total\{model="",status="404"\} [1-9]')
        self.assertRegex(metrics, r'patchcore_request_duration_seconds_bucket\{model="tire",le="\+Inf"\} [1-9]')
        self.assertNotIn('model="nothing"', metrics)
        for gauge in ("patchcore_queue_depth", "patchcore_in_flight", "patchcore_scoring", "patchcore_ready 1"):
            self.assertIn(gauge, metrics)

    def test_reload_swaps_a_good_model_and_refuses_a_broken_one(self):
        copy = os.path.join(self.models, "copy")
        shutil.copytree(self.model, copy)
        try:
            self.assertEqual(self.service.request("POST", "/v1/models/copy/reload")[0], 200)
            self.assertEqual(self.predict(GOOD[0], "copy")[0], 200)
            with open(os.path.join(copy, "patchcore_params.json"), "w") as f:
                f.write("{ damaged")
            status, answer = self.service.json("POST", "/v1/models/copy/reload")
            self.assertEqual(status, 422)
            self.assertIn("patchcore_params.json", answer["error"])
            status, _, data = self.predict(GOOD[0], "copy")  # the old one keeps serving
            self.assertEqual(json.loads(data)["score"], self.expected[GOOD[0]]["score"])
            self.assertIn("copy", self.service.json("GET", "/v1/models")[1]["refused"])
            self.assertEqual(self.service.request("POST", "/v1/models/nothing/reload")[0], 404)
        finally:
            shutil.rmtree(copy)
            self.service.process.send_signal(signal.SIGHUP)  # the folder is gone: no longer served
        deadline = time.time() + 60
        while time.time() < deadline and self.predict(GOOD[0], "copy")[0] != 404:
            time.sleep(0.2)
        self.assertEqual(self.predict(GOOD[0], "copy")[0], 404)

    def test_overload_answers_503_with_retry_after(self):
        service = Service(CLI, self.models, ["--queue", "1", "--max-batch", "1"])
        try:
            service.wait_ready()
            with open(GOOD[0], "rb") as f:
                body = f.read()
            answers = []

            def client():
                answers.append(service.request("POST", "/v1/models/tire/predict", body))
            threads = [threading.Thread(target=client) for _ in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            statuses = sorted(a[0] for a in answers)
            self.assertIn(503, statuses)
            self.assertIn(200, statuses)
            self.assertEqual(set(statuses), {200, 503})
            for status, headers, data in answers:
                if status == 503:
                    self.assertEqual(headers.get("Retry-After"), "1")
                else:
                    self.assertEqual(json.loads(data)["score"], self.expected[GOOD[0]]["score"])
        finally:
            self.assertEqual(service.stop(), 0)


class KillDuringReloadTest(unittest.TestCase):
    def test_kill_9_during_a_reload_leaves_a_service_that_restarts_with_valid_models(self):
        work = tempfile.mkdtemp(prefix="patchcore-kill-test-")
        try:
            models = os.path.join(work, "models")
            model = os.path.join(models, "tire")
            os.makedirs(models)
            fit_calibrated_model(CLI, DATA, WEIGHTS, model, train_images=4)
            expected = cli_scores(CLI, model, GOOD[:1])[GOOD[0]]
            for delay in (0.05, 0.4, 1.0):
                service = Service(CLI, models, log=os.path.join(work, "serve.log"))
                service.wait_ready()
                # A model being rewritten (calibrate replaces its description atomically), reloads over HTTP and by
                # SIGHUP, and kill -9 of both in the middle.
                writer = subprocess.Popen([CLI, "--threads", "1", "calibrate", "--model", model, "--data", DATA],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                service.process.send_signal(signal.SIGHUP)
                reload = threading.Thread(target=lambda: self._try_reload(service))
                reload.start()
                time.sleep(delay)
                service.process.kill()
                writer.kill()
                service.process.wait()
                writer.wait()
                reload.join()
                service.stop()
                restarted = Service(CLI, models)
                try:
                    restarted.wait_ready()
                    with open(GOOD[0], "rb") as f:
                        status, answer = restarted.json("POST", "/v1/models/tire/predict", f.read())
                    self.assertEqual(status, 200, answer)
                    self.assertEqual(answer["score"], expected["score"])
                    self.assertIn(answer["label"], ("OK", "NG"))
                finally:
                    self.assertEqual(restarted.stop(), 0)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @staticmethod
    def _try_reload(service):
        try:
            service.request("POST", "/v1/models/tire/reload", timeout=30)
        except Exception:  # the service is killed under it
            pass


if __name__ == "__main__":
    if not (os.path.isdir(DATA) and os.path.isfile(WEIGHTS)):
        print(f"test_service.py: {DATA} or {WEIGHTS} is absent; service tests skipped")
        sys.exit(77)
    unittest.main(verbosity=2)
