"""The operator's toolbox against a real local cluster: `fleet status`, `workers`, `models`,
`load`, `unload` and `plan --coordinator` (text and --json, with the control API's bearer token,
a wrong or missing token, an unreachable or silent coordinator); the control API's KServe and
Triton endpoints (/v2/models/{name}/ready, model metadata, POST /v2/repository/index); the
per-model forward counters and the queue-wait histogram, and an unloaded model's series
disappearing from /metrics of the coordinator and the workers; JSON log lines of the coordinator
and the workers (FLEET_LOG_FORMAT=json); --version and -h of every binary.

The cluster is `fleet up --ephemeral --emulate cuda:0=1gb,cuda:1=1gb,cpu=2gb` with
FLEET_HTTP_TOKEN_FILE and FLEET_LOG_FORMAT=json in its environment (the coordinator and workers
read them). Skipped (with the reason) when FLEET_BUILD_DIR/bin lacks the binaries.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "comfyui"))
BIN = pathlib.Path(os.environ.get("FLEET_BUILD_DIR", REPO / "build")) / "bin"
BINARIES = ["fleet", "fleet-coordinator", "fleet-worker", "fleet-run-local"]
TOKEN = "s3cret-token"
EXPERT = "cuda:0,30%;cuda:1,40%;cpu,*"
# A guard against a hung child, not a measurement: every command here answers in seconds.
GUARD_S = 120


def _missing():
    return [b for b in BINARIES if not os.access(BIN / b, os.X_OK)]


def fleet(*args, env=None, token=TOKEN, coordinator=None):
    """Runs `fleet ARGS` (with --coordinator/--token when given); returns the CompletedProcess."""
    cmd = [str(BIN / "fleet"), *map(str, args)]
    if coordinator:
        cmd += ["--coordinator", coordinator]
    if token:
        cmd += ["--token", token]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=GUARD_S,
                          env=env if env is not None else _clean_env())


def _clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}


def http(url, method="GET", body=None, token=TOKEN):
    """(status, parsed JSON body) of one control API request."""
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
    if token:
        req.add_header("Authorization", "Bearer " + token)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=GUARD_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def scrape(address):
    with urllib.request.urlopen("http://%s/metrics" % address, timeout=GUARD_S) as r:
        return r.read().decode()


def series(text, name):
    """{labels text: value} of metric `name` in a Prometheus exposition."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^%s(\{[^}]*\})? (\S+)$" % re.escape(name), line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


