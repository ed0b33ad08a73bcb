#!/usr/bin/python3
"""Debian's Prometheus server on loopback scrapes a live local cluster (a coordinator and two
workers from $FLEET_BUILD_DIR/bin) with the alert rules of monitoring/ loaded, and:

- every target (coordinator, workers) is up;
- the key series exist with the right values: fleet_coordinator_workers and the sum of
  fleet_coordinator_worker_up equal the number of workers; fleet_worker_capacity_bytes and
  fleet_worker_total_bytes exist for every worker id;
- every recording and alert rule evaluates without error, and no alert fires on the healthy
  cluster;
- every dashboard expression is accepted by the server;
- deploy/docker/fleet-healthcheck reports the coordinator and a worker healthy.
Skips only while the binaries are not built.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploycheck as dc  # noqa: E402
import fleet_cluster  # noqa: E402

problems = dc.Problems("check_prometheus_live")
WORKERS = [("cpu", "cpu"), ("cuda:0", "cpu")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, config, tmp):
        self.port = free_port()
        self.log = open(pathlib.Path(tmp) / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp}/tsdb",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            return json.loads(e.read().decode() or "{}")

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout} s: {self.tail()}")

    def query(self, expr):
        return self.api("/api/v1/query", query=expr)

    def tail(self):
        self.log.flush()
        return "\n".join(pathlib.Path(self.log.name).read_text().splitlines()[-15:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def wait_for(what, fn, timeout=30):
    """Polls fn() -> (ok, detail) until ok; records a problem with the last detail on timeout."""
    deadline, detail = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        ok, detail = fn()
        if ok:
            return True
        time.sleep(0.5)
    problems.add(what, str(detail))
    return False


def scalar(prom, expr):
    r = prom.query(expr)
    res = r.get("data", {}).get("result", [])
    return float(res[0]["value"][1]) if r.get("status") == "success" and res else None


def check(cluster, prom):
    n = len(cluster.workers)

    def targets_up():
        active = prom.api("/api/v1/targets").get("data", {}).get("activeTargets", [])
        down = [f"{t['labels'].get('instance')} ({t['labels'].get('fleet_role')}): {t.get('health')} "
                f"{t.get('lastError', '')}" for t in active if t.get("health") != "up"]
        return len(active) == n + 1 and not down, f"{len(active)} targets, not up: {down}"

    wait_for("prometheus targets", targets_up)
    expectations = [
        ("fleet_coordinator_workers", n),
        ("sum(fleet_coordinator_worker_up)", n),
        ('count(up{fleet_role="worker"} == 1)', n),
        ('count(up{fleet_role="coordinator"} == 1)', 1),
        ("count(count by (device) (fleet_worker_capacity_bytes))", n),
        ("count(count by (device) (fleet_worker_total_bytes))", n),
    ]
    for expr, want in expectations:
        wait_for(f"series {expr}", lambda e=expr, w=want: (scalar(prom, e) == w, f"= {scalar(prom, e)}, want {w}"))
    devices = {r["metric"].get("device") for r in
               prom.query("fleet_worker_capacity_bytes").get("data", {}).get("result", [])}
    if devices != {d for d, _ in WORKERS}:
        problems.add("fleet_worker_capacity_bytes", f"devices {sorted(map(str, devices))}, want {sorted(d for d, _ in WORKERS)}")

    def rules_evaluated():
        groups = prom.api("/api/v1/rules").get("data", {}).get("groups", [])
        rules = [r for g in groups for r in g.get("rules", [])]
        bad = [f"{r.get('name')}: {r.get('health')} {r.get('lastError', '')}" for r in rules
               if r.get("health") != "ok"]
        return bool(rules) and not bad, f"{len(rules)} rules loaded; not ok: {bad}"

    wait_for("alert rules", rules_evaluated)
    firing = [a for a in prom.api("/api/v1/alerts").get("data", {}).get("alerts", [])
              if a.get("state") == "firing"]
    for a in firing:
        problems.add(f"alert {a['labels'].get('alertname')}", f"fires on a healthy cluster: {a['labels']}")
    exprs = 0
    for path in dc.dashboard_files():
        for title, ref, expr in dc.dashboard_exprs(path):
            r = prom.query(dc.grafana_to_promql(expr))
            exprs += 1
            if r.get("status") != "success":
                problems.add(f"{dc.rel(path)} panel '{title}' target {ref}", f"Prometheus rejects it: {r.get('error')}")
    hc = str(dc.ROOT / "deploy/docker/fleet-healthcheck")
    for role, var, addr in [("coordinator", "FLEET_HTTP_LISTEN", cluster.coordinator.ready["http"]),
                            ("worker", "FLEET_METRICS_LISTEN", cluster.workers[0].ready["metrics"])]:
        r = dc.run(["sh", hc, role], env=dict(os.environ, **{var: addr}))
        if r.returncode != 0:
            problems.add(f"fleet-healthcheck {role}", f"reports the live {role} at {addr} unhealthy: {r.stdout.strip()}")
    r = dc.run(["sh", hc, "coordinator"], env=dict(os.environ, FLEET_HTTP_LISTEN=f"127.0.0.1:{free_port()}"))
    if r.returncode == 0:
        problems.add("fleet-healthcheck coordinator", "reports a closed port healthy")
    return exprs


def main():
    dc.require_tool("prometheus")
    missing = fleet_cluster.binaries_missing()
    if missing:
        dc.skip(f"binary not built: {', '.join(missing)} in {dc.BUILD / 'bin'} "
                "(the live Prometheus check needs a running cluster)")
    with tempfile.TemporaryDirectory(prefix="fleet-prom-") as tmp, \
            fleet_cluster.LocalCluster(workers=WORKERS) as cluster:
        import yaml

        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in dc.rule_files()],
            "scrape_configs": [
                {"job_name": "tensorfleet-coordinator",
                 "static_configs": [{"targets": [cluster.coordinator.ready["metrics"]],
                                     "labels": {"fleet_role": "coordinator"}}]},
                {"job_name": "tensorfleet-workers",
                 "static_configs": [{"targets": [w.ready["metrics"] for w in cluster.workers],
                                     "labels": {"fleet_role": "worker"}}]},
            ],
        }
        path = pathlib.Path(tmp) / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        prom = Prometheus(path, tmp)
        try:
            prom.wait_ready()
            exprs = check(cluster, prom)
        finally:
            prom.stop()
    problems.finish(f"Prometheus scraped a coordinator and {len(WORKERS)} workers: targets up, key "
                    f"series present, rules evaluate, no alert fires, {exprs} dashboard expressions "
                    "accepted, fleet-healthcheck agrees")


if __name__ == "__main__":
    main()
