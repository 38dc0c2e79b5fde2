"""Choosing training settings without touching the test images (issue 19).

The micro world renders a ``val`` pool (``world.POOLS``), disjoint from the test images by seed. Its rows have
the test rows' shape (question, four options ranked by the benchmark's visual similarity, seen/unseen split),
so a setting is chosen on the **seen** validation classes; the unseen validation rows are reported as a
diagnostic only (choosing on them would tune to the unseen classes).

``python -m finer1_lib validate --profile cpu --grid epochs=15,lr=3e-5 replay=0.5`` trains each SFT variant
(``pipeline.run_sft``: cached by its settings, resumable) and writes one table row per variant:
closed-world accuracy, answers that are one of the four options, well-formed answers, answers without a
closing ``</answer>`` (cut off by ``max_new_tokens``), open-world TI.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from .config import digest
from .io import atomic_write_text
from .profiles import get_profile
from .protocol import check_disjoint, eval_records

__all__ = ["validation_rows", "option_rate", "cot_structured", "options_copied", "COT_TAGS", "validation_summary", "validate_model", "validate_sft",
           "parse_variant"]


def validation_rows(bench, profile=None, per_class: int = 3, seed: int = 0, progress: bool = False) -> list[dict]:
    """Eval rows on ``per_class`` fresh ``val`` renders of every benchmark class (seen and unseen), rendered
    into ``bench.root / images/val`` on first use. Micro world only: the real datasets have no such pool here
    (hold out part of a dataset's training images instead)."""
    from .benchmark import render_missing
    from .world import World

    profile = get_profile(profile)
    if profile.world != "micro":
        raise ValueError(f"profile {profile.name!r}: validation renders exist for the micro world only; on the real "
                         f"datasets hold out part of each dataset's training images")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    world = World(profile.world_seed, profile.image_size, profile.n_genera)
    labels = [lab for sc in sorted(bench.split) for which in ("seen", "unseen") for lab in bench.split[sc][which]]
    records = [world.record(lab, "val", i) for lab in labels for i in range(per_class)]
    check_disjoint(test=bench.test, val=records)
    render_missing(world, records, bench.root, progress, desc="render val")
    return eval_records(records, bench.similarity, bench.split, seed)


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def option_rate(df: pd.DataFrame, rows: list[dict]) -> pd.Series:
    """Per closed-world row of ``df``: whether the extracted answer is one of the row's four options."""
    options = {r.get("image_id", r["image_path"]): {_norm(o) for o in r["options"]} for r in rows}
    closed = df[df["mode"] == "closed"]
    return closed.apply(lambda x: _norm(x["prediction"]) in options[x["image_id"]], axis=1)


#: The four parts of a Table 5 rationale, in order.
COT_TAGS = ("analysis", "options", "comparison", "prediction")


def cot_structured(df: pd.DataFrame) -> pd.Series:
    """Per closed-world row: whether the answer holds the four rationale parts of Table 5, each opened and closed,
    in order (visual analysis, candidates, comparison, prediction)."""
    pattern = re.compile("".join(rf"<{t}>.*?</{t}>.*?" for t in COT_TAGS), re.S)
    closed = df[df["mode"] == "closed"]
    return closed["output"].map(lambda text: bool(pattern.search(str(text))))


def options_copied(df: pd.DataFrame, rows: list[dict]) -> pd.Series:
    """Per closed-world row: whether the rationale's ``<options>`` block names all four given options (what a
    model that reads the prompt's options does; the CoT SFT set has no options in its prompts)."""
    options = {r.get("image_id", r["image_path"]): [_norm(o) for o in r["options"]] for r in rows}
    closed = df[df["mode"] == "closed"]

    def copied(x) -> bool:
        m = re.search(r"<options>(.*?)</options>", str(x["output"]), re.S)
        return bool(m) and all(o in _norm(m.group(1)) for o in options[x["image_id"]])
    return closed.apply(copied, axis=1)


def validation_summary(df: pd.DataFrame, rows: list[dict]) -> dict:
    """Percentages per split: closed-world accuracy, answers in the options, well-formed, cut off (no
    ``</answer>``), Table 5 structure, options copied into the rationale; open-world TI."""
    out = {}
    closed = df[df["mode"] == "closed"].assign(in_options=option_rate(df, rows),
                                               copied=options_copied(df, rows), structured=cot_structured(df))
    for which, g in closed.groupby("split"):
        out[f"closed acc {which}"] = 100 * g["correct"].astype(float).mean()
        out[f"in options {which}"] = 100 * g["in_options"].astype(float).mean()
        out[f"well-formed {which}"] = 100 * g["well_formed"].astype(float).mean()
        out[f"cut off {which}"] = 100 * (~g["output"].str.contains("</answer>", regex=False)).mean()
        out[f"CoT structure {which}"] = 100 * g["structured"].astype(float).mean()
        out[f"options copied {which}"] = 100 * g["copied"].astype(float).mean()
        out[f"n {which}"] = len(g)
    for which, g in df[df["mode"] == "open"].groupby("split"):
        out[f"open TI {which}"] = 100 * g["correct"].astype(float).mean()
    return {k: round(float(v), 1) if isinstance(v, float) else int(v) for k, v in out.items()}


def validate_model(model, processor, bench, rows: list[dict], profile, cache: Path, modes=("closed",),
                   progress: bool = False) -> pd.DataFrame:
    """Greedy answers of ``model`` on ``rows`` (the profile's eval settings), cached in ``cache``."""
    from .evaluate import run_eval

    if cache.is_file():
        return pd.read_csv(cache, keep_default_na=False, dtype={"output": str, "prediction": str})
    df = run_eval(model, processor, bench, rows, modes=modes, max_new_tokens=profile.eval["max_new_tokens"],
                  batch_size=profile.eval["batch_size"], progress=progress)
    atomic_write_text(cache, df.to_csv(index=False))
    return df


def parse_variant(text: str) -> dict:
    """``"epochs=5,lr=1e-4"`` -> {"epochs": 5, "lr": 1e-4}; ``"default"`` -> {} (values parsed as ``--set`` values are, so
    ``replay_tasks={"choice":1,"reasoning":1}`` is a dict)."""
    from .config import _parse_value

    if text.strip() in ("", "default"):
        return {}
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):  # commas inside {...} or [...] belong to the value
        depth += 1 if ch in "{[" else -1 if ch in "}]" else 0
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    out = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad variant {text!r}: expected key=value[,key=value...] or 'default'")
        out[key.strip()] = _parse_value(value)
    return out


