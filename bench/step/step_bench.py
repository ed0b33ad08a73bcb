#!/usr/bin/python3
"""bench/step: the time of one sampling step of a Flux or WAN model on a local Tensorfleet
cluster, in stream, pipeline and auto mode, against `fleet-run-local` (the same model in one
process, same thread count) measured in the same run, interleaved in rounds.

    bench/step/step_bench.py [--build DIR] [--configs small,large,wan] [--rounds 5] [--steps 4]

Per configuration it generates a random-weight model (real key names; Flux by `fleet gen-model`,
WAN 2.1 T2V by tests/python/wan_reference.random_weights, with the real head width 128) and
inputs, starts
`fleet up --emulate cuda:0=...,cuda:1=...,cpu=...` (a coordinator and three CPU-backed workers
on this host, talking over shared memory), loads the model once per mode with the allocation
string of the demo (`cuda:0,40%;cuda:1,35%;cpu,*`, compute on cuda:0) and then, per round:

* `fleet-run-local --repeat STEPS+1`: forward times inside the process (the first is dropped);
* per mode, a sampling run of STEPS steps through the job API, as the ComfyUI node sends them:
  the constant inputs (Flux: context, y, guidance; WAN: context) go with the first step only.
  Steps 2.. are timed at the client (round trip, what ComfyUI waits for).

Every step's output must equal run-local's output bit for bit (the same inputs every step);
a difference fails the run. The ratio of a mode is the median over rounds of (its median step
in the round / run-local's median in the round), so drift of this shared machine between rounds
cancels. Targets (issue 7): pipeline over shm <= 1.05x run-local; stream <= 1.10x
max(run-local, streamed bytes / memcpy bandwidth), with memcpy measured here in the same run.
"""
import argparse
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "comfyui"))
sys.path.insert(0, str(REPO / "tests" / "python"))
from safetensors_io import load_safetensors, save_safetensors  # noqa: E402
import wan_reference  # noqa: E402
from tensorfleet_client import Client, wire  # noqa: E402

# Flux configs: name -> (gen-model flags, gen-inputs flags).
CONFIGS = {
    # The hidden-256 test model of the demo: 4 double + 8 single blocks, bf16 (~100 MB).
    "small": (["--preset", "small", "--double", "4", "--single", "8", "--dtype", "bf16"],
              ["--height", "64", "--width", "64", "--txt-len", "256"]),
    # Hidden 1024 (8 heads of 128), 4 double + 8 single blocks, bf16 (~0.6 GB): 4x the width,
    # 16x the weights and the compute of `small`; what this 2-core machine can step in seconds.
    "large": (["--preset", "small", "--hidden", "1024", "--heads", "8", "--double", "4",
               "--single", "8", "--dtype", "bf16"],
              ["--height", "64", "--width", "64", "--txt-len", "256"]),
}
# WAN configs: name -> (wan_reference.random_weights arguments, latent [T, H, W], text tokens).
# WAN 2.1 T2V with the real key names and the real head width 128: dim 512 = 4 heads of 128
# (the head count follows from dim / 128, as for the real 1.3B and 14B, so the file carries no
# config metadata), 4 blocks, ffn 1024, umT5's text width 4096, bf16 (~33 MiB). A latent of
# 3 x 32 x 32 (patch 1x2x2: 3 * 16 * 16 = 768 video tokens) and 512 text tokens (umT5's padded
# length) make a step of ~0.3 s on this 2-core machine.
WAN_CONFIGS = {
    "wan": (dict(dim=512, ffn_dim=1024, num_layers=4, text_dim=4096), (3, 32, 32), 512),
}
MODES = ("stream", "pipeline", "auto")
ALLOCATION = "cuda:0,40%;cuda:1,35%;cpu,*"
EMULATE = "cuda:0=8gb,cuda:1=8gb,cpu=16gb"
# The inputs the ComfyUI node sends with the first step of a run only, per family
# (comfyui/tensorfleet_model.py: FLUX_CONSTANT_INPUTS, WAN_CONSTANT_INPUTS).
CONSTANT = {"flux": ("context", "y", "guidance"), "wan": ("context", "clip_fea")}


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


