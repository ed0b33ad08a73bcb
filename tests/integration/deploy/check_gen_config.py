#!/usr/bin/python3
"""The committed deployment configuration (deploy/k8s/base/config/*.env, used by the Kubernetes
ConfigMaps and the compose services) equals what deploy/gen-config makes from the binaries'
option tables (`--dump-config=table`). Skips, saying so, only while a binary is not built.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploycheck as dc  # noqa: E402

problems = dc.Problems("check_gen_config")


def main():
    missing = [b for b in dc.BINARY_OPTION_DEFS if not (dc.BUILD / "bin" / b).exists()]
    if missing:
        dc.skip(f"binary not built: {', '.join(missing)} in {dc.BUILD / 'bin'} "
                "(deploy/k8s/base/config/*.env cannot be compared with deploy/gen-config)")
    r = dc.run([str(dc.ROOT / "deploy/gen-config"), "--check", "--build", str(dc.BUILD)])
    if r.returncode != 0:
        problems.add("deploy/k8s/base/config", "differs from deploy/gen-config's output "
                     "(run deploy/gen-config and commit):\n" + (r.stdout + r.stderr).strip()[-4000:])
    problems.finish("deploy/k8s/base/config/{coordinator,worker}.env equal deploy/gen-config's output")


if __name__ == "__main__":
    main()
