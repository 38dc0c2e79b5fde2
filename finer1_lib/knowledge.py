"""What does the model know? Perception and field-guide probes of the micro world ("knows but cannot deploy").

Paper §1: an MLLM perceives the attributes and has read about every species, yet fails to *deploy* that
knowledge to name what it sees. Three probes make the claim measurable on the micro world, per seen/unseen:

* perception: caption a held-out image, parse the five attribute values (genus-level pair and all five);
* knowledge, name -> attributes: "Describe the <name>." -> all five values recalled;
* knowledge, attributes -> name: "Which bird has <attributes>?" -> the exact name.

Naming from images is measured by the closed/open-world evaluation (``evaluate.py``).
"""
from __future__ import annotations

import random
from typing import Sequence

import pandas as pd

from .inference import generate
from .rationale import CAPTION_PROMPTS, KNOWLEDGE_PROMPTS, REVERSE_PROMPTS, article
from .records import SUPER_CATEGORY_WORD
from .world import SCHEMAS, World, join_phrases

__all__ = ["parse_attributes", "perception_probe", "knowledge_probe", "probe_summary", "answers_in_options",
           "species_probe", "base_model_metrics", "BASE_MODEL_TARGETS", "target_table"]

# The shape a base model should have before Fine-R1 (issue 16; the paper's zero-shot Qwen2.5-VL-3B perceives and
# chooses well but names poorly in the open world, Table 1 / Table 6). (measure, metric key prefix, low, high), %,
# checked on each split (seen, unseen); "each attribute" is checked on the worst of the five slots.
BASE_MODEL_TARGETS = (
    ("perception, each attribute (worst slot)", "perception, attribute", 90.0, 100.0),
    ("perception, all five attributes", "perception (image -> attributes)", 70.0, 100.0),
    ("knowledge, name -> attributes (text)", "knowledge (name -> attributes)", 98.0, 100.0),
    ("knowledge, attributes -> name (text)", "knowledge (attributes -> name)", 95.0, 100.0),
    ("closed world zero-shot (4 options)", "closed-world acc", 45.0, 80.0),
    ("answers that are one of the options", "closed-world answer in options", 95.0, 100.0),
    ("open world zero-shot TI", "open-world TI", 0.0, 35.0),
    ("H1 probe, 8 images per species", "H1 probe, 8 images per species", 50.0, 100.0),
)


def parse_attributes(super_category: str, text: str) -> dict[str, str | None]:
    """The attribute values named in ``text`` (by their field-guide phrases); None where absent or ambiguous."""
    out = {}
    for d in SCHEMAS[super_category].dims:
        found = [v for v in d.values if d.say(v) in text]
        out[d.name] = found[0] if len(found) == 1 else None
    return out


def _score(super_category: str, truth: dict, text: str) -> dict:
    got = parse_attributes(super_category, text)
    schema = SCHEMAS[super_category]
    ok = {d.name: got[d.name] == truth[d.name] for d in schema.dims}
    return {"genus attrs": all(ok[d.name] for d in schema.genus_dims),
            "species attrs": all(ok[d.name] for d in schema.species_dims),
            "all 5 attrs": all(ok.values()), "per-attribute": sum(ok.values()) / len(ok),
            **{f"attribute {k + 1}": ok[d.name] for k, d in enumerate(schema.dims)}}  # slots 1-2: genus


