#!/usr/bin/python3
"""bench/stored: what keeping quantised weights in their stored form costs and saves, measured
against the same model expanded at load, in one run on a local cluster.

    bench/stored/stored_bench.py [--build DIR] [--rounds 3] [--steps 4] [--threads 2]

From a random-weight Flux model (gen-model's small preset with 4 double + 8 single blocks,
bf16) it makes, with ggml's own quantiser (libggml-base.so of the npm package
@node-llama-cpp/linux-x64, through tests/unit/formats/ggml_oracle.py):

* `q8_0.gguf`, `q4_k.gguf`: every matrix whose rows are whole blocks in that type, the rest F32;
* `fp8`: the bf16 model loaded with ComfyUI's weight_dtype fp8_e4m3fn (kept as fp8);
* `q8_0-expanded.safetensors`, `q4_k-expanded.safetensors`: the same values expanded once, as a
  loader that dequantises at load holds them (ggml's dequantisation rounded to bf16 with ggml's
  rounding, the F32 tensors rounded to bf16), so both compute on identical weights.

It starts `fleet up --emulate cuda:0=8gb,cuda:1=8gb,cpu=16gb`, loads every model in stream and
in pipeline mode with `cuda:0,40%;cuda:1,35%;cpu,*` (compute on cuda:0), and reports:

* resident bytes per device of each model, from the workers' fleet_worker_resident_bytes;
* the step time of each stored model against its expanded twin, per mode: the median over
  rounds of the ratio of their median steps in the round (target: pipeline <= 1.10x);
* the weight bytes a stream-mode step moves, against the bf16 model's.

Every step of a stored model must equal its expanded twin's output bit for bit (same weights,
same order of operations); a difference fails the run.
"""
import argparse
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
import urllib.request

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "step"))
sys.path.insert(0, str(REPO / "tests" / "unit" / "formats"))
import ggml_oracle as go  # noqa: E402
import step_bench as sb  # noqa: E402
from safetensors_io import load_safetensors, save_safetensors  # noqa: E402
from tensorfleet_client import Client, wire  # noqa: E402

MODEL_FLAGS = ["--preset", "small", "--double", "4", "--single", "8", "--dtype", "bf16"]
INPUT_FLAGS = ["--height", "64", "--width", "64", "--txt-len", "256"]
TYPES = {"q8_0": 8, "q4_k": 12}
MODES = ("stream", "pipeline")


def bf16_from_ggml(ggml, x):
    """float32 values rounded to bf16 with ggml's rounding, as a torch bf16 tensor."""
    bits = ggml.round16(np.ascontiguousarray(x, np.float32).reshape(-1), "bf16")
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).reshape(x.shape)


def make_models(ggml, source, models):
    tensors, meta = load_safetensors(source)
    for label, gid in TYPES.items():
        block = ggml.lib.ggml_blck_size(gid)
        entries, expanded = [], {}
        for name, t in sorted(tensors.items()):
            x = t.to(torch.float32).numpy()
            ne = list(reversed(x.shape))
            if name.endswith(".weight") and x.ndim == 2 and x.shape[1] % block == 0:
                data = ggml.quantize(gid, x, x.shape[0], x.shape[1])
                entries.append((name, gid, ne, data))
                values = ggml.to_float(gid, data, x.size).reshape(x.shape)
                expanded[name] = bf16_from_ggml(ggml, values)
            else:
                entries.append((name, 0, ne, np.ascontiguousarray(x).tobytes()))
                expanded[name] = torch.from_numpy(x).to(torch.bfloat16)
        kv = [("general.architecture", go.T_STR, "flux"), ("config", go.T_STR, meta["config"])]
        go.write_gguf(str(models / ("%s.gguf" % label)), kv, entries)
        save_safetensors(expanded, models / ("%s-expanded.safetensors" % label),
                         {"config": meta["config"]})


