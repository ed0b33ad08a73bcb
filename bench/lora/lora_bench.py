#!/usr/bin/python3
"""bench/lora: what a LoRA costs on a loaded model in a local Tensorfleet cluster, against
reloading the model from disk, measured in the same run.

    bench/lora/lora_bench.py [--build DIR] [--rounds 3] [--rank 16] [--threads 2]
        [--modes stream,pipeline]

Generates the `large` Flux of bench/step (hidden 1024, 4 double + 8 single blocks, bf16,
~0.6 GB), a rank-R LoRA (kohya names, bf16) on every 2-D weight of it, starts
`fleet up --emulate` (coordinator + three CPU-backed workers), loads the model in each mode
(stream: the blocks beyond cuda:0's share stream to it and are patched at each use; pipeline:
every block computes where it is resident, so patched copies are kept) with compute on cuda:0
and the demo's allocation, and per round measures:

* reload: unload + load of the model (what a loader that patches at load time pays to change a
  LoRA: the weights are read from disk again);
* apply: the first step with a LoRA the workers have not seen (the coordinator maps its keys,
  SetPatches reads the file on every computing worker) minus a steady step with that LoRA;
* change: the first step at another strength of the same file minus that steady step (another
  strength is another patch set: the same work as apply, the base weights untouched);
* steady steps with and without the LoRA.

Prints per-round values and the ratios apply / reload, change / reload and step with LoRA /
step without (medians over rounds). Every LoRA step's output must equal
`fleet run-local --lora` bit for bit; a difference fails the run.
"""
import argparse
import importlib.util
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "comfyui"))
sys.path.insert(0, str(REPO / "tests" / "python"))
import lora_files  # noqa: E402
from safetensors_io import load_safetensors  # noqa: E402
from tensorfleet_client import Client, wire  # noqa: E402

_spec = importlib.util.spec_from_file_location("step_bench", REPO / "bench/step/step_bench.py")
step_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_bench)


def timed(f):
    t0 = time.perf_counter()
    value = f()
    return (time.perf_counter() - t0) * 1e3, value


def bench_mode(c, mode, model, lora_rel, inputs, want, fresh, changed, args):
    """One mode's rounds and ratios (see the module docstring)."""
    spec = wire.ModelSpec(path=model.name, compute_device="cuda:0", mode=mode,
                          expert_mode_allocations=step_bench.ALLOCATION, eject_models=False)
    name = "lora-bench-" + mode
    c.load_model(spec, name)

    def step(loras, expect=None):
        ms, out = timed(lambda: c.forward(name, inputs, loras=loras)["out"])
        if expect is not None and not step_bench.same_bits(out, expect):
            raise SystemExit("FAIL: a LoRA step differs from fleet-run-local")
        return ms

    step([])  # warm-up
    rows = []
    for r in range(args.rounds):
        reload_ms = timed(lambda: (c.unload_model(name), c.load_model(spec, name)))[0]
        plain = statistics.median(step([]) for _ in range(3))
        first = step([(lora_rel, fresh[r])], want[fresh[r]])
        steady = statistics.median(step([(lora_rel, fresh[r])], want[fresh[r]])
                                   for _ in range(3))
        change = step([(lora_rel, changed[r])], want[changed[r]]) - steady
        rows.append(dict(reload=reload_ms, apply=first - steady, change=change, plain=plain,
                         lora=steady))
        print("%s round %d: reload %.0f ms, apply %.0f ms, change strength %.0f ms, step %.0f ms "
              "without LoRA, %.0f ms with" % (mode, r + 1, reload_ms, first - steady, change,
                                               plain, steady), flush=True)
    c.unload_model(name)
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    print("%s medians: reload %.0f ms, apply %.0f ms, change %.0f ms, step %.0f / %.0f ms"
          % (mode, med["reload"], med["apply"], med["change"], med["plain"], med["lora"]))
    print("%s ratio apply / reload:        %.3f" % (mode, med["apply"] / med["reload"]))
    print("%s ratio change / reload:       %.3f" % (mode, med["change"] / med["reload"]))
    print("%s ratio step with / without:   %.3f\n" % (mode, med["lora"] / med["plain"]),
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", type=pathlib.Path, default=REPO / "build")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="stream,pipeline")
    args = p.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="lora-bench-"))
    try:
        (work / "models" / "loras").mkdir(parents=True)
        model = work / "models" / "lora-large.safetensors"
        inputs_path = work / "inputs.safetensors"
        step_bench.make_flux(args, "large", model, inputs_path)
        base, _ = load_safetensors(model)
        targets = [n for n, t in base.items()
                   if n.endswith(".weight") and t.dim() == 2]
        lora_rel = "loras/all-linear-r%d.safetensors" % args.rank
        lora_files.write_lora(work / "models" / lora_rel, base, "flux", fmt="kohya",
                              adapter="lora", rank=args.rank, alpha=float(args.rank),
                              seed=3, dtype=torch.bfloat16, targets=targets)
        lora_bytes = (work / "models" / lora_rel).stat().st_size
        inputs, _ = load_safetensors(inputs_path)
        fleet_local = args.build / "bin" / "fleet-run-local"
        want = {}
        fresh = [0.30 + 0.05 * r for r in range(args.rounds)]    # a new patch set each round
        changed = [0.70 + 0.05 * r for r in range(args.rounds)]  # then its strength changes
        for strength in fresh + changed:
            out = work / "want.safetensors"
            subprocess.run([str(fleet_local), str(model), "--inputs", str(inputs_path), "--out",
                            str(out), "--threads", str(args.threads), "--lora",
                            "%s:%r" % (work / "models" / lora_rel, strength)],
                           check=True, capture_output=True)
            want[strength] = load_safetensors(out)[0]["out"]

        print("== Flux large (%.0f MiB bf16), LoRA rank %d on %d weights (%.0f MiB), %d threads "
              "per process" % (model.stat().st_size / 2**20, args.rank, len(targets),
                               lora_bytes / 2**20, args.threads), flush=True)
        cluster = step_bench.Cluster(args.build, work, args.threads)
        try:
            with Client(cluster.listen) as c:
                for mode in args.modes.split(","):
                    bench_mode(c, mode, model, lora_rel, inputs, want, fresh, changed, args)
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
