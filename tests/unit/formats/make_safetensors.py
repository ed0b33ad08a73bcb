#!/usr/bin/python3
"""Writes a safetensors file with torch (tests/python/safetensors_io.py: the writer of
docs/toolchain.md section 3, independent of ours) and a JSON sidecar listing each tensor's dtype,
shape and bytes (hex), for safetensors_test.cc."""
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "python"))
from safetensors_io import TORCH_TO_ST, save_safetensors  # noqa: E402



def main():
    path, sidecar = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(7)
    tensors = {
        "img_in.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
        "h": torch.randn(3, 5, generator=g).half(),
        "f": torch.randn(2, 3, 4, generator=g),
        "d": torch.randn(3, generator=g).double(),
        "i64": torch.arange(-3, 3, dtype=torch.int64),
        "i32": torch.arange(0, 7, dtype=torch.int32),
        "b": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "u8": torch.arange(0, 255, 7, dtype=torch.uint8),
    }
    save_safetensors(tensors, path, {"format": "pt", "fleet.note": "written by torch"})
    out = {}
    for name, t in tensors.items():
        b = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out[name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "hex": b.hex()}
    with open(sidecar, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
