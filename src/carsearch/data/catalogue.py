"""A rendered vehicle catalogue: the embedded default data set, drawn with Pillow.

Every image shows one vehicle in a side-on, front-three-quarter drawing whose labelled
fields are all visible:

- make: the front face's grille pattern and colour, the badge shape and colour, and
  the window-trim finish (chrome or black);
- body type: the silhouette (sedan, coupe, hatchback, wagon, convertible, SUV, minivan,
  van, and pickups whose cab length follows Regular / Extended / Quad / Crew Cab);
- year, by era: up to 2001 round headlights, chrome bumpers and side trim, small
  white-wall wheels; 2002-2008 rectangular lamps, grey bumpers, silver wheels; from
  2009 slim lamp strips, body-colour bumpers, large dark wheels;
- colour: the paint, one of the canonical colours, chosen per image.

Backgrounds (sky, ground, buildings, trees, road marks), position, scale, facing,
lighting, blur, and noise vary per image. The output is the Stanford Cars layout
(cars_meta.mat, cars_train_annos.mat with 1-based boxes, cars_train/NNNNN.jpg) plus
labels.jsonl with each image's colour and box ([x1, y1, x2, y2] pixels, 0-based, right and
bottom exclusive), so `load_stanford` reads it unchanged and the
benchmark split (even file number = test) applies. Output is byte-identical for a seed.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from carsearch.platform.errors import ConfigError
from carsearch.platform.vehicles import BODY_CATEGORY, COLOURS

log = logging.getLogger(__name__)

GENERATOR = "carsearch-synth/1"
DEFAULT_SIZE = (128, 96)
SUPERSAMPLE = 2
Point = tuple[float, float]
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class CatalogueClass:
    make: str
    model: str
    body: str
    year: int

    @property
    def class_name(self) -> str:
        return f"{self.make} {self.model} {self.body} {self.year}"

    @property
    def era(self) -> int:
        """0: up to 2001, 1: 2002-2008, 2: from 2009."""
        return 0 if self.year <= 2001 else 1 if self.year <= 2008 else 2


def _c(make: str, model: str, body: str, year: int) -> CatalogueClass:
    return CatalogueClass(make, model, body, year)


# 12 makes x 3 classes; every body category 4 times; eras spread across makes and bodies.
CATALOGUE: tuple[CatalogueClass, ...] = (
    _c("Chevrolet", "Silverado 1500", "Regular Cab", 2012),
    _c("Chevrolet", "Malibu", "Sedan", 1999),
    _c("Chevrolet", "Express", "Van", 2005),
    _c("Ford", "F-150", "Extended Cab", 1997),
    _c("Ford", "Mustang", "Convertible", 2012),
    _c("Ford", "Freestar", "Minivan", 2006),
    _c("BMW", "3 Series", "Sedan", 2005),
    _c("BMW", "M3", "Coupe", 2012),
    _c("BMW", "5 Series", "Wagon", 2011),
    _c("Mercedes-Benz", "E-Class", "Sedan", 2012),
    _c("Mercedes-Benz", "SL-Class", "Convertible", 1996),
    _c("Mercedes-Benz", "Sprinter", "Van", 2012),
    _c("Audi", "A4", "Wagon", 2006),
    _c("Audi", "TT", "Coupe", 2001),
    _c("Audi", "A3", "Hatchback", 1999),
    _c("Toyota", "Tacoma", "Crew Cab", 2005),
    _c("Toyota", "Sienna", "Minivan", 2012),
    _c("Toyota", "Corolla", "Sedan", 1997),
    _c("Volkswagen", "Golf", "Hatchback", 2012),
    _c("Volkswagen", "Beetle", "Convertible", 2004),
    _c("Volkswagen", "Transporter", "Van", 1994),
    _c("Jeep", "Wrangler", "SUV", 1998),
    _c("Jeep", "Grand Cherokee", "SUV", 2012),
    _c("Jeep", "Grand Wagoneer", "Wagon", 1991),
    _c("Dodge", "Caravan", "Minivan", 1997),
    _c("Dodge", "Challenger", "Coupe", 2011),
    _c("Dodge", "Ram Pickup 1500", "Quad Cab", 2012),
    _c("Volvo", "XC90", "SUV", 2007),
    _c("Volvo", "C30", "Hatchback", 2012),
    _c("Volvo", "850", "Wagon", 1996),
    _c("Honda", "Civic", "Coupe", 2006),
    _c("Honda", "Odyssey", "Minivan", 2007),
    _c("Honda", "Fit", "Hatchback", 2008),
    _c("Land Rover", "Range Rover", "SUV", 2000),
    _c("Land Rover", "Defender", "Van", 2006),
    _c("Land Rover", "Range Rover Evoque", "Convertible", 2012),
)

PAINT: dict[str, RGB] = {
    "red": (196, 28, 34),
    "blue": (28, 68, 176),
    "green": (32, 118, 52),
    "yellow": (236, 204, 38),
    "orange": (238, 118, 22),
    "black": (24, 24, 28),
    "white": (238, 238, 236),
    "silver": (180, 184, 190),
    "grey": (104, 107, 112),
    "brown": (104, 66, 38),
    "beige": (214, 198, 160),
    "gold": (172, 132, 42),
    "purple": (106, 46, 138),
}
assert set(PAINT) == set(COLOURS)

CHROME: RGB = (214, 216, 222)
BLACK: RGB = (18, 18, 20)
GLASS: RGB = (42, 52, 64)


@dataclass(frozen=True)
class MakeStyle:
    badge: str  # bowtie, oval, roundel, star, rings, ellipse, circle, none, cross, arrow, h
    badge_rgb: RGB
    grille: str  # split, slats, kidney, bar, hex, mesh, thin, slots, cross, diagonal, wide
    grille_rgb: RGB
    trim_chrome: bool


MAKE_STYLE: dict[str, MakeStyle] = {
    "Chevrolet": MakeStyle("bowtie", (222, 178, 40), "split", BLACK, True),
    "Ford": MakeStyle("oval", (30, 70, 190), "slats", CHROME, True),
    "BMW": MakeStyle("roundel", (60, 130, 220), "kidney", BLACK, True),
    "Mercedes-Benz": MakeStyle("star", (235, 235, 240), "bar", (60, 62, 66), True),
    "Audi": MakeStyle("rings", (225, 225, 230), "hex", BLACK, False),
    "Toyota": MakeStyle("ellipse", (200, 200, 206), "mesh", (70, 72, 78), False),
    "Volkswagen": MakeStyle("circle", (40, 80, 200), "thin", (40, 40, 44), False),
    "Jeep": MakeStyle("none", BLACK, "slots", BLACK, False),
    "Dodge": MakeStyle("cross", (220, 30, 30), "cross", BLACK, False),
    "Volvo": MakeStyle("arrow", (225, 225, 230), "diagonal", (30, 36, 48), True),
    "Honda": MakeStyle("h", (230, 230, 235), "wide", CHROME, False),
    "Land Rover": MakeStyle("oval", (30, 120, 60), "mesh", (28, 28, 30), False),
    # Not in the catalogue: a make no model trained on it has seen (the data flywheel's
    # tests and walkthrough render it as the "unrecognised vehicle").
    "Zephyr": MakeStyle("star", (240, 200, 40), "diagonal", (240, 200, 40), True),
}

NOVEL = CatalogueClass("Zephyr", "Aero", "Coupe", 2015)


@dataclass(frozen=True)
class BodyShape:
    outline: tuple[Point, ...]  # side profile, u (0 rear .. 1 nose) x v (up), units of length
    windows: tuple[tuple[Point, ...], ...]
    pillars: tuple[float, ...]
    wheels: tuple[float, float]
    clearance: float
    hood: float  # height of the nose, where the front face starts
    belt: float
    length: float = 1.0  # relative overall length
    wheel_scale: float = 1.0
    seats: bool = False


SHAPES: dict[str, BodyShape] = {
    "sedan": BodyShape(
        (
            (0, 0.07),
            (0, 0.20),
            (0.03, 0.235),
            (0.25, 0.245),
            (0.34, 0.36),
            (0.58, 0.37),
            (0.72, 0.25),
            (0.98, 0.225),
            (1, 0.19),
            (1, 0.07),
        ),
        (((0.30, 0.25), (0.355, 0.345), (0.575, 0.352), (0.685, 0.255)),),
        (0.47,),
        (0.19, 0.81),
        0.07,
        0.19,
        0.2,
    ),
    "coupe": BodyShape(
        (
            (0, 0.065),
            (0, 0.19),
            (0.04, 0.22),
            (0.18, 0.23),
            (0.38, 0.325),
            (0.55, 0.33),
            (0.70, 0.23),
            (0.98, 0.205),
            (1, 0.17),
            (1, 0.065),
        ),
        (((0.27, 0.235), (0.39, 0.31), (0.545, 0.315), (0.665, 0.235)),),
        (),
        (0.19, 0.81),
        0.065,
        0.17,
        0.19,
        0.95,
    ),
    "hatchback": BodyShape(
        (
            (0, 0.07),
            (0, 0.22),
            (0.02, 0.35),
            (0.08, 0.385),
            (0.54, 0.385),
            (0.72, 0.25),
            (0.98, 0.225),
            (1, 0.19),
            (1, 0.07),
        ),
        (((0.05, 0.255), (0.08, 0.362), (0.53, 0.364), (0.68, 0.255)),),
        (0.33,),
        (0.17, 0.82),
        0.07,
        0.19,
        0.22,
        0.8,
    ),
    "wagon": BodyShape(
        (
            (0, 0.07),
            (0, 0.22),
            (0.01, 0.36),
            (0.05, 0.375),
            (0.58, 0.375),
            (0.73, 0.25),
            (0.98, 0.225),
            (1, 0.19),
            (1, 0.07),
        ),
        (((0.035, 0.25), (0.055, 0.352), (0.57, 0.355), (0.69, 0.25)),),
        (0.22, 0.45),
        (0.18, 0.81),
        0.07,
        0.19,
        0.22,
        1.05,
    ),
    "convertible": BodyShape(
        ((0, 0.065), (0, 0.19), (0.03, 0.225), (0.70, 0.232), (0.98, 0.205), (1, 0.17), (1, 0.065)),
        (((0.615, 0.232), (0.665, 0.33), (0.68, 0.33), (0.70, 0.232)),),
        (),
        (0.19, 0.81),
        0.065,
        0.17,
        0.2,
        0.95,
        1.0,
        True,
    ),
    "suv": BodyShape(
        (
            (0, 0.10),
            (0, 0.30),
            (0.01, 0.47),
            (0.05, 0.49),
            (0.66, 0.49),
            (0.77, 0.32),
            (0.98, 0.30),
            (1, 0.27),
            (1, 0.10),
        ),
        (((0.035, 0.33), (0.05, 0.465), (0.65, 0.465), (0.74, 0.33)),),
        (0.24, 0.47),
        (0.18, 0.81),
        0.10,
        0.27,
        0.31,
        1.0,
        1.2,
    ),
    "minivan": BodyShape(
        (
            (0, 0.08),
            (0, 0.27),
            (0.02, 0.45),
            (0.08, 0.48),
            (0.60, 0.48),
            (0.81, 0.30),
            (0.98, 0.27),
            (1, 0.24),
            (1, 0.08),
        ),
        (((0.04, 0.31), (0.06, 0.455), (0.60, 0.455), (0.77, 0.31)),),
        (0.25, 0.45, 0.62),
        (0.16, 0.82),
        0.08,
        0.24,
        0.3,
        1.05,
        1.05,
    ),
    "van": BodyShape(
        (
            (0, 0.09),
            (0, 0.57),
            (0.02, 0.59),
            (0.80, 0.59),
            (0.88, 0.40),
            (0.99, 0.33),
            (1, 0.29),
            (1, 0.09),
        ),
        (((0.72, 0.40), (0.72, 0.555), (0.795, 0.555), (0.86, 0.40)),),
        (0.44,),
        (0.15, 0.83),
        0.09,
        0.29,
        0.38,
        1.05,
        1.1,
    ),
}
CAB_LENGTH: dict[str, float] = {
    "Regular Cab": 0.17,
    "Extended Cab": 0.24,
    "Quad Cab": 0.29,
    "Crew Cab": 0.33,
}


def body_category(cls: CatalogueClass) -> str:
    return BODY_CATEGORY[cls.body]


def _pickup_shape(body: str) -> BodyShape:
    start = 0.66 - CAB_LENGTH[body]
    cab = (
        (start, 0.10),
        (start, 0.50),
        (0.66, 0.50),
        (0.75, 0.33),
        (0.98, 0.31),
        (1, 0.28),
        (1, 0.10),
    )
    window = ((start + 0.02, 0.34), (start + 0.02, 0.475), (0.65, 0.475), (0.725, 0.34))
    pillars = ((start + 0.02 + 0.65) / 2,) if CAB_LENGTH[body] > 0.25 else ()
    return BodyShape(cab, (window,), pillars, (0.17, 0.82), 0.10, 0.28, 0.31, 1.1, 1.2)


# The novel make's own silhouette (a tall teardrop no catalogue body has): what makes it
# an unrecognised vehicle to a model trained on the catalogue, not only a new badge.
NOVEL_SHAPES: dict[str, BodyShape] = {
    "Zephyr": BodyShape(
        ((0, 0.08), (0, 0.30), (0.15, 0.55), (0.45, 0.64), (0.75, 0.56), (0.95, 0.36),
         (1, 0.2), (1, 0.08)),
        (((0.2, 0.36), (0.3, 0.52), (0.6, 0.57), (0.8, 0.39)),),
        (0.5,),
        (0.2, 0.8),
        0.08,
        0.2,
        0.36,
        0.8,
        1.3,
    ),
}


def shape_of(cls: CatalogueClass) -> BodyShape:
    if cls.make in NOVEL_SHAPES:
        return NOVEL_SHAPES[cls.make]
    return _pickup_shape(cls.body) if cls.body in CAB_LENGTH else SHAPES[body_category(cls)]


# ----------------------------------------------------------------------------- drawing


def _shade(rgb: RGB, k: float) -> RGB:
    return tuple(int(min(255, max(0, c * k))) for c in rgb)  # type: ignore[return-value]


@dataclass
class _Frame:
    """Maps car coordinates (u along, v up, in car lengths) to canvas pixels."""

    x0: float
    ground: float
    length: float
    umin: float  # u extent drawn (umin .. umax), mirrored when facing left
    umax: float
    facing_left: bool

    def p(self, u: float, v: float) -> Point:
        uu = self.umax - u if self.facing_left else u - self.umin
        return self.x0 + uu * self.length, self.ground - v * self.length

    def poly(self, pts: tuple[Point, ...] | list[Point]) -> list[Point]:
        return [self.p(u, v) for u, v in pts]

    def rect(self, u0: float, v0: float, u1: float, v1: float) -> list[Point]:
        return self.poly([(u0, v0), (u1, v0), (u1, v1), (u0, v1)])

    def circle(self, u: float, v: float, r: float) -> tuple[float, float, float, float]:
        x, y = self.p(u, v)
        rr = r * self.length
        return x - rr, y - rr, x + rr, y + rr


def _vertical_gradient(h: int, w: int, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3))


SKIES: tuple[tuple[RGB, RGB], ...] = (
    ((96, 150, 220), (190, 215, 240)),  # clear
    ((150, 155, 165), (205, 208, 212)),  # overcast
    ((70, 60, 120), (240, 150, 90)),  # dusk
    ((235, 235, 235), (250, 250, 250)),  # studio white
    ((40, 42, 48), (90, 92, 98)),  # showroom
    ((120, 170, 200), (230, 225, 200)),  # haze
)
GROUNDS: tuple[tuple[RGB, RGB], ...] = (
    ((80, 80, 84), (50, 50, 54)),  # asphalt
    ((90, 130, 60), (60, 100, 40)),  # grass
    ((200, 180, 140), (170, 150, 110)),  # sand
    ((170, 170, 165), (140, 140, 138)),  # concrete
    ((225, 228, 235), (200, 205, 215)),  # snow / studio floor
    ((120, 95, 70), (90, 70, 50)),  # dirt
)


def _background(rng: np.random.Generator, w: int, h: int) -> tuple[Image.Image, float]:
    horizon = h * rng.uniform(0.35, 0.7)
    sky_top, sky_bottom = SKIES[rng.integers(len(SKIES))]
    g_top, g_bottom = GROUNDS[rng.integers(len(GROUNDS))]
    jitter = rng.uniform(-18, 18, size=(4, 3)).astype(np.float32)
    hi = int(horizon)
    sky = _vertical_gradient(
        hi, w, np.float32(sky_top) + jitter[0], np.float32(sky_bottom) + jitter[1]
    )
    ground = _vertical_gradient(
        h - hi, w, np.float32(g_top) + jitter[2], np.float32(g_bottom) + jitter[3]
    )
    arr = np.clip(np.concatenate([sky, ground], axis=0), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 5))):  # buildings on the horizon
        bw, bh = rng.uniform(0.08, 0.3) * w, rng.uniform(0.1, 0.45) * h
        bx = rng.uniform(-0.1, 1.0) * w
        tone = rng.integers(60, 200)
        tint = rng.integers(-25, 25, size=3)
        col = tuple(int(np.clip(tone + t, 0, 255)) for t in tint)
        draw.rectangle((bx, horizon - bh, bx + bw, horizon), fill=col)
        for wy in np.arange(horizon - bh + 6, horizon - 6, 12):
            for wx in np.arange(bx + 5, bx + bw - 5, 10):
                draw.rectangle((wx, wy, wx + 4, wy + 5), fill=_shade(col, 0.6))
    for _ in range(int(rng.integers(0, 4))):  # trees
        tx, tr = rng.uniform(0, 1) * w, rng.uniform(0.05, 0.14) * h
        green = (int(rng.integers(20, 70)), int(rng.integers(70, 130)), int(rng.integers(20, 60)))
        draw.rectangle(
            (tx - tr * 0.15, horizon - tr * 1.6, tx + tr * 0.15, horizon), fill=(70, 50, 30)
        )
        draw.ellipse((tx - tr, horizon - tr * 2.6, tx + tr, horizon - tr * 0.8), fill=green)
    if rng.random() < 0.5:  # road marks
        y = rng.uniform(horizon + 4, h - 2)
        paint = (235, 235, 225) if rng.random() < 0.7 else (230, 190, 40)
        dash = rng.uniform(0.06, 0.15) * w
        for x in np.arange(rng.uniform(-dash, 0), w, dash * 2):
            draw.rectangle((x, y, x + dash, y + max(2.0, h * 0.012)), fill=paint)
    return img, horizon


def _wheel(draw: ImageDraw.ImageDraw, f: _Frame, u: float, r: float, era: int, cap: RGB) -> None:
    draw.ellipse(f.circle(u, r * 1.02, r * 1.16), fill=(12, 12, 14))  # arch
    draw.ellipse(f.circle(u, r, r), fill=(22, 22, 24))  # tyre
    if era == 0:
        draw.ellipse(f.circle(u, r, r * 0.78), fill=(240, 240, 236))  # white wall
        draw.ellipse(f.circle(u, r, r * 0.58), fill=(30, 30, 32))
        draw.ellipse(f.circle(u, r, r * 0.45), fill=(196, 198, 204))  # hubcap
    elif era == 1:
        draw.ellipse(f.circle(u, r, r * 0.62), fill=(176, 180, 188))
        x, y = f.p(u, r)
        for k in range(5):
            a = k * 2 * np.pi / 5
            draw.line(
                (x, y, x + np.cos(a) * r * f.length * 0.55, y + np.sin(a) * r * f.length * 0.55),
                fill=(90, 92, 98),
                width=2,
            )
    else:
        draw.ellipse(f.circle(u, r, r * 0.8), fill=(150, 152, 158))  # thin rim edge
        draw.ellipse(f.circle(u, r, r * 0.72), fill=(44, 46, 52))  # dark alloy
    draw.ellipse(f.circle(u, r, r * 0.2), fill=cap)  # the centre cap carries the make's colour


def _badge(draw: ImageDraw.ImageDraw, cx: float, cy: float, rad: float, style: MakeStyle) -> None:
    col, box = style.badge_rgb, (cx - rad, cy - rad, cx + rad, cy + rad)
    kind = style.badge
    if kind == "bowtie":
        draw.polygon(
            [
                (cx - rad * 1.4, cy - rad * 0.35),
                (cx + rad * 1.4, cy - rad * 0.35),
                (cx + rad * 1.4, cy + rad * 0.35),
                (cx - rad * 1.4, cy + rad * 0.35),
            ],
            fill=col,
        )
        draw.rectangle((cx - rad * 0.45, cy - rad * 0.8, cx + rad * 0.45, cy + rad * 0.8), fill=col)
    elif kind == "oval":
        draw.ellipse(
            (cx - rad * 1.5, cy - rad * 0.8, cx + rad * 1.5, cy + rad * 0.8),
            fill=col,
            outline=CHROME,
        )
    elif kind == "roundel":
        draw.ellipse(box, fill=(240, 240, 240), outline=BLACK)
        draw.pieslice(box, 180, 270, fill=col)
        draw.pieslice(box, 0, 90, fill=col)
    elif kind == "star":
        draw.ellipse(box, outline=col, width=max(1, int(rad * 0.25)))
        for a in (-90, 30, 150):
            t = np.deg2rad(a)
            draw.line((cx, cy, cx + np.cos(t) * rad, cy + np.sin(t) * rad), fill=col, width=2)
    elif kind == "rings":
        for k in range(4):
            x = cx + (k - 1.5) * rad * 0.7
            draw.ellipse(
                (x - rad * 0.5, cy - rad * 0.5, x + rad * 0.5, cy + rad * 0.5),
                outline=col,
                width=max(1, int(rad * 0.2)),
            )
    elif kind in ("ellipse", "circle", "h", "arrow"):
        draw.ellipse(
            box, fill=col if kind == "circle" else None, outline=col, width=max(1, int(rad * 0.3))
        )
        if kind == "circle":
            draw.line((cx - rad * 0.5, cy - rad * 0.5, cx, cy + rad * 0.6), fill=(245, 245, 245))
            draw.line((cx + rad * 0.5, cy - rad * 0.5, cx, cy + rad * 0.6), fill=(245, 245, 245))
        elif kind == "h":
            draw.rectangle(
                (cx - rad * 0.5, cy - rad * 0.6, cx - rad * 0.25, cy + rad * 0.6), fill=col
            )
            draw.rectangle(
                (cx + rad * 0.25, cy - rad * 0.6, cx + rad * 0.5, cy + rad * 0.6), fill=col
            )
            draw.rectangle(
                (cx - rad * 0.5, cy - rad * 0.1, cx + rad * 0.5, cy + rad * 0.1), fill=col
            )
        elif kind == "arrow":
            draw.line((cx, cy, cx + rad * 1.3, cy - rad * 1.3), fill=col, width=2)
    elif kind == "cross":
        draw.rectangle((cx - rad, cy - rad * 0.2, cx + rad, cy + rad * 0.2), fill=col)
        draw.rectangle((cx - rad * 0.2, cy - rad, cx + rad * 0.2, cy + rad), fill=col)


def _grille(
    draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], style: MakeStyle, paint: RGB
) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    col, kind = style.grille_rgb, style.grille
    if kind == "kidney":
        gap = w * 0.08
        half = (w - gap) / 2
        for left in (x0, x0 + half + gap):
            kidney = (round(left), round(y0), round(left + half), round(y1))
            if kidney[2] - kidney[0] < 4 or kidney[3] - kidney[1] < 4:
                draw.rectangle(kidney, fill=col, outline=CHROME)
            else:
                draw.rounded_rectangle(
                    kidney, radius=max(1, int(half * 0.35)), fill=col, outline=CHROME, width=2
                )
        return
    if kind == "hex":
        draw.polygon(
            [
                (x0 + w * 0.15, y0 - h * 0.1),
                (x1 - w * 0.15, y0 - h * 0.1),
                (x1, y0 + h * 0.4),
                (x1 - w * 0.1, y1 + h * 0.25),
                (x0 + w * 0.1, y1 + h * 0.25),
                (x0, y0 + h * 0.4),
            ],
            fill=col,
            outline=(120, 120, 126),
        )
        return
    if kind == "slots":
        for k in range(7):
            sx = x0 + (k + 0.2) * w / 7
            draw.rectangle((sx, y0, sx + w / 7 * 0.55, y1), fill=col)
        return
    if kind == "mesh":
        draw.polygon([(x0, y0), (x1, y0), (x1 - w * 0.12, y1), (x0 + w * 0.12, y1)], fill=col)
        for k in range(1, 5):
            y = y0 + k * h / 5
            draw.line((x0 + w * 0.05, y, x1 - w * 0.05, y), fill=_shade(col, 1.8))
        return
    draw.rectangle(box, fill=col)
    bar = _shade(col, 0.3) if col == CHROME else CHROME
    if kind == "split":
        draw.rectangle((x0 - w * 0.05, y0 + h * 0.4, x1 + w * 0.05, y0 + h * 0.62), fill=paint)
    elif kind == "slats":
        for k in range(1, 4):
            y = y0 + k * h / 4
            draw.line((x0, y, x1, y), fill=bar, width=2)
    elif kind == "bar":
        draw.rectangle((x0, y0 + h * 0.42, x1, y0 + h * 0.58), fill=CHROME)
    elif kind == "thin":
        draw.rectangle((x0, y0, x1, y0 + h * 0.3), fill=CHROME)
    elif kind == "cross":
        draw.rectangle((x0, y0 + h * 0.42, x1, y0 + h * 0.58), fill=CHROME)
        draw.rectangle((x0 + w * 0.44, y0, x0 + w * 0.56, y1), fill=CHROME)
    elif kind == "diagonal":
        draw.line((x0, y1, x1, y0), fill=CHROME, width=3)
    elif kind == "wide":
        draw.rectangle((x0, y0, x1, y0 + h * 0.45), fill=_shade(CHROME, 0.9))


def _front_face(
    draw: ImageDraw.ImageDraw,
    f: _Frame,
    shape: BodyShape,
    face: float,
    cls: CatalogueClass,
    paint: RGB,
) -> None:
    c, hood, era = shape.clearance, shape.hood, cls.era
    style = MAKE_STYLE[cls.make]
    draw.polygon(
        f.poly([(1, c), (1, hood), (1 + face, hood - 0.012), (1 + face, c + 0.008)]),
        fill=_shade(paint, 0.82),
        outline=_shade(paint, 0.5),
    )
    fh = hood - c

    def at(s: float, t: float) -> Point:
        return f.p(1 + s * face, c + t * fh)

    bumper = CHROME if era == 0 else (62, 62, 66) if era == 1 else _shade(paint, 0.7)
    draw.polygon([at(-0.02, 0), at(1.02, 0), at(1.02, 0.24), at(-0.02, 0.24)], fill=bumper)
    if era == 2:
        draw.polygon([at(0.3, 0.04), at(0.7, 0.04), at(0.7, 0.17), at(0.3, 0.17)], fill=BLACK)
    (gx0, gy1), (gx1, gy0) = at(0.24, 0.3), at(0.76, 0.86)
    _grille(draw, (min(gx0, gx1), gy0, max(gx0, gx1), gy1), style, paint)
    lamp = (250, 236, 190) if era == 0 else (240, 244, 250) if era == 1 else (225, 240, 255)
    for s in (0.12, 0.88):
        x, y = at(s, 0.7)
        half_w = face * f.length * 0.1
        if era == 0:
            draw.ellipse(
                (x - half_w, y - half_w, x + half_w, y + half_w), fill=lamp, outline=CHROME
            )
        elif era == 1:
            draw.rectangle(
                (x - half_w, y - half_w * 0.75, x + half_w, y + half_w * 0.75),
                fill=lamp,
                outline=(90, 90, 96),
            )
        else:
            draw.rectangle(
                (x - half_w * 1.2, y + half_w * 0.2, x + half_w * 1.2, y + half_w * 0.6), fill=lamp
            )
    if style.badge != "none":
        bx, by = at(0.5, 0.58)
        _badge(draw, bx, by, face * f.length * 0.1, style)


def _side(
    draw: ImageDraw.ImageDraw,
    f: _Frame,
    shape: BodyShape,
    cls: CatalogueClass,
    paint: RGB,
    wheel_r: float,
) -> None:
    era, style = cls.era, MAKE_STYLE[cls.make]
    if cls.body in CAB_LENGTH:  # the load bed behind the cab
        start = shape.outline[0][0]
        draw.polygon(
            f.rect(0, shape.clearance, start - 0.015, 0.30), fill=paint, outline=_shade(paint, 0.55)
        )
        draw.line(f.poly([(0.01, 0.29), (start - 0.025, 0.29)]), fill=_shade(paint, 0.45), width=2)
    draw.polygon(f.poly(shape.outline), fill=paint, outline=_shade(paint, 0.55))
    trim = CHROME if style.trim_chrome else BLACK
    for win in shape.windows:
        draw.polygon(f.poly(win), fill=GLASS, outline=trim)
    win_top = max(v for _, v in shape.windows[0])
    for u in shape.pillars:
        draw.line(f.poly([(u, shape.belt + 0.01), (u, win_top)]), fill=paint, width=3)
        draw.line(f.poly([(u, shape.clearance + 0.02), (u, shape.belt)]), fill=_shade(paint, 0.6))
    if shape.seats:
        for u in (0.40, 0.53):
            draw.rounded_rectangle(
                _box_of(f, u, shape.belt, u + 0.05, shape.belt + 0.06), radius=3, fill=(30, 30, 32)
            )
    draw.line(f.poly([(0.03, shape.belt), (0.97, shape.belt)]), fill=_shade(paint, 1.25), width=2)
    draw.polygon(
        f.rect(0.01, shape.clearance, 0.99, shape.clearance + 0.03), fill=_shade(paint, 0.7)
    )
    if era == 0:
        draw.line(
            f.poly([(0.02, shape.clearance + 0.06), (0.99, shape.clearance + 0.06)]),
            fill=CHROME,
            width=3,
        )
        draw.polygon(f.rect(-0.02, shape.clearance, 0.05, shape.clearance + 0.04), fill=CHROME)
    elif era == 1:
        draw.line(
            f.poly([(0.02, shape.clearance + 0.06), (0.99, shape.clearance + 0.06)]),
            fill=(50, 50, 54),
            width=2,
        )
        draw.polygon(
            f.rect(-0.015, shape.clearance, 0.04, shape.clearance + 0.04), fill=(62, 62, 66)
        )
    tail_v = shape.belt - 0.03 if cls.body not in CAB_LENGTH else 0.25
    tail = (
        f.rect(0.0, tail_v - 0.02, 0.02, tail_v + 0.02)
        if era < 2
        else f.rect(0.0, tail_v, 0.05, tail_v + 0.012)
    )
    draw.polygon(tail, fill=(200, 20, 24))
    if style.badge != "none":  # the fender badge, behind the front wheel arch
        bx, by = f.p(shape.wheels[1] - wheel_r * 1.9, shape.clearance + 0.07)
        _badge(draw, bx, by, 0.02 * f.length, style)
    cap = style.badge_rgb if style.badge != "none" else (150, 152, 158)
    for u in shape.wheels:
        _wheel(draw, f, u, wheel_r, era, cap)


def _box_of(
    f: _Frame, u0: float, v0: float, u1: float, v1: float
) -> tuple[float, float, float, float]:
    (xa, ya), (xb, yb) = f.p(u0, v0), f.p(u1, v1)
    return min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)


def render_vehicle(
    cls: CatalogueClass, colour: str, rng: np.random.Generator, size: tuple[int, int] = DEFAULT_SIZE
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One catalogue image and the vehicle's box (left, top, right, bottom; PIL convention)."""
    width, height = size
    cw, ch = width * SUPERSAMPLE, height * SUPERSAMPLE
    shape = shape_of(cls)
    img, horizon = _background(rng, cw, ch)
    draw = ImageDraw.Draw(img, "RGBA")
    shift = rng.integers(-10, 11)  # paint shade varies; its hue much less
    paint = tuple(int(np.clip(c + shift + rng.integers(-4, 5), 0, 255)) for c in PAINT[colour])
    face = 0.28
    wheel_r = (0.072, 0.082, 0.092)[cls.era] * shape.wheel_scale * rng.uniform(0.95, 1.05)
    span = 1 + face + 0.02
    top = max(v for _, v in shape.outline) + 0.02
    length = cw * rng.uniform(0.5, 0.8) * shape.length / span
    length = min(length, (ch - 4) / (top + 0.02), (cw - 4) / span)
    ground = rng.uniform(max(horizon + 0.15 * (ch - horizon), top * length + 2), ch - 2)
    x0 = rng.uniform(2, cw - span * length - 2)
    frame = _Frame(x0, ground, length, -0.02, 1 + face, bool(rng.random() < 0.5))
    sx0, sy0 = frame.p(-0.02, 0)
    sx1, _ = frame.p(1 + face, 0)
    draw.ellipse(
        (min(sx0, sx1), sy0 - length * 0.03, max(sx0, sx1), sy0 + length * 0.03), fill=(0, 0, 0, 90)
    )  # shadow
    _side(draw, frame, shape, cls, paint, wheel_r)  # type: ignore[arg-type]
    _front_face(draw, frame, shape, face, cls, paint)  # type: ignore[arg-type]
    left, top_px, right, bottom = _box_of(frame, -0.02, top - 0.02, 1 + face, 0)
    img = img.reduce(SUPERSAMPLE)
    box = (
        max(0, int(left // SUPERSAMPLE)),
        max(0, int(top_px // SUPERSAMPLE)),
        min(width, int(-(-right // SUPERSAMPLE))),
        min(height, int(-(-bottom // SUPERSAMPLE)) + 1),
    )
    return _photograph(img, rng), box


def _photograph(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Lighting, colour cast, blur and sensor noise."""
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.8))))
    arr = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.88, 1.12) * rng.uniform(0.97, 1.03, size=3).astype(np.float32)
    contrast = rng.uniform(0.85, 1.1)
    mean = arr.mean()
    arr = (arr - mean) * contrast + mean
    arr = arr * gain + rng.normal(0.0, rng.uniform(1.0, 7.0), size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- writing


def _image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))


def class_sequence(n: int, n_classes: int, seed: int) -> list[int]:
    """0-based class per image: images 2k and 2k+1 share a class (so every class lands in
    both benchmark splits), and each run of 2*C images holds every class exactly twice."""
    out: list[int] = []
    blocks = -(-((n + 1) // 2) // n_classes)
    for b in range(blocks):
        perm = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, b))).permutation(
            n_classes
        )
        for c in perm:
            out.extend((int(c), int(c)))
    return out[:n]


def write_vehicles(out: Path, cls: CatalogueClass, n: int, *, seed: int = 0,
                   colours: tuple[str, ...] = (), size: tuple[int, int] = DEFAULT_SIZE,
                   prefix: str = "") -> list[Path]:
    """Render ``n`` unlabelled JPEGs of one class into ``out`` (``colours`` cycled; default
    every colour): photos of a vehicle arriving from a camera, e.g. `NOVEL`."""
    if cls.make not in MAKE_STYLE:
        raise ConfigError(f"no style for make {cls.make!r}")
    out.mkdir(parents=True, exist_ok=True)
    paint = colours or COLOURS
    paths: list[Path] = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, i)))
        img, _ = render_vehicle(cls, paint[i % len(paint)], rng, size)
        path = out / f"{prefix}{cls.make.lower()}-{seed}-{i:04d}.jpg"
        img.save(path, format="JPEG", quality=90, subsampling=0)
        paths.append(path)
    return paths


def _savemat_bytes(variables: dict[str, object], description: str) -> bytes:
    """savemat with a fixed header text (scipy writes the time there) for identical bytes."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, do_compression=False, oned_as="row")
    data = bytearray(buf.getvalue())
    text = f"MATLAB 5.0 MAT-file, Platform: {GENERATOR}, {description}".encode("ascii")
    data[:116] = text[:116].ljust(116, b" ")
    return bytes(data)


def meta_mat_bytes(class_names: list[str]) -> bytes:
    cells = np.empty((1, len(class_names)), dtype=object)
    for i, name in enumerate(class_names):
        cells[0, i] = np.array([name])
    return _savemat_bytes({"class_names": cells}, "class names")


def annotations_mat_bytes(rows: list[tuple[tuple[int, int, int, int], int, str]]) -> bytes:
    """(1, N) struct array like cars_train_annos.mat; boxes given 0-based/exclusive."""
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    annos = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
    cls_type = np.uint8 if all(c <= 255 for _, c, _ in rows) else np.uint16
    for i, ((left, top, right, bottom), cls, fname) in enumerate(rows):
        annos[0, i] = (
            np.array([[left + 1]], dtype=np.uint16),
            np.array([[top + 1]], dtype=np.uint16),
            np.array([[right]], dtype=np.uint16),
            np.array([[bottom]], dtype=np.uint16),
            np.array([[cls]], dtype=cls_type),
            np.array([fname]),
        )
    return _savemat_bytes({"annotations": annos}, "annotations")


@dataclass(frozen=True)
class SynthReport:
    out: Path
    images: int
    classes: int
    seed: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def _prepare(out: Path, force: bool) -> Path:
    images = out / "cars_train"
    if images.exists() and any(images.iterdir()):
        if not force:
            raise ConfigError(f"{out} already holds a catalogue; pass --force to replace it")
        shutil.rmtree(images)
    images.mkdir(parents=True, exist_ok=True)
    return images


def write_catalogue(
    out: Path,
    n: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    force: bool = False,
    progress: bool = True,
) -> SynthReport:
    """Render n labelled images into `out` in the Stanford Cars layout."""
    if n < 1:
        raise ConfigError(f"--n must be at least 1, not {n}")
    if min(size) < 32:
        raise ConfigError(f"image size {size} is too small (at least 32 px a side)")
    out = Path(out)
    images = _prepare(out, force)
    started = time.perf_counter()
    classes = class_sequence(n, len(CATALOGUE), seed)
    rows: list[tuple[tuple[int, int, int, int], int, str]] = []
    sidecar: list[str] = []
    for i in tqdm(range(n), desc="rendering catalogue", unit="img", disable=not progress):
        rng = _image_rng(seed, i)
        cls = CATALOGUE[classes[i]]
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        img, box = render_vehicle(cls, colour, rng, size)
        fname = f"{i + 1:05d}.jpg"
        img.save(images / fname, format="JPEG", quality=90, subsampling=0)
        rows.append((box, classes[i] + 1, fname))
        # the vehicle's box, [x1, y1, x2, y2] in pixels (0-based, right/bottom exclusive)
        sidecar.append(json.dumps({"fname": fname, "colour": colour, "box": list(box)},
                                  sort_keys=True))
    (out / "cars_meta.mat").write_bytes(meta_mat_bytes([c.class_name for c in CATALOGUE]))
    (out / "cars_train_annos.mat").write_bytes(annotations_mat_bytes(rows))
    (out / "labels.jsonl").write_text("\n".join(sidecar) + "\n", encoding="utf-8")
    manifest = {
        "generator": GENERATOR,
        "seed": seed,
        "images": n,
        "size": list(size),
        "classes": len(CATALOGUE),
    }
    (out / "synth.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    seconds = time.perf_counter() - started
    log.info("rendered %d images of %d classes into %s in %.1f s", n, len(CATALOGUE), out, seconds)
    return SynthReport(out, n, len(CATALOGUE), seed, seconds)