def perception_probe(model, processor, bench, world: World, records: Sequence | None = None,
                     max_new_tokens: int = 48, batch_size: int = 32, progress: bool = True) -> pd.DataFrame:
    """Caption held-out test images; one row per image with the parsed-attribute scores."""
    records = list(bench.test if records is None else records)
    seen = set(bench.seen_labels())
    prompts = [CAPTION_PROMPTS[0].format(word=SUPER_CATEGORY_WORD[r.super_category]) for r in records]
    texts = generate(model, processor, [bench.image(r) for r in records], prompts,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    return pd.DataFrame([{"probe": "perception (image -> attributes)", "label": r.label,
                          "super_category": r.super_category, "split": "seen" if r.label in seen else "unseen",
                          "output": t, **_score(r.super_category, world.get(r.label).attributes, t)}
                         for r, t in zip(records, texts)])


def knowledge_probe(model, processor, bench, world: World, seed: int = 0, max_new_tokens: int = 48,
                    batch_size: int = 32, progress: bool = True) -> pd.DataFrame:
    """Text-only field-guide recall for every species, both directions; one row per (species, direction)."""
    rng = random.Random(seed)
    seen = set(bench.seen_labels())
    species = [world.get(lab) for lab in sorted(seen | set(bench.unseen_labels()))]
    fwd = [rng.choice(KNOWLEDGE_PROMPTS).format(name=s.name) for s in species]
    rev = []
    for s in species:
        word = SUPER_CATEGORY_WORD[s.super_category]
        features = join_phrases(rng.sample(s.phrases(), len(s.phrases())))
        rev.append(rng.choice(REVERSE_PROMPTS).format(word=word, features=features,
                                                      A_word=f"{article(word).capitalize()} {word}"))
    texts = generate(model, processor, [None] * (2 * len(species)), fwd + rev, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, progress=progress)
    rows = []
    for s, t in zip(species, texts[: len(species)]):
        rows.append({"probe": "knowledge (name -> attributes)", "label": s.name, "super_category": s.super_category,
                     "split": "seen" if s.name in seen else "unseen", "output": t,
                     **_score(s.super_category, s.attributes, t)})
    for s, t in zip(species, texts[len(species):]):
        named = [o.name for o in world.species_of(s.super_category) if o.name in t]
        rows.append({"probe": "knowledge (attributes -> name)", "label": s.name, "super_category": s.super_category,
                     "split": "seen" if s.name in seen else "unseen", "output": t,
                     "all 5 attrs": named == [s.name], "per-attribute": float(named == [s.name])})
    return pd.DataFrame(rows)


def probe_summary(*frames: pd.DataFrame) -> pd.DataFrame:
    """Percent correct per probe and split: the "all 5 attrs" column (exact name for attributes -> name)."""
    df = pd.concat(frames, ignore_index=True)
    table = df.pivot_table(index="probe", columns="split", values="all 5 attrs", aggfunc="mean") * 100
    if "genus attrs" in df:
        g = df.dropna(subset=["genus attrs"]).pivot_table(index="probe", columns="split", values="genus attrs",
                                                          aggfunc="mean") * 100
        g.index = [i.replace("-> attributes", "-> genus attributes") for i in g.index]
        table = pd.concat([table, g])
    return table.round(1)


def answers_in_options(results: pd.DataFrame, rows: Sequence[dict]) -> pd.Series:
    """Per split, % of closed-world answers that are one of the four options offered (case-insensitive).

    ``results``: ``evaluate.run_eval`` output for ``rows`` (its closed-world rows come in the order of ``rows``)."""
    closed = results[results["mode"] == "closed"].reset_index(drop=True)
    if len(closed) != len(rows):
        raise ValueError(f"{len(closed)} closed-world results for {len(rows)} evaluation rows")
    hit = [str(p).strip().lower() in {o.lower() for o in r["options"]} for p, r in zip(closed["prediction"], rows)]
    return (pd.Series(hit, dtype=float).groupby(closed["split"]).mean() * 100).round(2)


def species_probe(model, processor, bench, world: World, train_per_class: int = 8, batch_size: int = 16) -> dict:
    """H1's method (Table 4 left) on every species: a linear probe of mean-pooled image-token states, trained on
    ``train_per_class`` pretrain-pool images per species (seen and unseen alike), tested on the test images."""
    from .analysis import image_token_features, linear_probe

    train = [(sp.name, world.render(sp.name, "pretrain", 2 * 10**7 + i)) for sp in world.species
             for i in range(train_per_class)]
    test = list(bench.test)
    seen = set(bench.seen_labels())
    x_tr = image_token_features(model, processor, [im for _, im in train], batch_size=batch_size)
    x_te = image_token_features(model, processor, [bench.image(r) for r in test], batch_size=batch_size)
    return linear_probe(x_tr, [n for n, _ in train], x_te, [r.label for r in test],
                        groups=["seen" if r.label in seen else "unseen" for r in test])


def base_model_metrics(model, processor, bench, world: World, profile, progress: bool = False,
                       extended: bool = True, results: pd.DataFrame | None = None) -> dict:
    """The base model's shape as plain numbers (%, seen/unseen): perception (all five, both genus, each slot),
    knowledge, zero-shot naming, answers inside the offered options, and H1's probe with 8 images per species.

    Stored in the shipped model's manifest; a test recomputes them to check the checkpoint. ``extended=False``
    gives the measures of manifests written before the staged pretraining (no slots, options rate or probe).
    ``results``: this model's zero-shot ``evaluate_model`` output on ``bench`` if already computed (reused)."""
    from .evaluate import evaluate_model, summarize

    perception = perception_probe(model, processor, bench, world, progress=progress)
    probes = probe_summary(perception, knowledge_probe(model, processor, bench, world, progress=progress))
    if results is None:
        results = evaluate_model(model, processor, bench, profile, progress=progress)
    naming = summarize(results)["all"]
    out = {f"{probe} [{split}]": round(float(v), 2) for probe, row in probes.iterrows() for split, v in row.items()}
    if not extended:
        out.update({f"{metric} [{split}]": round(float(v), 2) for (metric, split), v in naming.items()})
        return out
    slots = perception.groupby("split")[[f"attribute {k}" for k in range(1, 6)]].mean() * 100
    out.update({f"perception, {col} [{split}]": round(float(v), 2) for split, row in slots.iterrows()
                for col, v in row.items()})
    out.update({f"{metric} [{split}]": round(float(v), 2) for (metric, split), v in naming.items()})
    out.update({f"closed-world answer in options [{split}]": float(v)
                for split, v in answers_in_options(results, bench.eval_rows).items()})
    probe = species_probe(model, processor, bench, world)
    out.update({f"H1 probe, 8 images per species [{split}]": round(float(v), 2) for split, v in probe.items()})
    return out


def target_table(metrics: dict) -> pd.DataFrame:
    """``base_model_metrics`` output against ``BASE_MODEL_TARGETS``: one row per measure, seen / unseen values,
    the target range and whether both splits are inside it (NaN values, e.g. an old manifest, count as missing)."""
    rows = []
    for name, prefix, lo, hi in BASE_MODEL_TARGETS:
        row = {"measure": name}
        for split in ("seen", "unseen"):
            vals = [v for k, v in metrics.items() if k.startswith(prefix) and k.endswith(f"[{split}]")]
            row[split] = min(vals) if vals else float("nan")
        row["target"] = f"≤ {hi:g}" if lo == 0 else f"≥ {lo:g}" if hi == 100 else f"{lo:g}–{hi:g}"
        row["met"] = all(lo <= row[s] <= hi for s in ("seen", "unseen"))  # NaN compares False
        rows.append(row)
    return pd.DataFrame(rows).set_index("measure")