class OpsCluster:
    def __init__(self, root):
        self.dir = root
        self.models = root / "models"
        (self.models / "more").mkdir(parents=True)
        token_file = root / "token"
        token_file.write_text(TOKEN + "\n")
        r = fleet("gen-model", "--preset", "tiny", "--double", 2, "--single", 2, "--dtype", "f32",
                  "--seed", 3, self.models / "tiny.safetensors", token=None)
        assert r.returncode == 0, r.stderr
        shutil.copy(self.models / "tiny.safetensors", self.models / "more" / "spare.safetensors")
        env = _clean_env()
        env.update(FLEET_HTTP_TOKEN_FILE=str(token_file), FLEET_LOG_FORMAT="json")
        self.up = subprocess.Popen(
            [str(BIN / "fleet"), "up", "--ephemeral", "--emulate", "cuda:0=1gb,cuda:1=1gb,cpu=2gb",
             "--dir", str(root), "--model-root", str(self.models),
             "--heartbeat-timeout", "10s"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self.worker_metrics = {}
        lines = []
        for line in self.up.stdout:
            lines.append(line)
            if line.startswith("fleet up ready"):
                ready = dict(re.findall(r"(\w+)=(\S+)", line))
                self.url = "http://" + ready["http"]
                self.metrics = ready["metrics"]
                self.listen = ready["listen"]
            m = re.match(r"\s+worker (\S+) .*metrics=(\S+)", line)
            if m:
                self.worker_metrics[m.group(1)] = m.group(2)
            if line.startswith("serving;"):
                break
        else:
            raise RuntimeError("fleet up did not start:\n" + "".join(lines[-30:]))

    def stop(self):
        self.up.send_signal(signal.SIGTERM)
        try:
            self.up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.up.pid, signal.SIGKILL)
            self.up.wait()


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    missing = _missing()
    if missing:
        pytest.skip("needs %s in %s (build them first)" % (", ".join(missing), BIN))
    c = OpsCluster(tmp_path_factory.mktemp("ops"))
    yield c
    c.stop()


def test_status_text_and_json(ops):
    r = fleet("status", coordinator=ops.url)
    assert r.returncode == 0, r.stderr
    assert "live         yes" in r.stdout
    assert "workers      3 up, 0 down" in r.stdout
    assert ops.url in r.stdout
    j = json.loads(fleet("status", "--json", coordinator=ops.url).stdout)
    version = fleet("--version", token=None).stdout.split()[1]
    assert j["version"] == version
    assert j["live"] is True and j["workers"] == {"up": 3, "down": 0}
    assert j["coordinator"] == ops.url


def test_token_from_the_environment_and_wrong_or_missing_tokens(ops):
    env = dict(_clean_env(), FLEET_TOKEN=TOKEN, FLEET_COORDINATOR=ops.url)
    r = fleet("workers", env=env, token=None)
    assert r.returncode == 0, r.stderr
    for token in ("wrong", None):
        r = fleet("status", coordinator=ops.url, token=token)
        assert r.returncode == 1
        assert "missing or wrong bearer token" in r.stderr and ops.url in r.stderr, r.stderr
        assert "FLEET_TOKEN" in r.stderr
    r = fleet("models", "--json", coordinator=ops.url, token="wrong")
    assert r.returncode == 1
    assert "bearer token" in json.loads(r.stdout)["error"]


def test_unreachable_and_silent_coordinators_give_clear_errors():
    if _missing():
        pytest.skip("fleet not built")
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = fleet("status", coordinator="http://127.0.0.1:%d" % port, token=None)
    assert r.returncode == 1
    assert "cannot reach the coordinator at http://127.0.0.1:%d" % port in r.stderr, r.stderr
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = "http://127.0.0.1:%d" % silent.getsockname()[1]
        r = fleet("workers", "--timeout", "1s", coordinator=url, token=None)
    assert r.returncode == 1
    assert "the coordinator at %s did not answer GET /v2/workers within 1 s" % url in r.stderr, r.stderr
    r = fleet("status", coordinator="tcp://127.0.0.1:7771", token=None)
    assert r.returncode == 2 and "expected the control API's URL, http://HOST:PORT" in r.stderr


def test_workers_table_and_json(ops):
    r = fleet("workers", coordinator=ops.url)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:6] == ["id", "backing", "capacity", "resident", "state", "heartbeat"]
    assert sorted(row.split()[0] for row in rows) == ["cpu", "cuda:0", "cuda:1"]
    assert all(row.split()[1] == "cpu" and " up " in row for row in rows), r.stdout
    j = json.loads(fleet("workers", "--json", coordinator=ops.url).stdout)
    assert sorted(w["device"] for w in j) == ["cpu", "cuda:0", "cuda:1"]
    assert all(w["up"] and w["capacity_bytes"] > 0 and "last_seen_seconds" in w for w in j)


def test_plan_against_the_running_cluster(ops):
    r = fleet("plan", "tiny.safetensors", "--expert-mode-allocations", EXPERT, "--explain",
              coordinator=ops.url)
    assert r.returncode == 0, r.stderr
    assert "Plan:" in r.stdout and "cuda:1" in r.stdout and "DisTorch2" in r.stdout
    r = fleet("plan", "tiny.safetensors", "--expert-mode-allocations", EXPERT, "--json",
              coordinator=ops.url)
    plan = json.loads(r.stdout)
    # The cluster's real devices with their capacities, not a what-if table.
    assert sorted(d["id"] for d in plan["devices"]) == ["cpu", "cuda:0", "cuda:1"]
    assert {d["id"]: d["capacity_bytes"] > 0 for d in plan["devices"]} == {"cpu": True, "cuda:0": True, "cuda:1": True}
    r = fleet("plan", "tiny.safetensors", "--expert-mode-allocations", "cuda:0,banana", coordinator=ops.url)
    assert r.returncode == 2 and r.stderr.startswith("fleet plan: GET %s/v2/plan" % ops.url), r.stderr
    r = fleet("plan", "--example", "flux-dev", coordinator=ops.url)
    assert r.returncode == 2 and "--example and --units need --devices" in r.stderr


