"""Closed- and open-world evaluation on seen and unseen classes (paper §5.1, Tables 1, 2 and 6).

Closed world: the official prompt with 4 options; correct iff the ground truth is inside ``<answer>``.
Open world: the official free-answer prompt; text inclusion (TI) and relative semantic similarity (SS, Eq. 5)
of the prediction (the ``<answer>`` content, else the whole output). Greedy decoding, Qwen's default system
prompt, as in the official ``eval/evaluation.py``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .inference import generate
from .metrics import (SemanticSimilarity, closed_world_correct, format_reward, open_world_prediction,
                      text_inclusion_for)
from .prompts import closed_world_prompt, open_world_prompt, step_by_step

__all__ = ["MODES", "eval_prompt", "run_eval", "add_semantic_similarity", "summarize", "SUPER_ORDER", "evaluate_model",
           "compare"]

MODES = ("closed", "open")
SUPER_ORDER = ("aircraft", "bird", "car", "dog", "flower", "pet")  # the paper's column order


def eval_prompt(row: dict, mode: str, think_step_by_step: bool = False) -> str:
    """The official closed- or open-world prompt of an eval record (+ "Let's think step by step", Fig. 3b)."""
    if mode == "closed":
        prompt = closed_world_prompt(row["question"], row["options"])
    elif mode == "open":
        prompt = open_world_prompt(row["question"])
    else:
        raise ValueError(f"unknown evaluation mode {mode!r}; expected one of {MODES}")
    return step_by_step(prompt) if think_step_by_step else prompt


def run_eval(model, processor, bench, rows: Sequence[dict] | None = None, modes: Sequence[str] = MODES, *,
             think_step_by_step: bool = False, max_new_tokens: int = 160, batch_size: int = 32,
             system: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Generate greedily for every (record, mode) and score it; one DataFrame row per pair."""
    rows = list(bench.eval_rows if rows is None else rows)
    if not rows:
        raise ValueError("no evaluation records to run")
    images = [bench.image(r["image_path"]) for r in rows]
    out = []
    for mode in modes:
        prompts = [eval_prompt(r, mode, think_step_by_step) for r in rows]
        texts = generate(model, processor, images, prompts, system=system, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, progress=progress)
        for r, text in zip(rows, texts):
            pred = open_world_prediction(text)
            out.append({
                "image_id": r.get("image_id", r["image_path"]), "super_category": r["super_category"],
                "split": r["split"], "mode": mode, "ground_truth": r["ground_truth"], "output": text,
                "prediction": pred, "well_formed": format_reward(text) == 1.0,
                "correct": closed_world_correct(text, r["ground_truth"]) if mode == "closed"
                else text_inclusion_for(r["super_category"], text, r["ground_truth"]),
            })
    return pd.DataFrame(out)


def add_semantic_similarity(df: pd.DataFrame, ss: SemanticSimilarity) -> pd.DataFrame:
    """Add column ``SS`` (Eq. 5) to the open-world rows (NaN for closed-world rows)."""
    df = df.copy()
    df["SS"] = np.nan
    open_rows = df["mode"] == "open"
    if open_rows.any():
        sub = df[open_rows]
        df.loc[open_rows, "SS"] = ss.score(sub["prediction"].tolist(), sub["ground_truth"].tolist(),
                                           sub["super_category"].tolist())
    return df


def summarize(df: pd.DataFrame, per_super: bool = False) -> pd.DataFrame:
    """Percentages: closed-world accuracy, open-world TI and SS, for seen / unseen (and per super-category)."""
    metrics = []
    for (mode, split), g in df.groupby(["mode", "split"]):
        entries = [("closed-world acc" if mode == "closed" else "open-world TI", g, "correct")]
        if mode == "open" and "SS" in g:
            entries.append(("open-world SS", g, "SS"))
        for name, frame, col in entries:
            row = {"metric": name, "split": split, "all": 100 * frame[col].astype(float).mean()}
            if per_super:
                for sc in SUPER_ORDER:
                    part = frame[frame["super_category"] == sc]
                    if len(part):
                        row[sc] = 100 * part[col].astype(float).mean()
            metrics.append(row)
    return pd.DataFrame(metrics).set_index(["metric", "split"]).round(2)


def evaluate_model(model, processor, bench, profile, ss: SemanticSimilarity | None = None, rows=None,
                   think_step_by_step: bool = False, progress: bool = False) -> pd.DataFrame:
    """run_eval with the profile's generation settings, plus SS (MiniLM unless ``ss`` is given)."""
    from .metrics import minilm_encoder

    df = run_eval(model, processor, bench, rows, think_step_by_step=think_step_by_step,
                  max_new_tokens=profile.eval["max_new_tokens"], batch_size=profile.eval["batch_size"],
                  progress=progress)
    return add_semantic_similarity(df, ss or SemanticSimilarity(minilm_encoder()))


def compare(results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per model: closed-world accuracy, open-world TI and SS on seen / unseen (Fig. 3a, Tables 1-2)."""
    table = {}
    for name, df in results.items():
        s = summarize(df)["all"]
        table[name] = {(metric, split): s.get((metric, split), np.nan)
                       for metric in ("closed-world acc", "open-world TI", "open-world SS")
                       for split in ("seen", "unseen")}
    out = pd.DataFrame(table).T
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    return out.round(1)
