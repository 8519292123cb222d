#!/usr/bin/env python3
"""Static checks of deploy/: neither systemd nor Docker nor Kubernetes runs here. The manifests parse, their probes
name the service's health routes, their ports agree, the Dockerfile's packages are the project's, the unit passes
`systemd-analyze verify` where it is available, and each file's command line is one `patchcore serve` accepts.

    PATCHCORE_CLI=build/patchcore python3 tests/serve/test_deploy.py
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import unittest

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
DEPLOY = os.path.join(ROOT, "deploy")
CLI = os.environ.get("PATCHCORE_CLI", "build/patchcore")


def read(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return f.read()


def option(args, name):
    return args[args.index(name) + 1]


class DeployTest(unittest.TestCase):
    def assert_cli_accepts(self, args):
        """The arguments parse: with an empty models folder the service stops with 'no model' (1), not usage (2)."""
        args = list(args)
        empty = tempfile.mkdtemp()
        try:
            args[args.index("--models") + 1] = empty
            args[args.index("--port") + 1] = "0"
            r = subprocess.run([CLI] + args, capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertIn("no model could be loaded", r.stderr)
        finally:
            shutil.rmtree(empty)

    def test_kubernetes_manifests(self):
        docs = list(yaml.safe_load_all(read("k8s.yaml")))
        kinds = {d["kind"]: d for d in docs}
        self.assertEqual(set(kinds), {"Deployment", "Service"})
        pod = kinds["Deployment"]["spec"]["template"]
        self.assertEqual(kinds["Deployment"]["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
        self.assertEqual(kinds["Service"]["spec"]["selector"], pod["metadata"]["labels"])
        [container] = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        self.assertEqual(ports["http"], int(option(container["args"], "--port")))
        self.assertEqual(kinds["Service"]["spec"]["ports"][0]["targetPort"], "http")
        self.assertEqual(container["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "http"})
        self.assertEqual(container["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "http"})
        self.assertEqual(option(container["args"], "--models"), container["volumeMounts"][0]["mountPath"])
        self.assert_cli_accepts(container["args"])

    def test_dockerfile(self):
        text = read("Dockerfile")
        self.assertEqual(re.findall(r"^FROM (\S+)", text, re.M), ["debian:12", "debian:12"])
        with open(os.path.join(ROOT, "scripts", "install-deps.sh")) as f:
            project_packages = set(re.findall(r"[a-z0-9][a-z0-9.+-]+", f.read().split("packages=(")[1].split(")")[0]))
        build_stage = text.split("FROM debian:12\n")[0]
        install = build_stage.split("--no-install-recommends")[1].split("&&")[0]
        packages = set(install.replace("\\", " ").split())
        self.assertIn("libcpp-httplib-dev", packages)
        self.assertEqual(packages - project_packages - {"file", "dpkg-dev"}, set())
        entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", text, re.M).group(1))
        self.assertEqual(entrypoint[0], "/usr/bin/patchcore")
        self.assertEqual(int(option(entrypoint, "--port")), int(re.search(r"^EXPOSE (\d+)", text, re.M).group(1)))
        self.assert_cli_accepts(entrypoint[1:])

    def test_systemd_unit(self):
        text = read("patchcore.service")
        exec_start = shlex.split(re.search(r"^ExecStart=(.*)$", text, re.M).group(1))
        self.assertEqual(exec_start[0], "/usr/bin/patchcore")
        self.assertIn("ExecReload=/bin/kill -HUP $MAINPID", text)
        self.assert_cli_accepts(exec_start[1:])
        analyze = shutil.which("systemd-analyze")
        if not analyze:
            self.skipTest("systemd-analyze is absent: the unit's syntax is not verified")
        # verify needs the executable to exist: the built CLI stands in for the installed one.
        work = tempfile.mkdtemp()
        try:
            unit = os.path.join(work, "patchcore.service")
            with open(unit, "w") as f:
                f.write(text.replace("/usr/bin/patchcore", os.path.abspath(CLI)))
            r = subprocess.run([analyze, "verify", unit], capture_output=True, text=True, timeout=60)
            # Lines about other units of this machine (a container's systemd setup) are not ours.
            ours = [line for line in r.stderr.splitlines() if "patchcore.service" in line]
            self.assertEqual(ours, [], r.stderr)
        finally:
            shutil.rmtree(work)


if __name__ == "__main__":
    unittest.main(verbosity=2)