def test_load_models_metadata_index_metrics_and_unload(ops, tmp_path):
    import torch  # noqa: F401 (the client's tensors)
    import tensorfleet_client as tf
    from safetensors_io import load_safetensors

    r = fleet("load", "tiny.safetensors", "--name", "tiny-a", "--compute-device", "cuda:0",
              "--expert-mode-allocations", EXPERT, "--mode", "pipeline", coordinator=ops.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("loaded tiny-a in "), r.stdout
    assert "tiny-a: flux, ready, pipeline mode, compute device cuda:0" in r.stdout
    assert re.search(r"^cuda:1\s+donor", r.stdout, re.M), r.stdout

    r = fleet("models", coordinator=ops.url)
    row = [line for line in r.stdout.splitlines() if line.startswith("tiny-a")]
    assert len(row) == 1 and row[0].split()[1:4] == ["flux", "ready", "pipeline"], r.stdout
    assert "cuda:1=" in row[0] and "cuda:0=" in row[0]
    models = json.loads(fleet("models", "--json", coordinator=ops.url).stdout)
    tiny = [m for m in models if m["name"] == "tiny-a"][0]
    assert set(tiny["bytes_per_device"]) == {"cuda:0", "cuda:1", "cpu"}
    assert sum(tiny["bytes_per_device"].values()) == tiny["bytes_total"]
    assert "models       1 loaded: tiny-a (ready)" in fleet("status", coordinator=ops.url).stdout

    # KServe: readiness and metadata; Triton: the repository index.
    assert http(ops.url + "/v2/models/tiny-a/ready") == (200, {"name": "tiny-a", "ready": True})
    status, body = http(ops.url + "/v2/models/nope/ready")
    assert status == 503 and body["ready"] is False and "no model named 'nope'" in body["reason"]
    assert http(ops.url + "/v2/models/tiny-a/ready", token="wrong")[0] == 401
    status, meta = http(ops.url + "/v2/models/tiny-a")
    assert status == 200
    assert meta["name"] == "tiny-a" and meta["versions"] == ["1"] and meta["platform"] == "tensorfleet"
    assert meta["family"] == "flux"
    assert [t["name"] for t in meta["inputs"]][:4] == ["x", "timestep", "context", "y"]
    assert meta["inputs"][0]["datatype"] == "FP32" and meta["inputs"][0]["shape"][1] == 16
    assert [t["name"] for t in meta["outputs"]] == ["out"]
    assert meta["plan_summary"]["compute_device"] == "cuda:0"
    assert {d["id"] for d in meta["plan_summary"]["devices"]} == {"cuda:0", "cuda:1", "cpu"}
    status, index = http(ops.url + "/v2/repository/index", "POST", {})
    assert status == 200
    by_name = {row["name"]: row for row in index}
    assert by_name["tiny-a"]["state"] == "READY" and by_name["tiny-a"]["path"] == "tiny.safetensors"
    assert by_name["more/spare.safetensors"]["state"] == "UNAVAILABLE"
    assert by_name["more/spare.safetensors"]["reason"] == "not loaded"
    assert "tiny.safetensors" not in by_name  # listed under its loaded name
    status, ready_only = http(ops.url + "/v2/repository/index", "POST", {"ready": True})
    assert status == 200 and [row["name"] for row in ready_only] == ["tiny-a"]

    # One good and one failing Forward through the job API.
    inputs_path = tmp_path / "in.safetensors"
    r = fleet("gen-inputs", ops.models / "tiny.safetensors", "--height", 8, "--width", 8, "--seed", 1,
              inputs_path, token=None)
    assert r.returncode == 0, r.stderr
    inputs = load_safetensors(inputs_path)[0]
    with tf.Client(ops.listen) as c:
        assert c.forward("tiny-a", inputs)["out"].shape[0] == inputs["x"].shape[0]
        with pytest.raises(Exception):  # no latent 'x': the stem refuses the step
            c.forward("tiny-a", {k: v for k, v in inputs.items() if k != "x"})
    text = scrape(ops.metrics)
    forwards = series(text, "fleet_coordinator_forwards_total")
    assert forwards['{model="tiny-a",outcome="ok"}'] == 1, forwards
    assert forwards['{model="tiny-a",outcome="failed"}'] == 1, forwards
    assert series(text, "fleet_coordinator_queue_wait_seconds_count")['{type="forward"}'] >= 2
    assert 'model="tiny-a"' in scrape(ops.worker_metrics["cuda:1"])

    r = fleet("unload", "tiny-a", coordinator=ops.url)
    assert r.returncode == 0 and r.stdout == "unloaded tiny-a\n", r.stderr
    text = scrape(ops.metrics)
    assert 'model="tiny-a"' not in text, [line for line in text.splitlines() if "tiny-a" in line]
    assert series(text, "fleet_coordinator_queue_wait_seconds_count")['{type="forward"}'] >= 2
    for device, address in ops.worker_metrics.items():
        assert 'model="tiny-a"' not in scrape(address), device
    assert "tiny-a" not in fleet("models", coordinator=ops.url).stdout
    r = fleet("unload", "tiny-a", coordinator=ops.url)
    assert r.returncode == 1 and "no model named 'tiny-a' is loaded" in r.stderr, r.stderr
    status, body = http(ops.url + "/v2/models/tiny-a/ready")
    assert status == 503 and "no model named 'tiny-a'" in body["reason"]


def test_load_refusals_are_reported(ops):
    r = fleet("load", "missing.safetensors", coordinator=ops.url)
    assert r.returncode == 1 and "missing.safetensors" in r.stderr and "not found" in r.stderr, r.stderr
    r = fleet("load", "tiny.safetensors", "--mode", "sideways", "--json", coordinator=ops.url)
    assert r.returncode == 1 and "sideways" in json.loads(r.stdout)["error"]
    r = fleet("load", coordinator=ops.url)
    assert r.returncode == 2 and "expected one MODEL path" in r.stderr


def test_coordinator_and_worker_logs_are_json_lines(ops):
    logs = [ops.dir / "coordinator.log"] + sorted(ops.dir.glob("worker-*.log"))
    assert len(logs) == 4
    for log in logs:
        records = []
        for line in log.read_text().splitlines():
            if " ready " in line and not line.startswith("{"):  # the ready line on stdout
                continue
            record = json.loads(line)  # every log line is one JSON object
            assert set(record) >= {"time", "level", "process", "subsystem", "function", "message"}, line
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", record["time"])
            records.append(record)
        assert records, "%s has no log line" % log
        assert all(r["level"] in ("debug", "info", "warning", "error") for r in records)


@pytest.mark.parametrize("binary", BINARIES)
def test_every_binary_answers_version_and_short_help(binary):
    if not os.access(BIN / binary, os.X_OK):
        pytest.skip("%s not built" % binary)
    r = subprocess.run([str(BIN / binary), "--version"], capture_output=True, text=True, timeout=GUARD_S)
    assert r.returncode == 0, r.stderr
    name, version = r.stdout.split()
    assert name == binary and re.match(r"^\d+\.\d+\.\d+$", version)
    r = subprocess.run([str(BIN / binary), "-h"], capture_output=True, text=True, timeout=GUARD_S)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: " + binary), r.stdout[:200]
    assert "--version" in r.stdout


def test_fleet_subcommands_answer_version_and_short_help():
    if _missing():
        pytest.skip("fleet not built")
    for command in ("status", "workers", "models", "load", "unload", "plan", "devices", "inspect",
                    "quantize", "up", "gen-model", "gen-inputs"):
        r = subprocess.run([str(BIN / "fleet"), command, "-h"], capture_output=True, text=True,
                           timeout=GUARD_S, env=_clean_env())
        assert r.returncode == 0 and r.stdout.startswith("usage: fleet " + command), (command, r.stderr)
        r = subprocess.run([str(BIN / "fleet"), command, "--version"], capture_output=True, text=True,
                           timeout=GUARD_S, env=_clean_env())
        assert r.returncode == 0 and r.stdout.startswith("fleet "), (command, r.stderr)
