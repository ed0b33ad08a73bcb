#!/usr/bin/python3
"""Static checks of deploy/docker/Dockerfile* (no Docker engine runs here):

- instructions parse (line continuations, comments), stages and `COPY --from` agree, every
  `${ARG}` is declared where it is used, every build argument is documented in the header;
- `COPY` sources exist in the build context (the repository) and are not excluded by the
  Dockerfile's .dockerignore;
- the build stage installs its packages with scripts/bootstrap (the same packages as developers
  and CI) and builds with CMake;
- the final stage runs as a non-root user, has a HEALTHCHECK whose program it copies in
  (deploy/docker/fleet-healthcheck, which must pass `sh -n`), and an ENTRYPOINT or CMD;
- every package the runtime stage installs exists in Debian 12 (apt-cache);
- CPU image: every shared library the built binaries link directly (objdump NEEDED,
  resolved with ldd) belongs to a runtime package or one of its dependencies (skipped while not built).
"""
import fnmatch
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploycheck as dc  # noqa: E402

problems = dc.Problems("check_dockerfiles")
DOCKER = dc.ROOT / "deploy/docker"


def parse(path):
    """[(line number, INSTRUCTION, arguments)]; comment lines inside continuations are dropped."""
    out, buf, start = [], "", None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if start is None:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        m = re.match(r"\s*([A-Za-z]+)\s+(.*)", buf, re.S)
        if not m:
            problems.add(f"{dc.rel(path)}:{start}", f"cannot parse instruction: {buf.strip()[:60]}")
        else:
            out.append((start, m.group(1).upper(), m.group(2).strip()))
        buf, start = "", None
    return out


def header_doc(path):
    text = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text.append(line)
    return "\n".join(text)


def ignore_patterns(path):
    f = path.with_name(path.name + ".dockerignore")
    if not f.exists():
        problems.add(dc.rel(path), f"no {f.name} next to it (the build context would include build trees and node_modules)")
        return []
    return [l.strip() for l in f.read_text().splitlines() if l.strip() and not l.startswith("#")]


def ignored(rel_path, patterns):
    result = False
    for p in patterns:
        neg = p.startswith("!")
        p = p[1:] if neg else p
        parts = rel_path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), p.lstrip("/")) for i in range(1, len(parts) + 1))
        if p.startswith("**/"):
            hit = hit or any(fnmatch.fnmatch(x, p[3:]) for x in parts)
        if hit:
            result = not neg
    return result


def check_dockerfile(path):
    where = dc.rel(path)
    instrs = parse(path)
    doc = header_doc(path)
    patterns = ignore_patterns(path)
    global_args, stage_args, stages, stage = set(), set(), [], None
    final = {}
    runs = []
    for n, ins, args in instrs:
        at = f"{where}:{n}"
        if ins == "ARG":
            for a in args.split():
                name = a.split("=", 1)[0]
                (stage_args if stage is not None else global_args).add(name)
                if name not in doc:
                    problems.add(at, f"build argument {name} is not documented in the file's header")
            continue
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", args))
        if ins == "FROM":
            for u in used:
                if u not in global_args:
                    problems.add(at, f"FROM uses ${u}, which no ARG before the first FROM declares")
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            stage = m.group(2) or f"#{len(stages)}"
            stages.append(stage)
            stage_args = set()
            final = {"user": None, "healthcheck": None, "entry": False, "copies": [], "line": n, "apt": []}
            continue
        if stage is None:
            problems.add(at, f"{ins} before the first FROM")
            continue
        if ins in ("RUN", "ENV", "WORKDIR", "COPY", "USER"):
            env_defined = set(re.findall(r"(\w+)=", args)) if ins == "ENV" else set()
            for u in used - stage_args - env_defined - {"PATH", "HOME"}:
                # $(nproc) etc. are shell; ${X} not declared in this stage is empty in Docker.
                if not re.search(r"\$\(\s*" + u, args):
                    problems.add(at, f"{ins} uses ${u}, which is not an ARG or ENV of this stage")
        if ins == "RUN":
            runs.append((stage, args))
            m = re.search(r"apt-get install ([^&;|]*)", args)
            if m:
                final["apt"] += [p.strip('"') for p in m.group(1).split() if not p.startswith("-")]
        elif ins == "COPY":
            parts = args.split()
            flags = [p for p in parts if p.startswith("--")]
            srcs = [p for p in parts if not p.startswith("--")][:-1]
            frm = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if frm is not None:
                if frm not in stages[:-1]:
                    problems.add(at, f"COPY --from={frm}: no earlier stage of that name ({stages[:-1]})")
                continue
            for s in srcs:
                if s == ".":
                    continue
                if not (dc.ROOT / s).exists():
                    problems.add(at, f"COPY source {s} does not exist in the build context")
                elif ignored(s.rstrip("/"), patterns):
                    problems.add(at, f"COPY source {s} is excluded by {path.name}.dockerignore")
                final["copies"].append(s)
        elif ins == "USER":
            final["user"] = args
        elif ins == "HEALTHCHECK":
            final["healthcheck"] = args
        elif ins in ("ENTRYPOINT", "CMD"):
            final["entry"] = True
    if len(stages) < 2:
        problems.add(where, "want a build stage and a runtime stage")
    build_runs = " ".join(a for s, a in runs if s == stages[0])
    if "scripts/bootstrap" not in build_runs:
        problems.add(where, "the build stage must install packages with scripts/bootstrap")
    if "cmake --build" not in build_runs:
        problems.add(where, "the build stage does not run cmake --build")
    user = (final.get("user") or "").split(":")[0]
    if not user or user in ("0", "root"):
        problems.add(where, f"the final stage runs as {user or 'root (no USER)'}; it must be a non-root user")
    hc = final.get("healthcheck")
    if not hc or "CMD" not in hc:
        problems.add(where, "the final stage has no HEALTHCHECK CMD")
    else:
        prog = re.search(r'CMD\s+\[?\s*"?([^",\s\]]+)', hc).group(1)
        if not any(c.endswith(os.path.basename(prog)) for c in final["copies"]):
            problems.add(where, f"HEALTHCHECK runs {prog}, which the final stage does not COPY in")
    if not final.get("entry"):
        problems.add(where, "the final stage has no ENTRYPOINT or CMD")
    return final.get("apt", [])


