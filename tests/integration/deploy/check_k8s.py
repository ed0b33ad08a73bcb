#!/usr/bin/python3
"""Renders every overlay in deploy/k8s/overlays with `kubectl kustomize` and validates it:

1. Schema: npm kubernetes-models validators (types, required fields, formats), then a
   TypeScript pass over its interfaces that also rejects unknown or misspelt keys.
2. The deployment's own contracts:
   - references resolve: ConfigMaps, PVCs, Secrets (only fleet-curve may come from outside);
   - Service, NetworkPolicy and PodMonitor selectors select the pods they are for; the PodMonitor
     keeps exactly the metrics ports;
   - coordinator probes: liveness and startup on /v2/health/live, readiness on
     /v2/health/ready; every container has all three probes, on ports it declares;
   - worker pods: every worker mounts the same memory-backed emptyDir at /dev/shm, has a unique
     FLEET_ID, binds FLEET_LISTEN on the pod IP at a declared port in the range the
     NetworkPolicy opens, and GPU workers (FLEET_BACKING cuda:*) hold exactly one nvidia.com/gpu;
   - CURVE key files named by the ConfigMaps lie in a mounted fleet-curve Secret;
   - pods run as non-root; every FLEET_* variable a container gets is an option of its binary
     (from `--dump-config=table` when built, else from the binary's options.def).
"""
import json
import os
import re
import sys
import tempfile
import pathlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploycheck as dc  # noqa: E402

problems = dc.Problems("check_k8s")
EXTERNAL_SECRETS = {"fleet-curve"}   # created by the operator (docs/operations.md)
WORKER_ZMQ_PORTS = range(7800, 7900)
WORKER_METRICS_PORTS = range(7900, 8000)


