"""A picture of a Tensorfleet placement plan, for the Tensorfleet Plan node's IMAGE output.

render(plan) takes the coordinator's plan JSON (as a dict: devices, assignments, schedule) and
returns a float32 numpy array [H, W, 3] in 0..1 (ComfyUI's IMAGE without the batch axis):

- a bar of the whole model in block order across the full width (the ranges stay visible
  when the model is small against the devices);
- one bar per device, its length scaled to the device's capacity (the longest bar is the
  largest capacity), the compute device marked;
- inside each bar the blocks the device holds, in model order, as wide as their bytes and
  coloured by the schedule range they belong to;
- streamed ranges (weights go to the compute device each step) are hatched; a red marker with a
  "P" stands where a pipelined range starts (activations move to that device there);
- a legend with each range (its first and last block, holder, how it runs), the mode and the
  expert string.

Text is drawn with a 5x7 bitmap font of our own (upper case; lower case is shown in upper case),
so the node needs numpy only. png_bytes() encodes an image as PNG (stdlib zlib) for looking at
it outside ComfyUI.
"""

import struct
import zlib

import numpy as np

_FONT_ROWS = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "####. ....# ....# .###. ....# ....# ####.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    " ": "..... ..... ..... ..... ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    ";": "..... .##.. .##.. ..... .##.. ..#.. .#...",
    "%": "##..# ##.#. ...#. ..#.. .#... .#.## #..##",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#.. .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "/": "....# ...#. ...#. ..#.. .#... .#... #....",
    "-": "..... ..... ..... .###. ..... ..... .....",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "[": ".###. .#... .#... .#... .#... .#... .###.",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "'": "..#.. ..#.. .#... ..... ..... ..... .....",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
    "|": "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
}
GLYPHS = {c: np.array([[ch == "#" for ch in row] for row in rows.split()], dtype=bool)
          for c, rows in _FONT_ROWS.items()}

SCALE = 2                    # font pixels per glyph pixel
ADVANCE = 6 * SCALE          # glyph width + one column of space
LINE = 10 * SCALE            # line height
WIDTH = 1024
MARGIN = 16
LABEL_W = 300                # left column with the device labels
BAR_H = 36
ROW_H = 64

BACKGROUND = (0.10, 0.10, 0.12)
TEXT = (0.92, 0.92, 0.92)
DIM = (0.60, 0.60, 0.64)
EMPTY = (0.20, 0.20, 0.23)
OUTLINE = (0.75, 0.75, 0.78)
MARK = (0.95, 0.20, 0.20)
PALETTE = [(0.27, 0.55, 0.90), (0.95, 0.62, 0.20), (0.35, 0.75, 0.40), (0.80, 0.40, 0.80),
           (0.95, 0.85, 0.30), (0.35, 0.80, 0.85), (0.85, 0.45, 0.45), (0.60, 0.60, 0.95)]


def text_width(s):
    return len(s) * ADVANCE


