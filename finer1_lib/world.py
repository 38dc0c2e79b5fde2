"""The micro world: a procedurally drawn fine-grained world that stands in for the paper's six datasets.

Three levels, as in real FGVR: super-category (aircraft, bird, car, dog, flower, pet; the columns of the
paper's Tables 1, 2 and 6) -> genus -> species. A species is a set of five attribute values:
two genus-level ones (shape: what makes a genus) and three species-level ones (colours and patterns).
Siblings in a genus share their genus attributes and one species attribute, and differ in one or two of the
other two (low inter-class variance); instances vary in pose, scale, position, background, lighting,
occlusion and noise (high intra-class variance). Each species has an arbitrary pronounceable name sharing its
genus word ("Marovi Talsek") and field-guide paraphrases: the text knowledge a real MLLM would have read.

Everything is a pure function of the world seed and (species, pool, index): same seed, byte-identical images.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .records import SUPER_CATEGORIES, SUPER_CATEGORY_WORD, ImageRecord

# Image pools. Disjoint by construction: the pool id is part of every image's seed.
POOLS = {"pretrain": 0, "train": 1, "rl": 2, "test": 3, "reference": 4, "val": 5}

COLOURS = {
    "red": (205, 35, 35), "blue": (35, 75, 210), "yellow": (240, 210, 30), "black": (25, 25, 25),
    "white": (245, 245, 245), "orange": (245, 125, 20), "grey": (135, 135, 140), "green": (40, 160, 60),
    "brown": (125, 75, 35), "pink": (245, 130, 190), "purple": (130, 50, 180), "silver": (195, 200, 210),
    "gold": (210, 165, 40), "tan": (215, 170, 115), "cream": (245, 230, 185), "navy": (20, 30, 90),
}


@dataclass(frozen=True)
class Dim:
    """One attribute dimension: its name, values, and how the field guide phrases it."""

    name: str
    values: tuple[str, ...]
    phrase: str  # e.g. "a {} crest"

    def say(self, value: str) -> str:
        text = self.phrase.format(value)
        return "an" + text[1:] if text.startswith("a ") and value[0] in "aeiou" else text  # "an orange breast"


@dataclass(frozen=True)
class Schema:
    """Attribute dimensions of one super-category: 2 genus-level, 3 species-level."""

    genus_dims: tuple[Dim, ...]
    species_dims: tuple[Dim, ...]

    @property
    def dims(self) -> tuple[Dim, ...]:
        return self.genus_dims + self.species_dims


SCHEMAS: dict[str, Schema] = {
    "aircraft": Schema(
        (Dim("wings", ("swept", "straight", "delta"), "{} wings"),
         Dim("engines", ("two", "four", "rear"), "{} engines")),
        (Dim("tail", ("red", "blue", "green", "yellow", "black"), "a {} tail"),
         Dim("stripe", ("no", "single", "double"), "{} fuselage stripe"),
         Dim("wingtips", ("grey", "red", "blue", "orange"), "{} wingtips"))),
    "bird": Schema(
        (Dim("body", ("round", "slender", "stout", "long-tailed"), "a {} body"),
         Dim("beak", ("short", "hooked", "long", "conical"), "a {} beak")),
        (Dim("crest", ("red", "blue", "yellow", "black", "white"), "a {} crest"),
         Dim("wings", ("plain", "striped", "spotted"), "{} wings"),
         Dim("breast", ("white", "orange", "grey", "yellow"), "a {} breast"))),
    "car": Schema(
        (Dim("body", ("sedan", "hatchback", "pickup", "van"), "a {} body"),
         Dim("wheels", ("small", "large"), "{} wheels")),
        (Dim("paint", ("red", "blue", "green", "silver", "yellow", "black"), "{} paint"),
         Dim("stripe", ("no", "single", "double"), "{} side stripe"),
         Dim("rims", ("black", "silver", "gold"), "{} rims"))),
    "dog": Schema(
        (Dim("build", ("long-legged", "short-legged", "stocky"), "a {} build"),
         Dim("ears", ("floppy", "pointed"), "{} ears")),
        (Dim("coat", ("brown", "black", "white", "gold", "grey"), "a {} coat"),
         Dim("pattern", ("plain", "spotted", "saddled"), "a {} pattern"),
         Dim("muzzle", ("black", "white", "tan"), "a {} muzzle"))),
    "flower": Schema(
        (Dim("petals", ("round", "pointed", "thin"), "{} petals"),
         Dim("count", ("five", "eight"), "{} petals in a ring")),
        (Dim("colour", ("red", "pink", "yellow", "purple", "white", "orange"), "a {} bloom"),
         Dim("centre", ("yellow", "brown", "black", "green"), "a {} centre"),
         Dim("marking", ("plain", "striped", "tipped"), "{} petal markings"))),
    "pet": Schema(
        (Dim("head", ("round", "wide", "narrow"), "a {} head"),
         Dim("ears", ("large", "small", "folded"), "{} ears")),
        (Dim("fur", ("orange", "grey", "black", "cream", "brown"), "{} fur"),
         Dim("pattern", ("plain", "tabby", "spotted"), "a {} pattern"),
         Dim("eyes", ("green", "blue", "gold"), "{} eyes"))),
}


def plural(super_category: str) -> str:
    word = SUPER_CATEGORY_WORD[super_category]
    return word if word == "aircraft" else word + "s"


# ----------------------------------------------------------------------------------------------- taxonomy
@dataclass(frozen=True)
class Species:
    name: str                    # "Marovi Talsek": epithet + genus word
    genus: str                   # "Talsek"
    super_category: str
    attributes: dict = field(hash=False)  # dim name -> value, genus dims first
    descriptions: tuple[str, ...] = field(default=(), hash=False)  # field-guide paraphrases

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_")

    def phrases(self) -> list[str]:
        """Attribute phrases in schema order, e.g. ["a round body", ..., "a white breast"]."""
        return [d.say(self.attributes[d.name]) for d in SCHEMAS[self.super_category].dims]


_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr",
           "pl", "st", "tr", "sk", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "", "n", "r", "l", "s", "k", "th", "m"]


def _make_name(rng: random.Random, syllables: int, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if i == syllables - 1
                                                                     else "") for i in range(syllables))
        name = name.capitalize()
        if name not in taken and 4 <= len(name) <= 10:
            taken.add(name)
            return name


def join_phrases(phrases: list[str]) -> str:
    return ", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else phrases[0]


def _descriptions(sp: Species, rng: random.Random) -> tuple[str, ...]:
    """Field-guide paraphrases: every one names all five attributes, in varied order and framing."""
    word, genus_ph = SUPER_CATEGORY_WORD[sp.super_category], sp.phrases()[:2]
    species_ph = sp.phrases()[2:]
    shuffled = lambda xs: rng.sample(xs, len(xs))  # noqa: E731
    art = "an" if word[0] in "aeiou" else "a"
    return (
        f"The {sp.name} is {art} {word} with {join_phrases(sp.phrases())}.",
        f"Like every {sp.genus} {word}, the {sp.name} has {join_phrases(genus_ph)}; "
        f"it is told apart by {join_phrases(shuffled(species_ph))}.",
        f"You can recognise the {sp.name} by {join_phrases(shuffled(species_ph))}, "
        f"together with {join_phrases(shuffled(genus_ph))}.",
        f"{sp.name}: {art} {word} of the {sp.genus} genus with {join_phrases(shuffled(sp.phrases()))}.",
    )


@dataclass
class World:
    """The taxonomy and the renderer. ``World(seed=0)`` is the world the shipped base model knows."""

    seed: int = 0
    image_size: int = 112
    n_genera: int = 4  # per super-category; 4 species per genus -> 16 per super-category, 96 in all

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels, got {self.image_size}")
        if not 3 <= self.n_genera <= 6:
            raise ValueError(f"n_genera must be in 3..6, got {self.n_genera}")

    @cached_property
    def species(self) -> list[Species]:
        rng = random.Random(f"micro-world-{self.seed}")
        taken: set[str] = set()
        out: list[Species] = []
        for sc in SUPER_CATEGORIES:
            schema = SCHEMAS[sc]
            combos = list(itertools.product(*(d.values for d in schema.genus_dims)))
            for gvals in rng.sample(combos, self.n_genera):
                genus = _make_name(rng, 2, taken)
                fixed = rng.randrange(3)  # the species dim shared by the whole genus
                vary = [i for i in range(3) if i != fixed]
                sdims = schema.species_dims
                fixed_val = rng.choice(sdims[fixed].values)
                pairs = [rng.sample(sdims[i].values, 2) for i in vary]
                for va, vb in itertools.product(*pairs):
                    svals = {sdims[fixed].name: fixed_val, sdims[vary[0]].name: va, sdims[vary[1]].name: vb}
                    attrs = {d.name: v for d, v in zip(schema.genus_dims, gvals)}
                    attrs.update({d.name: svals[d.name] for d in sdims})
                    name = f"{_make_name(rng, rng.choice([2, 3]), taken)} {genus}"
                    sp = Species(name, genus, sc, attrs)
                    out.append(Species(name, genus, sc, attrs, _descriptions(sp, rng)))
        return out

    @cached_property
    def by_name(self) -> dict[str, Species]:
        return {s.name: s for s in self.species}

    @cached_property
    def _index(self) -> dict[str, int]:
        return {s.name: i for i, s in enumerate(self.species)}

    def species_of(self, super_category: str) -> list[Species]:
        if super_category not in SCHEMAS:
            raise ValueError(f"unknown super-category {super_category!r}; expected one of {SUPER_CATEGORIES}")
        return [s for s in self.species if s.super_category == super_category]

    def get(self, name: str) -> Species:
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(f"no species named {name!r} in the micro world (seed {self.seed})") from None

    def genera(self) -> dict[str, list[Species]]:
        out: dict[str, list[Species]] = {}
        for s in self.species:
            out.setdefault(s.genus, []).append(s)
        return out

    def caption(self, name: str) -> str:
        """The attribute caption of a species: what a perfect perceiver would say of any of its images."""
        sp = self.get(name)
        word = SUPER_CATEGORY_WORD[sp.super_category]
        return f"{'an' if word[0] in 'aeiou' else 'a'} {word} with {join_phrases(sp.phrases())}"

    # ------------------------------------------------------------------------------------------- images
    def image_seed(self, name: str, pool: str, index: int) -> list[int]:
        if pool not in POOLS:
            raise ValueError(f"unknown image pool {pool!r}; expected one of {sorted(POOLS)}")
        if index < 0:
            raise ValueError(f"image index must be >= 0, got {index}")
        return [self.seed, self._index[self.get(name).name], POOLS[pool], index]

    def render(self, name: str, pool: str, index: int) -> Image.Image:
        """Instance ``index`` of species ``name`` in ``pool``: deterministic, RGB, image_size x image_size."""
        sp = self.get(name)
        rng = np.random.default_rng(self.image_seed(name, pool, index))
        return render_instance(sp.super_category, sp.attributes, rng, self.image_size)

    def record(self, name: str, pool: str, index: int, root: str | Path = "") -> ImageRecord:
        self.image_seed(name, pool, index)  # validates name, pool and index
        sp = self.get(name)
        rel = Path("images") / pool / sp.super_category / sp.slug / f"{index:04d}.png"
        return ImageRecord(
            image_id=f"micro/{sp.super_category}/{sp.slug}/{pool}/{index}",
            path=str(Path(root) / rel) if root else str(rel),
            super_category=sp.super_category, genus=sp.genus, label=sp.name, partition=pool,
            meta={"attributes": dict(sp.attributes), "world_seed": self.seed, "index": index},
        )

    def taxonomy(self) -> dict:
        """A JSON-ready description of the world (species, attributes, field guide)."""
        return {
            "seed": self.seed, "image_size": self.image_size,
            "schemas": {sc: {"genus_dims": {d.name: list(d.values) for d in s.genus_dims},
                             "species_dims": {d.name: list(d.values) for d in s.species_dims}}
                        for sc, s in SCHEMAS.items()},
            "species": [{"name": s.name, "genus": s.genus, "super_category": s.super_category,
                         "attributes": s.attributes, "descriptions": list(s.descriptions)} for s in self.species],
        }


def attribute_difference(a: Species, b: Species) -> list[str]:
    """Names of the attribute dimensions on which two species differ."""
    return [k for k in a.attributes if a.attributes[k] != b.attributes.get(k)]


# ------------------------------------------------------------------------------------------------ drawing
def _c(name: str) -> tuple[int, int, int]:
    return COLOURS[name]


def _shade(rgb, f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, v * f))) for v in rgb)


class _Pen:
    """Draws in unit coordinates on a square RGBA layer."""

    def __init__(self, size: int):
        self.s = size
        self.img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        self.d = ImageDraw.Draw(self.img)

    def _p(self, pts):
        return [(x * self.s, y * self.s) for x, y in pts]

    def ell(self, cx, cy, rx, ry, fill, outline=None):
        self.d.ellipse([(cx - rx) * self.s, (cy - ry) * self.s, (cx + rx) * self.s, (cy + ry) * self.s],
                       fill=fill, outline=outline)

    def poly(self, pts, fill):
        self.d.polygon(self._p(pts), fill=fill)

    def line(self, pts, fill, width):
        self.d.line(self._p(pts), fill=fill, width=max(1, int(width * self.s)))

    def rect(self, x0, y0, x1, y1, fill):
        self.d.rectangle([x0 * self.s, y0 * self.s, x1 * self.s, y1 * self.s], fill=fill)


def _pattern(pen: _Pen, kind: str, cx, cy, rx, ry, colour, rng, n=4):
    """Stripes or spots inside an ellipse-shaped region (wings, coats, fur)."""
    if kind in ("striped", "tabby"):
        for i in range(n):
            x = cx - rx * 0.7 + i * (1.4 * rx / max(1, n - 1))
            pen.line([(x, cy - ry * 0.75), (x - rx * 0.15, cy + ry * 0.75)], colour, 0.025)
    elif kind == "spotted":
        for i in range(n + 1):
            a = 2 * math.pi * i / (n + 1) + rng.uniform(0, 0.5)
            pen.ell(cx + 0.55 * rx * math.cos(a), cy + 0.55 * ry * math.sin(a), rx * 0.16, rx * 0.16, colour)
    elif kind == "saddled":
        pen.ell(cx, cy - ry * 0.35, rx * 0.7, ry * 0.5, colour)


def _draw_bird(pen: _Pen, a: dict, rng):
    body_c = (150, 120, 90)
    rx, ry, tail = {"round": (0.24, 0.19, 0.10), "slender": (0.28, 0.12, 0.12),
                    "stout": (0.27, 0.23, 0.08), "long-tailed": (0.22, 0.14, 0.30)}[a["body"]]
    cx, cy = 0.46, 0.55
    pen.poly([(cx - rx * 0.7, cy - ry * 0.2), (cx - rx - tail, cy - ry * 0.5), (cx - rx - tail, cy + ry * 0.1),
              (cx - rx * 0.7, cy + ry * 0.3)], _shade(body_c, 0.8))                         # tail
    pen.line([(cx - 0.05, cy + ry * 0.9), (cx - 0.06, cy + ry + 0.12)], (60, 50, 40), 0.02)  # legs
    pen.line([(cx + 0.04, cy + ry * 0.9), (cx + 0.05, cy + ry + 0.12)], (60, 50, 40), 0.02)
    pen.ell(cx, cy, rx, ry, body_c)
    pen.ell(cx + rx * 0.35, cy + ry * 0.35, rx * 0.55, ry * 0.6, _c(a["breast"]))             # breast
    wx, wy = cx - rx * 0.15, cy - ry * 0.1
    pen.ell(wx, wy, rx * 0.6, ry * 0.55, _shade(body_c, 0.7))                                 # wing
    _pattern(pen, a["wings"], wx, wy, rx * 0.6, ry * 0.55, (40, 30, 20) if a["wings"] == "striped"
             else (245, 245, 235), rng)
    hx, hy, hr = cx + rx * 0.85, cy - ry * 0.95, 0.1
    pen.poly([(hx - hr * 0.8, hy - hr * 0.5), (hx - hr * 0.2, hy - hr * 2.0), (hx + hr * 0.3, hy - hr * 0.6),
              (hx + hr * 0.1, hy - hr * 1.7), (hx + hr * 0.8, hy - hr * 0.4)], _c(a["crest"]))    # crest
    pen.ell(hx, hy, hr, hr, body_c)                                                             # head
    pen.ell(hx - hr * 0.35, hy - hr * 0.55, hr * 0.55, hr * 0.4, _c(a["crest"]))
    bx = hx + hr * 0.9
    beak_c = (230, 180, 50)
    if a["beak"] == "short":
        pen.poly([(bx, hy - 0.03), (bx + 0.07, hy), (bx, hy + 0.03)], beak_c)
    elif a["beak"] == "hooked":
        pen.poly([(bx, hy - 0.035), (bx + 0.08, hy - 0.02), (bx + 0.09, hy + 0.04), (bx + 0.05, hy + 0.01),
                  (bx, hy + 0.03)], beak_c)
    elif a["beak"] == "long":
        pen.poly([(bx, hy - 0.02), (bx + 0.2, hy + 0.01), (bx, hy + 0.025)], beak_c)
    else:  # conical
        pen.poly([(bx - 0.01, hy - 0.055), (bx + 0.09, hy), (bx - 0.01, hy + 0.055)], beak_c)
    pen.ell(hx + hr * 0.3, hy - hr * 0.15, 0.018, 0.018, (10, 10, 10))                        # eye


def _draw_aircraft(pen: _Pen, a: dict, rng):
    hull = (225, 225, 232)
    cy = 0.5
    wing = {"swept": [(0.55, cy), (0.35, cy - 0.40), (0.27, cy - 0.40), (0.40, cy)],
            "straight": [(0.56, cy), (0.54, cy - 0.42), (0.44, cy - 0.42), (0.42, cy)],
            "delta": [(0.72, cy), (0.24, cy - 0.36), (0.18, cy - 0.36), (0.22, cy)]}[a["wings"]]
    for sgn in (-1, 1):
        pts = [(x, cy + (y - cy) * sgn) for x, y in wing]
        pen.poly(pts, hull)
        tip = [pts[1], pts[2], ((pts[2][0] + pts[3][0]) / 2 * 0.25 + pts[2][0] * 0.75,
                                cy + (pts[2][1] - cy) * 0.75), (pts[1][0], cy + (pts[1][1] - cy) * 0.75)]
        pen.poly(tip, _c(a["wingtips"]))
        ex = (wing[0][0] + wing[3][0]) / 2
        if a["engines"] in ("two", "four"):
            offs = (0.17,) if a["engines"] == "two" else (0.12, 0.26)
            for o in offs:
                pen.ell(ex - o * 0.35 + 0.04, cy + sgn * o, 0.045, 0.022, (70, 70, 80))
        # tailplanes in the tail colour
        pen.poly([(0.2, cy), (0.1, cy + sgn * 0.15), (0.06, cy + sgn * 0.15), (0.1, cy)], _c(a["tail"]))
    pen.ell(0.5, cy, 0.42, 0.055, hull)                                                        # fuselage
    pen.poly([(0.08, cy - 0.05), (0.2, cy - 0.05), (0.2, cy + 0.05), (0.08, cy + 0.05)], _c(a["tail"]))
    if a["engines"] == "rear":
        for sgn in (-1, 1):
            pen.ell(0.25, cy + sgn * 0.075, 0.05, 0.022, (70, 70, 80))
    if a["stripe"] != "no":
        ys = (0.0,) if a["stripe"] == "single" else (-0.025, 0.025)
        for y in ys:
            pen.line([(0.22, cy + y), (0.86, cy + y)], _c("navy"), 0.016)
    pen.ell(0.89, cy, 0.03, 0.03, (60, 70, 90))                                                 # cockpit


def _draw_car(pen: _Pen, a: dict, rng):
    paint = _c(a["paint"])
    glass = (170, 200, 225)
    y0, y1 = 0.45, 0.66  # lower body band
    cabins = {"sedan": [(0.28, y0), (0.36, 0.30), (0.62, 0.30), (0.72, y0)],
              "hatchback": [(0.22, y0), (0.26, 0.30), (0.58, 0.30), (0.70, y0)],
              "pickup": [(0.50, y0), (0.52, 0.28), (0.68, 0.28), (0.74, y0)],
              "van": [(0.12, y0), (0.12, 0.24), (0.74, 0.24), (0.84, y0)]}[a["body"]]
    x0, x1 = (0.10, 0.90) if a["body"] != "van" else (0.10, 0.88)
    pen.poly(cabins, paint)
    win = [(x, y + 0.04 if y < y0 else y - 0.01) for x, y in cabins]
    win = [(win[0][0] + 0.05, win[0][1]), (win[1][0] + 0.03, win[1][1]), (win[2][0] - 0.03, win[2][1]),
           (win[3][0] - 0.05, win[3][1])]
    pen.poly(win, glass)
    pen.rect(x0, y0, x1, y1, paint)
    if a["stripe"] != "no":
        ys = (0.555,) if a["stripe"] == "single" else (0.525, 0.585)
        for y in ys:
            pen.line([(x0, y), (x1, y)], (245, 245, 245) if a["paint"] != "white" else (20, 20, 20), 0.022)
    r = {"small": 0.075, "large": 0.105}[a["wheels"]]
    for wx in (0.26, 0.74):
        pen.ell(wx, y1, r, r, (20, 20, 20))
        pen.ell(wx, y1, r * 0.55, r * 0.55, _c(a["rims"]))
    pen.ell(x1 - 0.02, y0 + 0.04, 0.02, 0.015, (255, 240, 150))                                 # headlight


def _draw_dog(pen: _Pen, a: dict, rng):
    coat = _c(a["coat"])
    leg_len, rx, ry = {"long-legged": (0.22, 0.22, 0.11), "short-legged": (0.10, 0.25, 0.12),
                       "stocky": (0.14, 0.22, 0.16)}[a["build"]]
    cx, cy = 0.45, 0.68 - leg_len - ry * 0.5
    for lx in (cx - rx * 0.7, cx - rx * 0.4, cx + rx * 0.45, cx + rx * 0.75):
        pen.rect(lx - 0.025, cy, lx + 0.025, cy + ry * 0.6 + leg_len, _shade(coat, 0.85))
    pen.line([(cx - rx * 0.95, cy - ry * 0.3), (cx - rx - 0.1, cy - ry - 0.08)], _shade(coat, 0.85), 0.035)
    pen.ell(cx, cy, rx, ry, coat)
    _pattern(pen, a["pattern"], cx, cy, rx, ry, (35, 25, 15) if a["coat"] != "black" else (225, 225, 225), rng)
    hx, hy, hr = cx + rx * 0.95, cy - ry - 0.06, 0.09
    pen.ell(hx, hy, hr, hr * 0.95, coat)
    pen.ell(hx + hr * 1.05, hy + hr * 0.3, hr * 0.6, hr * 0.42, _c(a["muzzle"]))                # muzzle
    pen.ell(hx + hr * 1.55, hy + hr * 0.15, 0.018, 0.016, (10, 10, 10))                          # nose
    pen.ell(hx + hr * 0.35, hy - hr * 0.25, 0.016, 0.016, (10, 10, 10))                          # eye
    ear = _shade(coat, 0.6)
    if a["ears"] == "floppy":
        pen.poly([(hx - hr * 0.6, hy - hr * 0.6), (hx - hr * 0.1, hy - hr * 0.7), (hx - hr * 0.3, hy + hr * 0.9),
                  (hx - hr * 0.8, hy + hr * 0.7)], ear)
    else:
        pen.poly([(hx - hr * 0.7, hy - hr * 0.5), (hx - hr * 0.4, hy - hr * 2.0), (hx + hr * 0.05, hy - hr * 0.7)],
                 ear)


def _draw_flower(pen: _Pen, a: dict, rng):
    pen.line([(0.5, 0.55), (0.52, 1.0)], (40, 120, 40), 0.04)                                    # stem
    pen.ell(0.6, 0.85, 0.08, 0.03, (50, 140, 50))                                                # leaf
    n = {"five": 5, "eight": 8}[a["count"]]
    length, width = {"round": (0.2, 0.11), "pointed": (0.24, 0.08), "thin": (0.26, 0.045)}[a["petals"]]
    col, cx, cy = _c(a["colour"]), 0.5, 0.45
    rot = rng.uniform(0, 2 * math.pi)
    for i in range(n):
        t = rot + 2 * math.pi * i / n
        ux, uy, vx, vy = math.cos(t), math.sin(t), -math.sin(t), math.cos(t)
        tip = (cx + ux * length * 1.25, cy + uy * length * 1.25)
        base = (cx + ux * 0.05, cy + uy * 0.05)
        mid = lambda f, w: (cx + ux * length * f + vx * w, cy + uy * length * f + vy * w)  # noqa: E731
        if a["petals"] == "round":
            pts = [base, mid(0.5, -width), mid(0.95, -width * 0.9), mid(1.2, -width * 0.4), tip,
                   mid(1.2, width * 0.4), mid(0.95, width * 0.9), mid(0.5, width)]
        else:
            pts = [base, mid(0.55, -width), tip, mid(0.55, width)]
        pen.poly(pts, col)
        if a["marking"] == "striped":
            pen.line([base, mid(1.0, 0)], _shade(col, 0.45) if a["colour"] != "white" else (150, 60, 150), 0.018)
        elif a["marking"] == "tipped":
            tc = (245, 245, 245) if a["colour"] not in ("white", "yellow") else (150, 40, 120)
            pen.poly([mid(0.95, -width * 0.6), tip, mid(0.95, width * 0.6)], tc)
    pen.ell(cx, cy, 0.075, 0.075, _c(a["centre"]))


def _draw_pet(pen: _Pen, a: dict, rng):
    fur = _c(a["fur"])
    rx, ry = {"round": (0.27, 0.26), "wide": (0.33, 0.23), "narrow": (0.21, 0.28)}[a["head"]]
    cx, cy = 0.5, 0.55
    ear = {"large": 0.22, "small": 0.12, "folded": 0.10}[a["ears"]]
    for sgn in (-1, 1):
        bx = cx + sgn * rx * 0.6
        if a["ears"] == "folded":
            pen.poly([(bx - 0.09, cy - ry * 0.75), (bx + 0.09, cy - ry * 0.75), (bx + sgn * 0.06, cy - ry - 0.02)],
                     _shade(fur, 0.8))
        else:
            pen.poly([(bx - 0.08, cy - ry * 0.7), (bx + sgn * 0.04, cy - ry - ear), (bx + 0.08, cy - ry * 0.7)],
                     _shade(fur, 0.8))
    pen.ell(cx, cy, rx, ry, fur)
    mark = (40, 30, 25) if a["fur"] not in ("black", "brown") else (215, 205, 190)
    if a["pattern"] == "tabby":
        for i in (-1, 0, 1):
            pen.line([(cx + i * 0.06, cy - ry * 0.95), (cx + i * 0.05, cy - ry * 0.5)], mark, 0.022)
        for sgn in (-1, 1):
            pen.line([(cx + sgn * rx * 0.95, cy), (cx + sgn * rx * 0.65, cy + 0.02)], mark, 0.02)
    elif a["pattern"] == "spotted":
        for dx, dy in ((-0.55, -0.45), (0.5, -0.5), (-0.7, 0.25), (0.65, 0.3), (0.0, -0.7)):
            pen.ell(cx + dx * rx, cy + dy * ry, 0.03, 0.03, mark)
    for sgn in (-1, 1):                                                                        # eyes
        pen.ell(cx + sgn * rx * 0.4, cy - ry * 0.12, 0.055, 0.045, _c(a["eyes"]))
        pen.ell(cx + sgn * rx * 0.4, cy - ry * 0.12, 0.015, 0.038, (10, 10, 10))
    pen.poly([(cx - 0.035, cy + ry * 0.2), (cx + 0.035, cy + ry * 0.2), (cx, cy + ry * 0.32)], (235, 130, 150))
    for sgn in (-1, 1):
        for dy in (0.25, 0.35):
            pen.line([(cx + sgn * 0.06, cy + ry * dy), (cx + sgn * 0.3, cy + ry * (dy + 0.1))], (60, 60, 60), 0.008)


_DRAWERS = {"aircraft": _draw_aircraft, "bird": _draw_bird, "car": _draw_car, "dog": _draw_dog,
            "flower": _draw_flower, "pet": _draw_pet}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(4)
    c0 = rng.uniform(60, 220, 3)
    c1 = np.clip(c0 + rng.uniform(-70, 70, 3), 0, 255)
    t = np.linspace(0, 1, size)[:, None, None]
    if kind == 0:                                   # flat
        bg = np.broadcast_to(c0, (size, size, 3)).copy()
    elif kind == 1:                                 # vertical gradient (sky / ground)
        bg = np.broadcast_to(c0 * (1 - t) + c1 * t, (size, size, 3)).copy()
    elif kind == 2:                                 # blotchy texture
        low = rng.uniform(0, 1, (6, 6))
        up = np.array(Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)) / 255.0
        bg = c0 * (1 - up[..., None]) + c1 * up[..., None]
    else:                                           # stripes (fences, leaves, tarmac)
        period = rng.integers(8, 24)
        mask = ((np.arange(size)[:, None] + np.arange(size)[None, :] * rng.integers(0, 2)) // period) % 2
        bg = np.where(mask[..., None] == 1, c0, c1)
    return bg.astype(np.float32)


def render_instance(super_category: str, attributes: dict, rng: np.random.Generator, size: int = 112) -> Image.Image:
    """Draw one instance: object layer -> pose (flip, rotation) -> scale and position -> background
    -> partial occlusion -> lighting -> sensor noise. ``rng`` fixes every random choice."""
    if super_category not in _DRAWERS:
        raise ValueError(f"unknown super-category {super_category!r}")
    layer_px = 2 * size  # draw at 2x and downsample: antialiased edges
    pen = _Pen(layer_px)
    _DRAWERS[super_category](pen, attributes, rng)
    obj = pen.img
    if rng.random() < 0.5:
        obj = obj.transpose(Image.FLIP_LEFT_RIGHT)
    obj = obj.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
    side = max(8, int(size * rng.uniform(0.72, 1.05)))
    obj = obj.resize((side, side), Image.BILINEAR)
    canvas = Image.fromarray(_background(rng, size).astype(np.uint8)).convert("RGBA")
    slack = size - side
    ox = int(rng.integers(min(0, slack), max(0, slack) + 1)) if slack else 0
    oy = int(rng.integers(min(0, slack), max(0, slack) + 1)) if slack else 0
    canvas.paste(obj, (ox, oy), obj)
    img = canvas.convert("RGB")
    if rng.random() < 0.3:                                               # partial occlusion
        d = ImageDraw.Draw(img)
        w, h = rng.uniform(0.15, 0.35, 2) * size
        x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
        col = tuple(int(v) for v in rng.uniform(40, 200, 3))
        (d.rectangle if rng.random() < 0.5 else d.ellipse)([x, y, x + w, y + h], fill=col)
    arr = np.asarray(img, dtype=np.float32)
    mean = arr.mean()
    arr = (arr - mean) * rng.uniform(0.8, 1.15) + mean                   # contrast
    arr = arr * rng.uniform(0.8, 1.2) + rng.uniform(-12, 12, 3)          # brightness and tint
    arr = arr + rng.normal(0, rng.uniform(0, 8), arr.shape)              # sensor noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
