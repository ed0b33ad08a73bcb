#!/usr/bin/python3
"""ggml itself as the oracle for our GGUF reader and dequantisers.

Loads ggml's own libggml-base.so (npm @node-llama-cpp/linux-x64, see package.json) through
ctypes and writes, into OUT_DIR:
  oracle.gguf        a GGUF v3 file (written by the writer below) holding one tensor of every
                     dequantisable type: rows quantised by ggml_quantize_chunk from random data,
                     plus rows of random block bytes (f16 scale fields kept finite)
  <name>.f32/.f16/.bf16   ggml's dequantize_row_* / ggml_fp16_to_fp32_row / ggml_bf16_to_fp32_row
                     output, and that output rounded by ggml_fp32_to_fp16_row / _bf16_row
  ggml.json          ggml's type table (blck_size, type_size for every id) and what ggml's own
                     gguf parser read from oracle.gguf (version, alignment, data offset, tensors)
Usage: ggml_oracle.py SOURCE_DIR OUT_DIR [seed]
"""
import ctypes
import json
import os
import struct
import sys

import numpy as np

LIB = "node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/libggml-base.so"

T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
FMT = {T_U8: "<B", T_I8: "<b", T_U16: "<H", T_I16: "<h", T_U32: "<I", T_I32: "<i", T_F32: "<f",
       T_BOOL: "<?", T_U64: "<Q", T_I64: "<q", T_F64: "<d"}

# ggml type id -> (name, f16 field offsets inside a block, for random-byte rows)
TYPES = {
    0: ("F32", None), 1: ("F16", None), 30: ("BF16", None),
    2: ("Q4_0", [0]), 3: ("Q4_1", [0, 2]), 6: ("Q5_0", [0]), 7: ("Q5_1", [0, 2]),
    8: ("Q8_0", [0]), 10: ("Q2_K", [80, 82]), 11: ("Q3_K", [108]), 12: ("Q4_K", [0, 2]),
    13: ("Q5_K", [0, 2]), 14: ("Q6_K", [208]),
}


def s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def val(t, v):
    if t == T_STR:
        return s(v)
    if t == T_ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(val(et, i) for i in items)
    return struct.pack(FMT[t], v)


