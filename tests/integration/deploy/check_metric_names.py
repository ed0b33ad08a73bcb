#!/usr/bin/python3
"""Every fleet_* metric name used by the alert rules and dashboards in monitoring/ exists.

    check_metric_names.py           the names are listed in docs/metrics.md (the contract)
    check_metric_names.py --live    the names are served by real processes: starts a
                                    coordinator and two workers on loopback, scrapes their
                                    /metrics and compares (skips only while the binaries are
                                    not built)

Histogram series (_bucket, _sum, _count) count as their family. A family that a process
declares but has no series for yet is absent from its exposition (prometheus-cpp), so the live
check first exercises the control API.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploycheck as dc  # noqa: E402

problems = dc.Problems("check_metric_names")


def check_documented(used, documented):
    for name, where in sorted(used.items()):
        base = dc.base_metric(name, documented)
        if base not in documented:
            problems.add(where[0], f"metric {name} is not in docs/metrics.md"
                         + (f" (also used in {len(where) - 1} more place(s))" if len(where) > 1 else ""))


def check_live(used, documented):
    import fleet_cluster

    missing = fleet_cluster.binaries_missing()
    if missing:
        dc.skip(f"binary not built: {', '.join(missing)} in {dc.BUILD / 'bin'} "
                "(the live metric-name check needs them)")
    with fleet_cluster.LocalCluster() as cluster:
        # Touch the control API so request/job families get series.
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/workers", "/v2/models"):
            cluster.http(path)
        cluster.exercise()
        served = {"fleet_coordinator": fleet_cluster.exposition_names(
            cluster.scrape(cluster.coordinator))}
        worker_names = {}
        for w in cluster.workers:
            for name, kind in fleet_cluster.exposition_names(cluster.scrape(w)).items():
                worker_names.setdefault(name, kind)
        served["fleet_worker"] = worker_names
    for name, where in sorted(used.items()):
        base = dc.base_metric(name, documented)
        prefix = "fleet_coordinator" if base.startswith("fleet_coordinator") else "fleet_worker"
        got = served[prefix].get(base)
        process = "fleet-coordinator" if prefix == "fleet_coordinator" else "fleet-worker"
        if got is None:
            problems.add(where[0], f"metric {base} is not served by a live {process} "
                         f"(it serves {len([n for n in served[prefix] if n.startswith('fleet_')])} "
                         "fleet_* families; a labelled family appears once it has a series)")
        elif base in documented and got not in (documented[base], "untyped"):
            problems.add(where[0], f"metric {base} is a {got} on the live {process}, "
                         f"docs/metrics.md says {documented[base]}")
    undocumented = sorted(n for names in served.values() for n in names
                          if n.startswith("fleet_") and n not in documented)
    for n in undocumented:
        problems.add("docs/metrics.md", f"live processes serve {n}, which it does not list")


def main():
    live = sys.argv[1:] == ["--live"]
    documented = dc.documented_metrics()
    if not documented:
        problems.add("docs/metrics.md", "no metric tables found")
        problems.finish("")
    used = dc.used_metric_names()
    if not used:
        problems.add("monitoring/", "no fleet_* metric names found in rules or dashboards")
    check_documented(used, documented)
    if live:
        check_live(used, documented)
    families = {dc.base_metric(n, documented) for n in used}
    problems.finish(f"{len(families)} metric families used by {len(dc.rule_files())} rule file(s) "
                    f"and {len(dc.dashboard_files())} dashboard(s) are "
                    + ("served by a live coordinator and workers" if live
                       else f"all in docs/metrics.md ({len(documented)} listed)"))


if __name__ == "__main__":
    main()
