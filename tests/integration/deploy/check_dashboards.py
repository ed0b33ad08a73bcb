#!/usr/bin/python3
"""Validates the Grafana dashboards and their provisioning (monitoring/grafana/).

1. The committed JSON equals monitoring/grafana/gen-dashboards' output.
2. Type check against npm @grafana/schema with TypeScript (strict, excess properties are errors):
   the dashboard as `Dashboard`, and each panel's options / custom field config as the options
   of its panel plugin.
3. Structure: unique dashboard uids and panel ids, panels inside the 24-column grid and not
   overlapping, every panel on the `${datasource}` variable, every `$variable` declared,
   targets with unique refIds and an expression.
4. Every expression parses as PromQL (`promtool check rules` on the expressions as recording
   rules, Grafana variables replaced).
5. The provisioning files point at the dashboards folder and a Prometheus datasource.
"""
import json
import os
import pathlib
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploycheck as dc  # noqa: E402

# Panel type -> module of @grafana/schema with its Options / FieldConfig types.
PANEL_TYPES = {
    "timeseries": "timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen",
    "stat": "stat/panelcfg/x/StatPanelCfg_types.gen",
    "bargauge": "bargauge/panelcfg/x/BarGaugePanelCfg_types.gen",
    "table": "table/panelcfg/x/TablePanelCfg_types.gen",
}
HAS_FIELD_CONFIG = {"timeseries", "table"}
BUILTIN_VARS = {"__rate_interval", "__interval", "__range", "__all"}

problems = dc.Problems("check_dashboards")


def check_generated():
    r = dc.run([str(dc.ROOT / "monitoring/grafana/gen-dashboards"), "--check"])
    if r.returncode != 0:
        problems.add("monitoring/grafana/dashboards", "differs from gen-dashboards output:\n"
                     + r.stdout[-3000:] + r.stderr)


def all_panels(dash):
    out = []

    def walk(panels):
        for p in panels:
            out.append(p)
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    return out


def check_structure(path, dash, uids):
    where = dc.rel(path)
    uid = dash.get("uid")
    if not uid:
        problems.add(where, "dashboard has no uid")
    elif uid in uids:
        problems.add(where, f"uid '{uid}' is also used by {uids[uid]}")
    else:
        uids[uid] = where
    variables = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
    ds_vars = {v.get("name") for v in dash.get("templating", {}).get("list", [])
               if v.get("type") == "datasource" and v.get("query") == "prometheus"}
    if not ds_vars:
        problems.add(where, "no templating variable of type datasource for prometheus")
    ids, cells = {}, {}
    for p in all_panels(dash):
        title = p.get("title", "?")
        pw = f"{where} panel '{title}'"
        pid = p.get("id")
        if not isinstance(pid, int):
            problems.add(pw, f"id {pid!r} is not an integer")
        elif pid in ids:
            problems.add(pw, f"id {pid} is also panel '{ids[pid]}'")
        else:
            ids[pid] = title
        g = p.get("gridPos") or {}
        x, y, w, h = (g.get(k) for k in ("x", "y", "w", "h"))
        if not all(isinstance(v, int) for v in (x, y, w, h)) or w <= 0 or h <= 0 or x < 0 or y < 0:
            problems.add(pw, f"gridPos {g} is not four non-negative integers with w, h > 0")
            continue
        if x + w > 24:
            problems.add(pw, f"gridPos x={x} w={w} goes past the 24-column grid")
        for cx in range(x, min(x + w, 24)):
            for cy in range(y, y + h):
                if (cx, cy) in cells:
                    problems.add(pw, f"overlaps panel '{cells[(cx, cy)]}' at column {cx} row {cy}")
                    break
                cells[(cx, cy)] = title
            else:
                continue
            break
        if p.get("type") == "row":
            continue
        if p.get("type") not in PANEL_TYPES:
            problems.add(pw, f"panel type '{p.get('type')}' is not one this check knows "
                         f"({', '.join(PANEL_TYPES)}); add its @grafana/schema module here")
        ds = p.get("datasource") or {}
        m = re.fullmatch(r"\$\{(\w+)\}", str(ds.get("uid", "")))
        if ds.get("type") != "prometheus" or not m or m.group(1) not in ds_vars:
            problems.add(pw, f"datasource {ds} is not the prometheus datasource variable")
        targets = p.get("targets") or []
        if not targets:
            problems.add(pw, "has no targets")
        refs = set()
        for t in targets:
            ref = t.get("refId")
            if not ref or ref in refs:
                problems.add(pw, f"target refId {ref!r} missing or repeated")
            refs.add(ref)
            expr = t.get("expr", "")
            if not expr.strip():
                problems.add(pw, f"target {ref} has an empty expr")
            for var in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expr):
                if var not in variables and var not in BUILTIN_VARS:
                    problems.add(pw, f"target {ref} uses ${var}, which is not a dashboard variable")


LOOSE = """
// String enums of the schema accept their values written as plain strings (as JSON has them).
type Loose<T> = T extends string ? `${T}` : T extends Array<infer U> ? Array<Loose<U>>
  : T extends object ? { [K in keyof T]: Loose<T[K]> } : T;
"""


