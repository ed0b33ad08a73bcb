#!/usr/bin/python3
"""ggml itself as the oracle for our GGUF reader and dequantisers.

Loads ggml's own libggml-base.so (npm @node-llama-cpp/linux-x64, see package.json) through
ctypes and writes, into OUT_DIR:
  oracle.gguf        a GGUF v3 file (written by the writer below) holding one tensor of every
                     type ggml can dequantise (every type whose ggml_type_traits has a to_float,
                     plus F32): rows quantised by ggml_quantize_chunk from random data (an
                     all-zero row, a row with outliers, a row with all-zero blocks; a synthetic
                     importance matrix for the IQ types that want one), plus rows of random
                     block bytes (f16 / e8m0 scale fields kept finite)
  <name>.f32/.f16/.bf16   ggml's to_float output (ggml_get_type_traits(type)->to_float, i.e.
                     dequantize_row_* / ggml_fp16_to_fp32_row / ggml_bf16_to_fp32_row), and that
                     output rounded by ggml_fp32_to_fp16_row / _bf16_row
  ggml.json          ggml's type table (name, blck_size, type_size, whether it has a to_float,
                     for every id) and what ggml's own gguf parser read from oracle.gguf
                     (version, alignment, data offset, tensors)
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

# ggml type id -> (name, scale fields of a block to keep finite in random-byte rows: a list of
# f16 field offsets, or "e8m0" (MXFP4: byte 0), "ue4m3" (NVFP4: bytes 0..3, every byte decodes
# finite; the first blocks get the edge codes) or "iq1m" (IQ1_M: an f16 spread over the top
# nibbles of its four u16 scales at byte 48)). Block layouts: ggml-common.h.
TYPES = {
    0: ("F32", None), 1: ("F16", None), 30: ("BF16", None),
    2: ("Q4_0", [0]), 3: ("Q4_1", [0, 2]), 6: ("Q5_0", [0]), 7: ("Q5_1", [0, 2]),
    8: ("Q8_0", [0]), 10: ("Q2_K", [80, 82]), 11: ("Q3_K", [108]), 12: ("Q4_K", [0, 2]),
    13: ("Q5_K", [0, 2]), 14: ("Q6_K", [208]),
    16: ("IQ2_XXS", [0]), 17: ("IQ2_XS", [0]), 18: ("IQ3_XXS", [0]), 19: ("IQ1_S", [0]),
    20: ("IQ4_NL", [0]), 21: ("IQ3_S", [0]), 22: ("IQ2_S", [0]), 23: ("IQ4_XS", [0]),
    29: ("IQ1_M", "iq1m"), 34: ("TQ1_0", [52]), 35: ("TQ2_0", [64]),
    39: ("MXFP4", "e8m0"), 40: ("NVFP4", "ue4m3"), 41: ("Q1_0", [0]), 42: ("Q2_0", [0]),
}
# Quantised with a synthetic importance matrix: the types ggml_quantize_requires_imatrix names
# (asked at run time) plus these, which use one when given.
IMATRIX_TYPES = {"IQ2_S", "IQ1_M"}


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


N_TYPE_IDS = 43  # ggml.h GGML_TYPE_COUNT of the packaged ggml


class TypeTraits(ctypes.Structure):
    """ggml.h struct ggml_type_traits (checked against ggml_type_name/_blck_size/_type_size)."""
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class Ggml:
    def __init__(self, source_dir):
        self.lib = L = ctypes.CDLL(os.path.join(source_dir, LIB))
        L.ggml_type_size.restype = ctypes.c_size_t
        L.ggml_blck_size.restype = ctypes.c_int64
        L.ggml_type_name.restype = ctypes.c_char_p
        L.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
        L.ggml_get_type_traits.argtypes = [ctypes.c_int]
        L.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        L.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        L.ggml_quantize_init.restype = None
        L.ggml_quantize_init.argtypes = [ctypes.c_int]
        L.ggml_quantize_chunk.restype = ctypes.c_size_t
        L.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_void_p]
        for fn in ("ggml_fp16_to_fp32_row", "ggml_bf16_to_fp32_row", "ggml_fp32_to_fp16_row",
                   "ggml_fp32_to_bf16_row"):
            getattr(L, fn).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            getattr(L, fn).restype = None
        for i in range(N_TYPE_IDS):  # the struct layout is the one this script assumes
            t = L.ggml_get_type_traits(i).contents
            assert (t.type_name == L.ggml_type_name(i) and t.blck_size == L.ggml_blck_size(i)
                    and t.type_size == L.ggml_type_size(i)), \
                "ggml_type_traits of type %d does not match ggml_type_name/blck_size/type_size: " \
                "the struct layout in ggml_oracle.py is out of date" % i

    def has_to_float(self, gtype):
        return bool(self.lib.ggml_get_type_traits(gtype).contents.to_float)

    def to_float(self, gtype, data, n):
        """ggml's own to_float for the type (F32 has none: the bytes are the values)."""
        if gtype == 0:
            return np.frombuffer(bytes(data), dtype=np.float32).copy()
        fn = self.lib.ggml_get_type_traits(gtype).contents.to_float
        assert fn, "ggml has no to_float for type %d" % gtype
        src = ctypes.create_string_buffer(bytes(data), len(data))
        dst = np.zeros(n, dtype=np.float32)
        TO_FLOAT(fn)(ctypes.cast(src, ctypes.c_void_p), dst.ctypes.data, n)
        return dst

    def round16(self, x, kind):
        out = np.zeros(len(x), dtype=np.uint16)
        fn = self.lib.ggml_fp32_to_fp16_row if kind == "f16" else self.lib.ggml_fp32_to_bf16_row
        fn(x.ctypes.data, out.ctypes.data, len(x))
        return out

    def quantize(self, gtype, x, nrows, n_per_row, imatrix=None):
        size = self.lib.ggml_type_size(gtype) * (nrows * n_per_row) // self.lib.ggml_blck_size(gtype)
        dst = ctypes.create_string_buffer(size)
        xs = np.ascontiguousarray(x, dtype=np.float32)
        qw = None
        if imatrix is not None:
            qw = np.ascontiguousarray(imatrix, dtype=np.float32)
            assert qw.shape == (n_per_row,)
        self.lib.ggml_quantize_init(gtype)  # the IQ grids; ggml_quantize_chunk does it too
        got = self.lib.ggml_quantize_chunk(gtype, xs.ctypes.data, dst, 0, nrows, n_per_row,
                                           None if qw is None else qw.ctypes.data)
        assert got == size, (gtype, got, size)
        return dst.raw


