"""Procedural painters for the synthetic datasets: one function per domain, `paint(rng, label, size) -> (image, words)`.

Each class is a strong, visible cue (a small CLIP must learn it at 64 px in minutes) while the nuisance factors —
position, scale, angle, colour, texture, noise — vary freely. `words` holds the nuisance words a caption may use.
Images are drawn at twice the size and downsampled, which antialiases thin strokes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 2


def _jitter(rgb, rng, amount=12) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _pick(rng, table: dict) -> tuple[str, object]:
    name = list(table)[int(rng.integers(len(table)))]
    return name, table[name]


def where_words(x: float, y: float) -> str:
    """Coarse position of a point given as fractions of the image."""
    vert = "top" if y < 0.4 else ("bottom" if y > 0.6 else "")
    horiz = "left" if x < 0.4 else ("right" if x > 0.6 else "")
    spot = f"{vert} {horiz}".strip()
    return "in the centre" if not spot else f"near the {spot}"


def _finish(canvas: np.ndarray, size: int, rng, noise=(3.0, 8.0), blur=0.6) -> Image.Image:
    """Downsample the supersampled canvas, add sensor-like noise and a little blur."""
    mode = "L" if canvas.ndim == 2 else "RGB"
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    img = img.resize((size, size), Image.LANCZOS)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, blur)))
    x = np.asarray(img, dtype=np.float32)
    x = x + rng.normal(0, rng.uniform(*noise), x.shape)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8)).convert(mode)


def _grid(d: int):
    ys, xs = np.mgrid[0:d, 0:d].astype(np.float32)
    return xs, ys


# ---- industrial: metal/fabric surfaces with defects -------------------------------------------------------------

INDUSTRIAL_CLASSES = ["scratch", "hole", "stain", "crack", "no defect"]
METALS = {"steel": (150, 155, 160), "dark steel": (95, 100, 108), "aluminium": (180, 182, 186),
          "bronze": (160, 118, 72), "copper": (170, 100, 66)}
FABRICS = {"blue": (60, 90, 150), "green": (70, 120, 80), "beige": (185, 170, 140), "red": (150, 60, 60),
           "gray": (125, 125, 125)}


def _brushed(d, base, rng) -> np.ndarray:
    """Brushed metal: streaks along a random direction."""
    xs, ys = _grid(d)
    theta = rng.uniform(0, math.pi)
    v = (-xs * math.sin(theta) + ys * math.cos(theta) + 2 * d).astype(np.int64)
    profile = np.convolve(rng.normal(0, 1, 5 * d), np.ones(3) / 3, mode="same") * rng.uniform(6, 14)
    return np.asarray(base, np.float32) + profile[v][..., None]


def _woven(d, base, rng) -> np.ndarray:
    """Woven fabric: a cross-hatched periodic pattern."""
    xs, ys = _grid(d)
    period = rng.uniform(5, 9)
    weave = np.sin(2 * math.pi * xs / period) * np.sin(2 * math.pi * ys / period)
    return np.asarray(base, np.float32) + (weave * rng.uniform(10, 20))[..., None]


def _line(draw, pts, fill, width):
    draw.line([tuple(map(float, p)) for p in pts], fill=fill, width=int(round(width)), joint="curve")


def _defect(draw, label, d, rng) -> tuple[float, float]:
    cx, cy = rng.uniform(0.3, 0.7, 2) * d
    kind = INDUSTRIAL_CLASSES[label]
    if kind == "scratch":  # long, straight, thin, bright
        for _ in range(int(rng.integers(1, 3))):
            length, a = rng.uniform(0.45, 0.8) * d, rng.uniform(0, math.pi)
            dx, dy = math.cos(a) * length / 2, math.sin(a) * length / 2
            ox, oy = rng.uniform(-0.08, 0.08, 2) * d
            _line(draw, [(cx + ox - dx, cy + oy - dy), (cx + ox + dx, cy + oy + dy)],
                  _jitter((238, 238, 232), rng, 10), rng.uniform(0.02, 0.03) * d)
    elif kind == "hole":  # round, dark, sharp, with a light rim
        for _ in range(int(rng.integers(1, 3))):
            r = rng.uniform(0.06, 0.1) * d
            x, y = cx + rng.uniform(-0.15, 0.15) * d, cy + rng.uniform(-0.15, 0.15) * d
            draw.ellipse([x - r * 1.25, y - r * 1.25, x + r * 1.25, y + r * 1.25], fill=_jitter((215, 215, 210), rng))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_jitter((12, 12, 14), rng, 8))
    elif kind == "crack":  # jagged, dark, branching
        length, a = rng.uniform(0.5, 0.8) * d, rng.uniform(0, 2 * math.pi)
        n = int(rng.integers(6, 10))
        pts = [(cx - math.cos(a) * length / 2, cy - math.sin(a) * length / 2)]
        for _ in range(n):
            step = a + rng.normal(0, 0.7)
            pts.append((pts[-1][0] + math.cos(step) * length / n, pts[-1][1] + math.sin(step) * length / n))
        width = rng.uniform(0.02, 0.03) * d
        _line(draw, pts, _jitter((25, 22, 20), rng, 8), width)
        branch = [pts[n // 2]]
        ab = a + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2)
        for _ in range(3):
            step = ab + rng.normal(0, 0.6)
            branch.append((branch[-1][0] + math.cos(step) * length / n, branch[-1][1] + math.sin(step) * length / n))
        _line(draw, branch, _jitter((25, 22, 20), rng, 8), width * 0.7)
    return cx / d, cy / d


def _stain(canvas, d, rng) -> tuple[float, float]:
    """A large soft blob blended over the surface (drawn in numpy for the soft edge)."""
    cx, cy = rng.uniform(0.3, 0.7, 2)
    xs, ys = _grid(d)
    r = rng.uniform(0.14, 0.24) * d
    ang = np.arctan2(ys - cy * d, xs - cx * d)
    wobble = 1 + sum(rng.uniform(0, 0.18) * np.cos(k * ang + rng.uniform(0, 6.3)) for k in (2, 3, 5))
    dist = np.hypot(xs - cx * d, ys - cy * d) / (r * wobble)
    alpha = np.clip((1.15 - dist) / 0.35, 0, 1)[..., None] * rng.uniform(0.6, 0.8)
    colour = np.asarray(_jitter(([95, 55, 20], [30, 30, 25], [120, 110, 30])[int(rng.integers(3))], rng), np.float32)
    canvas[:] = canvas * (1 - alpha) + colour * alpha
    return cx, cy


def paint_industrial(rng, label: int, size: int) -> tuple[Image.Image, dict]:
    d = size * SUPERSAMPLE
    if rng.random() < 0.5:
        name, base = _pick(rng, METALS)
        canvas, material = _brushed(d, _jitter(base, rng), rng), name
    else:
        name, base = _pick(rng, FABRICS)
        canvas, material = _woven(d, _jitter(base, rng), rng), f"{name} fabric"
    canvas = canvas * rng.uniform(0.9, 1.1)
    if INDUSTRIAL_CLASSES[label] == "stain":
        pos = _stain(canvas, d, rng)
    else:
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        pos = _defect(ImageDraw.Draw(img), label, d, rng)
        canvas = np.asarray(img, np.float32)
    where = "" if INDUSTRIAL_CLASSES[label] == "no defect" else where_words(*pos)
    return _finish(canvas, size, rng), {"material": material, "where": where,
                                        "kind": "fabric" if "fabric" in material else "metal"}


# ---- medical: grayscale scans with organ-like ellipses and lesion-like blobs ----------------------------------

MEDICAL_CLASSES = ["healthy tissue", "round lesion", "multiple lesions", "irregular mass", "dark cyst"]


def _blob(canvas, xs, ys, cx, cy, r, value, softness=0.25, wobble=None):
    dist = np.hypot(xs - cx, ys - cy) / r
    if wobble is not None:
        dist = dist / wobble(np.arctan2(ys - cy, xs - cx))
    alpha = np.clip((1 - dist) / softness + 0.5, 0, 1)
    canvas[:] = canvas * (1 - alpha) + value * alpha


def _ellipse(canvas, xs, ys, cx, cy, ax, ay, angle, value):
    c, s = math.cos(angle), math.sin(angle)
    u, v = (xs - cx) * c + (ys - cy) * s, -(xs - cx) * s + (ys - cy) * c
    alpha = np.clip((1 - np.hypot(u / ax, v / ay)) * 12, 0, 1)
    canvas[:] = canvas * (1 - alpha) + value * alpha


def paint_medical(rng, label: int, size: int) -> tuple[Image.Image, dict]:
    d = size * SUPERSAMPLE
    xs, ys = _grid(d)
    canvas = np.full((d, d), rng.uniform(0, 20), np.float32)
    angle = rng.uniform(-0.4, 0.4)
    bx, by = (0.5 + rng.uniform(-0.05, 0.05, 2)) * d
    _ellipse(canvas, xs, ys, bx, by, rng.uniform(0.38, 0.46) * d, rng.uniform(0.3, 0.4) * d, angle,
             rng.uniform(70, 105))
    for _ in range(int(rng.integers(2, 4))):  # organs: mid-grey ellipses inside the body
        ox, oy = (0.5 + rng.uniform(-0.22, 0.22, 2)) * d
        _ellipse(canvas, xs, ys, ox, oy, rng.uniform(0.08, 0.16) * d, rng.uniform(0.06, 0.12) * d,
                 rng.uniform(0, math.pi), rng.uniform(110, 150))
    kind = MEDICAL_CLASSES[label]
    cx, cy = (0.5 + rng.uniform(-0.17, 0.17, 2)) * d
    if kind == "round lesion":
        _blob(canvas, xs, ys, cx, cy, rng.uniform(0.06, 0.09) * d, rng.uniform(220, 250))
    elif kind == "multiple lesions":
        for _ in range(int(rng.integers(3, 7))):
            x, y = (0.5 + rng.uniform(-0.25, 0.25, 2)) * d
            _blob(canvas, xs, ys, x, y, rng.uniform(0.03, 0.045) * d, rng.uniform(215, 250))
    elif kind == "irregular mass":
        phases, amps = rng.uniform(0, 6.3, 3), rng.uniform(0.22, 0.35, 3)
        wobble = lambda a: 1 + sum(amp * np.cos(k * a + p) for amp, k, p in zip(amps, (3, 5, 7), phases))
        _blob(canvas, xs, ys, cx, cy, rng.uniform(0.16, 0.21) * d, rng.uniform(170, 210), 0.15, wobble)
    elif kind == "dark cyst":
        r = rng.uniform(0.08, 0.12) * d
        _blob(canvas, xs, ys, cx, cy, r * 1.3, rng.uniform(180, 215))
        _blob(canvas, xs, ys, cx, cy, r, rng.uniform(0, 15))
    where = "" if kind in ("healthy tissue", "multiple lesions") else where_words(cx / d, cy / d)
    contrast = rng.uniform(0.85, 1.15)
    canvas = (canvas - 128) * contrast + 128
    return _finish(canvas, size, rng, noise=(2.0, 7.0)), {"where": where}


# ---- scientific: charts with trends, micrographs of cells --------------------------------------------------------

SCIENTIFIC_CLASSES = ["rising line chart", "falling line chart", "bar chart", "scatter plot", "round cells",
                      "elongated cells"]
INKS = {"blue": (40, 80, 200), "red": (200, 40, 40), "green": (30, 140, 60), "orange": (230, 130, 20),
        "purple": (120, 50, 160), "black": (20, 20, 20)}
PAPERS = {"white": (250, 250, 250), "light gray": (225, 225, 228), "cream": (245, 238, 215),
          "pale blue": (225, 235, 248)}


def _axes(draw, d, rng, box):
    left, top, right, bottom = box
    if rng.random() < 0.3:  # gridlines
        for k in range(1, 4):
            y = top + (bottom - top) * k / 4
            draw.line([(left, y), (right, y)], fill=(200, 200, 200), width=1)
    if rng.random() < 0.75:
        draw.line([(left, top), (left, bottom), (right, bottom)], fill=(60, 60, 60), width=max(1, d // 64))


def _chart(draw, kind, d, rng, ink):
    left, top = rng.uniform(0.08, 0.2, 2) * d
    right, bottom = d - rng.uniform(0.06, 0.15) * d, d - rng.uniform(0.08, 0.2) * d
    _axes(draw, d, rng, (left, top, right, bottom))
    w, h = right - left, bottom - top
    if kind in ("rising line chart", "falling line chart"):
        n = int(rng.integers(6, 14))
        t = np.linspace(0, 1, n)
        y = t * rng.uniform(0.6, 0.9) + rng.normal(0, 0.04, n) + rng.uniform(0.03, 0.08)
        y = y if kind.startswith("rising") else y[::-1]
        pts = [(left + w * ti, bottom - h * yi) for ti, yi in zip(t, np.clip(y, 0, 1))]
        _line(draw, pts, ink, rng.uniform(0.025, 0.04) * d)
    elif kind == "bar chart":
        n = int(rng.integers(4, 8))
        slot = w / n
        for i, hi in enumerate(rng.uniform(0.2, 0.95, n)):
            x0 = left + slot * (i + 0.15)
            draw.rectangle([x0, bottom - h * hi, x0 + slot * 0.7, bottom], fill=ink)
    else:  # scatter plot: a cloud of dots, at most weakly correlated so it never reads as a trend line
        n, slope = int(rng.integers(20, 45)), rng.uniform(-0.25, 0.25)
        xs = rng.uniform(0.05, 0.95, n)
        ys = np.clip(0.5 + slope * (xs - 0.5) + rng.normal(0, 0.2, n), 0.05, 0.95)
        r = rng.uniform(0.012, 0.022) * d
        for x, y in zip(xs, ys):
            cx, cy = left + w * x, bottom - h * y
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink)


CELL_STAINS = {"pink": ((240, 220, 230), (200, 90, 150), (90, 30, 110)),  # background, cytoplasm, nucleus
               "fluorescent green": ((10, 15, 12), (60, 200, 80), (160, 255, 170)),
               "blue": ((230, 235, 245), (110, 140, 210), (30, 40, 120))}


def _cells(draw, kind, d, rng, colours):
    _, body, nucleus = colours
    n = int(rng.integers(5, 13))
    for _ in range(n):
        x, y = rng.uniform(0.12, 0.88, 2) * d
        if kind == "round cells":
            a = b = rng.uniform(0.05, 0.075) * d
        else:
            b = rng.uniform(0.03, 0.04) * d
            a = b * rng.uniform(3.5, 4.5)
        ang = rng.uniform(0, math.pi)
        outline = [(x + a * math.cos(t) * math.cos(ang) - b * math.sin(t) * math.sin(ang),
                    y + a * math.cos(t) * math.sin(ang) + b * math.sin(t) * math.cos(ang))
                   for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
        draw.polygon(outline, fill=_jitter(body, rng, 20))
        rn = b * 0.45
        draw.ellipse([x - rn, y - rn, x + rn, y + rn], fill=_jitter(nucleus, rng, 15))


def paint_scientific(rng, label: int, size: int) -> tuple[Image.Image, dict]:
    d = size * SUPERSAMPLE
    kind = SCIENTIFIC_CLASSES[label]
    if kind.endswith("cells"):
        stain, colours = _pick(rng, CELL_STAINS)
        canvas = np.asarray(_jitter(colours[0], rng, 10), np.float32) + rng.normal(0, 6, (d // 8, d // 8, 1))
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).resize((d, d), Image.BICUBIC)
        _cells(ImageDraw.Draw(img), kind, d, rng, colours)
        words = {"colour": stain, "background": "microscope"}
    else:
        paper, bg = _pick(rng, PAPERS)
        ink_name, ink = _pick(rng, INKS)
        img = Image.new("RGB", (d, d), _jitter(bg, rng, 5))
        _chart(ImageDraw.Draw(img), kind, d, rng, _jitter(ink, rng, 15))
        words = {"colour": ink_name, "background": paper}
    return _finish(np.asarray(img, np.float32), size, rng, noise=(1.0, 5.0), blur=0.5), words


# ---- generic pretraining corpus: shapes, colours, counts, textures, positions ------------------------------------

SHAPES = ["circle", "square", "triangle", "cross", "ring"]
COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
           "orange": (240, 130, 30), "purple": (130, 50, 170), "white": (245, 245, 245), "black": (15, 15, 15),
           "gray": (128, 128, 128), "brown": (120, 75, 40), "pink": (240, 150, 190)}
TEXTURES = ["plain", "striped", "dotted", "checkered", "grainy", "woven"]


def _texture(d, base, texture, rng) -> np.ndarray:
    xs, ys = _grid(d)
    period = rng.uniform(8, 16)
    pattern = {
        "plain": np.zeros_like(xs),
        "striped": np.sign(np.sin(2 * math.pi * (xs * math.cos(rng.uniform(0, 3.1)) + ys) / period)),
        "dotted": (np.hypot(xs % period - period / 2, ys % period - period / 2) < period / 5) * 2.0 - 0.2,
        "checkered": np.sign(np.sin(math.pi * xs / period) * np.sin(math.pi * ys / period)),
        "grainy": rng.normal(0, 1, (d, d)),
        "woven": np.sin(2 * math.pi * xs / period * 2) * np.sin(2 * math.pi * ys / period * 2),
    }[texture]
    return np.asarray(base, np.float32) + (pattern * 22)[..., None]


def _shape(draw, shape, x, y, r, fill):
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r * 0.85, y - r * 0.85, x + r * 0.85, y + r * 0.85], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r * 0.95, y + r * 0.75), (x - r * 0.95, y + r * 0.75)], fill=fill)
    elif shape == "cross":
        draw.rectangle([x - r, y - r * 0.3, x + r, y + r * 0.3], fill=fill)
        draw.rectangle([x - r * 0.3, y - r, x + r * 0.3, y + r], fill=fill)
    else:  # ring
        draw.ellipse([x - r, y - r, x + r, y + r], outline=fill, width=max(2, int(r * 0.35)))


def paint_generic(rng, label: int, size: int) -> tuple[Image.Image, dict]:
    """`label` indexes SHAPES; colour, count, size, texture, background and position are free."""
    d = size * SUPERSAMPLE
    names = list(COLOURS)
    bg_name = names[int(rng.integers(len(names)))]
    fg_name = rng.choice([n for n in names if n != bg_name])
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    img = Image.fromarray(np.clip(_texture(d, _jitter(COLOURS[bg_name], rng, 10), texture, rng), 0, 255)
                          .astype(np.uint8))
    draw = ImageDraw.Draw(img)
    count = int(rng.integers(1, 5))
    big = count <= 2 and rng.random() < 0.5
    r = (rng.uniform(0.18, 0.26) if big else rng.uniform(0.08, 0.13)) * d
    centres = [(0.5 + rng.uniform(-0.28, 0.28, 2)) * d] if count == 1 else _spread(count, d, r, rng)
    for x, y in centres:
        _shape(draw, SHAPES[label], x, y, r, _jitter(COLOURS[fg_name], rng, 15))
    where = where_words(centres[0][0] / d, centres[0][1] / d) if count == 1 else ""
    gray = rng.random() < 0.15  # some grayscale images, as medical scans are
    img = _finish(np.asarray(img, np.float32), size, rng, noise=(1.0, 6.0))
    if gray:
        img = img.convert("L").convert("RGB")
    return img, {"count": len(centres), "colour": str(fg_name), "background": bg_name, "texture": texture,
                 "size": "large" if big else "small", "where": where, "gray": gray}


def _spread(count, d, r, rng, tries=50):
    """Centres for `count` shapes that do not overlap (best effort)."""
    centres = []
    for _ in range(tries * count):
        c = rng.uniform(r * 1.1, d - r * 1.1, 2)
        if all(np.hypot(*(c - o)) > 2.2 * r for o in centres):
            centres.append(c)
            if len(centres) == count:
                break
    return centres or [np.array([d / 2, d / 2])]
