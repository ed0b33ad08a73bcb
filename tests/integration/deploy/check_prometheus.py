#!/usr/bin/python3
"""promtool over monitoring/prometheus: `check config` (with the container paths of
prometheus.yml pointed at this checkout, so the rule files it names are checked through it too),
`check rules` on every rule file and `test rules` on every unit-test file. Also requires every
alert to have a severity, a summary and a description, and a unit test that expects it to fire.
"""
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploycheck as dc  # noqa: E402

problems = dc.Problems("check_prometheus")
PROM = dc.ROOT / "monitoring/prometheus"


def promtool(*args, cwd=None):
    r = dc.run(["promtool", *args], cwd=cwd)
    if r.returncode != 0:
        problems.add(f"promtool {' '.join(args)}", (r.stdout + r.stderr).strip())
    return r


def main():
    import yaml

    dc.require_tool("promtool")
    config = PROM / "prometheus.yml"
    with tempfile.TemporaryDirectory() as tmp:
        # The compose file mounts monitoring/prometheus/rules at /etc/prometheus/rules.
        text = config.read_text().replace("/etc/prometheus/rules/", f"{PROM}/rules/")
        text = text.replace("/etc/prometheus/targets/", f"{tmp}/targets/")
        local = pathlib.Path(tmp) / "prometheus.yml"
        local.write_text(text)
        r = promtool("check", "config", str(local))
        rules = dc.rule_files()
        # promtool prints "SUCCESS: N rules found" once per rule file the config loaded.
        found = r.stdout.count("rules found")
        if r.returncode == 0 and found != len(rules):
            problems.add(dc.rel(config), f"rule_files loads {found} file(s), not the "
                         f"{len(rules)} in monitoring/prometheus/rules")
    if not rules:
        problems.add("monitoring/prometheus/rules", "no rule files")
    promtool("check", "rules", *[str(p) for p in rules])
    tests = sorted((PROM / "tests").glob("*.yml"))
    if not tests:
        problems.add("monitoring/prometheus/tests", "no rule unit tests")
    for t in tests:
        promtool("test", "rules", t.name, cwd=t.parent)

    tested = set()
    for t in tests:
        for case in (yaml.safe_load(t.read_text()) or {}).get("tests", []):
            for a in case.get("alert_rule_test", []):
                if a.get("exp_alerts"):
                    tested.add(a.get("alertname"))
    alerts = 0
    for path in rules:
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            for rule in group.get("rules", []):
                name = rule.get("alert")
                if not name:
                    continue
                alerts += 1
                where = f"{dc.rel(path)} alert {name}"
                if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                    problems.add(where, "labels.severity must be critical, warning or info")
                for key in ("summary", "description"):
                    if not rule.get("annotations", {}).get(key):
                        problems.add(where, f"annotations.{key} is missing")
                if name not in tested:
                    problems.add(where, "no promtool unit test expects it to fire")
    problems.finish(f"config, {len(rules)} rule file(s) with {alerts} alerts, "
                    f"{len(tests)} unit-test file(s): all pass")


if __name__ == "__main__":
    main()