def render(overlay):
    import yaml

    r = dc.run(["kubectl", "kustomize", str(overlay)])
    if r.returncode != 0:
        problems.add(dc.rel(overlay), f"kubectl kustomize failed: {r.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def pod_templates(objs):
    """[(obj, pod template)] of the workloads."""
    out = []
    for o in objs:
        if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            out.append((o, o["spec"]["template"]))
    return out


def env_of(container, configmaps):
    """{FLEET_* name: value} a container gets: envFrom ConfigMaps, then env (which wins)."""
    env = {}
    for ef in container.get("envFrom", []):
        ref = (ef.get("configMapRef") or {}).get("name")
        if ref in configmaps:
            env.update(configmaps[ref].get("data", {}))
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", "<valueFrom>")
    return env


def port_of(address):
    m = re.search(r":(\d+)$", address or "")
    return int(m.group(1)) if m else None


def check_overlay(name, objs, tables):
    where = f"overlay {name}"
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    configmaps = by_kind.get("ConfigMap", {})
    pvcs = by_kind.get("PersistentVolumeClaim", {})
    secrets = set(by_kind.get("Secret", {})) | EXTERNAL_SECRETS
    templates = pod_templates(objs)
    comps = {}
    for w, t in templates:
        comps.setdefault(t["metadata"].get("labels", {}).get("app.kubernetes.io/component"), []).append((w, t))
    for comp in ("coordinator", "worker"):
        if comp not in comps:
            problems.add(where, f"no workload with app.kubernetes.io/component={comp}")
    if not problems.items and len(comps.get("coordinator", [])) != 1:
        problems.add(where, "want exactly one coordinator workload")

    for w, t in templates:
        ww = f"{where} {w['kind']}/{w['metadata']['name']}"
        spec = t["spec"]
        sel = w["spec"].get("selector", {}).get("matchLabels", {})
        if not labels_match(sel, t["metadata"].get("labels", {})):
            problems.add(ww, f"selector {sel} does not match the pod template labels")
        sc = spec.get("securityContext", {})
        if not sc.get("runAsNonRoot") or not sc.get("runAsUser"):
            problems.add(ww, "pod securityContext must set runAsNonRoot and a non-zero runAsUser")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v and v["configMap"]["name"] not in configmaps:
                problems.add(ww, f"volume {v['name']}: ConfigMap {v['configMap']['name']} is not rendered")
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
                problems.add(ww, f"volume {v['name']}: PVC {v['persistentVolumeClaim']['claimName']} is not rendered")
            if "secret" in v and v["secret"]["secretName"] not in secrets:
                problems.add(ww, f"volume {v['name']}: Secret {v['secret']['secretName']} is neither rendered "
                             f"nor one the operator creates ({', '.join(sorted(EXTERNAL_SECRETS))})")
        pod_ports, ids, shm_volumes = {}, {}, set()
        comp = t["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        for c in spec["containers"]:
            cw = f"{ww} container {c['name']}"
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for pname, num in ports.items():
                if num in pod_ports:
                    problems.add(cw, f"port {num} is also declared by {pod_ports[num]} (one network namespace)")
                pod_ports[num] = c["name"]
            for ef in c.get("envFrom", []):
                ref = (ef.get("configMapRef") or {}).get("name")
                if ref and ref not in configmaps:
                    problems.add(cw, f"envFrom ConfigMap {ref} is not rendered")
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            for m in mounts.values():
                if m["name"] not in volumes:
                    problems.add(cw, f"mounts volume {m['name']}, which the pod does not have")
            # probes
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                p = c.get(probe)
                if not p:
                    problems.add(cw, f"has no {probe}")
                    continue
                action = p.get("httpGet") or p.get("tcpSocket") or {}
                port = action.get("port")
                if isinstance(port, str) and port not in ports:
                    problems.add(cw, f"{probe} uses port '{port}', which the container does not declare")
            if comp == "coordinator":
                want = {"startupProbe": "/v2/health/live", "livenessProbe": "/v2/health/live",
                        "readinessProbe": "/v2/health/ready"}
                for probe, path in want.items():
                    got = (c.get(probe) or {}).get("httpGet", {}).get("path")
                    if got != path:
                        problems.add(cw, f"{probe} must GET {path}, has {got}")
            # options of the binary this container runs
            binary = (c.get("command") or [""])[0]
            env = env_of(c, configmaps)
            names, source = tables.get(binary, (None, f"unknown binary '{binary}'"))
            if names is None:
                problems.add(cw, f"cannot check its FLEET_* variables: {source}") if binary not in tables else None
            else:
                for var in sorted(env):
                    if var.startswith("FLEET_") and var not in names:
                        problems.add(cw, f"{var} is not an option of {binary} (per {source})")
            # CURVE key files must lie in a mounted fleet-curve secret
            for var, value in env.items():
                if var.startswith("FLEET_CURVE_") and value:
                    mount = next((m for p, m in mounts.items() if value.startswith(p.rstrip("/") + "/")), None)
                    vol = volumes.get(mount["name"]) if mount else None
                    if not vol or vol.get("secret", {}).get("secretName") != "fleet-curve":
                        problems.add(cw, f"{var}={value} is not inside a mounted fleet-curve Secret")
            if comp != "worker":
                continue
            # workers
            shm = mounts.get("/dev/shm")
            vol = volumes.get(shm["name"]) if shm else None
            if not vol or vol.get("emptyDir", {}).get("medium") != "Memory":
                problems.add(cw, "does not mount a memory-backed emptyDir at /dev/shm")
            else:
                shm_volumes.add(shm["name"])
            wid = env.get("FLEET_ID")
            if not wid:
                problems.add(cw, "has no FLEET_ID")
            elif wid in ids:
                problems.add(cw, f"FLEET_ID {wid} is also the id of container {ids[wid]}")
            else:
                ids[wid] = c["name"]
            listen = env.get("FLEET_LISTEN", "")
            if not listen.startswith("tcp://$(POD_IP):"):
                problems.add(cw, f"FLEET_LISTEN={listen!r} must bind the pod IP (tcp://$(POD_IP):PORT): "
                             "the worker registers the endpoint it binds")
            zport, mport = port_of(listen), port_of(env.get("FLEET_METRICS_LISTEN"))
            if zport not in ports.values() or zport not in WORKER_ZMQ_PORTS:
                problems.add(cw, f"FLEET_LISTEN port {zport} is not a declared port in 7800-7899")
            if mport not in ports.values() or mport not in WORKER_METRICS_PORTS:
                problems.add(cw, f"FLEET_METRICS_LISTEN port {mport} is not a declared port in 7900-7999")
            metric_ports = [n for n, v in ports.items() if v == mport]
            if not metric_ports or not metric_ports[0].startswith("metrics"):
                problems.add(cw, f"the metrics port must be named metrics* (the PodMonitor keeps those), got {metric_ports}")
            gpus = str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", "0"))
            backing = env.get("FLEET_BACKING", "")
            if backing.startswith("cuda:") and gpus != "1":
                problems.add(cw, f"GPU worker (FLEET_BACKING={backing}) must limit nvidia.com/gpu to 1, has {gpus}")
            if backing == "cpu" and gpus != "0":
                problems.add(cw, f"CPU worker must not take GPUs (nvidia.com/gpu: {gpus})")
            if backing.startswith("cuda:") and backing != "cuda:0":
                problems.add(cw, f"FLEET_BACKING={backing}: a container pinned to one GPU sees it as cuda:0")
        if comp == "worker" and len(shm_volumes) > 1:
            problems.add(ww, f"workers mount different /dev/shm volumes {sorted(shm_volumes)}; they must share one")

    # Service selectors
    for svc in by_kind.get("Service", {}).values():
        sel = svc["spec"].get("selector", {})
        hit = [t for _, t in templates if labels_match(sel, t["metadata"].get("labels", {}))]
        if not hit:
            problems.add(f"{where} Service/{svc['metadata']['name']}", f"selector {sel} selects no pod")
        for p in svc["spec"].get("ports", []):
            tp = p.get("targetPort")
            if isinstance(tp, str) and hit and not any(
                    tp == port.get("name") for t in hit for c in t["spec"]["containers"] for port in c.get("ports", [])):
                problems.add(f"{where} Service/{svc['metadata']['name']}", f"targetPort '{tp}' is no container port")

    # NetworkPolicies: each selects pods, and every peer selector selects pods or a namespace.
    for np in by_kind.get("NetworkPolicy", {}).values():
        nw = f"{where} NetworkPolicy/{np['metadata']['name']}"
        sel = np["spec"]["podSelector"].get("matchLabels", {})
        if not any(labels_match(sel, t["metadata"].get("labels", {})) for _, t in templates):
            problems.add(nw, f"podSelector {sel} selects no pod")
        for rule in np["spec"].get("ingress", []) + np["spec"].get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                ps = peer.get("podSelector", {}).get("matchLabels")
                if ps and "namespaceSelector" not in peer and not any(
                        labels_match(ps, t["metadata"].get("labels", {})) for _, t in templates):
                    problems.add(nw, f"peer podSelector {ps} selects no pod of this deployment")
    policies = {np["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component"): np
                for np in by_kind.get("NetworkPolicy", {}).values()}
    for comp in ("coordinator", "worker"):
        if comp not in policies:
            problems.add(where, f"no NetworkPolicy for the {comp} pods")

    # PodMonitor
    monitors = by_kind.get("PodMonitor", {})
    if not monitors:
        problems.add(where, "no PodMonitor")
    for pm in monitors.values():
        pw = f"{where} PodMonitor/{pm['metadata']['name']}"
        spec = pm.get("spec", {})
        known = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels",
                 "sampleLimit", "targetLimit"}
        for k in set(spec) - known:
            problems.add(pw, f"unknown spec key '{k}'")
        sel = spec.get("selector", {}).get("matchLabels", {})
        comps_hit = {t["metadata"]["labels"].get("app.kubernetes.io/component")
                     for _, t in templates if labels_match(sel, t["metadata"].get("labels", {}))}
        if not {"coordinator", "worker"} <= comps_hit:
            problems.add(pw, f"selector {sel} must select the coordinator and the worker pods, selects {sorted(comps_hit)}")
        for ep in spec.get("podMetricsEndpoints", []):
            keep = [r for r in ep.get("relabelings", []) if r.get("action") == "keep"
                    and r.get("sourceLabels") == ["__meta_kubernetes_pod_container_port_name"]]
            role = [r for r in ep.get("relabelings", []) if r.get("targetLabel") == "fleet_role"]
            if not role:
                problems.add(pw, "endpoints must set the fleet_role label the alert rules select on")
            if not keep:
                problems.add(pw, "endpoints must keep only the metrics ports")
                continue
            rx = re.compile(f"^(?:{keep[0]['regex']})$")
            for _, t in templates:
                for c in t["spec"]["containers"]:
                    for port in c.get("ports", []):
                        is_metrics = port["containerPort"] in WORKER_METRICS_PORTS or port.get("name") == "metrics"
                        if bool(rx.match(port.get("name", ""))) != is_metrics:
                            problems.add(pw, f"keep regex {keep[0]['regex']} {'drops' if is_metrics else 'keeps'} "
                                         f"port {port.get('name')} of container {c['name']}")


def to_ts(objs_with_source, tmp):
    """TypeScript `satisfies I<Kind>` per object: unknown keys are errors (excess property checks)."""
    lines, where = [], []
    imports = {}
    for n, (source, o) in enumerate(objs_with_source):
        mod = f"kubernetes-models/{o['apiVersion']}/{o['kind']}"
        if not (dc.NODE_MODULES / f"{mod}.d.ts").exists():
            continue
        alias = f"I{o['kind']}_{o['apiVersion'].replace('/', '_').replace('.', '_')}"
        imports[alias] = (mod, f"I{o['kind']}")
        lines.append(f"export const o{n} = {json.dumps(o)} satisfies {alias};")
        where.append(f"{source} {o['kind']}/{o['metadata']['name']}")
    head = [f'import type {{ {iface} as {alias} }} from "{mod}";' for alias, (mod, iface) in imports.items()]
    f = pathlib.Path(tmp) / "manifests.ts"
    f.write_text("\n".join(head + lines) + "\n")
    (pathlib.Path(tmp) / "node_modules").symlink_to(dc.NODE_MODULES)
    r = dc.run([str(dc.NODE_MODULES / ".bin/tsc"), "--noEmit", "--strict", "--moduleResolution", "bundler",
                "--module", "esnext", "--target", "es2022", "--skipLibCheck", "--pretty", "false", f.name], cwd=tmp)
    if r.returncode != 0:
        for line in (r.stdout + r.stderr).strip().splitlines():
            m = re.match(r"manifests\.ts\((\d+),\d+\): (.*)", line)
            idx = int(m.group(1)) - 1 - len(head) if m else -1
            problems.add(where[idx] if 0 <= idx < len(where) else "TypeScript", m.group(2) if m else line)


def main():
    dc.require_machine_tool("kubectl", (1, 21), ["version", "--client"])
    dc.require_node_modules("kubernetes-models", "typescript")
    overlays = sorted(p for p in (dc.ROOT / "deploy/k8s/overlays").iterdir() if (p / "kustomization.yaml").exists())
    if not overlays:
        problems.add("deploy/k8s/overlays", "no overlays")
    tables = {}
    for binary in dc.BINARY_OPTION_DEFS:
        try:
            tables[binary] = dc.option_table(binary)
        except RuntimeError as e:
            problems.add(binary, str(e))
    rendered, counts = [], []
    for ov in overlays:
        objs = render(ov)
        counts.append(f"{ov.name}: {len(objs)} objects")
        rendered += [(ov.name, o) for o in objs]
        if objs:
            check_overlay(ov.name, objs, tables)
    with tempfile.TemporaryDirectory() as tmp:
        items = pathlib.Path(tmp) / "objects.json"
        items.write_text(json.dumps([{"source": s, "object": o} for s, o in rendered]))
        r = dc.run(["node", str(pathlib.Path(__file__).with_name("k8s_validate.mjs")), str(items)])
        for line in r.stdout.splitlines():
            if line.startswith("unknown-kind "):
                _, source, api, obj = line.split(" ", 3)
                if api != "monitoring.coreos.com/v1":   # PodMonitor: checked above
                    problems.add(f"overlay {source} {obj}", f"kind of {api} is unknown to kubernetes-models")
            elif line.strip():
                problems.add("kubernetes-models", line)
        if r.returncode not in (0, 1):
            problems.add("k8s_validate.mjs", r.stderr.strip())
        to_ts(rendered, tmp)
    checked = [src for names, src in tables.values() if names is not None]
    unchecked = [src for names, src in tables.values() if names is None]
    problems.finish(f"{'; '.join(counts)}: schema-valid (kubernetes-models + TypeScript), references, "
                    f"selectors, probes, /dev/shm, ports, GPU pinning and CURVE checked; FLEET_* "
                    f"variables checked against {', '.join(checked) or 'nothing'}"
                    + (f"; NOT checked: {'; '.join(unchecked)}" if unchecked else ""))


if __name__ == "__main__":
    main()
