"""CoT construction (paper §4.2 (2)): a teacher writes Table 5 rationales; quality filters keep the good ones.

A teacher gets the image, its label, its kept visual concepts (§4.2 (1), ``concepts.py``) and a question, and
returns the Table 5 form ``<analysis>..</analysis><options>..</options><comparison>..</comparison>
<prediction>..</prediction>``. Two teachers share one protocol (:class:`Teacher`):

* :class:`HFTeacher` - any Hugging Face MLLM prompted with Table 5 (the paper used Qwen2.5-VL-32B);
* :class:`KnowledgeBaseTeacher` - a STAND-IN for that large teacher on the micro world: no model, it reasons
  from the concepts with the world's field guide (``rationale.write_rationale``) and makes seeded mistakes so
  that the filters have something to reject.

:func:`build_cot_dataset` applies the paper's reliability strategies: resample until the prediction matches the
ground truth exactly (bounded retries), drop mixed-language rationales, keep only rationales whose candidates
include the ground truth (and at most four of them, as Table 5 asks). The result is written in the
LLaMA-Factory sharegpt layout of the official ``Fine-R1-Stage1-data.json`` (:func:`write_sharegpt`), and
:func:`read_sharegpt` reads both ours and the official release.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Protocol, Sequence, runtime_checkable

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from .inference import generate
from .io import DataError, atomic_write_text, iter_jsonl_numbered, read_text, write_jsonl
from .prompts import SFT_SYSTEM_PROMPT, cot_teacher_prompt, extract_tag, format_answer, parse_structured_cot
from .protocol import question_templates
from .rationale import similar_species, write_rationale
from .records import ImageRecord
from .world import SCHEMAS, World

__all__ = ["Teacher", "HFTeacher", "KnowledgeBaseTeacher", "CotSample", "CotStats", "REJECT_REASONS",
           "is_english", "name_keys", "names_match", "check_teacher_output", "cot_question", "build_cot_dataset", "to_sharegpt",
           "write_sharegpt", "read_sharegpt", "direct_answer_samples"]

#: Rejection reasons, in the order they are checked (an attempt gets the first that applies).
REJECT_REASONS = ("unparseable", "not_english", "wrong_prediction", "gt_missing", "too_many_candidates")
MAX_CANDIDATES = 4  # Table 5: "at most four candidate subcategories"


@runtime_checkable
class Teacher(Protocol):
    """Writes one raw rationale (Table 5 tags) for an image of ``record.label``; ``seed`` varies per attempt.

    A teacher may also define ``write_many(records, images, concepts, questions, seeds) -> list[str]``
    (one output per item), which :func:`build_cot_dataset` then uses to batch each round of attempts.
    """

    def write(self, record: ImageRecord, image: Image.Image, concepts: Sequence[str], question: str,
              seed: int = 0) -> str: ...


# ------------------------------------------------------------------------------------------------ teachers
class HFTeacher:
    """A Hugging Face MLLM prompted with the Table 5 template (``prompts.cot_teacher_prompt``) and the image.

    The paper used Qwen2.5-VL-32B; any model :func:`finer1_lib.model.load_model` loads works. Sampling at
    ``temperature`` (greedy when 0), so retries give new rationales.
    """

    def __init__(self, model, processor, max_new_tokens: int = 512, temperature: float = 0.7,
                 batch_size: int = 8, system: str | None = None):
        self.model, self.processor = model, processor
        self.max_new_tokens, self.temperature, self.batch_size, self.system = (max_new_tokens, temperature,
                                                                               batch_size, system)

    def write(self, record, image, concepts, question, seed: int = 0) -> str:
        return self.write_many([record], [image], [concepts], [question], [seed])[0]

    def write_many(self, records, images, concepts, questions, seeds) -> list[str]:
        """One batched generation for all items (seeded with the first item's seed)."""
        prompts = [cot_teacher_prompt(r.label, c, q) for r, c, q in zip(records, concepts, questions, strict=True)]
        return generate(self.model, self.processor, list(images), prompts, system=self.system,
                        max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                        temperature=self.temperature if self.temperature > 0 else 1.0,
                        seed=seeds[0] if seeds else None, batch_size=self.batch_size, progress=False)


class KnowledgeBaseTeacher:
    """A STAND-IN for the paper's large teacher MLLM (Qwen2.5-VL-32B), for the micro world. Not a model.

    It reads the kept concepts as observed attribute values (via the schema's phrases; the first concept per
    attribute wins, concepts being ordered by score), lists as candidates the species most similar to what is
    observed, seen or unseen alike (lesson 6 of micro-world-findings.md), shuffled, and writes the rationale with
    :func:`finer1_lib.rationale.write_rationale` (the same language as pretraining's reasoning), predicting the
    best-matching candidate. Like a teacher told the label, it includes the ground truth among the candidates and
    breaks ties in its favour; candidates it cannot tell apart from the prediction on the observed attributes
    are left out. It does not look at the image: wrong concepts lead to a wrong prediction (then rejected).

    Seeded mistakes, drawn per (image, attempt seed), make the filters of :func:`build_cot_dataset` matter:
    ``p_wrong``: misreads one attribute toward a similar species and predicts it (-> wrong_prediction);
    ``p_drop_gt``: omits the ground truth from the candidates yet still predicts the label (-> gt_missing);
    ``p_extra_candidates``: lists 5 or 6 candidates (-> too_many_candidates).
    """

    def __init__(self, world: World, seed: int = 0, p_wrong: float = 0.2, p_drop_gt: float = 0.1,
                 p_extra_candidates: float = 0.1):
        for name, p in (("p_wrong", p_wrong), ("p_drop_gt", p_drop_gt), ("p_extra_candidates", p_extra_candidates)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.world, self.seed = world, seed
        self.p_wrong, self.p_drop_gt, self.p_extra_candidates = p_wrong, p_drop_gt, p_extra_candidates

    def observe(self, super_category: str, concepts: Sequence[str]) -> dict[str, str]:
        """dim -> value read from the concept phrases (unknown phrases ignored; first value per dim wins)."""
        phrase_to = {d.say(v).lower(): (d.name, v) for d in SCHEMAS[super_category].dims for v in d.values}
        observed: dict[str, str] = {}
        for c in concepts:
            hit = phrase_to.get(c.strip().lower())
            if hit and hit[0] not in observed:
                observed[hit[0]] = hit[1]
        return observed

    def write(self, record, image, concepts, question, seed: int = 0) -> str:
        rng = random.Random(f"kb-teacher/{self.seed}/{record.image_id}/{seed}")
        sc, truth = record.super_category, self.world.get(record.label)
        wrong, drop = rng.random() < self.p_wrong, rng.random() < self.p_drop_gt
        k = rng.randint(5, 6) if rng.random() < self.p_extra_candidates else rng.randint(2, 4)
        observed = self.observe(sc, concepts)
        if not observed:
            return f"I cannot tell which {sc} this is from these features."  # untagged: rejected as unparseable
        dims = [d.name for d in SCHEMAS[sc].dims]
        if wrong:  # misread one attribute toward the most similar other species; predict the best non-gt match
            other = next(s for s in similar_species(self.world, observed, sc, k=len(self.world.species_of(sc)),
                                                    rng=rng) if s.name != truth.name)
            d = rng.choice([d for d in dims if other.attributes[d] != truth.attributes[d]])
            observed = {n: (other.attributes[d] if n == d else observed[n]) for n in dims if n in observed or n == d}
        ranked = similar_species(self.world, observed, sc, k=len(self.world.species_of(sc)), rng=rng)
        key = lambda s: tuple(s.attributes[n] for n in observed)  # noqa: E731 (what the observed dims show)
        score = lambda s: sum(s.attributes[n] == v for n, v in observed.items())  # noqa: E731
        best = max(score(s) for s in ranked if not wrong or s.name != truth.name)
        tied = [s for s in ranked if score(s) == best and (not wrong or s.name != truth.name)]
        prediction = truth if not wrong and truth in tied else tied[0]
        candidates = [prediction] + [s for s in ranked if key(s) != key(prediction)][: k - 1]
        if truth not in candidates and not drop:  # told the label, the teacher always considers it
            candidates = (candidates[:-1] if len(candidates) > 1 else candidates) + [truth]
        if drop:
            fill = [s for s in ranked if s not in candidates and s.name != truth.name and key(s) != key(prediction)]
            candidates = [s for s in candidates if s.name != truth.name] + fill[:1]
            prediction = truth  # a teacher told the label still predicts it, outside its own options
        candidates = rng.sample(candidates, len(candidates))
        return extract_tag(write_rationale(sc, observed, candidates, prediction.name, rng), "think")


# ------------------------------------------------------------------------------------------------- filters
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


def is_english(text: str | None, min_ascii: float = 0.9) -> bool:
    """Heuristic language check (§4.2: "CoT with mixed language"): no CJK/kana/hangul/full-width characters
    and at least ``min_ascii`` of the letters are ASCII a-z/A-Z. No letters at all -> False."""
    if not text or _CJK.search(text):
        return False
    letters = [ch for ch in text if ch.isalpha()]
    return bool(letters) and sum(ch.isascii() for ch in letters) / len(letters) >= min_ascii


def _norm(name: str | None) -> str:
    return re.sub(r"\s+", " ", (name or "").replace("_", " ")).strip().strip(".").strip().casefold()


_PARENS = re.compile(r"\s*\([^()]*\)")


def name_keys(name: str | None) -> set[str]:
    """The normalised forms a candidate or label name is matched by: the whole name, the name without its
    parenthesised extras ("Laysan Albatross (Phoebastria immutabilis)" -> "laysan albatross") and the name with
    the brackets dropped but their content kept ("Audi S4 Sedan (2012)" -> "audi s4 sedan 2012"). Case, spacing,
    underscores and a final period aside (as for the prediction)."""
    name = name or ""
    keys = {_norm(name), _norm(_PARENS.sub("", name)), _norm(name.replace("(", " ").replace(")", " "))}
    return {k for k in keys if k}


def names_match(a: str | None, b: str | None) -> bool:
    """True when two names share a form of :func:`name_keys` (parenthesised extras ignored on either side)."""
    return bool(name_keys(a) & name_keys(b))


def check_teacher_output(output: str, label: str, max_candidates: int = MAX_CANDIDATES) -> tuple[str | None, dict]:
    """(reason or None, parsed CoT) for one teacher output; reasons are checked in :data:`REJECT_REASONS` order.

    unparseable: any of analysis / options / comparison / prediction missing (tags or the official headings);
    not_english: :func:`is_english` fails; wrong_prediction: the prediction is not exactly the label (case,
    spacing, underscores and a final period aside); gt_missing: the label is not among the candidates;
    too_many_candidates: more than ``max_candidates`` candidates. The prediction and the candidates match the label
    with parenthesised extras ignored (a Latin name or a year: "Laysan Albatross (Phoebastria immutabilis)",
    "Audi S4 Sedan (2012)", see :func:`names_match`).
    """
    cot = parse_structured_cot(output or "")
    if not (cot["analysis"] and cot["options"] and cot["comparison"] and cot["prediction"]):
        return "unparseable", cot
    if not is_english(output):
        return "not_english", cot
    if not names_match(cot["prediction"], label):
        return "wrong_prediction", cot
    if not any(names_match(label, o) for o in cot["options"]):
        return "gt_missing", cot
    if len(cot["options"]) > max_candidates:
        return "too_many_candidates", cot
    return None, cot


# ------------------------------------------------------------------------------------------------ building
@dataclass
class CotSample:
    """One accepted CoT: the SFT example (system, question, image, response) and where it came from."""

    image_id: str
    image_path: str              # as in the benchmark record (relative to the benchmark root for the micro world)
    label: str
    super_category: str
    question: str                # the user turn after "<image>" (official layout: just the question)
    concepts: list[str]
    cot: dict                    # parse_structured_cot of the teacher output
    response: str                # "<think><analysis>..</prediction></think><answer>LABEL</answer>"
    teacher_output: str = ""
    attempts: int = 1
    system: str = SFT_SYSTEM_PROMPT


@dataclass
class CotStats:
    """Counts of :func:`build_cot_dataset`; ``log`` has one entry per attempt (image_id, attempt, outcome, output)."""

    images: int = 0
    kept: int = 0
    attempts: int = 0
    rejected: dict = field(default_factory=lambda: {r: 0 for r in REJECT_REASONS})
    failed: list = field(default_factory=list)       # image ids with no accepted CoT after max_retries
    no_concepts: list = field(default_factory=list)  # image ids skipped for lack of concepts
    log: list = field(default_factory=list)

    @property
    def retries(self) -> int:
        """Attempts beyond the first per image."""
        return self.attempts - (self.images - len(self.no_concepts))

    def to_dict(self) -> dict:
        return {"images": self.images, "kept": self.kept, "attempts": self.attempts, "retries": self.retries,
                "rejected": dict(self.rejected), "failed": list(self.failed), "no_concepts": list(self.no_concepts)}

    def table(self) -> pd.DataFrame:
        rows = [("images", self.images), ("kept", self.kept), ("attempts", self.attempts), ("retries", self.retries)]
        rows += [(f"rejected: {r}", n) for r, n in self.rejected.items()]
        rows += [("failed after max_retries", len(self.failed)), ("skipped: no concepts", len(self.no_concepts))]
        return pd.DataFrame(rows, columns=["statistic", "count"]).set_index("statistic")


def cot_question(record: ImageRecord, seed: int = 0) -> str:
    """The question of an image's CoT sample: one of the 10 official templates of its super-category, seeded."""
    return random.Random(f"{seed}/cot-question/{record.image_id}").choice(question_templates(record.super_category))


def _attempt_seed(seed: int, image_id: str, attempt: int) -> int:
    return random.Random(f"{seed}/cot-attempt/{image_id}/{attempt}").randrange(2**31)


def _find_records(bench, ids: Sequence[str]) -> list[ImageRecord]:
    index = {r.image_id: r for recs in bench.records.values() for r in recs}
    unknown = [i for i in ids if i not in index]
    if unknown:
        raise ValueError(f"{len(unknown)} image ids are not in the benchmark at {bench.root} (e.g. {unknown[0]!r})")
    return [index[i] for i in ids]


def build_cot_dataset(teacher: Teacher, bench, concepts_by_image: Mapping[str, Sequence[str]], *,
                      max_retries: int = 5, seed: int = 0, skip_empty: bool = False,
                      progress: bool = True) -> tuple[list[CotSample], CotStats]:
    """The open-world CoT SFT set of §4.2 (2): one accepted rationale per image, or none.

    ``concepts_by_image``: image_id -> kept concepts (:func:`finer1_lib.concepts.concepts_by_image`). Each image
    gets a seeded question (:func:`cot_question`); the teacher is asked up to ``1 + max_retries`` times, with a
    new attempt seed each time, until :func:`check_teacher_output` accepts the output. Accepted outputs are
    rewritten canonically as Table 5 tags inside ``<think>``, followed by ``<answer>LABEL</answer>``.
    An image without concepts raises ValueError naming it (``skip_empty=True``: skipped and counted instead);
    an unreadable image raises FileNotFoundError naming its path.
    """
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    records = _find_records(bench, list(concepts_by_image))
    stats = CotStats(images=len(records))
    todo = []
    for r in records:
        concepts = [c for c in concepts_by_image[r.image_id] if c and c.strip()]
        if not concepts:
            if not skip_empty:
                raise ValueError(f"image {r.image_id} ({r.label}) has no concepts: the teacher prompt needs at least "
                                 f"one (lower beta/min_support of filter_concepts, or pass skip_empty=True)")
            stats.no_concepts.append(r.image_id)
            continue
        todo.append((r, bench.image(r), concepts, cot_question(r, seed)))
    accepted: dict[str, CotSample] = {}
    bar = tqdm(total=len(todo), desc="CoT", disable=not progress)
    for attempt in range(max_retries + 1):
        pending = [t for t in todo if t[0].image_id not in accepted]
        if not pending:
            break
        seeds = [_attempt_seed(seed, t[0].image_id, attempt) for t in pending]
        if hasattr(teacher, "write_many"):
            outputs = teacher.write_many(*map(list, zip(*pending)), seeds)
        else:
            outputs = [teacher.write(r, img, c, q, seed=s) for (r, img, c, q), s in zip(pending, seeds)]
        for (r, _, concepts, question), output in zip(pending, outputs, strict=True):
            stats.attempts += 1
            reason, cot = check_teacher_output(output, r.label)
            stats.log.append({"image_id": r.image_id, "label": r.label, "attempt": attempt,
                              "outcome": reason or "kept", "output": output})
            if reason:
                stats.rejected[reason] += 1
                continue
            think = (f"<analysis>{cot['analysis']}</analysis><options>{', '.join(cot['options'])}</options>"
                     f"<comparison>{cot['comparison']}</comparison><prediction>{r.label}</prediction>")
            accepted[r.image_id] = CotSample(r.image_id, r.path, r.label, r.super_category, question, concepts, cot,
                                             format_answer(think, r.label), output, attempt + 1)
            bar.update(1)
    bar.close()
    stats.failed = [t[0].image_id for t in todo if t[0].image_id not in accepted]
    samples = [accepted[t[0].image_id] for t in todo if t[0].image_id in accepted]
    stats.kept = len(samples)
    return samples, stats


def direct_answer_samples(samples: Sequence[CotSample], system: str | None = None) -> list[CotSample]:
    """The direct-SFT baseline of paper Fig. 3a: same images and questions, response ``<answer>LABEL</answer>``
    only. ``system=None`` keeps each sample's system prompt (so that only the response differs)."""
    return [replace(s, response=f"<answer>{s.label}</answer>", system=s.system if system is None else system)
            for s in samples]


# ------------------------------------------------------------------------------------------------ sharegpt
def to_sharegpt(sample: CotSample) -> dict:
    """The LLaMA-Factory sharegpt record of the official Stage-1 data (+ a ``label`` key, ignored by it)."""
    return {"messages": [{"role": "system", "content": sample.system},
                         {"role": "user", "content": "<image>" + sample.question},
                         {"role": "assistant", "content": sample.response}],
            "images": [sample.image_path], "label": sample.label}


def write_sharegpt(path: str | Path, samples: Sequence[CotSample]) -> Path:
    """Write the SFT set atomically: a JSON array when ``path`` ends in ``.json`` (like the official file),
    else JSONL (one record per line). Both load in LLaMA-Factory with ``formatting: sharegpt``."""
    rows = [to_sharegpt(s) for s in samples]
    if Path(path).suffix.lower() == ".json":
        return atomic_write_text(path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    return write_jsonl(path, rows)


def _load_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, record) pairs from a JSON array or a JSONL file."""
    if not path.is_file():
        raise FileNotFoundError(f"sharegpt file not found: {path}")
    text = read_text(path, "sharegpt file")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return [(f"{path}: record {i}", row) for i, row in enumerate(rows)]
    return [(f"{path}: record {i} (line {lineno})", row) for i, (lineno, row) in enumerate(iter_jsonl_numbered(path))]


def _resolve_image(where: str, image_path: str, image_root, dataset_roots, check: bool) -> str:
    """The path of a record's image: joined to ``image_root`` when relative; when that file is missing and the path
    is under an official Stage-1 folder whose dataset is in ``dataset_roots``, the file of the standard copy."""
    from .datasets import stage1_dataset_path, super_category_from_path

    path = image_path
    if image_root is not None and not Path(image_path).is_absolute():
        path = str(Path(image_root) / image_path)
    if Path(path).is_file() or not (check or dataset_roots):
        return path
    sc = super_category_from_path(image_path)
    if dataset_roots and sc in dataset_roots:
        try:
            alt = stage1_dataset_path(image_path, dataset_roots[sc], sc)
        except (ValueError, FileNotFoundError):
            alt = None
        if alt is not None and alt.is_file():
            return str(alt)
    if not check:
        return path
    hint = ("pass image_root= the folder the image paths are relative to" if image_root is None
            and not Path(image_path).is_absolute() else "check image_root")
    if sc is not None:
        hint += f", or dataset_roots={{{sc!r}: <your {sc} dataset folder>}}"
    raise DataError(f"{where}: image not found: {path} ({hint}; or check_images=False to skip the check)")


def read_sharegpt(path: str | Path, image_root: str | Path | None = None, *, check_images: bool = True,
                  dataset_roots: Mapping[str, str | Path] | None = None) -> list[dict]:
    """Read a sharegpt SFT file: ours (:func:`write_sharegpt`) or the official ``Fine-R1-Stage1-data.json``.

    Returns one dict per record: ``system`` (None if absent), ``prompt`` (the user turn without ``<image>``),
    ``response``, ``image_path`` (joined to ``image_root`` when relative), ``label`` (None if absent),
    ``super_category`` (from the image path's dataset folder, standard or official, else None), the parsed CoT
    fields ``analysis``/``options``/``comparison``/``prediction`` (Table 5 tags or the official headed sections,
    see :func:`finer1_lib.prompts.parse_structured_cot`) and ``answer`` (the ``<answer>`` content).

    Images: with ``check_images`` (default) every image must exist, else a DataError names the record and the
    path. The official file's image folders (``bird_200/images_train/...``, ``stanford_cars_train/images/...``,
    ...) need not exist: give ``dataset_roots`` ({super-category: folder of a standard copy of the dataset,
    as passed to its reader}) and a missing image is taken from there (:func:`finer1_lib.datasets.
    stage1_dataset_path`).

    A file that is not UTF-8 or not valid JSON, a record without messages/images, with roles other than
    [system,] user, assistant, or whose ``<image>`` placeholders do not match its images raises DataError naming
    the file and record (0-based index).
    """
    from .datasets import super_category_from_path

    path = Path(path)
    out = []
    for where, row in _load_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        messages, images = row.get("messages"), row.get("images")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where}: missing or empty 'messages' list (keys: {sorted(row)})")
        if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
            raise DataError(f"{where}: missing or empty 'images' list of paths (keys: {sorted(row)})")
        roles = [m.get("role") for m in messages]
        if roles not in (["system", "user", "assistant"], ["user", "assistant"]):
            raise DataError(f"{where}: roles must be [system,] user, assistant; found {roles}")
        if not all(isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{where}: every message needs a string 'content'")
        turn = {m["role"]: m["content"] for m in messages}
        if turn["user"].count("<image>") != len(images):
            raise DataError(f"{where}: the user turn has {turn['user'].count('<image>')} <image> placeholders "
                            f"for {len(images)} images")
        paths = [_resolve_image(where, p, image_root, dataset_roots, check_images) for p in images]
        cot = parse_structured_cot(turn["assistant"])
        out.append({"system": turn.get("system"), "prompt": turn["user"].replace("<image>", "").strip(),
                    "response": turn["assistant"], "image_path": paths[0], "label": row.get("label"),
                    "super_category": super_category_from_path(images[0]),
                    **cot, "answer": extract_tag(turn["assistant"], "answer")})
    return out