def write_gguf(path, kv, tensors, align=32, version=3):
    """kv: [(key, type, value)]; tensors: [(name, ggml_type, ne list, raw bytes)]."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(kv))]
    out += [s(k) + struct.pack("<I", t) + val(t, v) for k, t, v in kv]
    blobs, off = [], 0
    for name, gtype, ne, data in tensors:
        out.append(s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
                   + struct.pack("<IQ", gtype, off))
        pad = b"\0" * (-len(data) % align)
        blobs.append(data + pad)
        off += len(data) + len(pad)
    head = b"".join(out)
    head += b"\0" * (-len(head) % align)
    with open(path, "wb") as f:
        f.write(head)
        f.write(b"".join(blobs))
    return len(head)


class Ggml:
    def __init__(self, source_dir):
        self.lib = L = ctypes.CDLL(os.path.join(source_dir, LIB))
        L.ggml_type_size.restype = ctypes.c_size_t
        L.ggml_blck_size.restype = ctypes.c_int64
        L.ggml_type_name.restype = ctypes.c_char_p
        L.ggml_quantize_chunk.restype = ctypes.c_size_t
        L.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_void_p]
        for fn in ("ggml_fp16_to_fp32_row", "ggml_bf16_to_fp32_row", "ggml_fp32_to_fp16_row",
                   "ggml_fp32_to_bf16_row"):
            getattr(L, fn).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            getattr(L, fn).restype = None

    def to_float(self, gtype, data, n):
        L = self.lib
        src = ctypes.create_string_buffer(bytes(data), len(data))
        dst = np.zeros(n, dtype=np.float32)
        name = TYPES[gtype][0]
        if name == "F32":
            return np.frombuffer(bytes(data), dtype=np.float32).copy()
        if name == "F16":
            L.ggml_fp16_to_fp32_row(src, dst.ctypes.data, n)
        elif name == "BF16":
            L.ggml_bf16_to_fp32_row(src, dst.ctypes.data, n)
        else:
            fn = getattr(L, "dequantize_row_" + name.lower().replace("_k", "_K"))
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            fn.restype = None
            fn(src, dst.ctypes.data, n)
        return dst

    def round16(self, x, kind):
        out = np.zeros(len(x), dtype=np.uint16)
        fn = self.lib.ggml_fp32_to_fp16_row if kind == "f16" else self.lib.ggml_fp32_to_bf16_row
        fn(x.ctypes.data, out.ctypes.data, len(x))
        return out

    def quantize(self, gtype, x, nrows, n_per_row):
        size = self.lib.ggml_type_size(gtype) * (nrows * n_per_row) // self.lib.ggml_blck_size(gtype)
        dst = ctypes.create_string_buffer(size)
        xs = np.ascontiguousarray(x, dtype=np.float32)
        got = self.lib.ggml_quantize_chunk(gtype, xs.ctypes.data, dst, 0, nrows, n_per_row, None)
        assert got == size, (gtype, got, size)
        return dst.raw


def random_half_fields(rng, block, offsets, nblocks):
    """Random block bytes with the f16 fields replaced by finite random halves."""
    raw = bytearray(rng.integers(0, 256, size=block * nblocks, dtype=np.uint8).tobytes())
    for b in range(nblocks):
        for o in offsets:
            h = np.float16(rng.normal() * 0.05).view(np.uint16)
            raw[b * block + o: b * block + o + 2] = struct.pack("<H", int(h))
    return bytes(raw)


def main():
    source_dir, out_dir = sys.argv[1], sys.argv[2]
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1234
    rng = np.random.default_rng(seed)
    g = Ggml(source_dir)
    cols, qrows, rawrows = 512, 6, 2
    tensors, expected = [], {}
    for gtype, (name, halves) in TYPES.items():
        rows = qrows + rawrows
        n = rows * cols
        if name == "F32":
            data = (rng.normal(size=n) * 3).astype(np.float32).tobytes()
        elif name in ("F16", "BF16"):
            # Every bit pattern, NaN/inf/subnormals included, then random ones.
            bits = np.concatenate([np.arange(65536, dtype=np.uint32) % 65536,
                                   rng.integers(0, 65536, size=n, dtype=np.uint32)])[:n]
            data = bits.astype(np.uint16).tobytes()
        else:
            # Quantised rows: normal data with per-row scale and offset, plus an all-zero row.
            x = rng.normal(size=(qrows, cols)) * rng.uniform(0.01, 4, size=(qrows, 1)) \
                + rng.uniform(-1, 1, size=(qrows, 1))
            x[0] = 0
            data = g.quantize(gtype, x.astype(np.float32), qrows, cols)
            block, bs = g.lib.ggml_type_size(gtype), g.lib.ggml_blck_size(gtype)
            data += random_half_fields(rng, block, halves, rawrows * cols // bs)
        f32 = g.to_float(gtype, data, n)
        tname = "t." + name
        tensors.append((tname, gtype, [cols, rows], data))
        f32.tofile(os.path.join(out_dir, tname + ".f32"))
        g.round16(f32, "f16").tofile(os.path.join(out_dir, tname + ".f16"))
        g.round16(f32, "bf16").tofile(os.path.join(out_dir, tname + ".bf16"))
        expected[tname] = {"type": name, "n": n}

    kv = [
        ("general.architecture", T_STR, "oracle"),
        ("general.alignment", T_U32, 64),
        ("u8", T_U8, 200), ("i8", T_I8, -5), ("u16", T_U16, 65535), ("i16", T_I16, -32768),
        ("u32", T_U32, 4000000000), ("i32", T_I32, -7), ("f32", T_F32, 0.5),
        ("bool", T_BOOL, True), ("u64", T_U64, 2**64 - 1), ("i64", T_I64, -2**63), ("f64", T_F64, 0.25),
        ("str", T_STR, "h\u00e9llo"),
        ("arr.i32", T_ARR, (T_I32, [1, -2, 3])),
        ("arr.str", T_ARR, (T_STR, ["a", "b"])),
        ("arr.empty", T_ARR, (T_F32, [])),
    ]
    # No nested arrays here: ggml's parser refuses them ("invalid GGUF type 9") although the
    # spec allows them; gguf_test.cc covers them with our own builder.
    path = os.path.join(out_dir, "oracle.gguf")
    write_gguf(path, kv, tensors, align=64)

    # What ggml's own parser sees in the file.
    L = g.lib

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]
    L.gguf_init_from_file.restype = ctypes.c_void_p
    L.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    for fn, rt in (("gguf_get_n_tensors", ctypes.c_int64), ("gguf_get_n_kv", ctypes.c_int64),
                   ("gguf_get_data_offset", ctypes.c_size_t), ("gguf_get_alignment", ctypes.c_size_t),
                   ("gguf_get_version", ctypes.c_uint32)):
        getattr(L, fn).restype = rt
        getattr(L, fn).argtypes = [ctypes.c_void_p]
    L.gguf_get_tensor_name.restype = ctypes.c_char_p
    L.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    L.gguf_get_tensor_offset.restype = ctypes.c_size_t
    L.gguf_get_tensor_offset.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    L.gguf_get_tensor_type.restype = ctypes.c_int
    L.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    L.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = L.gguf_init_from_file(path.encode(), Params(True, None))
    assert ctx, "ggml rejected oracle.gguf"
    parsed = {
        "version": L.gguf_get_version(ctx), "n_kv": L.gguf_get_n_kv(ctx),
        "alignment": L.gguf_get_alignment(ctx), "data_offset": L.gguf_get_data_offset(ctx),
        "tensors": [{"name": L.gguf_get_tensor_name(ctx, i).decode(),
                     "type": L.gguf_get_tensor_type(ctx, i),
                     "offset": L.gguf_get_tensor_offset(ctx, i)}
                    for i in range(L.gguf_get_n_tensors(ctx))],
    }
    L.gguf_free(ctx)
    types = {}
    for i in range(43):
        name = L.ggml_type_name(i).decode(errors="replace")
        types[str(i)] = {"name": name, "blck_size": L.ggml_blck_size(i), "type_size": L.ggml_type_size(i)}
    with open(os.path.join(out_dir, "ggml.json"), "w") as f:
        json.dump({"parsed": parsed, "types": types, "expected": expected}, f, indent=1)


if __name__ == "__main__":
    main()
