"""Starts a real local Tensorfleet cluster on loopback for the live deploy checks: one
fleet-coordinator and fleet-workers from $FLEET_BUILD_DIR/bin, every endpoint on port 0, the
bound addresses read from each process's "ready" line on stdout:

    fleet-coordinator ready listen=tcp://127.0.0.1:41001 http=127.0.0.1:41002 metrics=127.0.0.1:41003
    fleet-worker ready id=cuda:0 listen=tcp://127.0.0.1:41234 metrics=127.0.0.1:39001

The processes get the deployment's configuration (deploy/k8s/base/config/<binary>.env, the
ConfigMap data) in their environment, so a value there that a binary rejects fails these checks;
flags override what must differ on loopback (endpoints, model root, sizes).

Usage:
    with LocalCluster(workers=[("cpu", "cpu"), ("cuda:0", "cpu")]) as cluster:
        cluster.scrape(cluster.coordinator)   # Prometheus text of /metrics
"""
import os
import pathlib
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import deploycheck as dc

# Flags of the binaries used here (worker/options.def, coordinator/options.def).
COORDINATOR_FLAGS = ["--listen=tcp://127.0.0.1:*", "--register-listen=tcp://127.0.0.1:*",
                     "--http-listen=127.0.0.1:0",
                     "--metrics-listen=127.0.0.1:0"]
WORKER_FLAGS = ["--listen=tcp://127.0.0.1:*", "--metrics-listen=127.0.0.1:0",
                "--capacity=256mb", "--shm-arena-bytes=64mb"]
# Key of the coordinator's ready line that workers dial (--coordinator), first one present.
COORDINATOR_ENDPOINT_KEYS = ("register", "register_listen", "workers", "listen")
READY_TIMEOUT_S = 60


def binaries_missing():
    """Names of the binaries this cluster needs that are not built."""
    return [b for b in ("fleet-coordinator", "fleet-worker") if not (dc.BUILD / "bin" / b).exists()]


def config_env(binary):
    """FLEET_* variables of the committed ConfigMap data for `binary` (may be empty)."""
    path = dc.ROOT / "deploy/k8s/base/config" / f"{binary.removeprefix('fleet-')}.env"
    env = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                env[k.strip()] = v
    return env


class Process:
    def __init__(self, name, argv, env, log_dir):
        self.name, self.argv = name, argv
        self.log = pathlib.Path(log_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"
        self.ready = None
        self.lines = []
        self._stderr = open(self.log, "w")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     env=env, start_new_session=True)
        self._got_ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:  # drain stdout for the process's whole life
            self.lines.append(line.rstrip("\n"))
            if self.ready is None and " ready " in f" {line} ":
                self.ready = dict(re.findall(r"(\w+)=(\S+)", line))
                self._got_ready.set()
        self._got_ready.set()

    def wait_ready(self, timeout):
        self._got_ready.wait(timeout)
        if self.ready is None:
            raise RuntimeError(f"{self.name} printed no ready line within {timeout} s "
                               f"(exit code {self.proc.poll()}; command {' '.join(self.argv)})\n"
                               f"stdout: {self.lines[-10:]}\nstderr ({self.log}):\n{self.tail()}")
        return self.ready

    def tail(self, n=30):
        self._stderr.flush()
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


