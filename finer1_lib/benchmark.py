"""The FGVR benchmark of one run: split, few-shot training images, triplets and evaluation files.

One function for both worlds (paper §5.1 protocol):

* micro world: images are rendered from the world's disjoint pools (train / rl / test / reference) and saved;
  the seen/unseen split is drawn with the run seed (60/40 per super-category);
* real world: the six datasets are read from disk (``datasets.py``) with the official seen/unseen lists;
  training shots come from their train partitions, test images from their test partitions.

On disk (``out/``): ``records.jsonl`` (every image used, with its role), ``split.json``, ``triplets.jsonl``,
``similarity.json``, ``eval/<super>_<seen|unseen>.jsonl`` in the official eval shape, and ``benchmark.json``.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .datasets import official_split_records, read_dataset
from .io import atomic_write_bytes, read_jsonl, write_json, write_jsonl
from .profiles import Profile, get_profile
from .protocol import (Similarity, Triplet, build_similarity, check_disjoint, eval_records, group_by_label,
                       make_triplets, read_eval_jsonl, sample_shots, split_classes, thumbnail_embedding)
from .records import ImageRecord
from .world import World

__all__ = ["Benchmark", "build_benchmark", "load_benchmark", "ROLES"]

ROLES = ("train", "rl", "test", "reference")


@dataclass
class Benchmark:
    root: Path
    split: dict                      # super-category -> {"seen": [...], "unseen": [...]}
    records: dict                    # role -> list[ImageRecord]
    triplets: list[Triplet]
    similarity: Similarity
    eval_rows: list[dict]
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        # absolute: paths joined to the root elsewhere (read_sharegpt's image_root) must not be joined to it again
        # when the folder was given relative to the working directory (`--out runs/x`)
        self.root = Path(self.root).resolve()

    @property
    def train(self) -> list[ImageRecord]:
        return self.records["train"]

    @property
    def test(self) -> list[ImageRecord]:
        return self.records["test"]

    def path(self, rec_or_path) -> Path:
        p = Path(rec_or_path.path if isinstance(rec_or_path, ImageRecord) else rec_or_path)
        return p if p.is_absolute() else self.root / p

    def image(self, rec_or_path) -> Image.Image:
        path = self.path(rec_or_path)
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (FileNotFoundError, OSError) as err:
            raise FileNotFoundError(f"image {path} could not be read ({err}); rebuild the benchmark with "
                                    f"`python -m finer1_lib world --out {self.root}`") from None

    def eval(self, split: str | None = None, super_category: str | None = None) -> list[dict]:
        return [r for r in self.eval_rows if (split is None or r["split"] == split)
                and (super_category is None or r["super_category"] == super_category)]

    def seen_labels(self) -> list[str]:
        return sorted(lab for s in self.split.values() for lab in s["seen"])

    def unseen_labels(self) -> list[str]:
        return sorted(lab for s in self.split.values() for lab in s["unseen"])


def _micro_records(profile: Profile, split: dict, world: World) -> dict[str, list[ImageRecord]]:
    counts = {"train": profile.shots, "rl": profile.rl_per_class, "test": profile.test_per_class,
              "reference": profile.reference_per_class}
    seen = {lab for s in split.values() for lab in s["seen"]}
    out: dict[str, list[ImageRecord]] = {role: [] for role in ROLES}
    for sp in world.species:
        if sp.super_category not in split:
            continue
        for role in ROLES:
            if role in ("train", "rl") and sp.name not in seen:
                continue  # unseen classes never appear in training data
            out[role] += [world.record(sp.name, role, i) for i in range(counts[role])]
    return out


def _real_records(profile: Profile, seed: int) -> tuple[dict, dict[str, list[ImageRecord]]]:
    if not profile.data_root:
        raise ValueError(f"profile {profile.name!r} has no data_root: set it to the folder holding the datasets")
    split, out = {}, {role: [] for role in ROLES}
    for sc in profile.super_categories:
        recs = read_dataset(sc, profile.data_root)
        split[sc] = official_split_records(recs, sc)
        seen = set(split[sc]["seen"])
        train_pool = [r for r in recs if r.partition == "train" and r.label in seen]
        shots = sample_shots(train_pool, seen, profile.shots, seed)
        shot_ids = {r.image_id for r in shots}
        by_label = group_by_label(r for r in recs if r.partition == "train")
        out["train"] += shots
        rl = [r for lab in sorted(seen) for r in [x for x in sorted(by_label.get(lab, []), key=lambda r: r.image_id)
                                                   if x.image_id not in shot_ids][: profile.rl_per_class]]
        used = shot_ids | {r.image_id for r in rl}  # reference images stay disjoint from training images
        out["rl"] += rl
        out["reference"] += [r for lab in sorted(by_label) for r in [x for x in sorted(
            by_label[lab], key=lambda r: r.image_id) if x.image_id not in used][: profile.reference_per_class]]
        test = group_by_label(r for r in recs if r.partition == "test" and r.label in seen | set(split[sc]["unseen"]))
        out["test"] += [r for lab in sorted(test) for r in sorted(test[lab], key=lambda r: r.image_id)
                        [: profile.test_per_class]]
    return split, out


def render_missing(world: World, records, root: Path, progress: bool = False, desc: str = "render") -> None:
    """Write each micro-world record's image under ``root`` (PNG, atomically) unless it is already there."""
    for r in tqdm(records, desc=desc, disable=not progress):
        path = Path(root) / r.path
        if not path.is_file():
            buf = io.BytesIO()
            world.render(r.label, r.partition, r.meta["index"]).save(buf, format="PNG")
            atomic_write_bytes(path, buf.getvalue())


