#!/usr/bin/python3
"""Benchmark: one Flux forward of the hidden-256 test model (head width 128, context 4096,
2+4 blocks) on a 64x64 latent (1024 image tokens + 256 text tokens), float32:
fleet-run-local (C++/libtorch) against the same model in python3-torch eager, in the same run,
with the same thread count. Prints the median of repeats for each and the ratio C++ / Python.

    bench/flux_forward/flux_forward.py [--build DIR] [--threads 2] [--repeats 7]

The Python side is an eager forward written the way ComfyUI writes it (F.linear, F.layer_norm,
F.gelu, torch.softmax), not the slower didactic reference of tests/python.
"""
import argparse
import math
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "python"))
import flux_reference as ref  # noqa: E402  (safetensors I/O and config inference)


class EagerFlux:
    def __init__(self, weights, meta):
        r = ref.FluxReference(weights, meta, torch.float32)
        self.cfg = r
        self.w = {k: v.float().contiguous() for k, v in r.w.items()}

    def lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def emb(self, t):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        a = (t * 1000).float()[:, None] * freqs[None]
        return torch.cat([torch.cos(a), torch.sin(a)], -1)

    def mlp_emb(self, name, x):
        return self.lin(F.silu(self.lin(x, name + ".in_layer")), name + ".out_layer")

    def rope(self, x, pe):
        xr = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        return (pe[..., 0] * xr[..., 0] + pe[..., 1] * xr[..., 1]).reshape(*x.shape)

    def attention(self, q, k, v, pe):
        q, k = self.rope(q, pe), self.rope(k, pe)
        p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        o = p @ v
        return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def heads(self, qkv, norm):
        c = self.cfg
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, c.heads, -1).permute(2, 0, 3, 1, 4)
        def rms(x, g):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g
        return rms(q, self.w[norm + "query_norm.scale"]), rms(k, self.w[norm + "key_norm.scale"]), v

    def ln(self, x):
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6)

    def forward(self, x, t, ctx, y, g):
        c = self.cfg
        b, ch, h, w = x.shape
        img = x.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, ch * 4)
        img = self.lin(img, "img_in")
        vec = self.mlp_emb("time_in", self.emb(t))
        if c.guidance_embed:
            vec = vec + self.mlp_emb("guidance_in", self.emb(g))
        vec = vec + self.mlp_emb("vector_in", y)
        txt = self.lin(ctx, "txt_in")
        L = txt.shape[1]
        ang = ref.rope_angles(L, h // 2, w // 2, c.axes, c.theta)
        cs, sn = torch.cos(ang), torch.sin(ang)
        pe = torch.stack([cs, -sn, sn, cs], -1).view(1, 1, ang.shape[0], -1, 2, 2).float()
        sv = F.silu(vec)[:, None]
        for i in range(c.depth):
            p = f"double_blocks.{i}."
            im = self.lin(sv, p + "img_mod.lin").chunk(6, -1)
            tm = self.lin(sv, p + "txt_mod.lin").chunk(6, -1)
            iq, ik, iv = self.heads(self.lin(torch.addcmul(im[0], self.ln(img), 1 + im[1]), p + "img_attn.qkv"), p + "img_attn.norm.")
            tq, tk, tv = self.heads(self.lin(torch.addcmul(tm[0], self.ln(txt), 1 + tm[1]), p + "txt_attn.qkv"), p + "txt_attn.norm.")
            a = self.attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
            ta, ia = a[:, :L], a[:, L:]
            img = img + self.lin(ia, p + "img_attn.proj") * im[2]
            img = img + self.lin(F.gelu(self.lin(torch.addcmul(im[3], self.ln(img), 1 + im[4]), p + "img_mlp.0"), approximate="tanh"), p + "img_mlp.2") * im[5]
            txt = txt + self.lin(ta, p + "txt_attn.proj") * tm[2]
            txt = txt + self.lin(F.gelu(self.lin(torch.addcmul(tm[3], self.ln(txt), 1 + tm[4]), p + "txt_mlp.0"), approximate="tanh"), p + "txt_mlp.2") * tm[5]
        xs = torch.cat((txt, img), 1)
        D = c.hidden
        for i in range(c.depth_single):
            p = f"single_blocks.{i}."
            m = self.lin(sv, p + "modulation.lin").chunk(3, -1)
            lin1 = self.lin(torch.addcmul(m[0], self.ln(xs), 1 + m[1]), p + "linear1")
            qkv, mlp = torch.split(lin1, [3 * D, lin1.shape[-1] - 3 * D], -1)
            q, k, v = self.heads(qkv, p + "norm.")
            a = self.attention(q, k, v, pe)
            xs = xs + self.lin(torch.cat((a, F.gelu(mlp, approximate="tanh")), 2), p + "linear2") * m[2]
        img = xs[:, L:]
        sh, sc = self.lin(sv, "final_layer.adaLN_modulation.1").chunk(2, -1)
        out = self.lin(torch.addcmul(sh, self.ln(img), 1 + sc), "final_layer.linear")
        return out.view(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.environ.get("FLEET_BUILD_DIR", str(REPO / "build")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--txt-len", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    fleet = pathlib.Path(args.build) / "bin" / "fleet"
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="flux_bench_"))
    model, inputs, out = tmp / "model.safetensors", tmp / "in.safetensors", tmp / "out.safetensors"
    subprocess.run([fleet, "gen-model", "--preset", "small", "--seed", "1", "--dtype", "f32", model], check=True)
    subprocess.run([fleet, "gen-inputs", model, "--height", str(args.size), "--width", str(args.size),
                    "--txt-len", str(args.txt_len), "--seed", "2", inputs], check=True)

    # C++: forwards timed inside the process (excludes process start and model load); once as
    # shipped, once without the host allocator tuning to show its effect. The three variants
    # run interleaved in rounds so that load from other processes hits them alike.
    def cpp(*extra):
        p = subprocess.run([fleet, "run-local", model, "--inputs", inputs, "--out", out,
                            "--threads", str(args.threads), "--repeat", str(per_round + 1),
                            *extra], check=True, capture_output=True, text=True)
        return [float(v) for v in re.findall(r"forward_ms ([0-9.]+)", p.stdout)][1:]  # no warm-up

    torch.set_num_threads(args.threads)
    weights, meta = ref.load_safetensors(model)
    x, _ = ref.load_safetensors(inputs)
    m = EagerFlux(weights, meta)

    def python(n):
        times, result = [], None
        with torch.no_grad():
            for _ in range(n):
                t0 = time.perf_counter()
                result = m.forward(x["x"], x["timestep"], x["context"], x["y"], x.get("guidance"))
                times.append((time.perf_counter() - t0) * 1e3)
        return times, result

    per_round = 2
    rounds = max(1, (args.repeats + per_round - 1) // per_round)
    python(1)  # warm-up
    cpp_ms, cpp_plain_ms, py_ms = [], [], []
    for _ in range(rounds):
        cpp_plain_ms += cpp("--tune-allocator=false")
        cpp_ms += cpp()
        t, py_out = python(per_round)
        py_ms += t
    cpp_out, _ = ref.load_safetensors(out)
    diff = (cpp_out["out"] - py_out).abs().max().item()
    shutil.rmtree(tmp, ignore_errors=True)

    c, py = statistics.median(cpp_ms), statistics.median(py_ms)
    print(f"flux_forward: hidden 256, head 128, 2+4 blocks, latent {args.size}x{args.size}, "
          f"txt {args.txt_len}, float32, {args.threads} threads, median of {len(cpp_ms)}")
    print(f"  C++ fleet-run-local           : {c:8.1f} ms  (min {min(cpp_ms):.1f})")
    print(f"  C++ without TuneHostAllocator : {statistics.median(cpp_plain_ms):8.1f} ms  "
          f"(min {min(cpp_plain_ms):.1f})")
    print(f"  python3-torch eager           : {py:8.1f} ms  (min {min(py_ms):.1f})")
    print(f"  ratio C++/Python (medians)    : {c / py:8.3f}  (target <= 1.0)")
    print(f"  ratio C++/Python (minimums)   : {min(cpp_ms) / min(py_ms):8.3f}")
    print(f"  max |C++ - Python|            : {diff:.2e}")


if __name__ == "__main__":
    main()