def validate_sft(profile=None, out=None, seed: int = 0, variants=({},), data: str = "cot", per_class: int = 3,
                 modes=("closed",), base: bool = True, progress: bool = False) -> pd.DataFrame:
    """One row per SFT variant (settings on top of ``profile.sft``; ``{}`` is the profile's own), plus the base
    model when ``base``: :func:`validation_summary` on the validation rows. Each variant's SFT run is
    ``pipeline.run_sft`` (cached, resumable); its answers are cached next to its model."""
    from .model import load_model
    from .pipeline import base_model_key, get_benchmark, load_base_model, run_sft

    profile = get_profile(profile)
    bench = get_benchmark(profile, out, seed)
    rows = validation_rows(bench, profile, per_class, seed, progress)
    settings = {k: profile.eval[k] for k in ("max_new_tokens", "batch_size")}
    name = lambda model_key: f"val-{digest({'model': model_key, 'eval': settings, 'modes': list(modes), 'n': per_class}, 12)}.csv"  # noqa: E731
    table = []
    if base:
        model, processor = load_base_model(profile)
        df = validate_model(model, processor, bench, rows, profile, bench.root / name(base_model_key(profile)),
                            modes, progress)
        table.append({"variant": "zero-shot (base model)", **validation_summary(df, rows)})
    for overrides in variants:
        summary = run_sft(profile, out, seed, data, progress=progress, **overrides)
        model, processor = load_model(summary["model"], dtype=profile.load_dtype)
        cache = Path(summary["model"]).parent / name(summary["key"])
        df = validate_model(model, processor, bench, rows, profile, cache, modes, progress)
        label = ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"
        table.append({"variant": f"{data} SFT {label}", "SFT seconds": summary.get("seconds"),
                      **validation_summary(df, rows)})
    return pd.DataFrame(table).set_index("variant")
