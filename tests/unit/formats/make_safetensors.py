#!/usr/bin/python3
"""Writes a safetensors file with torch (the toolchain.md writer, independent of ours) and a JSON
sidecar listing each tensor's dtype, shape and bytes (hex), for safetensors_test.cc."""
import json
import struct
import sys

import torch

DT = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
      torch.uint8: "U8", torch.bool: "BOOL"}


def save_safetensors(tensors, path, metadata=None):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        b = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": DT[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


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
        out[name] = {"dtype": DT[t.dtype], "shape": list(t.shape), "hex": b.hex()}
    with open(sidecar, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
