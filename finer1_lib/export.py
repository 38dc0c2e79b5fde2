"""Export a run's data to the official training stack, and read the official files back.

A user who outgrows this repository moves to the official code (PKU-ICST-MIPL/FineR1_ICLR2026: LLaMA-Factory
for SFT, EasyR1/verl with FSDP for TAPO, ``eval/evaluation.py``). ``python -m finer1_lib export`` writes:

* ``official-rl/train.jsonl``: the benchmark's triplets as the official stage-2 records, one per triplet:
  ``images`` [anchor], ``problem`` ("<image>" + question), ``answer`` (the class), ``image_noisy`` [positive]
  and ``image_aug`` [negative]. The official trainer renders ``problem`` with its FORMAT_PROMPT
  ``cls_thinking.jinja``, which appends ``prompts.TAPO_SUFFIX``: the prompt the model sees is exactly
  ``prompts.tapo_prompt(question)``. Parquet needs pyarrow, which this project does not install: JSONL with
  the same fields, which the official loader (``datasets.load_dataset("json")``) reads as well.
* ``sharegpt/fine_r1_cot_sft.json`` + ``dataset_info.json``: the CoT SFT set in LLaMA-Factory's sharegpt
  format (system prompt = the official ``prompts.SFT_SYSTEM_PROMPT``), with its dataset entry.
* ``eval-jsonl/<super>_<seen|unseen>.jsonl``: the evaluation sets as the official JSONL (``image_path``,
  ``question``, ``options``, ``ground_truth``); the file name carries super-category and split.

Image paths are absolute: the official loaders open ``image_noisy`` / ``image_aug`` as given (its
``image_dir`` only prefixes ``images``), so the files work from any folder, on this machine. Readers:
:func:`read_official_rl` (here), ``cot.read_sharegpt`` and ``protocol.read_eval_jsonl`` read ours and the
official releases alike.
"""
from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

from .io import DataError, atomic_write_text, iter_jsonl_numbered, write_json, write_jsonl
from .prompts import SFT_SYSTEM_PROMPT, TAPO_SUFFIX
from .protocol import EVAL_KEYS, question_templates

__all__ = ["FORMATS", "RL_KEYS", "rl_records", "read_official_rl", "export_run"]

FORMATS = ("official-rl", "sharegpt", "eval-jsonl")
#: The fields of an official stage-2 (TAPO) record; image_noisy = positive, image_aug = negative.
RL_KEYS = ("images", "problem", "answer", "image_noisy", "image_aug")
SHAREGPT_NAME = "fine_r1_cot_sft"


def rl_records(bench, seed: int = 0) -> list[dict]:
    """The official stage-2 record of each triplet of ``bench`` (question drawn per anchor with ``seed``)."""
    rows = []
    for t in bench.triplets:
        rng = random.Random(zlib.crc32(f"export-question/{seed}/{t.anchor.image_id}".encode()))
        question = rng.choice(question_templates(t.anchor.super_category))
        rows.append({"images": [str(bench.path(t.anchor).resolve())], "problem": "<image>" + question,
                     "answer": t.anchor.label, "image_noisy": [str(bench.path(t.positive).resolve())],
                     "image_aug": [str(bench.path(t.negative).resolve())]})
    return rows


