"""The evaluation protocol of the paper (§5.1), as functions shared by the micro world and real datasets.

- seen/unseen class split: random, seeded, 60/40 per super-category, disjoint;
- 4-shot training images per seen class; held-out test images for seen and unseen classes;
- triplets for TAPO (§4.3): anchor, positive (same class), negative (most visually similar other class),
  with class similarity from a pluggable image-embedding function;
- closed-world option sets of 4: the ground truth at a seeded random position (the official files always put
  it first) and distractors from the most similar classes;
- evaluation records in the official eval JSONL shape (image_path, question, options, ground_truth) + metadata.
"""
from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from .io import DataError, iter_jsonl_numbered, read_json, write_jsonl
from .records import OFFICIAL_SPLITS_DIR, SUPER_CATEGORIES, ImageRecord

EmbedFn = Callable[[Sequence[Image.Image]], np.ndarray]


def _rng(seed: int, *salt) -> random.Random:
    """A random.Random whose stream depends only on (seed, salt): stable across Python runs."""
    return random.Random("/".join(str(x) for x in (seed, *salt)))


# ---------------------------------------------------------------------------------------------- questions
def question_templates(super_category: str) -> list[str]:
    """The 10 question templates of a super-category, as in the official eval files."""
    path = OFFICIAL_SPLITS_DIR / f"{super_category}.json"
    if super_category not in SUPER_CATEGORIES:
        raise ValueError(f"unknown super-category {super_category!r}; expected one of {SUPER_CATEGORIES}")
    if not path.is_file():
        raise FileNotFoundError(f"question templates not found: expected {path}")
    data = read_json(path, "official split file")
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list) or not all(isinstance(q, str) and q.strip() for q in questions):
        raise DataError(f"{path}: expected a JSON object with a 'questions' list of strings")
    if len(questions) != 10:
        raise DataError(f"{path}: expected 10 question templates, found {len(questions)}")
    return questions


# -------------------------------------------------------------------------------------------------- split
def split_classes(labels: Iterable[str], seen_frac: float = 0.6, seed: int = 0, salt: str = "") -> dict:
    """Random seeded seen/unseen split of one super-category's classes (§5.1: 60% / 40%).

    Returns {"seen": [...], "unseen": [...]}, each sorted; both non-empty when there are >= 2 classes.
    """
    labels = sorted(set(labels))
    if len(labels) < 2:
        raise ValueError(f"need at least 2 classes to split into seen/unseen, got {labels}")
    if not 0 < seen_frac < 1:
        raise ValueError(f"seen_frac must be in (0, 1), got {seen_frac}")
    order = labels[:]
    _rng(seed, "split", salt).shuffle(order)
    n_seen = min(len(labels) - 1, max(1, round(seen_frac * len(labels))))
    return {"seen": sorted(order[:n_seen]), "unseen": sorted(order[n_seen:])}


def split_all(records: Iterable[ImageRecord], seen_frac: float = 0.6, seed: int = 0) -> dict[str, dict]:
    """split_classes for every super-category present in ``records``."""
    labels: dict[str, set] = defaultdict(set)
    for r in records:
        labels[r.super_category].add(r.label)
    return {sc: split_classes(labels[sc], seen_frac, seed, salt=sc) for sc in SUPER_CATEGORIES if sc in labels}


def group_by_label(records: Iterable[ImageRecord]) -> dict[str, list[ImageRecord]]:
    out: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        out[r.label].append(r)
    return dict(out)


def sample_shots(records: Iterable[ImageRecord], labels: Iterable[str], k: int = 4, seed: int = 0) -> list[ImageRecord]:
    """k training images per class (§5.1: 4-shot), drawn with a seed from each class's images."""
    by_label = group_by_label(records)
    out = []
    for label in sorted(labels):
        pool = sorted(by_label.get(label, []), key=lambda r: r.image_id)
        if len(pool) < k:
            raise ValueError(f"class {label!r} has {len(pool)} training images, {k}-shot needs {k}")
        out.extend(_rng(seed, "shots", label).sample(pool, k))
    return out


def check_disjoint(**groups: Iterable[ImageRecord]) -> None:
    """Raise if any image id appears in two of the named groups (e.g. train=..., test=..., pretrain=...)."""
    seen: dict[str, str] = {}
    for name, recs in groups.items():
        for r in recs:
            if r.image_id in seen and seen[r.image_id] != name:
                raise ValueError(f"image {r.image_id} is in both {seen[r.image_id]!r} and {name!r}")
            seen[r.image_id] = name


