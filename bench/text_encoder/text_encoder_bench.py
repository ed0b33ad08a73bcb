#!/usr/bin/python3
"""bench/text_encoder: one prompt's encode in a local Tensorfleet cluster, per text encoder and
mode, against fleet-run-local measured in the same run.

    bench/text_encoder/text_encoder_bench.py [--build build] [--rounds 3] [--repeat 3]
        [--threads 2] [--models clip-l,t5,umt5]

Models (random weights with the real key names, bf16, made by
tests/python/text_encoder_reference):

* clip-l: CLIP-L at its real size (768 wide, 12 layers, 49408 tokens; 246 MB), one 77-token
  chunk;
* t5: a reduced T5 v1.1 encoder (1024 wide, 16 heads of 64, FFN 2816, 8 blocks, 32128 tokens;
  ~0.4 GB) on 512 tokens (Flux's T5 length); the full T5-XXL (9.5 GB, ~5 TFLOP per prompt)
  takes minutes per encode on this 2-core machine;
* umt5: the same widths with UMT5's real 256384-token embedding (0.5 GB of the ~0.9 GB) and a
  position bias per block, 512 tokens with 40 real and the rest masked (WAN's prompt).

Starts `fleet up --emulate cuda:0=8gb,cuda:1=8gb,cpu=16gb` (coordinator and three CPU-backed
workers) and loads each model once per mode (stream, pipeline) with compute on cuda:0 and the
allocation `cuda:0,30%;cuda:1,30%;cpu,*`, so the encoder's layers are spread over all three
devices with its embedding pinned to cuda:0. Per round: `fleet-run-local --repeat R+1`
(warm-up dropped) and R encodes through the Python job client per mode, each checked bit for
bit against run-local's output. Prints per-round medians and, per model and mode, the median
over rounds of (cluster / run-local) so this shared machine's drift between rounds cancels.
"""
import argparse
import importlib.util
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "comfyui"))
sys.path.insert(0, str(REPO / "tests" / "python"))
from safetensors_io import load_safetensors, save_safetensors  # noqa: E402
import text_encoder_reference as ref  # noqa: E402
from tensorfleet_client import Client, wire  # noqa: E402

_spec = importlib.util.spec_from_file_location("step_bench", REPO / "bench/step/step_bench.py")
step_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_bench)

ALLOCATION = "cuda:0,30%;cuda:1,30%;cpu,*"
MODELS = {
    "clip-l": (lambda: ref.clip_weights(dim=768, ffn=3072, layers=12, vocab=49408, seed=1), 77),
    "t5": (lambda: ref.t5_weights(dim=1024, heads=16, head_dim=64, ffn=2816, layers=8,
                                  vocab=32128, seed=2), 512),
    "umt5": (lambda: ref.t5_weights(umt5=True, dim=1024, heads=16, head_dim=64, ffn=2816,
                                    layers=8, vocab=256384, seed=3), 512),
}


def make(name, models_dir, work):
    weights_fn, length = MODELS[name]
    path = models_dir / ("%s.safetensors" % name)
    weights = {k: v.to(torch.bfloat16) for k, v in weights_fn().items()}
    save_safetensors(weights, path)
    vocab = weights["text_model.embeddings.token_embedding.weight" if name == "clip-l"
                    else "shared.weight"].shape[0]
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(2, vocab - 2, (1, length), generator=g)
    inputs = {"tokens": tokens}
    if name == "clip-l":
        tokens[0, 0], tokens[0, 30:] = 49406, 49407
        inputs["num_tokens"] = torch.tensor([31])
    if name == "umt5":
        tokens[0, 39], tokens[0, 40:] = 1, 0
        mask = torch.zeros(1, length, dtype=torch.long)
        mask[0, :40] = 1
        inputs["attention_mask"] = mask
    inputs_path = work / ("%s-in.safetensors" % name)
    save_safetensors(inputs, inputs_path)
    return path, inputs, inputs_path


def run_local(build, model, inputs_path, out, repeat, threads):
    p = subprocess.run([str(build / "bin" / "fleet-run-local"), str(model), "--inputs",
                        str(inputs_path), "--out", str(out), "--repeat", str(repeat + 1),
                        "--threads", str(threads)], check=True, capture_output=True, text=True)
    return [float(m) for m in re.findall(r"forward_ms (\S+)", p.stdout)][1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=pathlib.Path, default=REPO / "build")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="clip-l,t5,umt5")
    args = parser.parse_args()
    names = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="te-bench-") as tmp:
        work = pathlib.Path(tmp)
        models_dir = work / "models"
        models_dir.mkdir()
        made = {n: make(n, models_dir, work) for n in names}
        cluster = step_bench.Cluster(args.build, work, args.threads)
        try:
            with Client(cluster.listen, forward_timeout=600) as c:
                ratios = {}
                for name in names:
                    path, inputs, inputs_path = made[name]
                    size = os.path.getsize(path) / 2**30
                    loaded = {}
                    for mode in ("stream", "pipeline"):
                        info = c.load_model(wire.ModelSpec(
                            path=path.name, compute_device="cuda:0", mode=mode,
                            expert_mode_allocations=ALLOCATION, eject_models=False),
                            name="%s-%s" % (name, mode))
                        loaded[mode] = info.name
                    for r in range(args.rounds):
                        out = work / "want.safetensors"
                        local = statistics.median(run_local(args.build, path, inputs_path, out,
                                                            args.repeat, args.threads))
                        want = load_safetensors(out)[0]
                        line = "%-6s %.2f GiB round %d: run-local %8.1f ms" % (
                            name, size, r + 1, local)
                        for mode, model in loaded.items():
                            times = []
                            for _ in range(args.repeat):
                                t0 = time.perf_counter()
                                got = c.forward(model, inputs)
                                times.append((time.perf_counter() - t0) * 1e3)
                                for k, v in want.items():
                                    if not step_bench.same_bits(torch.as_tensor(got[k]), v):
                                        raise SystemExit("FAIL: %s %s '%s' differs from "
                                                         "run-local" % (name, mode, k))
                            t = statistics.median(times)
                            ratios.setdefault((name, mode), []).append(t / local)
                            line += "  %s %8.1f ms" % (mode, t)
                        print(line, flush=True)
                    for model in loaded.values():
                        c.unload_model(model)
                print("\nencode time, cluster / run-local (median over rounds; bit-identical):")
                for (name, mode), rs in ratios.items():
                    print("  %-6s %-8s %.2fx" % (name, mode, statistics.median(rs)))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
