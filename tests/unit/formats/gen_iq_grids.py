#!/usr/bin/python3
"""Derives the lookup tables of ggml's IQ / FP4 formats from ggml itself and writes them as
common/formats/src/iq_grids.h.

ggml keeps these tables static (ggml-common.h: iq2xxs_grid, iq2xs_grid, iq2s_grid,
iq3xxs_grid, iq3s_grid, iq1s_grid, ksigns_iq2xs, kvalues_iq4nl, kvalues_mxfp4), so they are not
exported from libggml-base.so. Instead this script builds blocks that select each table entry
in turn, with scales that make the arithmetic exact, dequantises them with ggml's own to_float
(libggml-base.so from the npm package @node-llama-cpp/linux-x64, loaded as ggml_oracle.py does)
and reads the entries back from the output:

  iq2xxs_grid[256]   IQ2_XXS, d = 1, scale nibble 0 (step 1/8), no signs
  iq2xs_grid[512]    IQ2_XS, d = 1, scales 0 (step 1/8), sign index 0
  iq2s_grid[1024]    IQ2_S, 10-bit index (qs | 2 bits of qh), d = 1, scales 0, sign bytes 0
  iq3xxs_grid[256]   IQ3_XXS, d = 1, scale 0 (step 1/4), no signs
  iq3s_grid[512]     IQ3_S, 9-bit index (qs | 1 bit of qh), d = 1, scales 0 (step 1)
  iq1s_grid[2048]    IQ1_S, 11-bit index (qs | 3 bits of qh), d = 1, scale 0, delta +1/8
  ksigns_iq2xs[128]  IQ2_XS sign index k on grid entry 0 (all entries positive): the signs
  kvalues_iq4nl[16]  IQ4_NL, d = 1, nibble j at position j
  kvalues_mxfp4[16]  MXFP4, e8m0 scale 128 (d = 1), nibble j at position j

Usage: gen_iq_grids.py SOURCE_DIR            rewrite SOURCE_DIR/common/formats/src/iq_grids.h
       gen_iq_grids.py SOURCE_DIR --check    exit 1 unless the committed header is what ggml gives
Without ggml's library it prints "SKIPPED: <why>" and exits 0 (the build never needs it: the
header is committed).
"""
import os
import struct
import sys

import numpy as np

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ggml_oracle  # noqa: E402  (the loader and ggml's to_float)

HEADER = "common/formats/src/iq_grids.h"
ONE_F16 = 0x3C00  # 1.0

IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, MXFP4 = 16, 17, 18, 19, 20, 21, 22, 39


def dequant(g, gtype, blocks, per_block):
    data = b"".join(bytes(b) for b in blocks)
    return g.to_float(gtype, data, per_block * len(blocks))


def exact_ints(values, step, what):
    """values / step, which must all be integers (the derivation relies on exact arithmetic)."""
    q = np.asarray(values, dtype=np.float64) / step
    r = np.rint(q)
    assert np.all(q == r), "%s: ggml's output is not a multiple of %g" % (what, step)
    return r.astype(np.int64)


def pack(byte_rows, width):
    """Rows of `width` small ints (bytes of one entry, lowest first) -> little-endian integers."""
    out = []
    for row in byte_rows:
        v = 0
        for j, b in enumerate(row):
            v |= (int(b) & 0xFF) << (8 * j)
        out.append(v)
    assert all(len(r) == width for r in byte_rows)
    return out