def check_packages(path, packages):
    if not packages:
        problems.add(dc.rel(path), "the runtime stage installs no packages")
        return
    r = dc.run(["apt-cache", "policy", *packages])
    for pkg in packages:
        block = re.search(rf"^{re.escape(pkg)}:\n(.*?)(?=^\S|\Z)", r.stdout, re.M | re.S)
        cand = re.search(r"Candidate: (\S+)", block.group(1)) if block else None
        if not cand or cand.group(1) == "(none)":
            problems.add(dc.rel(path), f"runtime package {pkg} is not in Debian 12's package lists")


def dependency_closure(packages):
    """Installed packages reachable from `packages` through Depends/Pre-Depends (first alternative)."""
    seen, todo = set(), list(packages)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        r = dc.run(["dpkg-query", "-W", "-f=${Depends}, ${Pre-Depends}\n", p])
        if r.returncode != 0:
            continue
        for dep in r.stdout.split(","):
            name = dep.strip().split("|")[0].strip().split(" ")[0].split(":")[0]
            if name:
                todo.append(name)
    return seen


def check_libraries(packages):
    """Every library the built binaries load comes from the runtime packages' closure."""
    # The image copies all of bin/: check every program there.
    bin_dir = dc.BUILD / "bin"
    built = sorted(b for b in bin_dir.glob("fleet*") if b.is_file() and os.access(b, os.X_OK))
    if not built:
        print("SKIPPED: the library check (no binaries in " + str(dc.BUILD / "bin") + ")")
        return "library check SKIPPED"
    closure = dependency_closure(packages)
    libc = dependency_closure(["libc6", "libgcc-s1", "libstdc++6"])
    missing = {}
    for b in built:
        # Direct dependencies (NEEDED) only: the packages' own Depends bring in the rest.
        needed = set(re.findall(r"NEEDED\s+(\S+)", dc.run(["objdump", "-p", str(b)]).stdout))
        r = dc.run(["ldd", str(b)])
        for line in r.stdout.splitlines():
            m = re.match(r"\s*(\S+) => (/\S+)", line)
            if not m or m.group(1) not in needed:
                continue
            real = os.path.realpath(m.group(2))
            owner = dc.run(["dpkg", "-S", real])
            if owner.returncode != 0:
                owner = dc.run(["dpkg", "-S", m.group(2)])
            if owner.returncode != 0:
                missing.setdefault(f"{m.group(1)} (no Debian package owns {real})", []).append(b.name)
                continue
            pkg = owner.stdout.split(":")[0].strip()
            if pkg not in closure and pkg not in libc:
                missing.setdefault(f"{m.group(1)} from {pkg}", []).append(b.name)
    for lib, users in sorted(missing.items()):
        problems.add("deploy/docker/Dockerfile runtime stage", f"{lib} (needed by {', '.join(users)}) "
                     "is not installed by the runtime packages")
    return f"libraries of {', '.join(b.name for b in built)} covered"


def main():
    for tool in ("apt-cache", "dpkg-query", "sh", "objdump", "ldd"):
        dc.require_tool(tool)
    files = sorted(p for p in DOCKER.glob("Dockerfile*") if not p.name.endswith(".dockerignore"))
    if {p.name for p in files} < {"Dockerfile", "Dockerfile.cuda"}:
        problems.add("deploy/docker", "want Dockerfile (CPU) and Dockerfile.cuda")
    cpu_packages = []
    for f in files:
        pkgs = check_dockerfile(f)
        check_packages(f, pkgs)
        if f.name == "Dockerfile":
            cpu_packages = pkgs
    hc = DOCKER / "fleet-healthcheck"
    r = dc.run(["sh", "-n", str(hc)])
    if r.returncode != 0:
        problems.add(dc.rel(hc), f"sh -n: {r.stderr.strip()}")
    if not os.access(hc, os.X_OK):
        problems.add(dc.rel(hc), "is not executable")
    libs = check_libraries(cpu_packages) if cpu_packages else "no runtime packages"
    problems.finish(f"{', '.join(f.name for f in files)}: stages, args, context, non-root user, "
                    f"healthcheck, Debian packages checked; {libs}")


if __name__ == "__main__":
    main()
