#!/usr/bin/python3
"""How far ComfyUI-GGUF's dequantised weights are from ours (ggml's f32 values rounded once).

ComfyUI-GGUF dequantises with torch ops in the dequant dtype: by default float16 (the block
scale's own dtype), so every product (scale x quant, and for K-quants scale x sub-scale and
min x sub-min first) is rounded to float16 before the result is cast to the compute dtype.
Tensorfleet uses ggml's own f32 dequantisation and rounds once to the compute dtype (or once to
the dequant dtype, then to the compute dtype, when one is chosen). This script quantises normal
random weights with ggml, dequantises them both ways and prints, per type and dequant dtype,
the share of weights whose compute-dtype value differs and the largest difference relative to
the weight's magnitude. The emulation of ComfyUI-GGUF's arithmetic is checked first: in float32
it must give exactly ggml's values.

    bench/dequant/comfy_gguf_arith.py [--values 4194304] [--seed 0]

Needs ggml's library from the npm package (npm ci; scripts/bootstrap does it).
"""

import argparse
import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests", "unit", "formats"))
import ggml_oracle as go  # noqa: E402

Q8_0, Q4_K, Q6_K = 8, 12, 14
QK_K = 256


def _f16(raw):
    return torch.from_numpy(np.ascontiguousarray(raw)).view(torch.float16)


def _q8_0(blocks, dtype):
    d = _f16(blocks[:, :2]).to(dtype)
    q = torch.from_numpy(np.ascontiguousarray(blocks[:, 2:])).view(torch.int8)
    return d * q  # an int8 operand takes the float operand's dtype


def _k_scales(raw):
    """The eight 6-bit sub-scales and sub-mins of a Q4_K/Q5_K block, in ggml's packing."""
    s = raw.astype(np.int32)
    sc = np.empty((len(s), 8), np.int32)
    mn = np.empty((len(s), 8), np.int32)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _q4_k(blocks, dtype):
    n = len(blocks)
    d = _f16(blocks[:, 0:2]).to(dtype)
    dmin = _f16(blocks[:, 2:4]).to(dtype)
    sc, mn = _k_scales(blocks[:, 4:16])
    d = (d * torch.from_numpy(sc).to(torch.uint8)).reshape(n, 8, 1)
    dm = (dmin * torch.from_numpy(mn).to(torch.uint8)).reshape(n, 8, 1)
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    qs = torch.from_numpy((qs & 0x0F).reshape(n, 8, 32).astype(np.uint8))
    return (d * qs - dm).reshape(n, QK_K)


def _q6_k(blocks, dtype):
    n = len(blocks)
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = torch.from_numpy(np.ascontiguousarray(blocks[:, 192:208])).view(torch.int8).to(dtype)
    d = _f16(blocks[:, 208:210]).to(dtype)
    d = (d * scales).reshape(n, 16, 1)
    lo = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hi = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (lo.reshape(n, 8, 32) | (hi.reshape(n, 8, 32) << 4)).astype(np.int16) - 32
    q = torch.from_numpy(q.astype(np.int8)).reshape(n, 16, 16)
    return (d * q).reshape(n, QK_K)


TYPES = {"Q8_0": (Q8_0, _q8_0), "Q4_K": (Q4_K, _q4_k), "Q6_K": (Q6_K, _q6_k)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--values", type=int, default=1 << 22)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ggml = go.Ggml(REPO)
    rows = max(1, args.values // 4096)
    x = np.random.default_rng(args.seed).standard_normal((rows, 4096)).astype(np.float32) * 0.02
    print("%d normal weights (sd 0.02) in rows of 4096; compute dtype bf16" % x.size)
    print("%-5s %-14s %12s %18s" % ("type", "dequant_dtype", "differ", "max |diff|/|w|max"))
    for name, (gid, emulate) in TYPES.items():
        data = ggml.quantize(gid, x, rows, 4096)
        size = ggml.lib.ggml_type_size(gid)
        blocks = np.frombuffer(data, np.uint8).reshape(-1, size)
        ref = torch.from_numpy(ggml.to_float(gid, data, x.size))
        exact = emulate(blocks, torch.float32).reshape(-1)
        assert torch.equal(exact, ref), "%s: the emulation in float32 is not ggml's" % name
        ours = ref.to(torch.bfloat16)
        scale = float(ref.abs().max())
        for dq in (torch.float16, torch.bfloat16):
            theirs = emulate(blocks, dq).reshape(-1).to(torch.bfloat16)
            diff = (theirs.float() - ours.float()).abs()
            label = "default (f16)" if dq == torch.float16 else "target (bf16)"
            print("%-5s %-14s %11.3f%% %18.2e" % (name, label,
                                                 100.0 * float((diff > 0).float().mean()),
                                                 float(diff.max()) / scale))


if __name__ == "__main__":
    main()
