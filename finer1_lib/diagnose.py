"""Where a structured answer goes wrong (issue 19's diagnosis): perception, candidate recall, or the choice.

A Fine-R1 answer (paper Table 5) reasons in four steps: the visual analysis states the image's attributes, the
options list candidate subcategories, the comparison weighs them, the prediction names one. On the micro world
every step can be checked against the truth, because the image's attributes and every species' attributes are
known (``world``):

* **perception**: which attribute values the analysis states, and how many of them are the image's own
  (``stated_attributes``; a value counts as stated when its field-guide phrase, e.g. "yellow tail", is in the
  analysis);
* **recall**: whether the true species is among the candidates of ``<options>``, and how many candidates are
  classes the model was trained on (seen);
* **choice**: whether the answer is the truth when the truth was a candidate.

A wrongly stated attribute that is the *answer's* value (not the image's) means the analysis describes the
species the model is about to name rather than the image: ``wrong attributes = the answer's``.

``diagnose(results, world)`` labels each answer (one row of an evaluation, ``evaluate.evaluate_model``'s output)
with the first step that failed: ``right``, ``no answer`` (no ``<answer>``), ``perception`` (a stated attribute
is wrong), ``recall`` (perception fine, truth not among the candidates), ``choice`` (truth among the candidates,
another answer), or ``unstructured`` (wrong, without analysis and options to check). ``diagnosis_table``
summarises it per world (closed / open) and split (seen / unseen) in percent.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import pandas as pd

from .prompts import extract_tag, split_options
from .world import SCHEMAS, World

__all__ = ["STEPS", "DIAGNOSED_METHODS", "stated_attributes", "analysis_span", "candidates_span", "diagnose",
           "diagnosis_table", "diagnose_methods", "names_in", "hedging", "hedging_table",
           "stopping", "stopping_table"]

#: The labels of ``diagnose``, in the order the steps happen.
STEPS = ("right", "no answer", "perception", "recall", "choice", "unstructured")


def _core(phrase: str) -> str:
    """A field-guide phrase without its article: "a yellow tail" -> "yellow tail"."""
    return re.sub(r"^(a|an|the)\s+", "", phrase.strip())


def stated_attributes(text: str, super_category: str) -> dict[str, list[str]]:
    """Each attribute dimension of ``super_category`` -> the values ``text`` states for it (longest phrases win:
    "dark red crest" is not also read as "red crest"). A dimension the text does not mention maps to []."""
    if super_category not in SCHEMAS:
        raise ValueError(f"unknown super-category {super_category!r}; expected one of {sorted(SCHEMAS)}")
    low = (text or "").lower()
    stated: dict[str, list[str]] = {}
    for dim in SCHEMAS[super_category].dims:
        found = []
        cores = sorted(((_core(dim.say(v)).lower(), v) for v in dim.values), key=lambda cv: -len(cv[0]))
        taken: list[tuple[int, int]] = []
        for core, value in cores:
            for m in re.finditer(rf"(?<![\w-]){re.escape(core)}(?![\w-])", low):
                if not any(a <= m.start() < b for a, b in taken):
                    taken.append((m.start(), m.end()))
                    if value not in found:
                        found.append(value)
        stated[dim.name] = found
    return stated


def _span(text: str, starts: Iterable[str], ends: Iterable[str]) -> str | None:
    text = text or ""
    begin = None
    for s in starts:
        i = text.find(s)
        if i >= 0:
            begin = i + len(s)
            break
    if begin is None:
        return None
    stop = min([j for j in (text.find(e, begin) for e in ends) if j >= 0], default=len(text))
    return text[begin:stop]


def analysis_span(text: str) -> str | None:
    """The visual analysis: inside ``<analysis>`` (or, when the model dropped that tag, from ``<think>``) up to
    the first closing tag or ``<options>``; None when the answer has neither."""
    if "<analysis>" not in (text or "") and "</analysis>" not in (text or ""):
        return None
    return _span(text, ("<analysis>", "<think>"), ("</analysis>", "<options>", "</think>"))


def candidates_span(text: str) -> list[str] | None:
    """The candidate subcategories listed in ``<options>`` (None when there is no ``<options>``)."""
    span = _span(text, ("<options>",), ("</options>", "<comparison>", "</think>"))
    return None if span is None else split_options(span)


def diagnose(results: pd.DataFrame, world: World, seen: Iterable[str] = ()) -> pd.DataFrame:
    """One row per answer of ``results`` (columns ``output``, ``ground_truth``, ``super_category``, ``split``,
    ``mode``, ``correct``): what its analysis states, whether the truth is a candidate, and ``step``, the first
    step that failed (``STEPS``). ``seen``: the seen class names (for the share of seen-class candidates)."""
    need = {"output", "ground_truth", "super_category", "split", "mode", "correct"}
    missing = need - set(results.columns)
    if missing:
        raise ValueError(f"evaluation results lack the columns {sorted(missing)} (expected evaluate_model's output)")
    seen = {s.lower() for s in seen}
    rows = []
    for r in results.itertuples(index=False):
        truth = world.get(r.ground_truth)
        output = r.output if isinstance(r.output, str) else ""
        analysis = analysis_span(output)
        stated = stated_attributes(analysis or "", r.super_category) if analysis is not None else {}
        n_stated = sum(bool(v) for v in stated.values())
        n_right = sum(v == [truth.attributes[d]] for d, v in stated.items())
        answer = extract_tag(output, "answer")
        pred = world.by_name.get((answer or "").strip())
        wrong = [(d, v) for d, v in stated.items() if v and v != [truth.attributes[d]]]
        of_answer = sum(pred is not None and pred.attributes.get(d) in v for d, v in wrong)
        cands = candidates_span(output)
        low = {c.lower() for c in cands or []}  # split_options already drops duplicates; case-insensitive here
        gt_cand = truth.name.lower() in low if cands is not None else None
        if bool(r.correct):
            step = "right"
        elif answer is None:
            step = "no answer"
        elif analysis is not None and n_right < n_stated:
            step = "perception"
        elif cands is not None and not gt_cand:
            step = "recall"
        elif cands is not None:
            step = "choice"
        else:
            step = "unstructured"
        rows.append({
            "mode": r.mode, "split": r.split, "ground_truth": truth.name, "step": step, "correct": bool(r.correct),
            "has_analysis": analysis is not None, "attributes_stated": n_stated, "attributes_right": n_right,
            "attributes_wrong": len(wrong), "wrong_of_answer": of_answer,
            "analysis_all_right": analysis is not None and n_stated == len(stated) and n_right == n_stated,
            "has_candidates": cands is not None, "n_candidates": len(low),
            "truth_in_candidates": gt_cand,
            "seen_candidates": len(low & seen) / len(low) if low and seen else None,
            "answer_genus_right": None if pred is None else pred.genus == truth.genus,
        })
    return pd.DataFrame(rows)


def diagnosis_table(diag: pd.DataFrame) -> pd.DataFrame:
    """Per (mode, split), in %: the share of answers in each ``step``, and, over the answers that have them, the
    analysis's attribute precision (stated values that are right), the analysis naming all five right, the wrongly
    stated values that are those of the species the answer names (the analysis describes the answer, not the
    image), the truth
    among the candidates, the seen-class share of the candidates and, over wrong answers naming a species, the
    answers of the right genus. ``n``: answers."""
    out = {}
    for (mode, split), g in diag.groupby(["mode", "split"], sort=True):
        row = {"n": len(g)}
        for step in STEPS:
            row[f"step: {step}"] = 100 * (g["step"] == step).mean()
        a = g[g["has_analysis"]]
        stated = a["attributes_stated"].sum()
        row["with analysis"] = 100 * len(a) / len(g)
        row["attribute precision"] = 100 * a["attributes_right"].sum() / stated if stated else float("nan")
        row["all five right"] = 100 * a["analysis_all_right"].mean() if len(a) else float("nan")
        n_wrong = a["attributes_wrong"].sum()
        row["wrong attributes = the answer's"] = 100 * a["wrong_of_answer"].sum() / n_wrong if n_wrong else float("nan")
        c = g[g["has_candidates"]]
        row["truth among candidates"] = 100 * c["truth_in_candidates"].astype(bool).mean() if len(c) else float("nan")
        sc = c["seen_candidates"].dropna()
        row["seen-class candidates"] = 100 * sc.mean() if len(sc) else float("nan")
        wrong = g[(~g["correct"]) & g["answer_genus_right"].notna()]
        row["wrong, right genus"] = 100 * wrong["answer_genus_right"].astype(bool).mean() if len(wrong) else float("nan")
        out[(mode, split)] = row
    table = pd.DataFrame(out).T
    table.index.names = ["mode", "split"]
    return table


#: The methods whose answers are structured (the CoT-trained ones) plus the zero-shot baseline.
DIAGNOSED_METHODS = ("zero-shot", "CoT SFT", "CoT SFT + DAPO", "Fine-R1 (TAPO)")


def diagnose_methods(profile=None, out=None, seed: int = 0, methods=DIAGNOSED_METHODS,
                     progress: bool = False) -> pd.DataFrame:
    """``diagnosis_table`` of each method's evaluation (``pipeline.evaluate_method``: cached, else trained and
    evaluated), one block per method: rows (method, mode, split)."""
    from .pipeline import evaluate_method, get_benchmark
    from .profiles import get_profile

    profile = get_profile(profile)
    if profile.world != "micro":
        raise ValueError(f"profile {profile.name!r}: the diagnosis needs the micro world, where the attributes of "
                         "every image and species are known (the real datasets have no attribute ground truth)")
    world = World(profile.world_seed, profile.image_size, profile.n_genera)
    seen = get_benchmark(profile, out, seed, progress=progress).seen_labels()
    tables = {m: diagnosis_table(diagnose(evaluate_method(profile, out, seed, m, progress=progress), world, seen))
              for m in methods}
    return pd.concat(tables, names=["method"])


def diagnosis_by_method(frames: dict, world: World) -> pd.DataFrame:
    """``diagnosis_table`` of each method's answers (``frames``: method -> evaluation results), one block per method
    (rows (method, mode, split)). The seen classes are read from the answers (the ground truths of rows whose split
    is "seen"); methods without generated text (the CLIP-style encoder) are left out."""
    have = {m: f for m, f in frames.items() if "output" in f.columns}
    seen = sorted({str(t) for f in have.values() for t in f.loc[f["split"] == "seen", "ground_truth"]})
    if not have:
        return pd.DataFrame()
    return pd.concat({m: diagnosis_table(diagnose(f, world, seen)) for m, f in have.items()}, names=["method"])


# ------------------------------------------------------------------------------------ several names at once

def names_in(text: str | None, names: Iterable[str]) -> set[str]:
    """The class names that occur in ``text`` as whole words (case-insensitive); a name inside a longer one
    ("Taibel" in "Zisol Taibel") counts only when it occurs on its own too."""
    if not text:
        return set()
    low = text.lower()
    found, taken = set(), []
    for name in sorted({n.lower() for n in names}, key=len, reverse=True):
        for m in re.finditer(rf"(?<![\w-]){re.escape(name)}(?![\w-])", low):
            if not any(a <= m.start() < b for a, b in taken):
                taken.append((m.start(), m.end()))
                found.add(name)
    return found


def hedging(results: pd.DataFrame, names: Iterable[str]) -> pd.DataFrame:
    """Per answer: how many class names the scored answer holds, and whether it is right with ONE name.

    The official scoring (``metrics.official_answer``: the greedy span from the first ``<answer>`` to the last
    ``</answer>``; right when the truth is a substring of it) credits an answer that lists several species, and
    so does the accuracy reward of §4.3 (the truth a substring of the first ``<answer>``). A policy trained long
    enough on that reward can learn to name several species at once. Columns added: ``names`` (class names in
    the official answer span), ``several names`` (two or more), ``right with one name`` (the first ``<answer>``
    element names exactly one class, the truth)."""
    from .metrics import official_answer

    names = list(names)
    first_re = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
    rows = []
    for text, gt in zip(results["output"], results["ground_truth"]):
        span = official_answer(text if isinstance(text, str) else None)
        first = first_re.search(text) if isinstance(text, str) else None
        in_first = names_in(first.group(1), names) if first else set()
        n = len(names_in(span, names))
        rows.append({"names": n, "several names": n >= 2,
                     "right with one name": in_first == {str(gt).lower().replace("_", " ")}})
    return results.assign(**pd.DataFrame(rows, index=results.index))


def _per_group(frames: dict, names: Iterable[str], annotate, columns: dict) -> pd.DataFrame:
    """method -> evaluation frame: ``annotate(frame, names)`` per answer, then ``columns`` (name -> function of
    the answers of one (mode, split) group) per (method, mode, split), rounded to 2 decimals."""
    names = list(names)
    out = []
    for method, frame in frames.items():
        for (mode, split), g in annotate(frame, names).groupby(["mode", "split"], sort=True):
            out.append({"method": method, "mode": mode, "split": split,
                        **{col: fn(g) for col, fn in columns.items()}})
    return pd.DataFrame(out).set_index(["method", "mode", "split"]).round(2)


def hedging_table(frames: dict, names: Iterable[str]) -> pd.DataFrame:
    """method -> evaluation frame, summarised per (method, mode, split) in percent: the official score, the
    score with one name required, the share of answers naming several species and the mean names per answer."""
    return _per_group(frames, names, hedging, {
        "official": lambda g: 100 * g["correct"].astype(float).mean(),
        "one name required": lambda g: 100 * g["right with one name"].mean(),
        "answers naming several species": lambda g: 100 * g["several names"].mean(),
        "names per answer": lambda g: g["names"].mean()})


def stopping(results: pd.DataFrame, names: Iterable[str]) -> pd.DataFrame:
    """Per answer: does the model stop after its answer? Columns added: ``answer tags`` (how many ``<answer>``
    the output opens), ``clean single answer`` (exactly one, and the output ends with its ``</answer>``) and
    ``several names in first answer`` (the first ``<answer>`` element lists two or more classes).

    A policy that keeps writing after ``</answer>`` (``</answer>Name</answer>...``) puts more names inside the
    official answer span, so the two failure modes behind a hedged score are told apart: not stopping, and
    listing names in one answer."""
    names = list(names)
    first_re = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
    rows = []
    for text in results["output"]:
        text = text if isinstance(text, str) else ""
        tags = text.count("<answer>")
        first = first_re.search(text)
        rows.append({"answer tags": tags,
                     "clean single answer": tags == 1 and text.rstrip().endswith("</answer>"),
                     "several names in first answer": bool(first) and len(names_in(first.group(1), names)) >= 2})
    return results.assign(**pd.DataFrame(rows, index=results.index))


def stopping_table(frames: dict, names: Iterable[str]) -> pd.DataFrame:
    """method -> evaluation frame, summarised per (method, mode, split) in percent: answers that open several
    ``<answer>`` tags, answers whose first ``<answer>`` lists several classes, clean single answers."""
    return _per_group(frames, names, stopping, {
        "several <answer> tags": lambda g: 100 * (g["answer tags"] > 1).mean(),
        "several names in the first answer": lambda g: 100 * g["several names in first answer"].mean(),
        "clean single answer": lambda g: 100 * g["clean single answer"].mean()})
