#!/usr/bin/python3
"""Validates deploy/docker-compose.yml without a Docker engine.

1. `docker-compose config` (Debian's v1, schema and interpolation) with and without the gpu
   profile; a bad key or value fails here.
2. The deployment's contracts on the resolved config:
   - a coordinator, a CPU worker, GPU workers (profile gpu), Prometheus and Grafana;
   - every worker sees the same /dev/shm: one worker has `ipc: shareable` and an shm_size of at
     least 1 GiB, the others join it with `ipc: service:<that worker>`;
   - each GPU worker reserves exactly one NVIDIA device, no two the same, and serves it as
     backing cuda:0 under a unique FLEET_ID;
   - workers bind an address the coordinator can dial (not a wildcard) and the coordinator
     endpoint in their config names the coordinator's service and register port;
   - every FLEET_* variable (env_file and environment) is an option of the binary the service
     runs; env files and bind-mounted paths exist in the repository;
   - Prometheus scrapes exactly the coordinator and worker services on their metrics ports,
     and Grafana mounts the provisioning and the dashboards where the provider looks.
"""
import os
import pathlib
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploycheck as dc  # noqa: E402

problems = dc.Problems("check_compose")
COMPOSE = dc.ROOT / "deploy/docker-compose.yml"


def compose_config(*extra):
    import yaml

    env = dict(os.environ, FLEET_MODELS_DIR="/srv/models")
    r = dc.run(["docker-compose", "-f", str(COMPOSE), *extra, "config"], env=env)
    if r.returncode != 0:
        problems.add(f"docker-compose {' '.join(extra)} config", r.stderr.strip())
        return None
    return yaml.safe_load(r.stdout)


def env_file_vars(path):
    out = {}
    for line in pathlib.Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v
    return out


def port_of(address):
    m = re.search(r":(\d+)$", str(address or ""))
    return int(m.group(1)) if m else None