def grid_iq2xxs(g):
    blocks = []
    for b in range(256 // 32):  # 32 entries per block: 8 groups of 32 values x 4 entries
        blk = bytearray(66)
        struct.pack_into("<H", blk, 0, ONE_F16)
        for ib in range(8):
            for l in range(4):
                blk[2 + 8 * ib + l] = b * 32 + ib * 4 + l  # grid index bytes; signs/scale 0
        blocks.append(blk)
    y = exact_ints(dequant(g, IQ2_XXS, blocks, 256), 0.125, "iq2xxs_grid")
    return pack(y.reshape(256, 8), 8)


def grid_iq2xs(g):
    blocks = []
    for b in range(512 // 32):
        blk = bytearray(74)
        struct.pack_into("<H", blk, 0, ONE_F16)
        for k in range(32):
            struct.pack_into("<H", blk, 2 + 2 * k, b * 32 + k)  # 9-bit index, sign index 0
        blocks.append(blk)
    y = exact_ints(dequant(g, IQ2_XS, blocks, 256), 0.125, "iq2xs_grid")
    return pack(y.reshape(512, 8), 8)


def ksigns(g):
    blocks = []
    for b in range(128 // 32):
        blk = bytearray(74)
        struct.pack_into("<H", blk, 0, ONE_F16)
        for k in range(32):
            struct.pack_into("<H", blk, 2 + 2 * k, (b * 32 + k) << 9)  # grid entry 0
        blocks.append(blk)
    y = dequant(g, IQ2_XS, blocks, 256).reshape(128, 8)
    assert np.all(y != 0), "ksigns_iq2xs: grid entry 0 has a zero"
    return [sum(1 << j for j in range(8) if row[j] < 0) for row in y]


def grid_iq2s(g):
    blocks = []
    for b in range(1024 // 32):
        blk = bytearray(82)  # d, qs[32], signs[32], qh[8], scales[8]
        struct.pack_into("<H", blk, 0, ONE_F16)
        for ib in range(8):
            for l in range(4):
                e = b * 32 + ib * 4 + l
                blk[2 + 4 * ib + l] = e & 0xFF
                blk[66 + ib] |= (e >> 8) << (2 * l)
        blocks.append(blk)
    y = exact_ints(dequant(g, IQ2_S, blocks, 256), 0.125, "iq2s_grid")
    return pack(y.reshape(1024, 8), 8)


def grid_iq3xxs(g):
    blocks = []
    for b in range(256 // 64):  # 64 entries of 4 values per block
        blk = bytearray(98)  # d, qs[64], scales_and_signs[32] (0: scale 0, no signs)
        struct.pack_into("<H", blk, 0, ONE_F16)
        for k in range(64):
            blk[2 + k] = b * 64 + k
        blocks.append(blk)
    y = exact_ints(dequant(g, IQ3_XXS, blocks, 256), 0.25, "iq3xxs_grid")
    return pack(y.reshape(256, 4), 4)


def grid_iq3s(g):
    blocks = []
    for b in range(512 // 64):
        blk = bytearray(110)  # d, qs[64], qh[8], signs[32], scales[4]
        struct.pack_into("<H", blk, 0, ONE_F16)
        for k in range(64):
            e = b * 64 + k
            blk[2 + k] = e & 0xFF
            blk[66 + k // 8] |= (e >> 8) << (k % 8)
        blocks.append(blk)
    y = exact_ints(dequant(g, IQ3_S, blocks, 256), 1.0, "iq3s_grid")
    return pack(y.reshape(512, 4), 4)


def grid_iq1s(g):
    blocks = []
    for b in range(2048 // 32):
        blk = bytearray(50)  # d, qs[32], qh u16[8] (3 index bits per entry, scale 0, delta +)
        struct.pack_into("<H", blk, 0, ONE_F16)
        for ib in range(8):
            h = 0
            for l in range(4):
                e = b * 32 + ib * 4 + l
                blk[2 + 4 * ib + l] = e & 0xFF
                h |= (e >> 8) << (3 * l)
            struct.pack_into("<H", blk, 34 + 2 * ib, h)
        blocks.append(blk)
    y = dequant(g, IQ1_S, blocks, 256) - np.float32(0.125)  # y = 1 * (grid + 1/8), exact
    return pack(exact_ints(y, 1.0, "iq1s_grid").reshape(2048, 8), 8)


def kvalues(g, gtype, block_bytes, prefix, what):
    blk = bytearray(block_bytes)
    blk[:len(prefix)] = prefix
    for j in range(16):
        blk[len(prefix) + j] = j | (j << 4)
    y = exact_ints(dequant(g, gtype, [blk], 32)[:16], 1.0, what)
    return [int(v) for v in y]


def tables(g):
    """[(C type, C name, ggml name, values)]"""
    return [
        ("uint64_t", "kIq2xxsGrid", "iq2xxs_grid", grid_iq2xxs(g)),
        ("uint64_t", "kIq2xsGrid", "iq2xs_grid", grid_iq2xs(g)),
        ("uint64_t", "kIq2sGrid", "iq2s_grid", grid_iq2s(g)),
        ("uint32_t", "kIq3xxsGrid", "iq3xxs_grid", grid_iq3xxs(g)),
        ("uint32_t", "kIq3sGrid", "iq3s_grid", grid_iq3s(g)),
        ("uint64_t", "kIq1sGrid", "iq1s_grid", grid_iq1s(g)),
        ("uint8_t", "kIqSigns", "ksigns_iq2xs", ksigns(g)),
        ("int8_t", "kIq4nlValues", "kvalues_iq4nl",
         kvalues(g, IQ4_NL, 18, struct.pack("<H", ONE_F16), "kvalues_iq4nl")),
        ("int8_t", "kFp4Values", "kvalues_mxfp4 (kvalues_fp4)",
         kvalues(g, MXFP4, 17, bytes([128]), "kvalues_mxfp4")),
    ]


def render(tabs):
    out = [
        "// Lookup tables of ggml's IQ and FP4 formats (ggml-common.h), as ggml's own dequantisers",
        "// use them. GENERATED by tests/unit/formats/gen_iq_grids.py from libggml-base.so: do not",
        "// edit; rerun the script instead (GgmlOracleTest.IqGridsHeaderMatchesGgml checks it).",
        "// Grid entries hold one byte per value, the first value in the lowest byte.",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "namespace fleet::formats::internal {",
        "",
        "// clang-format off",
    ]
    for ctype, name, ggml_name, values in tabs:
        out.append("")
        out.append("// ggml %s" % ggml_name)
        out.append("inline constexpr %s %s[%d] = {" % (ctype, name, len(values)))
        if ctype == "uint64_t":
            fmt, per = "0x%016x", 4
        elif ctype == "uint32_t":
            fmt, per = "0x%08x", 8
        else:
            fmt, per = "%d", 16
        for i in range(0, len(values), per):
            out.append("    " + ", ".join(fmt % v for v in values[i:i + per]) + ",")
        out.append("};")
    out += ["", "// clang-format on", "", "}  // namespace fleet::formats::internal", ""]
    return "\n".join(out)


def main():
    if len(sys.argv) < 2 or sys.argv[2:] not in ([], ["--check"]):
        print(__doc__, file=sys.stderr)
        return 2
    source_dir, check = sys.argv[1], sys.argv[2:] == ["--check"]
    lib = os.path.join(source_dir, ggml_oracle.LIB)
    if not os.path.exists(lib):
        print("SKIPPED: ggml's library %s is missing (scripts/bootstrap installs it with npm "
              "when Node.js >= 20 is present)" % lib)
        return 0
    text = render(tables(ggml_oracle.Ggml(source_dir)))
    path = os.path.join(source_dir, HEADER)
    if check:
        have = open(path).read() if os.path.exists(path) else ""
        if have != text:
            a, b = have.splitlines(), text.splitlines()
            line = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
            print("%s differs from what ggml gives, first at line %d:\n  have: %s\n  ggml: %s\n"
                  "rerun tests/unit/formats/gen_iq_grids.py %s" % (
                      HEADER, line + 1, a[line] if line < len(a) else "<end>",
                      b[line] if line < len(b) else "<end>", source_dir))
            return 1
        print("%s matches ggml" % HEADER)
        return 0
    with open(path, "w") as f:
        f.write(text)
    print("wrote %s" % path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
