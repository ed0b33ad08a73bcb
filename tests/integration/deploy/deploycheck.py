"""Shared helpers of the deploy/monitoring checks (tests/integration/deploy/check_*.py).

Each check is a script run by ctest (see CMakeLists.txt here). It prints what it checked, exits
0 when everything holds, 1 with one line per problem (file, field, what is wrong) when not, and
SKIP (77, ctest's SKIP_RETURN_CODE) with a "SKIPPED: ..." line when something it needs is absent:
the fleet binaries (not built yet), or a tool that comes with the machine rather than from
Debian (Node.js >= 20 with the npm packages, kubectl >= 1.21; scripts/bootstrap says when they
are missing). A missing Debian tool is a failure: scripts/bootstrap installs those.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

SKIP = 77
ROOT = pathlib.Path(os.environ.get("FLEET_SOURCE_DIR") or pathlib.Path(__file__).resolve().parents[3])
BUILD = pathlib.Path(os.environ.get("FLEET_BUILD_DIR") or ROOT / "build")
NODE_MODULES = ROOT / "node_modules"

# Metric names in PromQL: fleet_ followed by the rest of the identifier. Recording-rule names
# (fleet:...) contain a colon and are not matched.
_METRIC_RE = re.compile(r"\bfleet_[a-z0-9_]+\b")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


class Problems:
    """Collects problems; `finish()` prints them and exits 1, or prints `ok_line` and exits 0."""

    def __init__(self, name):
        self.name, self.items = name, []

    def add(self, where, what):
        self.items.append(f"{where}: {what}")

    def finish(self, ok_line):
        if self.items:
            for item in self.items:
                print(f"FAIL {item}")
            print(f"{self.name}: {len(self.items)} problem(s)")
            sys.exit(1)
        print(f"{self.name}: {ok_line}")
        sys.exit(0)


def skip(reason):
    print(f"SKIPPED: {reason}")
    sys.exit(SKIP)


def rel(path):
    try:
        return str(pathlib.Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run(cmd, **kwargs):
    """Runs cmd, returns CompletedProcess with text output (stdout and stderr captured)."""
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def require_tool(name):
    path = shutil.which(name)
    if not path:
        print(f"FAIL {name} is not installed (scripts/bootstrap installs it)")
        sys.exit(1)
    return path


def _version(text):
    m = re.search(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def require_machine_tool(name, minimum, version_args):
    """A tool that comes with the machine, not from Debian (node, kubectl): skips the check,
    saying why, when it is missing or older than `minimum` (major, minor)."""
    path = shutil.which(name)
    if not path:
        skip(f"{name} is not installed (needs >= {minimum[0]}.{minimum[1]}; it comes with the "
             "machine, not from Debian)")
    r = run([path, *version_args])
    have = _version(r.stdout + r.stderr)
    if have is None or have < minimum:
        skip(f"{name} is too old or unreadable: '{(r.stdout + r.stderr).strip()[:80]}' "
             f"(needs >= {minimum[0]}.{minimum[1]})")
    return path


def require_node_modules(*packages):
    """npm packages pinned by package-lock.json; npm ci needs Node.js >= 20, so without it the
    check is skipped, saying why."""
    require_machine_tool("node", (20, 0), ["--version"])
    for p in packages:
        if not (NODE_MODULES / p / "package.json").exists():
            skip(f"npm package {p} is missing in {NODE_MODULES} (scripts/bootstrap installs it "
                 "when Node.js >= 20 with npm is present)")


def documented_metrics():
    """{name: type} from the tables of docs/metrics.md."""
    names = {}
    for line in (ROOT / "docs/metrics.md").read_text().splitlines():
        m = re.match(r"\|\s*`(fleet_[a-z0-9_]+)`\s*\|\s*([a-z]+)", line)
        if m:
            names[m.group(1)] = m.group(2)
    return names


def base_metric(name, types):
    """fleet_x_seconds_bucket -> fleet_x_seconds when fleet_x_seconds is a histogram."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
            return name[: -len(suffix)]
    return name


_LABEL_CONTEXT_RE = re.compile(
    r"\{[^}]*\}|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names_in(text):
    """fleet_* metric names of a PromQL expression (label names in {...}, by (...) etc. skipped)."""
    return set(_METRIC_RE.findall(_LABEL_CONTEXT_RE.sub(" ", text)))


def rule_files():
    return sorted((ROOT / "monitoring/prometheus/rules").glob("*.yml"))


def dashboard_files():
    return sorted((ROOT / "monitoring/grafana/dashboards").glob("*.json"))


def dashboard_exprs(path):
    """[(panel title, refId, expr)] of a dashboard, rows' nested panels included."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p.get("title", "?"), t.get("refId", "?"), t.get("expr", "")))
            walk(p.get("panels", []))

    walk(json.loads(pathlib.Path(path).read_text()).get("panels", []))
    return out


def rule_exprs(path):
    import yaml  # python3-yaml (Debian)

    out = []
    for group in (yaml.safe_load(pathlib.Path(path).read_text()) or {}).get("groups", []):
        for rule in group.get("rules", []):
            out.append((rule.get("alert") or rule.get("record"), rule.get("expr", "")))
    return out


def used_metric_names():
    """{metric name as written: [where]} over every rule and dashboard expression."""
    used = {}
    for path in rule_files():
        for name, expr in rule_exprs(path):
            for m in metric_names_in(str(expr)):
                used.setdefault(m, []).append(f"{rel(path)} rule {name}")
    for path in dashboard_files():
        for title, ref, expr in dashboard_exprs(path):
            for m in metric_names_in(expr):
                used.setdefault(m, []).append(f"{rel(path)} panel '{title}' target {ref}")
        # Template variable queries use metric names too.
        dash = json.loads(path.read_text())
        for var in dash.get("templating", {}).get("list", []):
            q = var.get("query")
            text = q.get("query", "") if isinstance(q, dict) else str(q or "")
            for m in metric_names_in(text):
                used.setdefault(m, []).append(f"{rel(path)} variable {var.get('name')}")
    return used


def grafana_to_promql(expr):
    """Replaces Grafana's variables with values Prometheus accepts, for syntax checks/queries."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    expr = expr.replace("$__range", "1h")
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}?", ".*", expr)


BINARY_OPTION_DEFS = {"fleet-coordinator": "coordinator", "fleet-worker": "worker"}


def option_table(binary):
    """(set of FLEET_* names of `binary`'s options, where they came from) or (None, reason).

    From `<build>/bin/<binary> --dump-config=table` when the binary is built, else from the
    names in its options.def in the source tree (the same X-macro table)."""
    path = BUILD / "bin" / binary
    if path.exists():
        r = run([str(path), "--dump-config=table"], timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{path} --dump-config=table exited {r.returncode}: {r.stderr.strip()}")
        return {row["env"] for row in json.loads(r.stdout)}, f"{binary} --dump-config=table"
    defs = sorted((ROOT / BINARY_OPTION_DEFS[binary]).glob("**/options.def"))
    if not defs:
        return None, f"{binary} is not built and has no options.def yet"
    names = set()
    for d in defs:
        for m in re.finditer(r"^\s*FLEET_OPTION\(\s*[^,]+?\s*,\s*(\w+)\s*,", d.read_text(), re.M):
            names.add("FLEET_" + m.group(1).upper())
    return names, rel(defs[0])