def main():
    import yaml

    dc.require_tool("docker-compose")
    base = compose_config()
    cfg = compose_config("--profile", "gpu")
    if not base or not cfg:
        problems.finish("")
    raw = yaml.safe_load(COMPOSE.read_text())
    services = cfg.get("services", {})
    tables = {b: dc.option_table(b) for b in dc.BINARY_OPTION_DEFS}

    roles = {}
    for name, svc in services.items():
        cmd = svc.get("command") or []
        binary = cmd[0] if cmd else ""
        roles[name] = binary
        where = f"deploy/docker-compose.yml services.{name}"
        if binary not in tables:
            continue
        env = {}
        for f in raw["services"][name].get("env_file", []) if isinstance(raw["services"][name].get("env_file"), list) else []:
            path = COMPOSE.parent / f
            if not path.exists():
                problems.add(where, f"env_file {f} does not exist")
            else:
                env.update(env_file_vars(path))
        env.update({k: str(v) for k, v in (svc.get("environment") or {}).items()})
        svc["_env"] = env
        names, source = tables[binary]
        if names is not None:
            for var in sorted(env):
                if var.startswith("FLEET_") and var not in names:
                    problems.add(where, f"{var} is not an option of {binary} (per {source})")
    coordinators = [n for n, b in roles.items() if b == "fleet-coordinator"]
    workers = [n for n, b in roles.items() if b == "fleet-worker"]
    if len(coordinators) != 1:
        problems.add("deploy/docker-compose.yml", f"want one fleet-coordinator service, have {coordinators}")
    for want in ("prometheus", "grafana"):
        if want not in services:
            problems.add("deploy/docker-compose.yml", f"no {want} service")
    if "fleet-worker-cpu" not in services:
        problems.add("deploy/docker-compose.yml", "no fleet-worker-cpu service")
    gpu_workers = [n for n in workers if services[n].get("_env", {}).get("FLEET_BACKING", "").startswith("cuda")]
    if not gpu_workers:
        problems.add("deploy/docker-compose.yml", "no GPU worker service")
    base_services = set(base.get("services", {}))
    for n in gpu_workers:
        if n in base_services and "gpu" not in (services[n].get("profiles") or []):
            problems.add(f"services.{n}", "GPU workers belong to the gpu profile (a CPU-only box must start without them)")

    # shared memory
    owners = [n for n in workers if services[n].get("ipc") == "shareable"]
    if len(owners) != 1:
        problems.add("deploy/docker-compose.yml", f"want exactly one worker with ipc: shareable, have {owners}")
    else:
        owner = owners[0]
        shm = services[owner].get("shm_size")
        size = None
        m = re.fullmatch(r"(\d+)([kmg]?)b?", str(shm).lower())
        if m:
            size = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]
        if size is None or size < (1 << 30):
            problems.add(f"services.{owner}", f"shm_size {shm!r} must be at least 1 GiB (the workers' shm arenas live there)")
        for n in workers:
            if n != owner and services[n].get("ipc") != f"service:{owner}":
                problems.add(f"services.{n}", f"ipc must be service:{owner} to share its /dev/shm, is {services[n].get('ipc')!r}")

    # GPUs and ids
    ids, devices = {}, {}
    for n in workers:
        env = services[n].get("_env", {})
        wid = env.get("FLEET_ID")
        if not wid or wid in ids:
            problems.add(f"services.{n}", f"FLEET_ID {wid!r} missing or also used by {ids.get(wid)}")
        ids[wid] = n
        listen = env.get("FLEET_LISTEN", "")
        if re.search(r"//(\*|0\.0\.0\.0|127\.0\.0\.1|localhost):", listen) or not listen:
            problems.add(f"services.{n}", f"FLEET_LISTEN={listen!r} must be an address other containers can dial")
        coord = env.get("FLEET_COORDINATOR", "")
        if coordinators:
            cenv = services[coordinators[0]].get("_env", {})
            want = f"tcp://{coordinators[0]}:{port_of(cenv.get('FLEET_REGISTER_LISTEN'))}"
            if coord != want:
                problems.add(f"services.{n}", f"FLEET_COORDINATOR={coord!r}, the coordinator registers workers at {want}")
        reserved = (((services[n].get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
        backing = env.get("FLEET_BACKING", "")
        if backing.startswith("cuda"):
            ids_here = [d for r in reserved if r.get("driver") == "nvidia" and "gpu" in r.get("capabilities", [])
                        for d in r.get("device_ids", [])]
            if len(ids_here) != 1:
                problems.add(f"services.{n}", f"a GPU worker reserves exactly one nvidia device_id, has {ids_here}")
            elif ids_here[0] in devices:
                problems.add(f"services.{n}", f"GPU {ids_here[0]} is also reserved by {devices[ids_here[0]]}")
            else:
                devices[ids_here[0]] = n
            if backing != "cuda:0":
                problems.add(f"services.{n}", f"FLEET_BACKING={backing}: the container sees its one GPU as cuda:0")
        elif reserved:
            problems.add(f"services.{n}", "a CPU worker reserves devices")

    # bind mounts exist
    for n, svc in raw["services"].items():
        for v in svc.get("volumes", []) or []:
            src = str(v).split(":")[0]
            if src.startswith("."):
                if not (COMPOSE.parent / src).exists():
                    problems.add(f"services.{n}", f"bind-mounted {src} does not exist")

    # Prometheus targets = coordinator + workers on their metrics ports
    prom = yaml.safe_load((dc.ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    targets = {}
    for job in prom.get("scrape_configs", []):
        for sc in job.get("static_configs", []):
            for t in sc.get("targets", []):
                targets[t] = sc.get("labels", {}).get("fleet_role")
    want = {}
    for n in coordinators + workers:
        port = port_of(services[n].get("_env", {}).get("FLEET_METRICS_LISTEN"))
        want[f"{n}:{port}"] = "coordinator" if n in coordinators else "worker"
    for t, role in want.items():
        if targets.get(t) != role:
            problems.add("monitoring/prometheus/prometheus.yml", f"does not scrape {t} with fleet_role={role}")
    for t in set(targets) - set(want):
        problems.add("monitoring/prometheus/prometheus.yml", f"scrapes {t}, which is no service of the compose file")

    # Grafana provisioning
    gvols = [str(v) for v in raw["services"].get("grafana", {}).get("volumes", [])]
    prov = yaml.safe_load((dc.ROOT / "monitoring/grafana/provisioning/dashboards/tensorfleet.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    if not any(v.endswith(f":{path}:ro") or v.endswith(f":{path}") for v in gvols if "dashboards" in v.split(":")[0]):
        problems.add("services.grafana", f"does not mount monitoring/grafana/dashboards at {path} (the provider's path)")
    if not any(v.split(":")[1] == "/etc/grafana/provisioning" for v in gvols if ":" in v):
        problems.add("services.grafana", "does not mount the provisioning at /etc/grafana/provisioning")

    checked = [src for names, src in tables.values() if names is not None]
    problems.finish(f"{len(services)} services ({len(workers)} workers, {len(gpu_workers)} on GPUs): "
                    "docker-compose config valid with and without --profile gpu; shared /dev/shm, "
                    "GPU reservations, ids, endpoints, mounts and Prometheus targets consistent; FLEET_* "
                    f"variables checked against {', '.join(checked) or 'nothing'}")


if __name__ == "__main__":
    main()