def draw_text(img, x, y, s, color=TEXT, max_width=None):
    """Draws `s` with its top-left corner at (x, y); clips at max_width (adds "..")."""
    s = str(s).upper()
    if max_width is not None and text_width(s) > max_width:
        keep = max(0, max_width // ADVANCE - 2)
        s = s[:keep] + ".."
    h, w = img.shape[:2]
    for i, ch in enumerate(s):
        glyph = GLYPHS.get(ch, GLYPHS["?"])
        big = np.kron(glyph, np.ones((SCALE, SCALE), dtype=bool))
        gx = x + i * ADVANCE
        if gx >= w or y >= h:
            break
        region = img[y:y + big.shape[0], gx:gx + big.shape[1]]
        mask = big[:region.shape[0], :region.shape[1]]
        region[mask] = color


def _fill(img, x0, y0, x1, y1, color):
    img[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = color


def _outline(img, x0, y0, x1, y1, color):
    _fill(img, x0, y0, x1, y0 + 1, color)
    _fill(img, x0, y1 - 1, x1, y1, color)
    _fill(img, x0, y0, x0 + 1, y1, color)
    _fill(img, x1 - 1, y0, x1, y1, color)


def _hatch(img, x0, y0, x1, y1):
    """Diagonal light stripes over a box: this range's weights are streamed."""
    ys, xs = np.mgrid[y0:y1, x0:x1]
    stripes = ((xs + ys) // 3) % 4 == 0
    region = img[y0:y1, x0:x1]
    region[stripes] = region[stripes] * 0.4 + 0.6


def format_bytes(n):
    n = float(n)
    for unit in ("B", "KIB", "MIB", "GIB", "TIB"):
        if n < 1024 or unit == "TIB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return "%d B" % n


def _ranges(plan, units):
    """[(first index, last index, holder, site)] over `units` (model order), from the schedule;
    one resident range per device run when the plan has no schedule."""
    index = {u: i for i, u in enumerate(units)}
    out = []
    for r in (plan.get("schedule") or {}).get("ranges") or []:
        if r.get("first") in index and r.get("last") in index:
            out.append((index[r["first"]], index[r["last"]], r.get("holder", ""),
                        r.get("site", "resident")))
    if out:
        return out
    device_of = {a["unit"]: a["device"] for a in plan.get("assignments") or []}
    for i, u in enumerate(units):
        if out and out[-1][2] == device_of.get(u):
            out[-1] = (out[-1][0], i, out[-1][2], out[-1][3])
        else:
            out.append((i, i, device_of.get(u, ""), "resident"))
    return out


def render(plan, title=""):
    """The picture of `plan` (the coordinator's plan JSON as a dict). Returns float32 [H, W, 3]."""
    devices = plan.get("devices") or []
    assignments = plan.get("assignments") or []
    units = [a["unit"] for a in assignments]
    unit_bytes = {a["unit"]: int(a.get("bytes", 0)) for a in assignments}
    ranges = _ranges(plan, units)
    range_of = {}
    for k, (first, last, _, _) in enumerate(ranges):
        for i in range(first, last + 1):
            range_of[units[i]] = k
    legend_rows = min(len(ranges), 16)
    height = (MARGIN + 3 * LINE + (len(devices) + 1) * ROW_H + LINE + (legend_rows + 2) * LINE
              + MARGIN)
    img = np.empty((height, WIDTH, 3), dtype=np.float32)
    img[:] = BACKGROUND

    y = MARGIN
    compute = plan.get("compute_device", "")
    draw_text(img, MARGIN, y, "TENSORFLEET PLAN: %s" % (title or plan.get("family", "model")),
              max_width=WIDTH - 2 * MARGIN)
    y += LINE
    draw_text(img, MARGIN, y, "%s  MODE %s  COMPUTE %s  %s" % (
        plan.get("family", ""), plan.get("mode", ""), compute,
        format_bytes(plan.get("model_bytes", sum(unit_bytes.values())))), DIM,
        max_width=WIDTH - 2 * MARGIN)
    y += 2 * LINE

    bar_x0, bar_x1 = MARGIN + LABEL_W, WIDTH - MARGIN
    scale_bytes = max([int(d.get("capacity_bytes") or d.get("total_bytes") or 0)
                       for d in devices] + [sum(unit_bytes.values()), 1])
    px_per_byte = (bar_x1 - bar_x0) / float(scale_bytes)
    pipeline_starts = {units[first] for first, _, _, site in ranges if site == "pipeline"}

    def draw_blocks(held, x, by0, by1, scale):
        """Draws `held` from x on, each block unit_bytes * scale pixels wide."""
        for u in held:
            k = range_of.get(u, 0)
            site = ranges[k][3] if ranges else "resident"
            sx0, x = int(round(x)), x + unit_bytes[u] * scale
            sx1 = max(sx0 + 1, int(round(x)))
            color = np.array(PALETTE[k % len(PALETTE)], dtype=np.float32)
            _fill(img, sx0, by0 + 2, sx1, by1 - 2, color)
            if site == "stream":
                _hatch(img, sx0, by0 + 2, sx1, by1 - 2)
            if sx1 - sx0 >= 4:  # a thin separator between blocks
                _fill(img, sx1 - 1, by0 + 2, sx1, by1 - 2, color * 0.6)
            if u in pipeline_starts:
                _fill(img, sx0, by0 - 6, sx0 + 3, by1 + 6, MARK)
                draw_text(img, sx0 + 5, by1 + 2, "P", MARK)

    # The whole model in block order across the full width: the ranges whatever the capacities.
    draw_text(img, MARGIN, y + 2, "MODEL, BLOCK ORDER", max_width=LABEL_W - 8)
    draw_text(img, MARGIN, y + 2 + LINE, "%d BLOCKS" % len(units), DIM, max_width=LABEL_W - 8)
    total = max(1, sum(unit_bytes.values()))
    _fill(img, bar_x0, y, bar_x1, y + BAR_H, EMPTY)
    draw_blocks(units, float(bar_x0), y, y + BAR_H, (bar_x1 - bar_x0) / float(total))
    _outline(img, bar_x0, y, bar_x1, y + BAR_H, OUTLINE)
    y += ROW_H

    for d in devices:
        dev = d.get("id", "?")
        cap = int(d.get("capacity_bytes") or d.get("total_bytes") or 0)
        held = [u for u in units if any(a["unit"] == u and a["device"] == dev
                                        for a in assignments)]
        used = sum(unit_bytes[u] for u in held)
        draw_text(img, MARGIN, y + 2, dev + ("  (COMPUTE)" if dev == compute else ""),
                  max_width=LABEL_W - 8)
        draw_text(img, MARGIN, y + 2 + LINE, "%s OF %s" % (format_bytes(used), format_bytes(cap)),
                  DIM, max_width=LABEL_W - 8)
        by0, by1 = y, y + BAR_H
        bx1 = bar_x0 + max(2, int(round(cap * px_per_byte)))
        _fill(img, bar_x0, by0, bx1, by1, EMPTY)
        draw_blocks(held, float(bar_x0), by0, by1, px_per_byte)
        _outline(img, bar_x0, by0, bx1, by1, OUTLINE)
        y += ROW_H

    y += LINE // 2
    draw_text(img, MARGIN, y, "RANGES  (HATCHED: WEIGHTS STREAMED TO COMPUTE; P: PIPELINED "
              "FROM HERE)", DIM, max_width=WIDTH - 2 * MARGIN)
    y += LINE
    for k, (first, last, holder, site) in enumerate(ranges[:legend_rows]):
        _fill(img, MARGIN, y + 2, MARGIN + 14, y + 2 + 14, PALETTE[k % len(PALETTE)])
        if site == "stream":
            _hatch(img, MARGIN, y + 2, MARGIN + 14, y + 16)
        span = units[first] if first == last else "%s .. %s" % (units[first], units[last])
        draw_text(img, MARGIN + 22, y + 2, "%s ON %s: %s" % (span, holder, site),
                  max_width=WIDTH - 2 * MARGIN - 22)
        y += LINE
    if len(ranges) > legend_rows:
        draw_text(img, MARGIN + 22, y + 2, "+%d MORE RANGES" % (len(ranges) - legend_rows), DIM)
    y += LINE
    expert = plan.get("expert_string", "")
    if expert:
        draw_text(img, MARGIN, y + 2, "EXPERT STRING: " + expert, DIM,
                  max_width=WIDTH - 2 * MARGIN)
    return np.clip(img, 0.0, 1.0)


def png_bytes(image):
    """Encodes a float [H, W, 3] image in 0..1 as an 8-bit RGB PNG."""
    rgb = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    h, w = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