def memcpy_bandwidth(nbytes=256 << 20, repeats=7):
    """Bytes per second of one memcpy between pre-faulted buffers (best of `repeats`)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


class Cluster:
    """`fleet up` in its own process group; stop() ends it (coordinator and workers)."""

    def __init__(self, build, workdir, threads):
        self.log = open(workdir / "up.out", "w+")
        self.proc = subprocess.Popen(
            [str(build / "bin" / "fleet"), "up", "--emulate", EMULATE, "--ephemeral", "--dir",
             str(workdir / "cluster"), "--model-root", str(workdir / "models"),
             "--worker-threads", str(threads), "--heartbeat-timeout", "10s"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            self.log.seek(0)
            text = self.log.read()
            if "serving;" in text:
                self.listen = re.search(r"listen=(\S+)", text).group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("fleet up did not start:\n" + text)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_local(build, model, inputs, out, steps, threads):
    """Forward times (ms) of `fleet-run-local --repeat steps+1`, the first (warm-up) dropped."""
    p = run([build / "bin" / "fleet-run-local", model, "--inputs", inputs, "--out", out,
             "--repeat", steps + 1, "--threads", threads])
    times = [float(m) for m in re.findall(r"forward_ms (\S+)", p.stdout)]
    return times[1:]


def same_bits(a, b):
    return (a.dtype == b.dtype and a.shape == b.shape and
            torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def sampling_run(client, name, inputs, run_id, steps, reference, constant):
    """One sampling run; returns (client ms of steps 2.., ForwardResults of steps 2..)."""
    walls, results = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        out = client.forward(name, inputs, run_id=run_id, constant_inputs=constant,
                             end_run=step + 1 == steps)["out"]
        wall = (time.perf_counter() - t0) * 1e3
        if not same_bits(out, reference):
            raise SystemExit("FAIL: %s step %d differs from fleet-run-local" % (name, step + 1))
        if step > 0:
            walls.append(wall)
            results.append(client.last_forward)
    return walls, results


def make_flux(args, label, model, inputs_path):
    """A Flux model and inputs by `fleet gen-model` / `fleet gen-inputs`; returns the shape text."""
    model_flags, input_flags = CONFIGS[label]
    fleet = args.build / "bin" / "fleet"
    run([fleet, "gen-model", *model_flags, "--seed", "7", model])
    run([fleet, "gen-inputs", model, *input_flags, "--seed", "1", inputs_path])
    return "latent 64x64, 256 text tokens"


def make_wan(label, model, inputs_path):
    """A WAN 2.1 T2V model (wan_reference.random_weights, stored bf16) and its inputs as ComfyUI
    hands them over (x and context in the model dtype, timestep float32 in [0, 1000));
    returns the shape text."""
    shape, latent, text = WAN_CONFIGS[label]
    weights = wan_reference.random_weights("t2v", seed=7, **shape)
    save_safetensors({k: v.to(torch.bfloat16) for k, v in weights.items()}, model)
    channels = wan_reference.VARIANT_CHANNELS["t2v"][0]
    g = torch.Generator().manual_seed(1)
    save_safetensors({
        "x": torch.randn(1, channels, *latent, generator=g).to(torch.bfloat16),
        "context": (0.5 * torch.randn(1, text, shape["text_dim"], generator=g)).to(torch.bfloat16),
        "timestep": torch.rand(1, generator=g) * 1000,
    }, inputs_path)
    t, h, w = latent
    return "dim %d = %d heads of 128, %d blocks, ffn %d, latent %dx%dx%d = %d tokens, %d text " \
        "tokens of %d" % (shape["dim"], shape["dim"] // 128, shape["num_layers"],
                          shape["ffn_dim"], t, h, w, t * (h // 2) * (w // 2), text,
                          shape["text_dim"])


def bench_config(args, label, workdir):
    family = "wan" if label in WAN_CONFIGS else "flux"
    (workdir / "models").mkdir(parents=True)
    model = workdir / "models" / ("step-%s.safetensors" % label)
    inputs_path = workdir / "inputs.safetensors"
    if family == "wan":
        what = make_wan(label, model, inputs_path)
    else:
        what = make_flux(args, label, model, inputs_path)
    inputs, _ = load_safetensors(inputs_path)
    constant = [n for n in CONSTANT[family] if n in inputs]
    ref_path = workdir / "reference.safetensors"
    run_local(args.build, model, inputs_path, ref_path, 0, args.threads)
    reference = load_safetensors(ref_path)[0]["out"]
    size = model.stat().st_size
    print("\n== %s: %s (%s, %.0f MiB), %s, %d threads per process"
          % (label, model.name, family, size / 2**20, what, args.threads), flush=True)

    cluster = Cluster(args.build, workdir, args.threads)
    try:
        client = Client(cluster.listen, forward_timeout=1800)
        for mode in MODES:
            spec = wire.ModelSpec(path=model.name, compute_device="cuda:0",
                                  expert_mode_allocations=ALLOCATION, mode=mode,
                                  eject_models=False, keep_loaded=True)
            info = client.load_model(spec, "step-" + mode)
            if info.family != family:
                raise SystemExit("FAIL: %s loaded as family '%s', not '%s'"
                                 % (model.name, info.family, family))
            sampling_run(client, "step-" + mode, inputs, "warmup-" + mode, 2, reference,
                         constant)
        local_rounds, mode_rounds = [], {m: [] for m in MODES}
        for r in range(args.rounds):
            local = run_local(args.build, model, inputs_path, workdir / "out.safetensors",
                              args.steps - 1, args.threads)
            local_rounds.append(statistics.median(local))
            order = MODES[r % 3:] + MODES[:r % 3]  # rotate: no mode always runs first
            for mode in order:
                walls, results = sampling_run(client, "step-" + mode, inputs,
                                              "bench-%s-%d" % (mode, r), args.steps, reference,
                                              constant)
                mode_rounds[mode].append((statistics.median(walls), results))
            print("   round %d: run-local %.1f ms, %s" % (
                r + 1, local_rounds[-1], ", ".join("%s %.1f ms" % (m, mode_rounds[m][-1][0])
                                                   for m in MODES)), flush=True)
    finally:
        cluster.stop()

    bandwidth = memcpy_bandwidth()
    local_ms = statistics.median(local_rounds)
    rows = []
    for mode in MODES:
        ratios = [w / l for (w, _), l in zip(mode_rounds[mode], local_rounds)]
        results = [f for _, fs in mode_rounds[mode] for f in fs]
        weights = statistics.median(f.weight_bytes for f in results)
        activations = statistics.median(f.activation_bytes for f in results)
        server_ms = statistics.median(f.step_seconds * 1e3 for f in results)
        wall_ms = statistics.median(w for w, _ in mode_rounds[mode])
        copy_ms = weights / bandwidth * 1e3
        if mode == "pipeline":
            bound, target = local_ms, 1.05
        elif mode == "stream":
            bound, target = max(local_ms, copy_ms), 1.10
        else:
            bound, target = local_ms, None
        ratio = statistics.median(ratios) * local_ms / bound
        rows.append((mode, wall_ms, server_ms, weights, activations, copy_ms, ratio, target))

    print("   memcpy %.1f GB/s; run-local median %.1f ms per step" % (bandwidth / 1e9, local_ms))
    print("   %-9s %9s %11s %11s %12s %10s %8s  %s" % (
        "mode", "step ms", "server ms", "weights", "activations", "bytes/bw", "ratio", "target"))
    for mode, wall, server, weights, act, copy_ms, ratio, target in rows:
        verdict = "-" if target is None else ("<= %.2f %s" % (target, "met" if ratio <= target
                                                             else "NOT MET"))
        print("   %-9s %9.1f %11.1f %8.1f MiB %8.2f MiB %7.1f ms %7.3fx  %s" % (
            mode, wall, server, weights / 2**20, act / 2**20, copy_ms, ratio, verdict))
        print("RESULT config=%s mode=%s ratio=%.3f target=%s" % (
            label, mode, ratio, "-" if target is None else "%.2f" % target))
    print("   every step of every mode equals fleet-run-local bit for bit")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=pathlib.Path, default=REPO / "build")
    ap.add_argument("--configs", default="small,large",
                    help="comma list of: %s" % ", ".join([*CONFIGS, *WAN_CONFIGS]))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps per sampling run (>= 2)")
    ap.add_argument("--threads", type=int, default=2, help="libtorch threads per process")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args()
    args.build = args.build.resolve()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (step 1 carries the constant inputs and is not timed)")
    for label in args.configs.split(","):
        if label not in CONFIGS and label not in WAN_CONFIGS:
            ap.error("unknown config '%s' (have: %s)"
                     % (label, ", ".join([*CONFIGS, *WAN_CONFIGS])))
    top = pathlib.Path(tempfile.mkdtemp(prefix="fleet-step-bench-"))
    try:
        for label in args.configs.split(","):
            bench_config(args, label, top / label)
    finally:
        if args.keep:
            print("kept", top)
        else:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
