#!/usr/bin/python3
"""Writes the seed corpus for the two fuzz targets (small valid files of each feature).
Usage: make_seeds.py OUT_DIR   (creates OUT_DIR/safetensors and OUT_DIR/gguf)"""
import json
import os
import random
import struct
import sys


def st(tensors, metadata=None):
    header, blobs, off = {}, [], 0
    for name, dtype, shape, size in tensors:
        b = bytes(random.randrange(256) for _ in range(size))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + size]}
        blobs.append(b)
        off += size
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def val(t, v):
    if t == 8:
        return s(v)
    if t == 9:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(val(et, i) for i in items)
    return struct.pack(FMT[t], v)


def gguf(kv, tensors, align=32, version=3):
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(kv))]
    out += [s(k) + struct.pack("<I", t) + val(t, v) for k, t, v in kv]
    blobs, off = [], 0
    for name, gtype, ne, size in tensors:
        data = bytes(random.randrange(256) for _ in range(size))
        out.append(s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
                   + struct.pack("<IQ", gtype, off))
        pad = b"\0" * (-len(data) % align)
        blobs.append(data + pad)
        off += len(data) + len(pad)
    head = b"".join(out)
    head += b"\0" * (-len(head) % align)
    return head + b"".join(blobs)


def main():
    random.seed(1)
    out = sys.argv[1]
    os.makedirs(out + "/safetensors", exist_ok=True)
    os.makedirs(out + "/gguf", exist_ok=True)
    seeds = {
        "basic": st([("w", "F32", [2, 2], 16), ("b", "BF16", [3], 6)], {"format": "pt"}),
        "fp8": st([("a", "F8_E4M3", [4], 4), ("b", "F8_E5M2", [2, 2], 4), ("c", "U8", [0], 0)]),
        "alltypes": st([(d, d, [2], 2 * n) for d, n in [("BOOL", 1), ("U8", 1), ("I8", 1), ("I16", 2),
                        ("U16", 2), ("F16", 2), ("I32", 4), ("U32", 4), ("F64", 8), ("I64", 8), ("U64", 8)]]),
        "scalar": st([("s", "F32", [], 4)]),
        "flux": st([("model.diffusion_model.img_in.weight", "F32", [4, 8], 128),
                    ("model.diffusion_model.txt_in.weight", "F32", [4, 2], 32),
                    ("model.diffusion_model.vector_in.in_layer.weight", "F32", [4, 2], 32),
                    ("model.diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale", "F32", [2], 8),
                    ("model.diffusion_model.double_blocks.0.img_mlp.0.weight", "F32", [8, 4], 128),
                    ("model.diffusion_model.single_blocks.0.linear1.weight", "F32", [2], 8),
                    ("model.diffusion_model.final_layer.linear.weight", "F32", [8, 4], 128)],
                   {"fleet.axes_dim": "[2]"}),
        "wan": st([("patch_embedding.weight", "F32", [4, 2, 1, 2, 2], 128),
                   ("text_embedding.0.weight", "F32", [4, 4], 64),
                   ("time_embedding.0.weight", "F32", [4, 2], 32),
                   ("blocks.0.ffn.0.weight", "F32", [8, 4], 128),
                   ("head.head.weight", "F32", [8, 4], 128)]),
        "escapes": b"",
    }
    h = '{"a\\u00e9\\ud83d\\ude00\\n":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'.encode()
    seeds["escapes"] = struct.pack("<Q", len(h)) + h + b"x"
    for name, data in seeds.items():
        open(f"{out}/safetensors/{name}", "wb").write(data)

    kv_all = [("general.architecture", 8, "flux"), ("general.alignment", 4, 32), ("u8", 0, 1), ("i8", 1, -1),
              ("u16", 2, 2), ("i16", 3, -2), ("u32", 4, 3), ("i32", 5, -3), ("f32", 6, 0.5), ("b", 7, True),
              ("u64", 10, 4), ("i64", 11, -4), ("f64", 12, 0.25), ("arr", 9, (5, [1, 2])),
              ("nested", 9, (9, [(8, ["x"]), (0, [1])]))]
    types = [(0, 1, 4), (1, 1, 2), (30, 1, 2), (2, 32, 18), (3, 32, 20), (6, 32, 22), (7, 32, 24),
             (8, 32, 34), (10, 256, 84), (11, 256, 110), (12, 256, 144), (13, 256, 176), (14, 256, 210)]
    for gtype, block, size in types:
        data = gguf([("general.architecture", 8, "x")], [(f"t{gtype}", gtype, [block, 2], 2 * size)])
        open(f"{out}/gguf/type{gtype}", "wb").write(data)
    open(f"{out}/gguf/kv_all", "wb").write(gguf(kv_all, [("a", 0, [4], 16)]))
    open(f"{out}/gguf/v2", "wb").write(gguf([], [("a", 1, [8], 16), ("b", 8, [32], 34)], version=2))
    open(f"{out}/gguf/align64", "wb").write(gguf([("general.alignment", 4, 64)], [("a", 0, [4], 16), ("b", 0, [2], 8)], align=64))
    open(f"{out}/gguf/orig_shape", "wb").write(gguf(
        [("comfy.gguf.orig_shape.patch_embedding.weight", 9, (5, [4, 2, 1, 2, 2])), ("general.architecture", 8, "wan")],
        [("patch_embedding.weight", 0, [8, 4], 128), ("blocks.0.ffn.0.weight", 0, [4, 8], 128)]))
    open(f"{out}/gguf/flux", "wb").write(gguf([("general.architecture", 8, "flux")], [
        ("img_in.weight", 8, [64, 2], 136), ("txt_in.weight", 0, [2, 2], 16), ("vector_in.in_layer.weight", 0, [2, 2], 16),
        ("double_blocks.0.img_attn.norm.query_norm.scale", 0, [2], 8), ("double_blocks.0.img_mlp.0.weight", 0, [2, 4], 32),
        ("final_layer.linear.weight", 0, [2, 4], 32)]))


if __name__ == "__main__":
    main()