def random_blocks(rng, block, scales, nblocks):
    """Random block bytes with the scale fields replaced by finite random values."""
    raw = bytearray(rng.integers(0, 256, size=block * nblocks, dtype=np.uint8).tobytes())
    for b in range(nblocks):
        o0 = b * block
        if scales == "e8m0":  # 2^(e-127), 255 is NaN: the extremes first, then random
            raw[o0] = [0, 1, 2, 254][b] if b < 4 else int(rng.integers(100, 150))
            continue
        if scales == "ue4m3":  # 0, 0x7f (NaN, read as 0), subnormals, bit 7 set, the largest
            edge = [0x00, 0x7F, 0x01, 0x07, 0x08, 0x80, 0xFF, 0x7E]
            if b < 2:
                raw[o0:o0 + 4] = bytes(edge[4 * b:4 * b + 4])
            continue
        if scales == "iq1m":  # the f16's nibbles are the top nibbles of sc[0..3]
            h = int(np.float16(rng.normal() * 0.05).view(np.uint16))
            for k in range(4):
                i = o0 + 48 + 2 * k + 1
                raw[i] = (raw[i] & 0x0F) | (((h >> (4 * k)) & 0xF) << 4)
            continue
        for o in scales:
            h = np.float16(rng.normal() * 0.05).view(np.uint16)
            raw[o0 + o: o0 + o + 2] = struct.pack("<H", int(h))
    return bytes(raw)


def main():
    source_dir, out_dir = sys.argv[1], sys.argv[2]
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1234
    rng = np.random.default_rng(seed)
    g = Ggml(source_dir)
    cols, qrows, rawrows = 512, 6, 2
    tensors, expected = [], {}
    # Every type ggml can dequantise is in TYPES (and the C++ test checks our table against the
    # to_float flags in ggml.json).
    missing = [i for i in range(N_TYPE_IDS) if g.has_to_float(i) and i not in TYPES]
    assert not missing, "ggml can dequantise types %s: add them to TYPES" % missing
    for gtype, (name, scales) in TYPES.items():
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
            # Quantised rows: normal data with per-row scale and offset; row 0 all zero, row 1
            # with a few huge outliers, row 2 with all-zero blocks (a 32-value one and the
            # whole second half of the row: whole blocks of every block size).
            x = rng.normal(size=(qrows, cols)) * rng.uniform(0.01, 4, size=(qrows, 1)) \
                + rng.uniform(-1, 1, size=(qrows, 1))
            x[0] = 0
            x[1, [5, 100, 301, 477]] = [900.0, -2500.0, 4000.0, -600.0]
            x[2, 32:64] = 0
            x[2, 256:] = 0
            imatrix = None
            if g.lib.ggml_quantize_requires_imatrix(gtype) or name in IMATRIX_TYPES:
                imatrix = rng.uniform(0.05, 3.0, size=cols)  # one positive weight per column
            data = g.quantize(gtype, x.astype(np.float32), qrows, cols, imatrix)
            block, bs = g.lib.ggml_type_size(gtype), g.lib.ggml_blck_size(gtype)
            data += random_blocks(rng, block, scales, rawrows * cols // bs)
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
    for i in range(N_TYPE_IDS):
        name = L.ggml_type_name(i).decode(errors="replace")
        types[str(i)] = {"name": name, "blck_size": L.ggml_blck_size(i),
                         "type_size": L.ggml_type_size(i), "to_float": g.has_to_float(i)}
    with open(os.path.join(out_dir, "ggml.json"), "w") as f:
        json.dump({"parsed": parsed, "types": types, "expected": expected}, f, indent=1)


if __name__ == "__main__":
    main()