def resident_bytes(metrics_endpoints):
    """{model: {device: bytes}} from the workers' fleet_worker_resident_bytes."""
    out = {}
    pattern = re.compile(r'^fleet_worker_resident_bytes\{device="([^"]+)",model="([^"]+)"\} (\S+)',
                         re.M)
    for endpoint in metrics_endpoints:
        with urllib.request.urlopen("http://%s/metrics" % endpoint, timeout=10) as r:
            text = r.read().decode()
        for device, model, value in pattern.findall(text):
            out.setdefault(model, {})[device] = int(float(value))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=pathlib.Path, default=REPO / "build")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.build = args.build.resolve()
    if not (REPO / go.LIB).exists():
        sys.exit("bench/stored needs ggml's library %s (npm ci, Node.js >= 20)" % go.LIB)
    ggml = go.Ggml(str(REPO))
    work = pathlib.Path(tempfile.mkdtemp(prefix="fleet-stored-bench-"))
    cluster = None
    try:
        models = work / "models"
        models.mkdir()
        fleet = args.build / "bin" / "fleet"
        source = models / "bf16.safetensors"
        sb.run([fleet, "gen-model", *MODEL_FLAGS, "--seed", "7", source])
        inputs_path = work / "inputs.safetensors"
        sb.run([fleet, "gen-inputs", source, *INPUT_FLAGS, "--seed", "1", inputs_path])
        inputs, _ = load_safetensors(inputs_path)
        make_models(ggml, source, models)
        names = ["bf16", "fp8"] + [n for t in TYPES for n in (t, t + "-expanded")]
        files = {n: "%s.%s" % (n, "gguf" if n in TYPES else "safetensors") for n in names}
        files["fp8"] = files["bf16"]  # the bf16 model loaded with weight_dtype fp8_e4m3fn

        cluster = sb.Cluster(args.build, work, args.threads)
        cluster.log.seek(0)
        metrics = re.findall(r"worker \S+ pid=\d+ .*metrics=(\S+)", cluster.log.read())
        client = Client(cluster.listen, forward_timeout=1800)
        for n in names:
            for mode in MODES:
                client.load_model(wire.ModelSpec(path=files[n], compute_device="cuda:0",
                                                 expert_mode_allocations=sb.ALLOCATION, mode=mode,
                                                 eject_models=False,
                                                 weight_dtype="fp8_e4m3fn" if n == "fp8"
                                                 else "default"), "%s-%s" % (n, mode))
        resident = resident_bytes(metrics)
        steps = {(n, m): [] for n in names for m in MODES}
        moved = {}
        for r in range(args.rounds):
            for n in names:
                for mode in MODES:
                    reference = None
                    walls = []
                    for step in range(args.steps):
                        t0 = sb.time.perf_counter()
                        out = client.forward("%s-%s" % (n, mode), inputs)["out"]
                        walls.append((sb.time.perf_counter() - t0) * 1e3)
                        reference = out if reference is None else reference
                        if not sb.same_bits(out, reference):
                            sys.exit("FAIL: %s %s is not deterministic" % (n, mode))
                    steps[(n, mode)].append((statistics.median(walls[1:]), reference))
                    moved[(n, mode)] = client.last_forward.weight_bytes
            print("   round %d done" % (r + 1), flush=True)
    finally:
        if cluster:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)

    print("\n== resident bytes per device (fleet_worker_resident_bytes, pipeline-mode load)")
    devices = sorted({d for m in resident.values() for d in m})
    print("   %-16s %s %12s %8s" % ("model", " ".join("%12s" % d for d in devices), "total",
                                    "vs bf16"))
    bf16_total = sum(resident["bf16-pipeline"].values())
    for n in names:
        per = resident.get("%s-pipeline" % n, {})
        total = sum(per.values())
        print("   %-16s %s %12d %7.3fx" % (n, " ".join("%12d" % per.get(d, 0) for d in devices),
                                            total, total / bf16_total))
    print("\n== step time, stored form against expanded at load (same weights, same bits)")
    for t in TYPES:
        for mode in MODES:
            stored, expanded = steps[(t, mode)], steps[(t + "-expanded", mode)]
            for (_, a), (_, b) in zip(stored, expanded):
                if not sb.same_bits(a, b):
                    sys.exit("FAIL: %s in %s mode differs from its expanded twin" % (t, mode))
            ratio = statistics.median(s / e for (s, _), (e, _) in zip(stored, expanded))
            target = 1.10 if mode == "pipeline" else None
            verdict = "-" if target is None else ("<= 1.10 %s" % ("met" if ratio <= target
                                                                  else "NOT MET"))
            print("   %-5s %-9s stored %8.1f ms  expanded %8.1f ms  %6.3fx  %s" % (
                t, mode, statistics.median(s for s, _ in stored),
                statistics.median(e for e, _ in expanded), ratio, verdict))
            print("RESULT bench=stored type=%s mode=%s ratio=%.3f" % (t, mode, ratio))
    print("\n== weight bytes moved per stream-mode step")
    for n in names:
        print("   %-16s %12d  %6.3fx bf16" % (n, moved[(n, "stream")],
                                           moved[(n, "stream")] / moved[("bf16", "stream")]))
    print("   every stored model's output equals its expanded twin's bit for bit")


if __name__ == "__main__":
    main()
