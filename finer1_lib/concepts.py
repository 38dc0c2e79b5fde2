"""Image-level visual concept selection (paper §4.2 (1)): caption many times, pool, keep what is informative.

The paper (following Shi et al., 2025b) asks the MLLM for several descriptions of each few-shot image, "each
emphasizing different visual attributes", pools the visual concepts they mention, and applies "an information
bottleneck strategy, retaining only the most relevant ones". The official code has none of this; here it is:

1. :func:`concept_prompts` - one prompt per attribute dimension ("Describe the crest of this bird.") plus the
   general caption prompts of :data:`finer1_lib.rationale.CAPTION_PROMPTS`;
2. :func:`extract_concepts_for` - samples ``samples_per_prompt`` captions per prompt (temperature, seeded) and
   pools the concepts of each image (:func:`pool_concepts`, :func:`extract_concepts`, :func:`split_phrases`);
3. :func:`filter_concepts` - the information-bottleneck-style filter. For class c and concept k:

   * p(k|c)    = fraction of the captions of c's images that mention k (its *support*);
   * p(k|N(c)) = the same fraction averaged over N(c), the ``neighbours`` classes most similar to c (by the
     benchmark's :class:`~finer1_lib.protocol.Similarity`) among the classes that have captioned images;
   * score     = p(k|c) * log((p(k|c) + eps) / (p(k|N(c)) + eps)), the pointwise KL term that concept k
     contributes to I(concept; label) between c and its confusable classes.

   A concept the image mentions is kept when p(k|c) >= ``min_support`` AND score >= ``beta``; otherwise it is
   dropped as "unsupported" (too rarely seen: likely a misperception) or "not_discriminative" (as frequent in
   the neighbours: generic). ``beta`` is the bottleneck's trade-off knob: higher keeps fewer, more
   discriminative concepts. Kept concepts are ordered by score.

World-agnostic: a concept is a phrase from a vocabulary (micro world: every attribute phrase of the
super-category, :func:`micro_vocabulary`) or, without a vocabulary, a short phrase split from the caption.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from .inference import generate
from .io import read_jsonl, write_jsonl
from .protocol import Similarity, group_by_label
from .rationale import CAPTION_PROMPTS
from .records import SUPER_CATEGORY_WORD, ImageRecord
from .world import SCHEMAS

__all__ = ["ConceptResult", "micro_vocabulary", "concept_prompts", "extract_concepts", "split_phrases",
           "pool_concepts", "choose_images", "extract_concepts_for", "filter_concepts", "concepts_by_image",
           "concept_table", "concept_quality", "beta_sweep", "save_concepts", "load_concepts", "REASONS"]

#: Why a concept was dropped by :func:`filter_concepts`.
REASONS = ("unsupported", "not_discriminative")


@dataclass
class ConceptResult:
    """The concepts of one image: raw captions, pooled counts and (after :func:`filter_concepts`) the selection.

    ``counts[k]`` = number of captions mentioning concept k (a caption counts once). ``scores[k]`` =
    ``{"p_c", "p_n", "score"}`` of the filter; ``dropped`` = ``[{"concept", "reason", "p_c", "p_n", "score"}]``.
    """

    record: ImageRecord
    prompts: list[str]
    captions: list[str]
    counts: dict[str, int]
    kept: list[str] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    scores: dict[str, dict] = field(default_factory=dict)
    neighbours: list[str] = field(default_factory=list)
    filtered: bool = False

    @property
    def image_id(self) -> str:
        return self.record.image_id

    @property
    def label(self) -> str:
        return self.record.label

    @property
    def super_category(self) -> str:
        return self.record.super_category

    def to_dict(self) -> dict:
        return {"record": self.record.to_dict(), "prompts": self.prompts, "captions": self.captions,
                "counts": self.counts, "kept": self.kept, "dropped": self.dropped, "scores": self.scores,
                "neighbours": self.neighbours, "filtered": self.filtered}

    @classmethod
    def from_dict(cls, d: dict) -> "ConceptResult":
        missing = [k for k in ("record", "prompts", "captions", "counts") if k not in d]
        if missing:
            raise ValueError(f"concept record is missing keys {missing} (has {sorted(d)})")
        return cls(ImageRecord.from_dict(d["record"]), list(d["prompts"]), list(d["captions"]),
                   {k: int(v) for k, v in d["counts"].items()}, list(d.get("kept", [])),
                   list(d.get("dropped", [])), dict(d.get("scores", {})), list(d.get("neighbours", [])),
                   bool(d.get("filtered", False)))


# ------------------------------------------------------------------------------------------------ parsing
def micro_vocabulary(super_category: str) -> list[str]:
    """Every attribute phrase of a micro-world super-category ("a round body", ..., "a white breast")."""
    if super_category not in SCHEMAS:
        raise ValueError(f"unknown super-category {super_category!r}; expected one of {sorted(SCHEMAS)}")
    return [d.say(v) for d in SCHEMAS[super_category].dims for v in d.values]


def concept_prompts(super_category: str, dims: Sequence[str] | None = None) -> list[str]:
    """Captioning prompts that emphasise different attributes (§4.2 (1)).

    One "Describe the {dim} of this {word}." per attribute dimension (default: the dims of the micro world's
    schema for that super-category, which also make sense for the real datasets), then every general
    caption prompt of :data:`~finer1_lib.rationale.CAPTION_PROMPTS`.
    """
    word = SUPER_CATEGORY_WORD.get(super_category, super_category)
    if dims is None:
        dims = [d.name for d in SCHEMAS[super_category].dims] if super_category in SCHEMAS else []
    return [f"Describe the {d} of this {word}." for d in dims] + [p.format(word=word) for p in CAPTION_PROMPTS]


def extract_concepts(text: str, vocabulary: Sequence[str]) -> list[str]:
    """The vocabulary phrases found in ``text`` (case-insensitive, whole words), in order of appearance.

    Longer phrases are matched first and a shorter phrase inside an already matched span is not counted again.
    Each phrase is returned once, spelt as in the vocabulary. Raises ValueError for an empty vocabulary.
    """
    vocab = [v for v in dict.fromkeys(v.strip() for v in vocabulary) if v]
    if not vocab:
        raise ValueError("extract_concepts needs a non-empty vocabulary of concept phrases")
    text = text or ""
    taken: list[tuple[int, int]] = []
    found: list[tuple[int, str]] = []
    for phrase in sorted(vocab, key=len, reverse=True):
        pattern = re.compile(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", re.IGNORECASE)
        for m in pattern.finditer(text):
            if any(m.start() < b and a < m.end() for a, b in taken):
                continue
            taken.append(m.span())
            if phrase not in (p for _, p in found):
                found.append((m.start(), phrase))
    return [p for _, p in sorted(found)]


_LEAD = re.compile(r"\b(?:with|has|have|having|shows|showing|features|featuring)\b", re.IGNORECASE)
_SENTENCE = re.compile(r"[.!?;:\n]+")
_AND = re.compile(r",|\band\b|\bas well as\b", re.IGNORECASE)


def split_phrases(text: str, max_words: int = 6) -> list[str]:
    """Fallback concept parser without a vocabulary: short phrases after "with"/"has" (and similar verbs).

    Each sentence is cut after its last "with"/"has"/"having"/"showing"/"featuring"; the rest is split at
    commas and "and". Phrases are lower-cased, stripped of punctuation, and kept when 1..``max_words`` words
    long. "This is a bird with a round body, a short beak and a red crest." -> ["a round body", "a short beak",
    "a red crest"]. A sentence without such a verb gives nothing.
    """
    out: list[str] = []
    for sentence in _SENTENCE.split(text or ""):
        leads = list(_LEAD.finditer(sentence))
        if not leads:
            continue
        for part in _AND.split(sentence[leads[-1].end():]):
            phrase = re.sub(r"\s+", " ", part).strip(" \t'\"()[]-").lower()
            if phrase and len(phrase.split()) <= max_words and phrase not in out:
                out.append(phrase)
    return out


def pool_concepts(record: ImageRecord, captions: Sequence[str], vocabulary: Sequence[str] | None,
                  prompts: Sequence[str] | None = None) -> ConceptResult:
    """Pool the concepts of one image's captions: ``counts[k]`` = captions mentioning k, most frequent first.

    ``vocabulary=None`` uses :func:`split_phrases`. Raises ValueError naming the image when there are no
    captions or the vocabulary is empty. An image whose captions mention nothing gets empty counts (no error).
    """
    if not captions:
        raise ValueError(f"image {record.image_id} ({record.label}): no captions to extract concepts from")
    if vocabulary is not None and not [v for v in vocabulary if v and v.strip()]:
        raise ValueError(f"image {record.image_id} ({record.label}): empty concept vocabulary for "
                         f"{record.super_category!r}; pass phrases, or vocabulary_fn=None to split captions")
    counts: Counter = Counter()
    first: dict[str, int] = {}
    for caption in captions:
        for k in (extract_concepts(caption, vocabulary) if vocabulary is not None else split_phrases(caption)):
            counts[k] += 1
            first.setdefault(k, len(first))
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], first[kv[0]])))
    return ConceptResult(record, list(prompts or []), list(captions), ordered)


# --------------------------------------------------------------------------------------------- extraction
def choose_images(bench, per_class: int = 1, seed: int = 0) -> list[ImageRecord]:
    """``per_class`` few-shot training images of every seen class (§4.2: "one image per sub-category")."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    by_label = group_by_label(bench.train)
    out = []
    for label in bench.seen_labels():
        pool = sorted(by_label.get(label, []), key=lambda r: r.image_id)
        if not pool:
            raise ValueError(f"seen class {label!r} has no few-shot training image in the benchmark")
        out += random.Random(f"{seed}/concepts/{label}").sample(pool, min(per_class, len(pool)))
    return out