# ------------------------------------------------------------------------------------------- similarity
def thumbnail_embedding(images: Sequence[Image.Image], side: int = 12) -> np.ndarray:
    """The default image embedding: a small colour thumbnail, mean-centred and L2-normalised.

    Cheap and model-free; pass a model's image features instead once a model exists (the argument
    ``embed_fn`` of class_similarity)."""
    rows = []
    for im in images:
        a = np.asarray(im.convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
        a = a - a.mean()
        rows.append(a / (np.linalg.norm(a) + 1e-8))
    return np.stack(rows)


def class_similarity(images_by_label: dict[str, Sequence[Image.Image]], embed_fn: EmbedFn = thumbnail_embedding,
                     center: bool = False) -> tuple[list[str], np.ndarray]:
    """Cosine similarity between class prototypes (mean image embeddings). Returns (labels, S).

    ``center=True`` subtracts the mean prototype first (removes what all classes share, e.g. a model's
    common image features), so the ranking reflects what tells classes apart."""
    labels = sorted(images_by_label)
    if not labels:
        raise ValueError("class_similarity needs at least one class with images")
    protos = []
    for label in labels:
        ims = images_by_label[label]
        if len(ims) == 0:
            raise ValueError(f"class {label!r} has no images to embed")
        e = np.asarray(embed_fn(ims), dtype=np.float64).mean(0)
        protos.append(e / (np.linalg.norm(e) + 1e-12))
    P = np.stack(protos)
    if center and len(P) > 1:
        P = P - P.mean(0, keepdims=True)
        P = P / (np.linalg.norm(P, axis=1, keepdims=True) + 1e-12)
    return labels, P @ P.T


@dataclass
class Similarity:
    """Class-to-class similarity within super-categories; ranks the most similar other classes."""

    labels: list[str]
    matrix: np.ndarray
    super_of: dict[str, str]

    def ranked(self, label: str, among: Iterable[str] | None = None) -> list[str]:
        """Other classes of the same super-category, most similar first (ties broken by name)."""
        if label not in self.super_of:
            raise KeyError(f"class {label!r} has no similarity row")
        i = self.labels.index(label)
        allowed = set(among) if among is not None else None
        cands = [(float(-self.matrix[i, j]), other) for j, other in enumerate(self.labels)
                 if other != label and self.super_of[other] == self.super_of[label]
                 and (allowed is None or other in allowed)]
        return [o for _, o in sorted(cands)]


def build_similarity(records: Iterable[ImageRecord], load_image: Callable[[ImageRecord], Image.Image],
                     embed_fn: EmbedFn = thumbnail_embedding, per_class: int = 4, center: bool = False) -> Similarity:
    """Similarity of every class to every other, from ``per_class`` images each (the first by id)."""
    by_label = group_by_label(records)
    images = {lab: [load_image(r) for r in sorted(rs, key=lambda r: r.image_id)[:per_class]]
              for lab, rs in by_label.items()}
    labels, S = class_similarity(images, embed_fn, center)
    return Similarity(labels, S, {lab: by_label[lab][0].super_category for lab in labels})


# ----------------------------------------------------------------------------------------------- triplets
@dataclass(frozen=True)
class Triplet:
    """Anchor x, positive x_pos (same class, another image) and negative x_neg (most similar other class)."""

    anchor: ImageRecord
    positive: ImageRecord
    negative: ImageRecord

    def to_dict(self) -> dict:
        return {"anchor": self.anchor.to_dict(), "positive": self.positive.to_dict(),
                "negative": self.negative.to_dict()}


def make_triplets(anchors: Sequence[ImageRecord], pool: Sequence[ImageRecord], sim: Similarity,
                  seed: int = 0, negative_among: Iterable[str] | None = None) -> list[Triplet]:
    """One triplet per anchor (§4.3, intra- and inter-class augmentation).

    positive: a random other image of the anchor's class from ``pool``;
    negative: a random image of the most similar other class (per ``sim``) that has images in ``pool``,
    restricted to ``negative_among`` when given (e.g. the seen classes only)."""
    by_label = group_by_label(pool)
    out = []
    for a in anchors:
        rng = _rng(seed, "triplet", a.image_id)
        same = sorted((r for r in by_label.get(a.label, []) if r.image_id != a.image_id), key=lambda r: r.image_id)
        if not same:
            raise ValueError(f"no positive for {a.image_id}: class {a.label!r} has no other image in the pool")
        allowed = [lab for lab in sim.ranked(a.label, negative_among) if by_label.get(lab)]
        if not allowed:
            raise ValueError(f"no negative for {a.image_id}: no other class of {a.super_category!r} in the pool")
        negs = sorted(by_label[allowed[0]], key=lambda r: r.image_id)
        out.append(Triplet(a, rng.choice(same), rng.choice(negs)))
    return out


# ---------------------------------------------------------------------------------------- closed world
def closed_world_options(ground_truth: str, ranked_distractors: Sequence[str], k: int = 4,
                         rng: random.Random | None = None) -> list[str]:
    """k options: the ground truth and the k-1 most similar classes, the ground truth at a random position."""
    distractors = [d for d in ranked_distractors if d != ground_truth][: k - 1]
    if len(distractors) < k - 1:
        raise ValueError(f"need {k - 1} distractors for {ground_truth!r}, only {len(distractors)} available")
    options = distractors[:]
    options.insert((rng or random.Random(f"options-{ground_truth}")).randrange(k), ground_truth)
    return options


EVAL_KEYS = ("image_path", "question", "options", "ground_truth")


def eval_records(test: Sequence[ImageRecord], sim: Similarity, split: dict[str, dict], seed: int = 0,
                 k: int = 4) -> list[dict]:
    """Evaluation records in the official eval JSONL shape, plus metadata (super-category, genus, split).

    Distractors come from all classes of the super-category (seen and unseen), most similar first."""
    rows = []
    for r in test:
        rng = _rng(seed, "eval", r.image_id)
        sc_split = split[r.super_category]
        which = "seen" if r.label in sc_split["seen"] else "unseen" if r.label in sc_split["unseen"] else None
        if which is None:
            raise ValueError(f"test image {r.image_id}: class {r.label!r} is in neither seen nor unseen")
        rows.append({
            "image_path": r.path,
            "question": rng.choice(question_templates(r.super_category)),
            "options": closed_world_options(r.label, sim.ranked(r.label), k, rng),
            "ground_truth": r.label,
            "super_category": r.super_category, "genus": r.genus, "split": which, "image_id": r.image_id,
        })
    return rows


def write_eval_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return write_jsonl(path, rows)


_SPLITS = ("seen", "unseen")


def _name_tokens(path: str | Path) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", Path(path).stem.lower()) if t]


def super_category_from_file_name(path: str | Path) -> str | None:
    """The super-category named by a file name (``bird_seen.jsonl``, ``Cars-test.jsonl``), else None."""
    tokens = _name_tokens(path)
    return next((sc for sc in SUPER_CATEGORIES if sc in tokens or sc + "s" in tokens), None)


def split_from_file_name(path: str | Path) -> str | None:
    """"seen" / "unseen" when the file name says so (``bird_unseen.jsonl``), else None."""
    tokens = _name_tokens(path)
    return next((s for s in ("unseen", "seen") if s in tokens), None)


def read_eval_jsonl(path: str | Path, super_category: str | None = None, split: str | None = None,
                    allow_empty: bool = False) -> list[dict]:
    """Read an eval JSONL file: ours or the official release (same four keys; metadata optional).

    Metadata a record lacks is filled in. ``super_category``: the argument, else the file name (``bird_seen.jsonl``),
    else the dataset folder in the image path (the official eval code's rule, e.g. ``.../bird_200/images/...``,
    see :func:`finer1_lib.datasets.super_category_from_path`). ``split``: the argument, else the file name
    (``..._unseen.jsonl``). When neither says, a DataError names the file and how to pass it (no record is
    returned with a None super-category or split, which the summaries would silently drop). An empty file is a
    DataError too unless ``allow_empty``.
    """
    from .datasets import super_category_from_path

    for name, value, allowed in (("super_category", super_category, SUPER_CATEGORIES), ("split", split, _SPLITS)):
        if value is not None and value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
    file_sc, file_split = super_category_from_file_name(path), split_from_file_name(path)
    rows = []
    for lineno, row in iter_jsonl_numbered(path):
        where = f"{path}:{lineno}"
        missing = [k for k in EVAL_KEYS if k not in row]
        if missing:
            raise DataError(f"{where}: eval record is missing {missing} (has {sorted(row)})")
        if not isinstance(row["options"], list) or len(row["options"]) < 2:
            raise DataError(f"{where}: 'options' must be a list of at least 2 names")
        row = dict(row)
        if row.get("super_category") is None:
            row["super_category"] = (super_category or file_sc
                                     or super_category_from_path(str(row["image_path"])))
            if row["super_category"] is None:
                raise DataError(
                    f"{where}: cannot tell the super-category of this eval record: it has no 'super_category' key, "
                    f"and neither the file name nor the image path {row['image_path']!r} names one; pass "
                    f"super_category=... (one of {', '.join(SUPER_CATEGORIES)}) or name the file like "
                    f"bird_seen.jsonl")
        elif row["super_category"] not in SUPER_CATEGORIES:
            raise DataError(f"{where}: unknown super_category {row['super_category']!r}; expected one of "
                            f"{SUPER_CATEGORIES}")
        if row.get("split") is None:
            row["split"] = split or file_split
            if row["split"] is None:
                raise DataError(f"{where}: cannot tell whether this eval record is of a seen or an unseen class: it "
                                f"has no 'split' key and the file name does not say; pass split='seen' or "
                                f"split='unseen', or name the file like bird_seen.jsonl / bird_unseen.jsonl")
        elif row["split"] not in _SPLITS:
            raise DataError(f"{where}: unknown split {row['split']!r}; expected one of {_SPLITS}")
        rows.append(row)
    if not rows and not allow_empty:
        raise DataError(f"{path}: no eval records (the file is empty)")
    return rows