def check_types(paths, tmp):
    """Writes one .ts file per dashboard and runs tsc over them."""
    tmp = pathlib.Path(tmp)
    (tmp / "node_modules").symlink_to(dc.NODE_MODULES)
    files, offsets = [], []
    for n, path in enumerate(paths):
        dash = json.loads(path.read_text())
        lines = ['import type { Dashboard } from "@grafana/schema";']
        for kind, module in PANEL_TYPES.items():
            names = f"Options as {kind}Options"
            if kind in HAS_FIELD_CONFIG:
                names += f", FieldConfig as {kind}FieldConfig"
            lines.append(f'import type {{ {names} }} from '
                         f'"@grafana/schema/dist/esm/raw/composable/{module}";')
        lines.append(LOOSE)
        lines.append(f"// {dc.rel(path)}")
        # json.dumps(indent=1) keeps the line structure of the file (indent=2): tsc's line numbers
        # inside the dashboard map back onto the JSON file.
        offsets.append(len("\n".join(lines).splitlines()) + 1)
        lines.append(f"export const dashboard = {json.dumps(dash, indent=1)} satisfies Loose<Dashboard>;")
        for p in all_panels(dash):
            kind = p.get("type")
            if kind not in PANEL_TYPES:
                continue
            tag = f"panel_{p.get('id')}"
            lines.append(f"// panel '{p.get('title')}'")
            lines.append(f"export const {tag}_options = {json.dumps(p.get('options', {}))} "
                         f"satisfies Partial<Loose<{kind}Options>>;")
            custom = p.get("fieldConfig", {}).get("defaults", {}).get("custom")
            if custom is not None:
                if kind not in HAS_FIELD_CONFIG:
                    problems.add(f"{dc.rel(path)} panel '{p.get('title')}'",
                                 f"fieldConfig.defaults.custom is set but {kind} panels have none")
                else:
                    lines.append(f"export const {tag}_custom = {json.dumps(custom)} "
                                 f"satisfies Partial<Loose<{kind}FieldConfig>>;")
        f = tmp / f"dashboard_{n}.ts"
        f.write_text("\n".join(lines) + "\n")
        files.append(f)
    tsc = dc.NODE_MODULES / ".bin/tsc"
    r = dc.run([str(tsc), "--noEmit", "--strict", "--moduleResolution", "bundler", "--module", "esnext",
                "--target", "es2022", "--skipLibCheck", "--pretty", "false",
                *[str(f) for f in files]], cwd=tmp)
    if r.returncode != 0:
        for line in (r.stdout + r.stderr).strip().splitlines():
            m = re.match(r"(dashboard_(\d+)\.ts)\((\d+),(\d+)\): (.*)", line)
            if not m:
                problems.add("@grafana/schema type check", line)
                continue
            n, ts_line = int(m.group(2)), int(m.group(3))
            path = paths[n]
            json_lines = len(path.read_text().splitlines())
            json_line = ts_line - offsets[n] + 1
            if 1 <= json_line <= json_lines:
                where = f"{dc.rel(path)}:{json_line}"
            else:
                where = f"{dc.rel(path)} panel options (line {ts_line} of the generated {m.group(1)})"
            problems.add(where, m.group(5))


def check_promql(paths, tmp):
    import yaml

    rules = []
    for path in paths:
        for n, (title, ref, expr) in enumerate(dc.dashboard_exprs(path)):
            rules.append({"record": f"dashboard:check_{len(rules)}",
                          "expr": dc.grafana_to_promql(expr),
                          "labels": {"panel": f"{dc.rel(path)} {title} {ref}"}})
    f = pathlib.Path(tmp) / "dashboard-exprs.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-exprs", "rules": rules}]}))
    r = dc.run(["promtool", "check", "rules", str(f)])
    if r.returncode != 0:
        mapped = 0
        for line in (r.stdout + r.stderr).splitlines():
            m = re.search(r'"dashboard:check_(\d+)": (.*)', line)
            if m:
                rule = rules[int(m.group(1))]
                problems.add(rule["labels"]["panel"], f"{m.group(2)} in: {rule['expr']}")
                mapped += 1
        if not mapped:
            problems.add("dashboard expressions", "promtool rejects:\n" + (r.stdout + r.stderr).strip())
    return len(rules)


def check_provisioning():
    import yaml

    prov = dc.ROOT / "monitoring/grafana/provisioning"
    ds_file = prov / "datasources/prometheus.yml"
    db_file = prov / "dashboards/tensorfleet.yml"
    for f in (ds_file, db_file):
        if not f.exists():
            problems.add(dc.rel(f), "missing")
            return
    ds = yaml.safe_load(ds_file.read_text())
    types = [d.get("type") for d in ds.get("datasources", [])]
    if ds.get("apiVersion") != 1 or "prometheus" not in types:
        problems.add(dc.rel(ds_file), f"want apiVersion 1 and a prometheus datasource, got {types}")
    db = yaml.safe_load(db_file.read_text())
    providers = db.get("providers", [])
    if db.get("apiVersion") != 1 or not providers:
        problems.add(dc.rel(db_file), "want apiVersion 1 and at least one provider")
    for p in providers:
        if p.get("type") != "file" or not p.get("options", {}).get("path"):
            problems.add(dc.rel(db_file), f"provider {p.get('name')} is not a file provider with a path")


def main():
    dc.require_tool("promtool")
    dc.require_node_modules("@grafana/schema", "typescript")
    paths = dc.dashboard_files()
    if not paths:
        problems.add("monitoring/grafana/dashboards", "no dashboards")
        problems.finish("")
    check_generated()
    uids, panels = {}, 0
    for path in paths:
        try:
            dash = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            problems.add(f"{dc.rel(path)}:{e.lineno}:{e.colno}", f"not JSON: {e.msg}")
            continue
        check_structure(path, dash, uids)
        panels += len(all_panels(dash))
    with tempfile.TemporaryDirectory() as tmp:
        check_types(paths, tmp)
        exprs = check_promql(paths, tmp)
    check_provisioning()
    problems.finish(f"{len(paths)} dashboard(s), {panels} panels, {exprs} expressions: "
                    "generated, typed (@grafana/schema), laid out, PromQL valid, provisioned")


if __name__ == "__main__":
    main()