def extract_concepts_for(model, processor, bench, records: Sequence[ImageRecord] | None = None, *,
                         vocabulary_fn: Callable[[str], Sequence[str]] | None = micro_vocabulary,
                         prompts_fn: Callable[[str], Sequence[str]] = concept_prompts, per_class: int = 1,
                         samples_per_prompt: int = 2, temperature: float = 1.0, seed: int = 0,
                         max_new_tokens: int = 48, batch_size: int = 32, progress: bool = True
                         ) -> list[ConceptResult]:
    """Caption each image with every prompt ``samples_per_prompt`` times and pool its concepts (§4.2 (1)).

    ``records=None`` takes :func:`choose_images` (``per_class`` per seen class). ``vocabulary_fn(super_category)``
    gives the concept phrases (None: :func:`split_phrases`). Sampling uses ``temperature`` and one ``seed`` for
    the whole call. Returns unfiltered results; pass them to :func:`filter_concepts`. An unreadable image raises
    FileNotFoundError naming its path (before any generation).
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    records = list(choose_images(bench, per_class, seed) if records is None else records)
    images = [bench.image(r) for r in records]
    prompts = [list(prompts_fn(r.super_category)) for r in records]
    vocabs = [list(vocabulary_fn(r.super_category)) if vocabulary_fn else None for r in records]
    for r, p, v in zip(records, prompts, vocabs):
        if not p:
            raise ValueError(f"image {r.image_id} ({r.label}): no captioning prompts for {r.super_category!r}")
        if v is not None and not v:
            raise ValueError(f"image {r.image_id} ({r.label}): vocabulary_fn gave no concept phrases for "
                             f"{r.super_category!r}")
    flat_images = [img for img, ps in zip(images, prompts) for _ in ps]
    flat_prompts = [p for ps in prompts for p in ps]
    texts = generate(model, processor, flat_images, flat_prompts, max_new_tokens=max_new_tokens,
                     do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                     num_return_sequences=samples_per_prompt, seed=seed, batch_size=batch_size, progress=progress)
    out, i = [], 0
    for r, ps, v in zip(records, prompts, vocabs):
        n = len(ps) * samples_per_prompt
        used = [p for p in ps for _ in range(samples_per_prompt)]
        out.append(pool_concepts(r, texts[i:i + n], v, used))
        i += n
    return out


# ---------------------------------------------------------------------------------------------- filtering
def _class_rates(results: Sequence[ConceptResult]) -> dict[str, dict[str, float]]:
    """p(k|c): per class, the fraction of its captions (all its images pooled) mentioning each concept."""
    counts: dict[str, Counter] = {}
    totals: Counter = Counter()
    for r in results:
        counts.setdefault(r.label, Counter()).update(r.counts)
        totals[r.label] += len(r.captions)
    return {c: {k: n / totals[c] for k, n in cnt.items()} if totals[c] else {} for c, cnt in counts.items()}


def filter_concepts(results: Sequence[ConceptResult], similarity: Similarity | None = None, *,
                    beta: float | None = None, min_support: float | None = None, neighbours: int | None = None,
                    eps: float = 1e-3) -> list[ConceptResult]:
    """The information-bottleneck-style filter of §4.2 (1); see the module docstring for the exact criterion.

    N(c) = the ``neighbours`` classes most similar to c by ``similarity`` among the classes present in
    ``results`` (they are the only ones with captions: the seen classes' few-shot images); ``similarity=None``
    uses every other class of the same super-category present. With no neighbour, p(k|N(c)) = 0.
    ``beta``, ``min_support`` and ``neighbours`` left out are the current profile's (``profile.concepts``:
    the one place they are set). Returns new results (``filtered=True``); the inputs are not modified.
    """
    if None in (beta, min_support, neighbours):
        from .profiles import get_profile

        cfg = get_profile().concepts
        beta = cfg["beta"] if beta is None else beta
        min_support = cfg["min_support"] if min_support is None else min_support
        neighbours = cfg["neighbours"] if neighbours is None else neighbours
    if neighbours < 0:
        raise ValueError(f"neighbours must be >= 0, got {neighbours}")
    rates = _class_rates(results)
    super_of = {r.label: r.record.super_category for r in results}
    out = []
    for r in results:
        c = r.label
        if similarity is not None:
            nbrs = similarity.ranked(c, among=rates)[:neighbours]
        else:
            nbrs = sorted(o for o in rates if o != c and super_of[o] == r.record.super_category)[:neighbours]
        scores, kept, dropped = {}, [], []
        for k in r.counts:
            p_c = rates[c].get(k, 0.0)
            p_n = sum(rates[o].get(k, 0.0) for o in nbrs) / len(nbrs) if nbrs else 0.0
            s = p_c * math.log((p_c + eps) / (p_n + eps))
            scores[k] = {"p_c": round(p_c, 6), "p_n": round(p_n, 6), "score": round(s, 6)}
            reason = "unsupported" if p_c < min_support else "not_discriminative" if s < beta else None
            (dropped.append(dict(concept=k, reason=reason, **scores[k])) if reason else kept.append(k))
        kept.sort(key=lambda k: (-scores[k]["score"], -r.counts[k], k))
        out.append(replace(r, kept=kept, dropped=dropped, scores=scores, neighbours=list(nbrs), filtered=True))
    return out


def concepts_by_image(results: Sequence[ConceptResult]) -> dict[str, list[str]]:
    """image_id -> kept concepts (the input of :func:`finer1_lib.cot.build_cot_dataset`)."""
    not_filtered = [r.image_id for r in results if not r.filtered]
    if not_filtered:
        raise ValueError(f"{len(not_filtered)} results were never filtered (e.g. {not_filtered[0]}); "
                         f"run filter_concepts first")
    return {r.image_id: list(r.kept) for r in results}


def concept_table(results: Sequence[ConceptResult]) -> pd.DataFrame:
    """One row per image: captions, concepts found, kept (in order) and dropped per reason."""
    rows = []
    for r in results:
        why = Counter(d["reason"] for d in r.dropped)
        rows.append({"image_id": r.image_id, "label": r.label, "captions": len(r.captions),
                     "concepts found": len(r.counts), "kept": len(r.kept),
                     "dropped unsupported": why["unsupported"], "dropped not discriminative": why["not_discriminative"],
                     "kept concepts": ", ".join(r.kept) if r.kept else ("(no concept found)" if not r.counts
                                                                       else "(all dropped)")})
    return pd.DataFrame(rows)


def concept_quality(results: Sequence[ConceptResult], true_phrases: Callable[[str], Sequence[str]]) -> pd.DataFrame:
    """Micro world only (the truth is known): per image, how many concepts were found / kept and how many of
    them are true attributes of the label (``true_phrases(label)``), before and after the filter."""
    rows = []
    for r in results:
        truth = {t.lower() for t in true_phrases(r.label)}
        found, kept = list(r.counts), list(r.kept)
        rows.append({"image_id": r.image_id, "super_category": r.super_category, "found": len(found),
                     "found true": sum(c.lower() in truth for c in found), "kept": len(kept),
                     "kept true": sum(c.lower() in truth for c in kept)})
    return pd.DataFrame(rows)


def beta_sweep(results: Sequence[ConceptResult], similarity, betas: Sequence[float],
               true_phrases: Callable[[str], Sequence[str]], **filter_kwargs) -> pd.DataFrame:
    """The bottleneck trade-off: mean kept concepts per image and their precision for each ``beta``."""
    rows = []
    for beta in betas:
        q = concept_quality(filter_concepts(results, similarity, beta=beta, **filter_kwargs), true_phrases)
        rows.append({"beta": beta, "kept per image": q["kept"].mean(),
                     "precision of kept": q["kept true"].sum() / max(1, q["kept"].sum()),
                     "images with no concept": int((q["kept"] == 0).sum())})
    return pd.DataFrame(rows).set_index("beta")


# ------------------------------------------------------------------------------------------------- files
def save_concepts(path: str | Path, results: Sequence[ConceptResult]) -> Path:
    """Write the results as JSONL, atomically (one image per line)."""
    return write_jsonl(path, [r.to_dict() for r in results])


def load_concepts(path: str | Path) -> list[ConceptResult]:
    """Read back :func:`save_concepts`; a bad line raises ValueError naming file and line."""
    out = []
    for lineno, d in enumerate(read_jsonl(path), 1):
        try:
            out.append(ConceptResult.from_dict(d))
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: record {lineno}: {err}") from None
    return out