def build_benchmark(profile: Profile | str | None = None, out: str | Path | None = None, seed: int = 0,
                    embed_fn: Callable | None = None, progress: bool = True) -> Benchmark:
    """Build (and write to ``out``) the benchmark of ``profile`` for run seed ``seed``.

    ``embed_fn`` (images -> unit vectors) measures visual similarity between classes; it picks the negatives of
    the triplets (§4.3) and the closed-world distractors. Default: a colour-thumbnail embedding.
    """
    t0 = time.perf_counter()
    profile = get_profile(profile)
    out = Path(out) if out else profile.run_dir() / f"benchmark-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    embed_fn = embed_fn or thumbnail_embedding
    if profile.world == "micro":
        world = World(profile.world_seed, profile.image_size, profile.n_genera)
        split = {sc: split_classes([s.name for s in world.species_of(sc)], profile.seen_frac, seed, salt=sc)
                 for sc in profile.super_categories}
        records = _micro_records(profile, split, world)
        render_missing(world, [r for role in ROLES for r in records[role]], out, progress)
        write_json(out / "taxonomy.json", world.taxonomy())
    elif profile.world == "real":
        split, records = _real_records(profile, seed)
    else:
        raise ValueError(f"profile {profile.name!r}: unknown world {profile.world!r} (expected 'micro' or 'real')")
    check_disjoint(**records)

    bench = Benchmark(out, split, records, [], None, [])  # type: ignore[arg-type]
    sim = build_similarity(records["reference"], bench.image, embed_fn, per_class=profile.reference_per_class)
    seen = [lab for s in split.values() for lab in s["seen"]]
    triplets = make_triplets(records["train"], records["train"] + records["rl"], sim, seed, negative_among=seen)
    rows = eval_records(records["test"], sim, split, seed)
    rows = [r for sc in sorted(split) for which in ("seen", "unseen") for r in rows
            if r["super_category"] == sc and r["split"] == which]  # the order load_benchmark reads them in
    bench.similarity, bench.triplets, bench.eval_rows = sim, triplets, rows

    write_jsonl(out / "records.jsonl", [dict(r.to_dict(), role=role) for role in ROLES for r in records[role]])
    write_json(out / "split.json", split)
    write_jsonl(out / "triplets.jsonl", [t.to_dict() for t in triplets])
    write_json(out / "similarity.json", {"labels": sim.labels, "matrix": np.round(sim.matrix, 6).tolist(),
                                         "super_of": sim.super_of})
    for sc in sorted(split):
        for which in ("seen", "unseen"):
            write_jsonl(out / "eval" / f"{sc}_{which}.jsonl", [r for r in rows if r["super_category"] == sc
                                                                and r["split"] == which])
    bench.info = {"profile": profile.name, "world": profile.world, "seed": seed,
                  "counts": {role: len(records[role]) for role in ROLES},
                  "classes": {sc: {k: len(v) for k, v in s.items()} for sc, s in split.items()},
                  "eval_rows": len(rows), "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "benchmark.json", bench.info)
    return bench


def load_benchmark(out: str | Path) -> Benchmark:
    """Read back a benchmark written by :func:`build_benchmark`."""
    out = Path(out)
    if not (out / "benchmark.json").is_file():
        raise FileNotFoundError(f"no benchmark at {out} (expected {out / 'benchmark.json'}); build it with "
                                f"`python -m finer1_lib world --out {out}`")
    records: dict[str, list[ImageRecord]] = {role: [] for role in ROLES}
    for d in read_jsonl(out / "records.jsonl"):
        records[d.pop("role")].append(ImageRecord.from_dict(d))
    split = json.loads((out / "split.json").read_text())
    s = json.loads((out / "similarity.json").read_text())
    sim = Similarity(s["labels"], np.asarray(s["matrix"]), s["super_of"])
    triplets = [Triplet(*(ImageRecord.from_dict(t[k]) for k in ("anchor", "positive", "negative")))
                for t in read_jsonl(out / "triplets.jsonl")]
    rows = [r for p in sorted((out / "eval").glob("*.jsonl")) for r in read_eval_jsonl(p)]
    return Benchmark(out, split, records, triplets, sim, rows, json.loads((out / "benchmark.json").read_text()))