class LocalCluster:
    def __init__(self, workers=(("cpu", "cpu"), ("cuda:0", "cpu"))):
        self.worker_specs = list(workers)
        self.tmp = tempfile.TemporaryDirectory(prefix="fleet-deploy-")
        self.models = pathlib.Path(self.tmp.name) / "models"
        self.models.mkdir()
        self.coordinator = None
        self.workers = []

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def _env(self, binary):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(config_env(binary))
        env["FLEET_LOG_LEVEL"] = env.get("FLEET_LOG_LEVEL", "info")
        return env

    def start(self):
        bin_dir = dc.BUILD / "bin"
        self.coordinator = Process(
            "fleet-coordinator",
            [str(bin_dir / "fleet-coordinator"), *COORDINATOR_FLAGS, f"--model-root={self.models}"],
            self._env("fleet-coordinator"), self.tmp.name)
        ready = self.coordinator.wait_ready(READY_TIMEOUT_S)
        endpoint = next((ready[k] for k in COORDINATOR_ENDPOINT_KEYS if k in ready), None)
        if not endpoint or "http" not in ready or "metrics" not in ready:
            raise RuntimeError(f"coordinator ready line lacks listen/http/metrics: {ready}")
        for device, backing in self.worker_specs:
            w = Process(f"fleet-worker {device}",
                        [str(bin_dir / "fleet-worker"), f"--id={device}", f"--backing={backing}",
                         *WORKER_FLAGS, f"--model-root={self.models}", f"--coordinator={endpoint}"],
                        self._env("fleet-worker"), self.tmp.name)
            self.workers.append(w)
        for w in self.workers:
            if "metrics" not in w.wait_ready(READY_TIMEOUT_S):
                raise RuntimeError(f"{w.name} ready line has no metrics=: {w.ready}")
        self.wait_registered()

    def wait_registered(self, timeout=30):
        """Until the coordinator's fleet_coordinator_workers gauge counts every worker."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            for p in [self.coordinator, *self.workers]:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")
            m = re.search(r"^fleet_coordinator_workers(?:\{\})? (\S+)$",
                          self.scrape(self.coordinator), re.M)
            last = m.group(1) if m else None
            if last is not None and float(last) >= len(self.workers):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the coordinator counts {last} registered workers after {timeout} s, "
                           f"want {len(self.workers)}\ncoordinator log:\n{self.coordinator.tail()}")

    def exercise(self):
        """Loads a generated tiny Flux model in pipeline and in stream mode and runs Forwards
        through the Python client, so every labelled family (jobs, steps, transfers of weights and
        activations, loads, block compute, prefetch stalls) has series."""
        import subprocess
        import sys

        sys.path.insert(0, str(dc.ROOT / "comfyui"))
        from tensorfleet_client import Client, ModelSpec

        fleet = str(dc.BUILD / "bin" / "fleet")
        model = self.models / "tiny.safetensors"
        inputs = pathlib.Path(self.tmp.name) / "inputs.safetensors"
        subprocess.run([fleet, "gen-model", "--preset", "tiny", "--seed", "1", str(model)], check=True)
        subprocess.run([fleet, "gen-inputs", str(model), str(inputs)], check=True)
        sys.path.insert(0, str(dc.ROOT / "tests" / "python"))
        from safetensors_io import load_safetensors
        tensors, _ = load_safetensors(inputs)
        devices = [d for d, _ in self.worker_specs]
        compute = next((d for d in devices if d != "cpu"), devices[0])
        donor = next((d for d in devices if d != compute), compute)
        constants = [c for c in ("context", "y", "guidance") if c in tensors]
        with Client(self.coordinator.ready["listen"]) as client:
            for mode in ("pipeline", "stream"):
                spec = ModelSpec(path="tiny.safetensors", compute_device=compute, virtual_vram_gb=0,
                                 expert_mode_allocations=f"{compute},30%;{donor},*", mode=mode,
                                 eject_models=False, keep_loaded=False)
                client.load_model(spec, name=f"tiny-{mode}")
                for step in range(2):
                    client.forward(f"tiny-{mode}", tensors, run_id=f"run-{mode}",
                                   constant_inputs=constants, end_run=step == 1)
            client.unload_model("tiny-stream")

    def processes(self):
        return [self.coordinator, *self.workers]

    def http(self, path, method="GET"):
        """(status, body) of the coordinator's control API."""
        req = urllib.request.Request(f"http://{self.coordinator.ready['http']}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    @staticmethod
    def scrape(process):
        with urllib.request.urlopen(f"http://{process.ready['metrics']}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self):
        for p in reversed(self.processes()):
            if p is not None:
                p.stop()
        self.tmp.cleanup()


def exposition_names(text):
    """{metric family name: type} of Prometheus text; samples without a TYPE line are 'untyped'."""
    types = {}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            types[m.group(1)] = m.group(2)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0)
            base = dc.base_metric(name, types)
            types.setdefault(base, "untyped")
    return types