def _image(where: str, key: str, value, root: Path | None, check: bool) -> str:
    """The one image path of a record field: a list of one path (ours, the official JSON) or of one
    ``{"path": ...}`` (a datasets Image column); joined to ``root`` when relative."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: '{key}' must be a list of one image path, got {str(value)[:80]!r}")
    path = Path(value) if root is None or Path(value).is_absolute() else Path(root) / value
    if check and not path.is_file():
        raise DataError(f"{where}: '{key}' image not found: {path} (pass image_root= the folder the paths are "
                        f"relative to, or check_images=False)")
    return str(path)


def read_official_rl(path, image_root=None, *, check_images: bool = True) -> list[dict]:
    """Read official stage-2 records (ours from :func:`export_run`, or the official data as JSONL).

    Returns per record: ``question`` (``problem`` without ``<image>`` and without a rendered TAPO suffix),
    ``answer``, and the paths ``anchor`` (images), ``positive`` (image_noisy), ``negative`` (image_aug).
    A missing field, an image list that is not one path, or a missing image (with ``check_images``) raises
    DataError naming the file and line. Parquet (the official release): convert it first, e.g.
    ``pandas.read_parquet(p).to_json(out, orient="records", lines=True)`` (needs pyarrow)."""
    path = Path(path)
    if path.suffix == ".parquet":
        raise DataError(f"{path}: parquet needs pyarrow, which this project does not install; convert it to "
                        f"JSONL (pandas.read_parquet(...).to_json(..., orient='records', lines=True))")
    out = []
    for lineno, row in iter_jsonl_numbered(path):
        where = f"{path}:{lineno}"
        missing = [k for k in RL_KEYS if k not in row]
        if missing:
            raise DataError(f"{where}: official RL record is missing {missing} (has {sorted(row)})")
        if not isinstance(row["problem"], str) or not isinstance(row["answer"], str) or not row["answer"]:
            raise DataError(f"{where}: 'problem' and 'answer' must be strings (answer non-empty)")
        question = row["problem"].replace("<image>", "").strip()
        question = question.removesuffix(TAPO_SUFFIX).strip()
        out.append({"question": question, "answer": row["answer"],
                    **{name: _image(where, key, row[key], image_root, check_images)
                       for name, key in (("anchor", "images"), ("positive", "image_noisy"),
                                         ("negative", "image_aug"))}})
    if not out:
        raise DataError(f"{path}: no official RL records in this file")
    return out


def _sharegpt(rows: list[dict]) -> list[dict]:
    """Our CoT set (``cot.read_sharegpt`` rows, image paths resolved) as official sharegpt records."""
    return [{"messages": [{"role": "system", "content": SFT_SYSTEM_PROMPT},
                          {"role": "user", "content": "<image>" + r["prompt"]},
                          {"role": "assistant", "content": r["response"]}],
             "images": [str(Path(r["image_path"]).resolve())]} for r in rows]


#: LLaMA-Factory's dataset entry for the sharegpt file (data/dataset_info.json format).
DATASET_INFO = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}}


def export_run(profile=None, runs=None, seed: int = 0, formats=FORMATS, out=None) -> dict[str, list[Path]]:
    """Write the run's benchmark triplets / CoT set / eval sets in the official formats under ``out``
    (``<runs>/export-seed{seed}`` by default), one folder per format, each file written atomically and read
    back before returning. ``runs``: the run folder (default the profile's). Returns format -> files."""
    from .benchmark import load_benchmark
    from .cot import read_sharegpt
    from .profiles import current_run_dir, get_profile
    from .protocol import read_eval_jsonl

    profile = get_profile(profile)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format {unknown}; choose from {', '.join(FORMATS)}")
    runs = Path(runs) if runs else current_run_dir(profile)
    out = Path(out) if out else runs / f"export-seed{seed}"
    bench = load_benchmark(runs / f"benchmark-seed{seed}")
    written: dict[str, list[Path]] = {}
    if "official-rl" in formats:
        path = write_jsonl(out / "official-rl" / "train.jsonl", rl_records(bench, seed))
        read_official_rl(path)
        written["official-rl"] = [path]
    if "sharegpt" in formats:
        cot = runs / f"cot-seed{seed}" / "cot_sft.json"
        if not cot.is_file():
            raise FileNotFoundError(f"no CoT SFT set at {cot}: build it with `python -m finer1_lib cot --profile "
                                    f"{profile.name} --seed {seed}`")
        rows = _sharegpt(read_sharegpt(cot, image_root=bench.root))
        path = atomic_write_text(out / "sharegpt" / f"{SHAREGPT_NAME}.json",
                                 json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        info = write_json(out / "sharegpt" / "dataset_info.json", {SHAREGPT_NAME: {"file_name": path.name,
                                                                                   **DATASET_INFO}})
        read_sharegpt(path)
        written["sharegpt"] = [path, info]
    if "eval-jsonl" in formats:
        written["eval-jsonl"] = []
        for sc in sorted(bench.split):
            for which in ("seen", "unseen"):
                rows = [{**{k: r[k] for k in EVAL_KEYS}, "image_path": str(bench.path(r["image_path"]).resolve())}
                        for r in bench.eval(which, sc)]
                if rows:
                    path = write_jsonl(out / "eval-jsonl" / f"{sc}_{which}.jsonl", rows)
                    read_eval_jsonl(path)
                    written["eval-jsonl"].append(path)
    return written
