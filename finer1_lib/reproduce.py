"""Issue 19: every run behind the paper's comparisons, on the micro world, resumably, as committed results.

``python -m finer1_lib reproduce --profile cpu --seeds 0 1 2 [--out data/results/<name>] [--rl-passes 3]
[--set tapo.steps=N ...] [--dry-run]`` runs, per seed: zero-shot, + "step by step", direct SFT, CoT SFT,
CoT SFT + DAPO, + intra, + inter, TAPO (Fine-R1), the literal-Eq.-4 TAPO (``tapo-eq4``), the n1:n2 sweep of
Table 3a (5:5 is the TAPO run; 10:0 has exactly the settings of "+ inter", so it is that run), the CLIP-style
baseline, and H1-H3; then writes the report into ``--out``:

    results.md                  tables (mean ± std over seeds, ddof 1) beside the paper's numbers, a verdict
                                per finding (verdicts.py) with its test, the RL length and flatness check
    evaluation.csv              per-seed rows of every method (closed acc, open TI / SS; seen / unseen)
    evaluation-seed{S}.csv      the same, one file per seed
    per_image-seed{S}.csv       per test image and mode: each method's correctness and SS (the bootstrap's input)
    analysis-seed{S}.json       H1-H3 of the seed (pipeline.run_analysis)
    rl_logs/<run>.csv           the per-step TAPO logs, copied
    rl_flatness.csv, verdicts.json, config.json, timings/, reproduce.log
    runs/                       the run folders (models, checkpoints, caches; git-ignored by the ``runs/`` rule)

Nothing is forked: every piece is a ``pipeline`` function whose result is cached by its settings key, so a
rerun after an interruption redoes only what is missing (TAPO resumes from its last checkpoint), and a rerun
when everything is done only rebuilds the tables. ``--dry-run`` prints the runs, which are cached, and an
estimated time, and runs nothing.

RL length: ``rl_passes`` passes over the RL anchors (the benchmark's triplets, one per few-shot image):
``steps = ceil(rl_passes * n_anchors / prompts_per_step)``, through the ``epochs`` setting that
``pipeline.tapo_config`` already reads. An explicit ``--set tapo.steps=N`` (or ``tapo.epochs``) wins.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from . import pipeline, verdicts
from .config import digest, read_run_info
from .io import atomic_write_text, write_json
from .profiles import Profile, get_profile
from .records import REPO_ROOT

__all__ = ["ReproduceConfig", "ALL_METHODS", "RATIO_METHODS", "LABELS", "prepare_profile", "rl_steps",
           "n_anchors", "plan", "format_plan", "reproduce", "build_report", "canonical_methods", "committed",
           "COMMITTED"]

#: The rows, in the order of the report (pipeline method names).
RATIO_METHODS = {(10, 0): "tapo-tapo-10x0", (8, 2): "tapo-tapo-8x2", (5, 5): "Fine-R1 (TAPO)",
                 (2, 8): "tapo-tapo-2x8", (0, 10): "tapo-tapo-0x10"}
ALL_METHODS = ("zero-shot", "zero-shot + step by step", "direct SFT", "CoT SFT", "CoT SFT + DAPO", "tapo-intra",
               "tapo-inter", "Fine-R1 (TAPO)", "tapo-tapo-eq4", "tapo-tapo-10x0", "tapo-tapo-8x2",
               "tapo-tapo-2x8", "tapo-tapo-0x10", "CLIP-style dual encoder")
LABELS = {"tapo-intra": "CoT SFT + DAPO + intra", "tapo-inter": "CoT SFT + DAPO + inter",
          "tapo-tapo-eq4": "TAPO, literal Eq. 4 (tapo-eq4)",
          **{m: f"TAPO n1:n2 = {a}:{b}" for (a, b), m in RATIO_METHODS.items() if m.startswith("tapo-")}}
ANALYSIS_METHODS = ("zero-shot", "Fine-R1 (TAPO)")


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    """Settings of the report (not of the runs: those are the profile's, keyed by the pipeline)."""
    rl_passes: float | None = 3        # passes over the RL anchors; None: the profile's tapo.steps as is
    n_boot: int = 2000                 # bootstrap resamples over test images
    boot_seed: int = 0                 # the bootstrap's RNG seed (fixed: the report is deterministic)
    alpha: float = 0.05                # one-sided level of the seed-level tests
    h3_threshold: float = 5.0          # (v): points of cross-validated accuracy (issue 19)
    h1_margin: float = 5.0             # (iv): a probe change within ±5 points is "little"
    h2_margin: float = 0.05            # (iv): a Δ change within ±0.05 cosine is "little" (the paper's: 0.044)
    flat_tolerance: float = 0.05       # reward units over the last third of the RL steps


# ----------------------------------------------------------------------------------------------- settings


def prepare_profile(profile, rl_passes: float | None = 3) -> Profile:
    """The profile with RL length in passes over the anchors (``tapo.epochs``), unless ``rl_passes`` is None
    (then ``tapo.steps`` / ``tapo.epochs`` of the profile stay as they are)."""
    profile = get_profile(profile)
    if rl_passes is None:
        return profile
    if rl_passes <= 0:
        raise ValueError(f"rl_passes must be > 0, got {rl_passes}")
    return profile.replace(tapo={**profile.tapo, "epochs": rl_passes})


def n_anchors(profile, runs, seed: int) -> int | None:
    """The number of RL anchors (triplets) of a seed's benchmark: read from the benchmark when it is built,
    else counted from the micro world's split (one anchor per few-shot image); None for real data not built."""
    from .protocol import split_classes
    from .world import World

    profile = get_profile(profile)
    built = Path(runs) / f"benchmark-seed{seed}" / "triplets.jsonl"
    if built.is_file():
        return sum(1 for line in built.read_text().splitlines() if line.strip())
    if profile.world != "micro":
        return None
    world = World(profile.world_seed, profile.image_size, profile.n_genera)
    seen = sum(len(split_classes([s.name for s in world.species_of(sc)], profile.seen_frac, seed, salt=sc)["seen"])
               for sc in profile.super_categories)
    return seen * profile.shots


def rl_steps(profile, runs, seed: int, variant: str = "tapo") -> int | None:
    """TAPO steps of a seed's runs (``pipeline.tapo_config``: from ``epochs`` x anchors, or ``steps``)."""
    n = n_anchors(profile, runs, seed)
    try:
        return pipeline.tapo_config(profile, seed, variant, n_triplets=n).steps
    except ValueError:
        return None


def canonical_methods(profile, methods) -> dict[str, str]:
    """method -> the method whose run it is: a TAPO run with the same settings as an earlier one in ``methods``
    (n1:n2 = 10:0 of full TAPO is "+ inter"; 5:5 is TAPO itself) is not trained twice."""
    seen, out = {}, {}
    # an ablation preset or a named method is the run; an n1:n2 variant of it is the alias
    for m in sorted(methods, key=lambda m: m in RATIO_METHODS.values() and m.startswith("tapo-")):
        kind = pipeline._method_key(m)[0]
        if kind.startswith("tapo-"):
            variant, n1, n2 = pipeline._tapo_key(kind)
            ratio = {k: v for k, v in (("n1", n1), ("n2", n2)) if v is not None}
            sig = digest(pipeline.tapo_config(profile, 0, variant, n_triplets=1, **ratio).to_dict())
        else:
            sig = kind + str(pipeline._method_key(m)[1])
        out[m] = seen.setdefault(sig, m)
    return {m: out[m] for m in methods}


# ----------------------------------------------------------------------------------------------- the plan


class _WouldCompute(Exception):
    pass


@contextlib.contextmanager
def _no_compute():
    """Inside: the pipeline may read caches and compute keys, but any step that would build or load a model
    (benchmark, concepts, CoT teacher) raises _WouldCompute instead; used to probe what is cached."""
    def refuse(*args, **kwargs):
        raise _WouldCompute

    names = ("build_benchmark", "load_base_model", "_teacher")
    saved = {n: getattr(pipeline, n) for n in names}
    try:
        for n in names:
            setattr(pipeline, n, refuse)
        yield
    finally:
        for n, fn in saved.items():
            setattr(pipeline, n, fn)


def _probe(fn, *args, **kwargs):
    """fn(...) when it only reads caches, else None."""
    with _no_compute():
        try:
            return fn(*args, **kwargs)
        except (_WouldCompute, FileNotFoundError, ValueError):
            return None


def _run_done(folder: Path, key: str | None, done_file: str) -> bool:
    info = read_run_info(folder)
    return bool(key and info and info["key"] == key and (folder / done_file).is_file() and (folder / "model").is_dir())


def _tapo_state(profile, runs: Path, seed: int, method: str, data_ok: bool) -> tuple[str, int]:
    """("cached" | "resume" | "to do", steps logged so far) of a method's TAPO run."""
    variant, n1, n2 = pipeline._tapo_key(pipeline._method_key(method)[0])
    folder = runs / pipeline._tapo_folder(variant, seed, n1, n2)
    key = _probe(pipeline.tapo_key, profile, runs, seed, variant, n1, n2) if data_ok else None
    if _run_done(folder, key, "tapo.json"):
        return "cached", 0
    info = read_run_info(folder)
    log = folder / "tapo_log.csv"
    if key and info and info["key"] == key and log.is_file() and (folder / "checkpoint").is_dir():
        return "resume", max(0, len(log.read_text().splitlines()) - 1)
    return "to do", 0


def _analysis_key(profile, runs: Path, seed: int) -> str | None:
    keys = [_probe(pipeline.method_key, profile, runs, seed, m) for m in ANALYSIS_METHODS]
    bench = _probe(pipeline.get_benchmark, profile, runs, seed)
    if None in keys or bench is None:
        return None
    cfg = {**pipeline.ANALYSIS_DEFAULTS, **get_profile(profile).eval.get("analysis", {})}
    return digest({"models": keys, "bench": pipeline.bench_key(bench), "cfg": cfg, "methods": ANALYSIS_METHODS})


#: Rough seconds per piece on the 2-core reference machine, one core per job (notebooks 03-04 and the committed
#: 3-seed run); replaced by this output folder's own measurements (``timings/``) as soon as there are some.
#: "tapo_group": one rollout group of one step (x prompts_per_step = seconds per step), per variant.
DEFAULT_SECONDS = {
    "cpu": dict(benchmark=20, data=240, sft=150, eval=300, clip=150, analysis=240,
                tapo_group=dict(dapo=2.1, intra=5.0, inter=2.7, tapo=2.7, **{"tapo-eq4": 3.5})),
    "smoke": dict(benchmark=10, data=30, sft=25, eval=60, clip=10, analysis=40,
                  tapo_group=dict(dapo=2.0, intra=3.0, inter=2.5, tapo=2.5, **{"tapo-eq4": 3.0})),
}


def _measured(out: Path) -> dict:
    """Mean measured seconds per piece kind from ``timings/*.json`` (``tapo_group`` per variant)."""
    sums: dict = {}
    for f in sorted((out / "timings").glob("seed*.json")) if (out / "timings").is_dir() else ():
        try:
            t = json.loads(f.read_text())
        except ValueError:
            continue
        if not isinstance(t, dict) or t.get("status") == "cached":
            continue
        if t.get("kind") == "tapo" and t.get("train_seconds") and t.get("steps_trained"):
            per = t["train_seconds"] / t["steps_trained"] / max(1, t.get("prompts_per_step", 1))
            sums.setdefault(("tapo_group", t["variant"]), []).append(per)
            if t.get("eval_seconds"):
                sums.setdefault(("eval", None), []).append(t["eval_seconds"])
        elif t.get("kind") in ("benchmark", "data", "sft", "eval", "clip", "analysis"):
            sums.setdefault((t["kind"], None), []).append(t["seconds"])
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _seconds(profile, out: Path, kind: str, variant: str | None = None) -> float:
    base = DEFAULT_SECONDS.get(get_profile(profile).name, DEFAULT_SECONDS["cpu"])
    measured = _measured(out)
    if kind == "tapo_group":
        v = variant if variant in base["tapo_group"] else "tapo"
        return measured.get((kind, variant), base["tapo_group"][v])
    return measured.get((kind, None), base[kind])


def plan(profile, out, seeds=(0, 1, 2), runs=None, methods=ALL_METHODS, analysis: bool = True) -> list[dict]:
    """The pieces of a reproduction, in the order they run, each with ``status`` ("cached", "to do",
    "resume (k steps logged)") and ``seconds`` (estimated; 0 when cached). Reads caches only; runs nothing."""
    from .parallel import workers_for

    profile = get_profile(profile)
    out = Path(out)
    runs = Path(runs) if runs else out / "runs"
    canon = canonical_methods(profile, methods)
    pieces = []
    for seed in seeds:
        kinds = {pipeline._method_key(m)[0] for m in methods}
        bench_ok = (runs / f"benchmark-seed{seed}" / "benchmark.json").is_file()
        pieces.append(dict(seed=seed, piece="benchmark", kind="benchmark", phase=1,
                           status="cached" if bench_ok else "to do"))
        needs_data = any(k.startswith(("sft-", "tapo-")) for k in kinds)
        data_ok = bench_ok and _probe(pipeline.run_cot, profile, runs, seed, progress=False) is not None
        if needs_data:
            pieces.append(dict(seed=seed, piece="concepts + CoT data", kind="data", phase=1,
                               status="cached" if data_ok else "to do"))
        sft_needed = sorted({k[4:] for k in kinds if k.startswith("sft-")}
                            | ({"cot"} if any(k.startswith("tapo-") for k in kinds) else set()))
        for data in sft_needed:
            key = _probe(pipeline.sft_key, profile, runs, seed, data) if data_ok else None
            done = _run_done(runs / f"sft-{data}-seed{seed}", key, "sft.json")
            pieces.append(dict(seed=seed, piece=f"sft-{data}", kind="sft", phase=1,
                               status="cached" if done else "to do"))
        for m in methods:
            if canon[m] != m:
                pieces.append(dict(seed=seed, piece=m, kind="alias", phase=2, status=f"= {canon[m]} (same settings)"))
                continue
            kind = pipeline._method_key(m)[0]
            cache = _probe(pipeline._eval_cache, profile, runs, seed, m) if (bench_ok and (
                data_ok or not kind.startswith(("sft-", "tapo-")))) else None
            evaluated = bool(cache and cache.is_file() and _probe(pipeline._folder_holds, cache.parent, m, profile,
                                                                    runs, seed))
            row = dict(seed=seed, piece=m, kind="eval", phase=2, status="cached" if evaluated else "to do")
            if not evaluated and _archived(out, seed, m, cache):
                row["status"] = "archived"  # restored once the CoT data (the digest's input) is rebuilt
            if kind.startswith("tapo-"):
                variant = pipeline._tapo_key(kind)[0]
                state, logged = _tapo_state(profile, runs, seed, m, data_ok)
                ratio = {k: v for k, v in zip(("n1", "n2"), pipeline._tapo_key(kind)[1:]) if v is not None}
                try:
                    cfg = pipeline.tapo_config(profile, seed, variant, n_triplets=n_anchors(profile, runs, seed),
                                               **ratio)
                    n_steps, pps = cfg.steps, cfg.prompts_per_step
                except ValueError:  # real data not read yet: the anchors are unknown
                    n_steps, pps = 0, 0
                row.update(kind="tapo", variant=variant, steps=n_steps, prompts_per_step=pps, train=state,
                           logged=logged)
                if not evaluated and row["status"] != "archived":
                    row["status"] = {"cached": "trained; evaluate", "resume": f"resume at step {logged}",
                                     "to do": "train + evaluate"}[state]
            elif kind == "clip":
                row["kind"] = "clip"
            pieces.append(row)
        if analysis:
            key = _analysis_key(profile, runs, seed)
            side = runs / f"analysis-seed{seed}.run.json"
            done = bool(key) and side.is_file() and json.loads(side.read_text()).get("key") == key and (
                runs / f"analysis-seed{seed}.json").is_file()
            arch = Path(out) / f"analysis-seed{seed}.run.json"
            archived = not done and arch.is_file() and (Path(out) / f"analysis-seed{seed}.json").is_file() and (
                key is None or json.loads(arch.read_text()).get("key") == key)
            pieces.append(dict(seed=seed, piece="H1-H3 analysis", kind="analysis", phase=3,
                               status="cached" if done else "archived" if archived else "to do"))
    for p in pieces:
        p["seconds"] = 0.0
        if p["status"] in ("cached", "archived") or p["kind"] == "alias":
            continue
        if p["kind"] == "tapo":
            left = p["steps"] - p["logged"] if p["train"] != "cached" else 0
            p["seconds"] = (left * p["prompts_per_step"] * _seconds(profile, out, "tapo_group", p["variant"])
                            + _seconds(profile, out, "eval"))
        else:
            p["seconds"] = _seconds(profile, out, p["kind"])
    jobs = [p for p in pieces if p["phase"] == 2 and p["seconds"]]
    workers = workers_for(len(jobs)) if jobs else 1
    for phase in (1, 2, 3):
        todo = [p["seconds"] for p in pieces if p["phase"] == phase and p["seconds"]]
        w = 1 if phase == 1 else max(1, min(workers, len(todo)))
        for p in pieces:
            if p["phase"] == phase:
                p["wall"] = 0.0
        if todo:
            pieces[[i for i, p in enumerate(pieces) if p["phase"] == phase][0]]["wall"] = max(max(todo), sum(todo) / w)
    return pieces


def format_plan(pieces: list[dict], profile=None) -> str:
    """The plan as text: one line per piece, then the estimated wall time."""
    lines = [f"{'seed':>4}  {'piece':<28} {'steps':>6}  {'status':<28} {'est.':>8}"]
    for p in pieces:
        steps = str(p.get("steps", "")) if p["kind"] == "tapo" else ""
        est = _hms(p["seconds"]) if p["seconds"] else "-"
        lines.append(f"{p['seed']:>4}  {LABELS.get(p['piece'], p['piece']):<28} {steps:>6}  {p['status']:<28} {est:>8}")
    total = sum(p.get("wall", 0.0) for p in pieces)
    todo = sum(1 for p in pieces if p["seconds"])
    cached = sum(1 for p in pieces if p["status"] == "cached")
    archived = sum(1 for p in pieces if p["status"] == "archived")
    lines.append(f"{todo} pieces to run, {cached} cached"
                 + (f", {archived} archived in {ARCHIVE}/ (restored after the CoT data)" if archived else "")
                 + f"; estimated wall time {_hms(total)} "
                 f"(rough: per-piece times from this folder's measurements when it has some, else defaults)")
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------------- the archive
#
# The run folders (``runs/``: models, checkpoints) are not committed, so a checkout keeps none of them. What a
# piece produces that the report reads is small: a method's evaluation CSV (its name is a digest of the model's
# key, the prompt, the evaluation settings and the benchmark, ``pipeline._eval_cache``), a TAPO run's per-step
# log, a seed's H1-H3 summary. ``<out>/evals/seed{S}/`` keeps a copy of each, committed with the results; a
# later invocation (another session, a fresh clone) rebuilds what the keys need (benchmark, CoT data, SFT) and
# restores every archived piece whose name still matches: the same settings are never run twice, and a
# changed setting (another digest) is run again, never read from the archive.

ARCHIVE = "evals"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def _archive_name(method: str, cache: Path) -> str:
    return f"{_safe(method)}--{cache.name}"


def _archived(out: Path, seed: int, method: str, cache: Path | None) -> bool:
    """Whether the archive holds the method's evaluation: the exact file when its name is known (``cache``),
    else any file of the method (a dry run on a fresh checkout cannot compute the digest before the CoT data
    exists; the run then restores only an exact match)."""
    folder = Path(out) / ARCHIVE / f"seed{seed}"
    if cache is not None:
        return (folder / _archive_name(method, cache)).is_file()
    return folder.is_dir() and any(folder.glob(f"{_safe(method)}--*.csv"))


def _archive_method(profile, runs, out, seed: int, method: str) -> None:
    """Copy a method's evaluation (and a TAPO run's log) into the archive; older digests of it are removed."""
    cache = pipeline._eval_cache(profile, runs, seed, method)
    if not cache.is_file():
        return
    folder = Path(out) / ARCHIVE / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    name = _archive_name(method, cache)
    for old in folder.glob(f"{_safe(method)}--*"):
        if not old.name.startswith(name[:-4]):
            old.unlink()
    atomic_write_text(folder / name, cache.read_text(encoding="utf-8"))
    log = cache.parent / "tapo_log.csv"
    if pipeline._method_key(method)[0].startswith("tapo-") and log.is_file():
        atomic_write_text(folder / (name[:-4] + ".tapo_log.csv"), log.read_text(encoding="utf-8"))


def _restore(profile, runs: Path, out: Path, seed: int, methods, canon, log_path=None) -> list[str]:
    """Put the archived evaluations of a seed whose names match the current settings back into the run
    folders (after phase 1: the names need the CoT data's digest); returns the methods restored."""
    from .config import claim_run_folder

    folder = Path(out) / ARCHIVE / f"seed{seed}"
    if not folder.is_dir():
        return []
    restored = []
    for m in methods:
        if canon[m] != m:
            continue
        cache = pipeline._eval_cache(profile, runs, seed, m)
        src = folder / _archive_name(m, cache)
        kind = pipeline._method_key(m)[0]
        if not src.is_file() or (cache.is_file() and pipeline._folder_holds(cache.parent, m, profile, runs, seed)):
            continue
        if kind != "base":  # the run folder must name the run the evaluation belongs to (_folder_holds)
            claim_run_folder(cache.parent, pipeline.method_key(profile, runs, seed, m),
                             {"stage": kind, "restored_from": f"{ARCHIVE}/seed{seed}/{src.name}"})
        atomic_write_text(cache, src.read_text(encoding="utf-8"))
        log = folder / (src.name[:-4] + ".tapo_log.csv")
        if log.is_file() and not (cache.parent / "tapo_log.csv").is_file():
            atomic_write_text(cache.parent / "tapo_log.csv", log.read_text(encoding="utf-8"))
        restored.append(m)
    key = _analysis_key(profile, runs, seed)
    side = Path(out) / f"analysis-seed{seed}.run.json"
    result = Path(out) / f"analysis-seed{seed}.json"
    if key and side.is_file() and result.is_file() and json.loads(side.read_text()).get("key") == key \
            and not (runs / f"analysis-seed{seed}.json").is_file():
        shutil.copyfile(result, runs / result.name)
        shutil.copyfile(side, runs / side.name)
        restored.append("H1-H3 analysis")
    if restored:
        _emit(log_path, f"seed {seed}  restored from {ARCHIVE}/seed{seed}: {', '.join(restored)}")
    return restored


# ---------------------------------------------------------------------------------------------- running


def _shown(path) -> str:
    """A path as the log shows it: relative to the repository when inside it (no machine path in a committed
    log), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return str(path)


def _emit(log_path, text: str) -> None:
    line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}"
    print(line, flush=True)
    if log_path:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _timing(out, name: str, record: dict) -> None:
    write_json(Path(out) / "timings" / f"{_safe(name)}.json", record)


def _method_job(profile, runs, out, seed: int, method: str, log_path=None) -> dict:
    """Train (if needed) and evaluate one method of one seed; a progress line and a timing file when done.
    Runs in a worker process (``parallel.run_parallel``)."""
    t0 = time.perf_counter()
    kind = pipeline._method_key(method)[0]
    record = {"seed": seed, "method": method, "kind": "eval"}
    what = []
    if kind.startswith("tapo-"):
        variant, n1, n2 = pipeline._tapo_key(kind)
        _emit(log_path, f"seed {seed}  {method}: started")
        summary = pipeline.run_tapo(profile, runs, seed, variant, progress=False, n1=n1, n2=n2)
        train = time.perf_counter() - t0
        resumed = summary.get("resumed_from") or 0
        record.update(kind="tapo", variant=variant, steps=summary["steps"],
                      prompts_per_step=summary["cfg"]["prompts_per_step"] if "cfg" in summary else None)
        if summary.get("reused"):
            what.append(f"RL run cached ({summary['steps']} steps)")
        else:
            record.update(train_seconds=train, steps_trained=summary["steps"] - resumed)
            what.append(f"trained {summary['steps'] - resumed} RL steps"
                        + (f" (resumed at {resumed})" if resumed else ""))
    elif kind == "clip":
        pipeline.run_clip(profile, runs, seed)
        record["kind"] = "clip"
    t1 = time.perf_counter()
    pipeline.evaluate_method(profile, runs, seed, method)
    record.update(eval_seconds=time.perf_counter() - t1, seconds=time.perf_counter() - t0, status="done")
    what.append("evaluated")
    _archive_method(profile, runs, out, seed, method)
    _timing(out, f"seed{seed}-{method}", record)
    _emit(log_path, f"seed {seed}  {method}: {', '.join(what)} in {_hms(record['seconds'])}")
    return record


def _analysis_job(profile, runs, out, seed: int, key: str | None, log_path=None) -> dict:
    t0 = time.perf_counter()
    pipeline.run_analysis(profile, runs, seed, methods=ANALYSIS_METHODS, progress=False)
    key = key or _analysis_key(profile, Path(runs), seed)
    write_json(Path(runs) / f"analysis-seed{seed}.run.json", {"key": key, "methods": list(ANALYSIS_METHODS)})
    for name in (f"analysis-seed{seed}.json", f"analysis-seed{seed}.run.json"):  # the archive (see _restore)
        shutil.copyfile(Path(runs) / name, Path(out) / name)
    record = {"seed": seed, "kind": "analysis", "seconds": time.perf_counter() - t0, "status": "done"}
    _timing(out, f"seed{seed}-analysis", record)
    _emit(log_path, f"seed {seed}  H1-H3 analysis: done in {_hms(record['seconds'])}")
    return record


def _step(log_path, out, seed: int, name: str, kind: str, fn) -> None:
    t0 = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t0
    cached = isinstance(result, dict) and result.get("reused")
    _timing(out, f"seed{seed}-{name}", {"seed": seed, "kind": kind, "seconds": dt,
                                         "status": "cached" if cached else "done"})
    _emit(log_path, f"seed {seed}  {name}: {'cached' if cached else 'done'} in {_hms(dt)}")


def reproduce(profile=None, out=None, seeds=(0, 1, 2), runs=None, methods=ALL_METHODS, analysis: bool = True,
              config: ReproduceConfig | None = None, dry_run: bool = False, command: str | None = None) -> dict:
    """Run (or resume) every piece of the reproduction and write the report; see the module docstring.

    ``profile`` already carries any ``--set`` overrides; ``config.rl_passes`` sets the RL length (None: the
    profile's). ``methods`` restricts the rows (tests). Returns ``{"plan": [...], "results": path or None,
    "ran": [pieces run], "cached": [pieces reused]}``."""
    from .parallel import run_parallel

    config = config or ReproduceConfig()
    profile = prepare_profile(profile, config.rl_passes)
    out = Path(out or REPO_ROOT / "data" / "results" / f"{profile.name}-reproduce")
    runs = Path(runs) if runs else out / "runs"
    methods = tuple(methods)
    unknown = [m for m in methods if m not in pipeline.METHODS and not m.startswith("tapo-")]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(ALL_METHODS)}")
    before = plan(profile, out, seeds, runs, methods, analysis)
    text = format_plan(before)
    if dry_run:
        print(f"reproduce plan: profile {profile.name}, seeds {list(seeds)}, runs in {_shown(runs)}\n{text}")
        return {"plan": before, "results": None, "ran": [], "cached": []}
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    log_path = out / "reproduce.log"
    start = time.perf_counter()
    _emit(log_path, f"reproduce: profile {profile.name}, seeds {list(seeds)}, runs in {_shown(runs)}"
                    + (f"; command: {command}" if command else "") + f"\n{text}")
    write_json(out / "config.json", {"profile": profile.name, "seeds": list(seeds), "methods": list(methods),
                                     "reproduce": dataclasses.asdict(config), "tapo": _jsonable(profile.tapo),
                                     "sft": _jsonable(profile.sft), "eval": _jsonable(profile.eval),
                                     "command": command})
    canon = canonical_methods(profile, methods)
    status = {(p["seed"], p["piece"]): p["status"] for p in before}
    try:
        # phase 1, in this process: what the runs share (batched SFT uses every core well; see parallel.py)
        for seed in seeds:
            if status[seed, "benchmark"] == "cached":
                _emit(log_path, f"seed {seed}  benchmark: cached")
            else:
                _step(log_path, out, seed, "benchmark", "benchmark",
                      lambda: pipeline.get_benchmark(profile, runs, seed) and None)
            if (seed, "concepts + CoT data") in status:
                if status[seed, "concepts + CoT data"] == "cached":
                    _emit(log_path, f"seed {seed}  concepts + CoT data: cached")
                else:
                    _step(log_path, out, seed, "concepts + CoT data", "data",
                          lambda: pipeline.sft_samples(profile, runs, seed, "cot") and None)
            # what an earlier invocation archived (another checkout: its run folders are gone)
            if _restore(profile, runs, out, seed, methods, canon, log_path):
                status.update({(p["seed"], p["piece"]): p["status"]
                               for p in plan(profile, out, [seed], runs, methods, analysis)})
            pending = {pipeline._method_key(m)[0] for m in methods if canon[m] == m and status[seed, m] != "cached"}
            if analysis and status[seed, "H1-H3 analysis"] != "cached":
                pending |= {pipeline._method_key(m)[0] for m in ANALYSIS_METHODS}
            for data in ("cot", "direct"):
                if (seed, f"sft-{data}") not in status:
                    continue
                needed = f"sft-{data}" in pending or (data == "cot" and any(k.startswith("tapo-") for k in pending))
                if status[seed, f"sft-{data}"] == "cached":
                    _emit(log_path, f"seed {seed}  sft-{data}: cached")
                elif not needed:
                    _emit(log_path, f"seed {seed}  sft-{data}: not needed (what uses it is archived)")
                else:
                    _step(log_path, out, seed, f"sft-{data}", "sft",
                          lambda: pipeline.run_sft(profile, runs, seed, data, progress=False))
        # phase 2: training runs and evaluations, one core each (TAPO first: the longest)
        jobs = {}
        for seed in seeds:
            for m in methods:
                if canon[m] != m:
                    continue
                if status[seed, m] == "cached":
                    _emit(log_path, f"seed {seed}  {m}: cached")
                else:
                    jobs[seed, m] = dict(profile=profile, runs=str(runs), out=str(out), seed=seed, method=m,
                                         log_path=str(log_path))
        jobs = dict(sorted(jobs.items(), key=lambda kv: not pipeline._method_key(kv[0][1])[0].startswith("tapo-")))
        if jobs:
            run_parallel(_method_job, jobs)
        # phase 3: H1-H3 (needs the Fine-R1 model of the seed)
        if analysis:
            ajobs = {}
            for seed in seeds:
                if status[seed, "H1-H3 analysis"] == "cached":
                    _emit(log_path, f"seed {seed}  H1-H3 analysis: cached")
                else:
                    ajobs[seed] = dict(profile=profile, runs=str(runs), out=str(out), seed=seed, key=None,
                                       log_path=str(log_path))
            if ajobs:
                run_parallel(_analysis_job, ajobs)
        # phase 4: the tables
        t0 = time.perf_counter()
        report = build_report(profile, out, seeds, runs, methods, analysis, config, wall=time.perf_counter() - start)
        _emit(log_path, f"report written to {_shown(report)} in {_hms(time.perf_counter() - t0)}; "
                        f"this invocation: {_hms(time.perf_counter() - start)}")
    except KeyboardInterrupt:
        _emit(log_path, f"interrupted after {_hms(time.perf_counter() - start)}: finished pieces are kept; "
                        f"rerun the same command to resume")
        raise
    finally:
        _record_invocation(out, time.perf_counter() - start)
    ran = [p for p in before if p["status"] not in ("cached", "archived") and p["kind"] != "alias"]
    return {"plan": before, "results": report, "ran": ran,
            "cached": [p for p in before if p["status"] == "cached"]}


def _record_invocation(out: Path, seconds: float) -> None:
    path = out / "timings" / "invocations.json"
    try:
        past = json.loads(path.read_text()) if path.is_file() else []
    except ValueError:
        past = []
    write_json(path, past + [{"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 1)}])


def _jsonable(d):
    return json.loads(json.dumps(d, default=list))


# ---------------------------------------------------------------------------------------------- the report

#: The paper's numbers per method row (Tables 1, 2, 6 seen / unseen Avg.; Fig. 3a / 3b / 3c from §5.3's text).
#: "derived" = a sum of numbers stated in §5.3 (paper.FIG3_NOTES), not printed as such in the paper.
_METRICS = [("closed-world acc", "seen"), ("closed-world acc", "unseen"), ("open-world TI", "seen"),
            ("open-world TI", "unseen"), ("open-world SS", "seen"), ("open-world SS", "unseen")]
_SHORT = {"closed-world acc": "closed", "open-world TI": "TI", "open-world SS": "SS"}


def _paper_rows() -> dict[str, tuple[str, dict]]:
    from .paper import FIG3_NOTES, TABLE1_CLOSED, TABLE2_OPEN_SS, TABLE6_OPEN_TI

    tables = {"closed-world acc": TABLE1_CLOSED, "open-world TI": TABLE6_OPEN_TI, "open-world SS": TABLE2_OPEN_SS}

    def row(name):
        return {(metric, split): float(t.loc[name, ("avg", split)]) if name in t.index else float("nan")
                for metric, t in tables.items() for split in ("seen", "unseen")}

    f3a = FIG3_NOTES["3a"]["numbers"]
    sft = {k: float("nan") for k in _METRICS}
    sft[("closed-world acc", "seen")] = f3a["sft_seen"]
    sft[("closed-world acc", "unseen")] = round(f3a["zero_shot_unseen"] + f3a["sft_unseen_delta_vs_zero_shot"], 2)
    return {"zero-shot": ("Qwen2.5-VL-3B (Tables 1, 6, 2)", row("Qwen2.5-VL-3B")),
            "direct SFT": ("SFT, Qwen2.5-VL-3B (Fig. 3a; unseen derived)", sft),
            "Fine-R1 (TAPO)": ("Fine-R1-3B (Tables 1, 6, 2)", row("Fine-R1-3B")),
            "CLIP-style dual encoder": ("CLIP-L (Table 1)", row("CLIP-L"))}


def _fig3c_paper() -> dict[str, float]:
    from .paper import FIG3_NOTES, TABLE2_OPEN_SS

    n = FIG3_NOTES["3c"]["numbers"]
    base = float(TABLE2_OPEN_SS.loc["Qwen2.5-VL-3B", ("avg", "overall")])
    cot = round(base + n["cot_sft_delta"], 2)
    return {"zero-shot": base, "CoT SFT": cot, "CoT SFT + DAPO": round(cot + n["dapo_after_cot_sft_delta"], 2),
            "Fine-R1 (TAPO)": n["intra_plus_inter_full"]}


def _frames(profile, runs, seeds, methods, canon) -> dict:
    return {(s, m): pipeline.evaluate_method(profile, runs, s, canon[m]) for s in seeds for m in methods}


def _per_image(frames: dict, seed: int, methods) -> "pd.DataFrame":
    import pandas as pd

    base = None
    for m in methods:
        df = frames[seed, m][["image_id", "super_category", "split", "mode", "correct"]
                             + (["SS"] if "SS" in frames[seed, m] else [])].copy()
        df = df.rename(columns={"correct": f"{m} | correct", "SS": f"{m} | SS"})
        df[f"{m} | correct"] = df[f"{m} | correct"].astype(float)
        base = df if base is None else base.merge(df, on=["image_id", "super_category", "split", "mode"], how="outer")
    return base.sort_values(["mode", "split", "image_id"]).reset_index(drop=True)


def _comparison(per_image: dict, seeds, a: str, b: str, mode: str, col: str, splits, config: ReproduceConfig,
                threshold: float = 0.0, sign: int = 1) -> dict:
    """Effect = sign * (b - a) in points on the rows (mode, splits): per-seed values, the seed test and the
    bootstrap over test images (cells: seed x split, split-balanced)."""
    import numpy as np

    diffs, cells, per_seed = [], [], []
    for s in seeds:
        df = per_image[s]
        ca, cb = f"{a} | {col}", f"{b} | {col}"
        if ca not in df or cb not in df:
            continue
        sub = df[(df["mode"] == mode) & df["split"].isin(splits)].dropna(subset=[ca, cb])
        if sub.empty:
            continue
        d = sign * 100 * (sub[cb].to_numpy(float) - sub[ca].to_numpy(float))
        per_seed.append(float(np.mean([d[sub["split"].to_numpy() == sp].mean() for sp in splits
                                       if (sub["split"] == sp).any()])))
        diffs += d.tolist()
        cells += [(s, sp) for sp in sub["split"]]
    n_cells = len(set(cells))
    weights = {c: 1.0 / n_cells for c in set(cells)} if cells else None
    boot = verdicts.paired_bootstrap(diffs, cells, weights, n_boot=config.n_boot, seed=config.boot_seed)
    seed_stats = verdicts.seed_test(per_seed, threshold)
    effect = float(np.mean(per_seed)) if per_seed else float("nan")
    verdict, reason = verdicts.directional_verdict(effect, boot["ci"], threshold, seed_stats, config.alpha)
    return {"a": a, "b": b, "metric": f"{_SHORT.get(mode, mode)} {col} {'+'.join(splits)}", "per_seed": per_seed,
            "effect": effect, "seeds": seed_stats, "bootstrap": boot, "threshold": threshold,
            "verdict": verdict, "reason": reason}


def _analysis_findings(runs: Path, seeds, config: ReproduceConfig) -> dict:
    import numpy as np

    h1, h2, h2_se, h3 = [], [], [], []
    a, b = ANALYSIS_METHODS
    for s in seeds:
        path = runs / f"analysis-seed{s}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        h1.append(r["h1"][b]["probe (all)"] - r["h1"][a]["probe (all)"])
        d = r["h2"][f"delta ({b})"] - r["h2"][f"delta ({a})"]
        h2.append(d)
        t = r["h2"].get("t")
        h2_se.append(abs(d / t) if t not in (None, 0) and math.isfinite(t) and d else float("nan"))
        h3.append(100 * (r["h3"][b]["full_accuracy"] - r["h3"][a]["full_accuracy"]))
    out = {}
    for name, vals, margin in (("H1 probe (all), points", h1, config.h1_margin), ("H2 delta", h2, config.h2_margin)):
        ci = verdicts.t_interval(vals)
        extra = {}
        if name.startswith("H2") and vals:
            se = [x for x in h2_se if math.isfinite(x)]
            if len(se) == len(vals):  # species-level: the per-seed paired t-tests over species, pooled
                m, pooled = float(np.mean(vals)), math.sqrt(sum(x * x for x in se)) / len(se)
                extra["species_ci"] = (m - 1.96 * pooled, m + 1.96 * pooled)
                if len(vals) < 2:
                    ci = extra["species_ci"]
        effect = float(np.mean(vals)) if vals else float("nan")
        verdict, reason = verdicts.equivalence_verdict(effect, ci, margin)
        out[name] = {"per_seed": vals, "effect": effect, "ci": ci, "margin": margin, "verdict": verdict,
                     "reason": reason, "seeds": verdicts.seed_test(vals), **extra}
    seeds3 = verdicts.seed_test(h3, config.h3_threshold)
    v, reason = verdicts.directional_verdict(seeds3["mean"], seeds3["ci"], config.h3_threshold, seeds3, config.alpha)
    out["H3 full acc, points"] = {"per_seed": h3, "effect": seeds3["mean"], "ci": seeds3["ci"],
                                  "threshold": config.h3_threshold, "verdict": v, "reason": reason, "seeds": seeds3}
    return out


def _findings(per_image, seeds, methods, runs, analysis, config: ReproduceConfig) -> list[dict]:
    """The issue's targets (i)-(v) and a few other comparisons of the paper, each with its parts' tests."""
    have = set(methods)
    F = []

    def part(label, paper, *args, **kw):
        return {"label": label, "paper": paper, **_comparison(per_image, seeds, *args, config=config, **kw)}

    if {"zero-shot", "direct SFT"} <= have:
        parts = [part("seen closed acc rises", 3.98, "zero-shot", "direct SFT", "closed", "correct", ("seen",)),
                 part("unseen closed acc falls", 6.12, "zero-shot", "direct SFT", "closed", "correct", ("unseen",),
                      sign=-1)]
        F.append({"id": "(i)", "finding": "direct SFT raises seen and lowers unseen closed-world accuracy vs "
                                          "zero-shot (Fig. 3a)", "parts": parts})
    parts = []
    if {"zero-shot", "Fine-R1 (TAPO)"} <= have:
        parts += [part("Fine-R1 > zero-shot, unseen closed acc", 9.47, "zero-shot", "Fine-R1 (TAPO)", "closed",
                       "correct", ("unseen",)),
                  part("Fine-R1 > zero-shot, unseen open SS", 15.57, "zero-shot", "Fine-R1 (TAPO)", "open", "SS",
                       ("unseen",))]
    if {"CoT SFT + DAPO", "Fine-R1 (TAPO)"} <= have:
        parts.append(part("Fine-R1 > CoT SFT + DAPO, SS (seen+unseen)/2", 1.51, "CoT SFT + DAPO", "Fine-R1 (TAPO)",
                          "open", "SS", ("seen", "unseen")))
    if {"CoT SFT", "CoT SFT + DAPO"} <= have:
        parts.append(part("CoT SFT + DAPO > CoT SFT, SS (seen+unseen)/2", 1.60, "CoT SFT", "CoT SFT + DAPO", "open",
                          "SS", ("seen", "unseen")))
    if parts:
        F.append({"id": "(ii)", "finding": "Fine-R1 above zero-shot on unseen classes (closed and open world, "
                                           "Table 1-2) and above CoT SFT + DAPO, above CoT SFT (Fig. 3c), beyond "
                                           "seed-to-seed noise", "parts": parts})
    from .paper import TABLE3A_RATIOS

    ratio_methods = {r: m for r, m in RATIO_METHODS.items() if m in have}
    if (5, 5) in ratio_methods and len(ratio_methods) > 1:
        parts = [part(f"5:5 > {a}:{b}, unseen SS", round(61.29 - float(TABLE3A_RATIOS.loc[f"{a}:{b}", "avg"]), 2),
                      m, "Fine-R1 (TAPO)", "open", "SS", ("unseen",))
                 for (a, b), m in ratio_methods.items() if (a, b) != (5, 5)]
        weak = (verdicts.NOT_REPRODUCED if any(p["verdict"] == verdicts.NOT_REPRODUCED for p in parts)
                else verdicts.INCONCLUSIVE if any(p["bootstrap"]["ci"][1] < 0 for p in parts)
                else verdicts.REPRODUCED)
        F.append({"id": "(iii)", "finding": "n1:n2 = 5:5 is best or within noise of the best (Table 3a, unseen SS)",
                  "parts": parts, "verdict": weak,
                  "rule": "not reproduced if another ratio is credibly better (its part 'not reproduced'); "
                          "inconclusive if one is better on the test images but not across seeds; else reproduced. "
                          "The paper's stronger claim (5:5 better than each) is the parts' combined verdict: "
                          + verdicts.combine(p["verdict"] for p in parts)})
    if analysis:
        A = _analysis_findings(Path(runs), seeds, config)
        F.append({"id": "(iv)", "finding": "H1 probe and H2 Δ change little (Table 4)", "analysis": [
            {"label": k, "paper": p, **A[k]} for k, p in (("H1 probe (all), points", 0.74), ("H2 delta", 0.0443))]})
        F.append({"id": "(v)", "finding": "H3: positive and negative image–name pairs more separable after "
                                          "training, by >= 5 points of cross-validated accuracy (Fig. 4)",
                  "analysis": [{"label": "H3 full acc, points", "paper": None, **A["H3 full acc, points"]}]})
    other = []
    for m, lab in (("tapo-intra", "+ intra > CoT SFT + DAPO"), ("tapo-inter", "+ inter > CoT SFT + DAPO")):
        if {m, "CoT SFT + DAPO"} <= have:
            other.append(part(f"{lab}, SS (seen+unseen)/2", None, "CoT SFT + DAPO", m, "open", "SS",
                              ("seen", "unseen")))
    if {"Fine-R1 (TAPO)", "CLIP-style dual encoder"} <= have:
        other.append(part("Fine-R1 > CLIP-style, closed acc (seen+unseen)/2", round(85.19 - 72.54, 2),
                          "CLIP-style dual encoder", "Fine-R1 (TAPO)", "closed", "correct", ("seen", "unseen")))
    if {"Fine-R1 (TAPO)", "tapo-tapo-eq4"} <= have:
        other.append(part("literal Eq. 4 vs official TAPO, SS (seen+unseen)/2 (no paper claim)", None,
                          "Fine-R1 (TAPO)", "tapo-tapo-eq4", "open", "SS", ("seen", "unseen")))
    if other:
        F.append({"id": "other", "finding": "other comparisons of the paper (Fig. 3c components, CLIP models), "
                                            "not targets of issue 19", "parts": other})
    for f in F:
        if "verdict" not in f:
            f["verdict"] = verdicts.combine(p["verdict"] for p in f.get("parts", []) + f.get("analysis", []))
    return F


def _flatness_rows(profile, runs: Path, out: Path, seeds, methods, canon, config: ReproduceConfig) -> list[dict]:
    import pandas as pd

    rows = []
    (out / "rl_logs").mkdir(parents=True, exist_ok=True)
    for m in methods:
        kind = pipeline._method_key(m)[0]
        if canon[m] != m or not kind.startswith("tapo-"):
            continue
        variant, n1, n2 = pipeline._tapo_key(kind)
        for s in seeds:
            name = pipeline._tapo_folder(variant, s, n1, n2)
            log = runs / name / "tapo_log.csv"
            if not log.is_file():
                continue
            shutil.copyfile(log, out / "rl_logs" / f"{name}.csv")
            df = pd.read_csv(log)
            fl = verdicts.flatness(df["reward"].to_numpy(float), config.flat_tolerance)
            rows.append({"run": name, "method": m, "seed": s, "steps": fl["steps"],
                         "reward first (smoothed)": round(fl["first_smoothed"], 3),
                         "reward last (smoothed)": round(fl["last_smoothed"], 3),
                         "change over last third": round(fl["change"], 3),
                         "CI low": round(fl["change_ci"][0], 3), "CI high": round(fl["change_ci"][1], 3),
                         "state": fl["state"], "kept_ratio (mean)": round(float(df["kept_ratio"].mean()), 3),
                         "seconds": round(float(df["seconds"].sum()), 1)})
    return rows


def _md(df, index: bool = True) -> str:
    cols = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, row in df.iterrows():
        vals = ([str(i)] if index else []) + ["" if (isinstance(v, float) and math.isnan(v)) else str(v)
                                              for v in row.tolist()]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _pm(values, digits=1) -> str:
    import numpy as np

    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return "n/a"
    if len(v) < 2:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}"


def _paper_cell(v) -> str:
    return "" if v is None else f"{v:+g}"


def _fmt_p(p) -> str:
    return "n/a" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.3f}"


def build_report(profile, out, seeds, runs=None, methods=ALL_METHODS, analysis: bool = True,
                 config: ReproduceConfig | None = None, wall: float | None = None) -> Path:
    """The tables, verdicts and copies of a finished reproduction (every piece cached); writes results.md."""
    import pandas as pd

    from .evaluate import compare

    config = config or ReproduceConfig()
    profile = get_profile(profile)
    out = Path(out)
    runs = Path(runs) if runs else out / "runs"
    methods = tuple(methods)
    canon = canonical_methods(profile, methods)
    frames = _frames(profile, runs, seeds, methods, canon)
    for s in seeds:  # the archive holds every piece of the report (also ones run before it existed)
        for m in methods:
            if canon[m] == m:
                _archive_method(profile, runs, out, s, m)
    tables = {s: compare({m: frames[s, m] for m in methods}) for s in seeds}
    for s, t in tables.items():
        atomic_write_text(out / f"evaluation-seed{s}.csv", t.to_csv())
    atomic_write_text(out / "evaluation.csv", pd.concat(tables, names=["seed", "method"]).to_csv())
    per_image = {s: _per_image(frames, s, methods) for s in seeds}
    for s, df in per_image.items():
        atomic_write_text(out / f"per_image-seed{s}.csv", df.to_csv(index=False))
    if analysis:
        for s in seeds:
            for name in (f"analysis-seed{s}.json", f"analysis-seed{s}.run.json"):
                src = runs / name
                if src.is_file():
                    shutil.copyfile(src, out / src.name)
    flat = _flatness_rows(profile, runs, out, seeds, methods, canon, config)
    atomic_write_text(out / "rl_flatness.csv", pd.DataFrame(flat).to_csv(index=False))
    if flat:
        _curves_figure(out, min(seeds))
    findings = _findings(per_image, seeds, methods, runs, analysis, config)
    write_json(out / "verdicts.json", json.loads(json.dumps(findings, default=_json_default)))
    text = _results_md(profile, out, runs, seeds, methods, canon, tables, findings, flat, analysis, config, wall)
    text += _hedging_section(profile, out, frames, seeds, methods)
    text += _diagnosis_section(profile, out, frames, seeds, methods)
    return atomic_write_text(out / "results.md", text)


def _answer_table(profile, out: Path, frames: dict, seeds, methods, table_fn, csv_name: str):
    """A per-seed ``diagnose`` table of every method's answers, written to ``out/csv_name``, and its mean over
    seeds flattened to one row per (method, world, split) for results.md; None off the micro world (the class
    names are known there only)."""
    import pandas as pd

    from .world import World

    if profile.world != "micro":
        return None
    world = World(profile.world_seed, profile.image_size, profile.n_genera)
    names = [s.name for s in world.species]
    table = pd.concat({s: table_fn({m: frames[s, m] for m in methods}, names) for s in seeds}, names=["seed"])
    atomic_write_text(out / csv_name, table.to_csv())
    mean = table.groupby(level=["method", "mode", "split"], sort=False).mean().round(1)
    mean = mean.rename(index=lambda m: LABELS.get(m, m), level="method")
    flat = mean.reset_index()
    flat.index = [f"{r.method} ({r.mode}, {r.split})" for r in flat.itertuples()]
    flat.index.name = "method (world, split)"
    return flat.drop(columns=["method", "mode", "split"])


def _hedging_section(profile, out: Path, frames: dict, seeds, methods) -> str:
    """``hedging.csv`` and ``stopping.csv`` and their sections of results.md: how much of each method's official
    score comes from answers that name several species (``diagnose.hedging``), and whether the answers stop
    after ``</answer>`` (``diagnose.stopping``)."""
    from .diagnose import hedging_table, stopping_table

    flat = _answer_table(profile, out, frames, seeds, methods, hedging_table, "hedging.csv")
    if flat is None:
        return ""
    stops = _answer_table(profile, out, frames, seeds, methods, stopping_table, "stopping.csv")
    return ("\n## Answers that name several species (is the score earned with one name?)\n\n"
            "The official scoring credits an answer when the truth is a substring of the span from the first "
            "`<answer>` to the last `</answer>`, and the accuracy reward of §4.3 when it is a substring of the first "
            "`<answer>`: an answer listing several species scores as right. `one name required`: the first "
            "`<answer>` names exactly one class, the truth. Mean over seeds; per seed in `hedging.csv` "
            "(`finer1_lib.diagnose.hedging`).\n\n" + _md(flat) + "\n"
            "\n## Does the answer stop after `</answer>`?\n\n"
            "Two ways to put several names in the official span: writing on after `</answer>` (several `<answer>` "
            "tags) and listing names inside one answer. `clean single answer`: one `<answer>`, nothing after its "
            "`</answer>`. Mean over seeds; per seed in `stopping.csv` (`finer1_lib.diagnose.stopping`).\n\n"
            + _md(stops) + "\n")


#: The diagnosis columns results.md shows (all of them are in diagnosis.csv).
DIAGNOSIS_COLUMNS = ("step: right", "step: perception", "step: recall", "step: choice", "attribute precision",
                     "wrong attributes = the answer's", "truth among candidates", "seen-class candidates")


def _diagnosis_section(profile, out: Path, frames: dict, seeds, methods) -> str:
    """``diagnosis.csv`` (``diagnose.diagnosis_table`` per seed and method) and its section of results.md: where
    each method's answers go wrong, the first failing step and what the analysis states. Micro world only (its
    images' attributes are known)."""
    from .diagnose import diagnosis_by_method

    def table_fn(fr, names):
        from .world import World
        return diagnosis_by_method(fr, World(profile.world_seed, profile.image_size, profile.n_genera))

    flat = _answer_table(profile, out, frames, seeds, methods, table_fn, "diagnosis.csv")
    if flat is None or flat.empty:
        return ""
    return ("\n## Where the answers go wrong (`finer1_lib.diagnose`)\n\n"
            "Per answer, the first step that failed: `perception` (the analysis states an attribute value the image "
            "does not have), `recall` (the truth is not among the `<options>` candidates), `choice` (it is, and the "
            "answer names another). `attribute precision`: stated values that are the image's; `wrong attributes = "
            "the answer's`: wrongly stated values that belong to the species the answer names (the analysis "
            "describes the answer, not the image). All %, mean over seeds; every column per seed in `diagnosis.csv`."
            "\n\n" + _md(flat[[c for c in DIAGNOSIS_COLUMNS if c in flat.columns]]) + "\n")


def _curves_figure(out: Path, seed: int) -> Path | None:
    """``rl_curves.png``: the per-step reward, groups kept, KL and response length of the seed's RL runs."""
    import matplotlib.pyplot as plt

    from .plots import rl_curves, save_figure

    logs = committed(out, seed)["logs"]
    if not logs:
        return None
    steps = max(len(df) for df in logs.values())
    fig = rl_curves(logs, ("reward", "kept_ratio", "kl", "response_len"), ncols=2,
                    title=f"long run: seed {seed}, {steps} RL steps (python -m finer1_lib reproduce)")
    path = save_figure(fig, out / "rl_curves.png")
    plt.close(fig)
    return path


#: The committed reproduction the notebooks show beside their short live runs.
COMMITTED = REPO_ROOT / "data" / "results" / "cpu-reproduce-v5"


def committed(out=None, seed: int = 0) -> dict:
    """What a reproduction folder holds for a notebook: ``logs`` (run key, e.g. "tapo-dapo" -> its per-step
    TAPO log, for ``seed``), ``evaluation`` (the seed's method table, or None), ``flatness`` (one row per run),
    ``config`` (the settings and command that made it), ``n_test`` (closed-world test images per split) and
    ``path``. Empty when the folder has none of them."""
    import pandas as pd

    out = Path(out) if out else COMMITTED
    logs = {}
    for f in sorted((out / "rl_logs").glob(f"*-seed{seed}.csv")) if (out / "rl_logs").is_dir() else ():
        logs[f.name[: -len(f"-seed{seed}.csv")]] = pd.read_csv(f)
    from .plots import METHOD_NAMES

    order = list(METHOD_NAMES)  # DAPO, + intra, + inter, TAPO: Fig. 3c's order
    logs = dict(sorted(logs.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
    ev = out / f"evaluation-seed{seed}.csv"
    flat = out / "rl_flatness.csv"
    cfg = out / "config.json"
    per_image = out / f"per_image-seed{seed}.csv"
    n = {}
    if per_image.is_file():
        img = pd.read_csv(per_image, usecols=["split", "mode"])
        n = img[img["mode"] == "closed"]["split"].value_counts().to_dict()
    return {"path": out, "logs": logs, "n_test": n,
            "evaluation": pd.read_csv(ev, header=[0, 1], index_col=0) if ev.is_file() else None,
            "flatness": pd.read_csv(flat) if flat.is_file() and flat.stat().st_size > 1 else pd.DataFrame(),
            "config": json.loads(cfg.read_text()) if cfg.is_file() else {}}


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _results_md(profile, out, runs, seeds, methods, canon, tables, findings, flat, analysis, config, wall) -> str:
    import pandas as pd

    from .paper import TABLE3A_RATIOS, TABLE4

    L = []
    n = len(seeds)
    L.append(f"# Reproduction on the micro world: profile {profile.name}, seeds {' '.join(map(str, seeds))}\n")
    L.append("Written by `python -m finer1_lib reproduce` (finer1_lib/reproduce.py); every number below is computed "
             f"from the files in this folder. Mean ± sample std over the {n} seed(s) (ddof 1). The paper's numbers "
             "are Qwen2.5-VL-3B / Fine-R1-3B on six real datasets: compare directions and gaps, not values.\n")
    # --- run length and time
    steps = sorted({(r["method"], r["steps"]) for r in flat})
    anchors = {s: n_anchors(profile, runs, s) for s in seeds}
    passes = profile.tapo.get("epochs")
    L.append("## Runs\n")
    pps = profile.tapo.get("prompts_per_step")
    L.append(f"- RL anchors (triplets) per seed: {', '.join(f'seed {s}: {a}' for s, a in anchors.items())}; "
             f"prompts per step {pps}; "
             + (f"RL length {passes} passes over the anchors -> steps = ceil({passes} x anchors / {pps})"
                if passes else f"RL steps set directly (tapo.steps = {profile.tapo.get('steps')})")
             + f"; steps run: {', '.join(sorted({str(s) for _, s in steps})) or 'n/a'}.")
    aliases = [f"{LABELS.get(m, m)} = {LABELS.get(c, c)}" for m, c in canon.items() if m != c]
    if aliases:
        L.append(f"- Same settings, one run: {'; '.join(aliases)} (n1 = 10, n2 = 0 with the inter-class terms "
                 f"is exactly the '+ inter' preset).")
    L.append(f"- Compute: {_time_summary(out, wall or 0.0)}.")
    L.append(f"- Run folders: `{_rel(runs, out)}`; settings in `config.json`; progress in `reproduce.log`.\n")
    # --- verdicts
    L.append("## Verdicts (issue 19 targets)\n")
    L.append("Effects in points, oriented so that positive = the paper's direction. Tests: a paired difference "
             "over seeds (mean ± std, one-sided one-sample t-test, one-sided sign test) and a paired bootstrap "
             f"over test images ({config.n_boot} resamples within seed x split, RNG seed {config.boot_seed}, "
             "95 % percentile CI of the split-balanced mean over seeds). **reproduced**: CI excludes 0 in the "
             f"paper's direction, effect >= the threshold, and the seed t-test agrees (p < {config.alpha}); "
             "**not reproduced**: CI below the threshold (0: the opposite direction) and the seeds agree; "
             "otherwise **inconclusive**. With one seed the seed test is skipped.\n")
    L.append("| finding | part | effect (seeds) | seed test: t p / sign p | bootstrap 95 % CI | paper | verdict |")
    L.append("|---|---|---|---|---|---|---|")
    notes = set()
    for f in findings:
        first = True
        for p in f.get("parts", []):
            st = p["seeds"]
            if st.get("note"):
                notes.add(st["note"])
            L.append(f"| {f['id'] if first else ''} | {p['label']} | {_pm(p['per_seed'], 2)} | "
                     f"{_fmt_p(st['p_greater'])} / {_fmt_p(st['sign_p'])} | "
                     f"[{p['bootstrap']['ci'][0]:.2f}, {p['bootstrap']['ci'][1]:.2f}] | "
                     f"{_paper_cell(p['paper'])} | "
                     f"{p['verdict']}: {p['reason']} |")
            first = False
        for a in f.get("analysis", []):
            ci = a["ci"]
            ci_txt = "n/a" if any(math.isnan(x) for x in ci) else f"[{ci[0]:.3g}, {ci[1]:.3g}] (t over seeds)"
            if "species_ci" in a:
                ci_txt += f"; species-level [{a['species_ci'][0]:.3g}, {a['species_ci'][1]:.3g}]"
            L.append(f"| {f['id'] if first else ''} | {a['label']} | {_pm(a['per_seed'], 3)} | "
                     f"{_fmt_p(a['seeds']['p_greater'])} / {_fmt_p(a['seeds']['sign_p'])} | {ci_txt} | "
                     f"{_paper_cell(a['paper'])} | "
                     f"{a['verdict']}: {a['reason']} |")
            first = False
    L.append("")
    L.append("| finding | verdict |")
    L.append("|---|---|")
    for f in findings:
        rule = f" ({f['rule']})" if f.get("rule") else ""
        L.append(f"| {f['id'] + ' ' if f['id'] != 'other' else ''}{f['finding']} | **{f['verdict']}**{rule} |")
    L.append("")
    L.append("(iv) is an equivalence test: reproduced when the CI of the change lies inside "
             f"±{config.h1_margin:g} probe points (H1) and ±{config.h2_margin:g} (H2 Δ); H3 (v) and H1 have no "
             "per-image data (the analysis keeps its summary numbers), so their CI is over seeds only. Paper "
             "effects of (ii) and the Fig. 3c rows are sums of the numbers §5.3 states (paper.FIG3_NOTES).")
    for note in sorted(notes):
        L.append(f"Note: {note}.")
    L.append("")
    # --- all methods
    L.append("## All methods (Tables 1, 2, 6 and Fig. 3 analogs)\n")
    paper = _paper_rows()
    rows = []
    long = pd.concat(tables, names=["seed", "method"])
    for m in methods:
        cells = {f"{_SHORT[a]} {b}": _pm(long.xs(m, level="method")[(a, b)].tolist()) for a, b in _METRICS}
        rows.append({"method": LABELS.get(m, m), **cells})
        if m in paper:
            name, vals = paper[m]
            rows.append({"method": f"*paper: {name}*",
                         **{f"{_SHORT[a]} {b}": ("" if math.isnan(vals[a, b]) else f"{vals[a, b]:.2f}")
                            for a, b in _METRICS}})
    L.append(_md(pd.DataFrame(rows).set_index("method")))
    L.append("\nclosed = closed-world accuracy (4 options), TI = open-world text inclusion, SS = open-world relative "
             "semantic similarity (Eq. 5), all %, pooled over the test images of each split (the paper's Avg. is "
             "the mean of six datasets). The CLIP-style encoder is closed-world only.\n")
    # --- Fig. 3c
    fig3c = [m for m in ("zero-shot", "CoT SFT", "CoT SFT + DAPO", "tapo-intra", "tapo-inter", "Fine-R1 (TAPO)",
                         "tapo-tapo-eq4") if m in methods]
    if len(fig3c) > 1:
        p3c = _fig3c_paper()
        rows = []
        for m in fig3c:
            t = long.xs(m, level="method")
            overall = ((t[("open-world SS", "seen")] + t[("open-world SS", "unseen")]) / 2).tolist()
            rows.append({"method": LABELS.get(m, m), "SS (seen+unseen)/2": _pm(overall),
                         "paper": f"{p3c[m]:.2f}" if m in p3c else ""})
        L.append("## Key components (Fig. 3c analog: open-world SS, mean of seen and unseen)\n")
        L.append(_md(pd.DataFrame(rows).set_index("method")))
        L.append("\nPaper: zero-shot = Table 2's Qwen2.5-VL-3B overall Avg.; CoT SFT and + DAPO derived from §5.3's "
                 "+13.30 and +1.60; Fine-R1 = Table 2's Fine-R1-3B overall 67.32.\n")
    # --- Table 3a
    ratios = [(r, m) for r, m in RATIO_METHODS.items() if m in methods]
    if len(ratios) > 1:
        rows = [{"n1:n2": f"{a}:{b}",
                 "SS unseen": _pm(long.xs(m, level="method")[("open-world SS", "unseen")].tolist()),
                 "closed unseen": _pm(long.xs(m, level="method")[("closed-world acc", "unseen")].tolist()),
                 "paper (Table 3a)": f"{float(TABLE3A_RATIOS.loc[f'{a}:{b}', 'avg']):.2f}",
                 "run": LABELS.get(canon[m], canon[m])} for (a, b), m in ratios]
        L.append("## Anchor-to-positive ratio (Table 3a analog: unseen SS)\n")
        L.append(_md(pd.DataFrame(rows).set_index("n1:n2")))
        L.append("")
    # --- H1-H3
    if analysis and all((runs / f"analysis-seed{s}.json").is_file() for s in seeds):
        summary = pipeline.analysis_summary(profile, runs, seeds)
        L.append("## H1-H3 (Table 4, Fig. 4 analog)\n")
        L.append(_md(summary))
        base, fine = TABLE4.loc["Qwen2.5-VL-3B"], TABLE4.loc["Fine-R1"]
        L.append(f"\nPaper (Table 4): probe {base['probing']} -> {fine['probing']} (CUB-200); Δ {base['delta']} -> "
                 f"{fine['delta']}, t = {base['t']}, p = {base['p']}. H3: Fig. 4 only (no number).")
        tests = {s: {k: round(v, 4) for k, v in t.items()} for s, t in summary.attrs["h2_tests"].items()}
        L.append(f"H2 paired t-tests over species per seed (base vs Fine-R1): {json.dumps(tests)}\n")
    # --- RL curves
    if flat:
        L.append("## RL reward curves: has the reward flattened?\n")
        L.append("Per run: the OLS slope of the per-step reward over the last third of the steps, as the change it "
                 "implies over that third, with its 95 % t CI; **flat** when the CI lies inside "
                 f"±{config.flat_tolerance:g} (reward units), **rising** / **falling** when it excludes 0 beyond it, "
                 "else **undecided**. "
                 "Smoothed = moving mean of 5 steps. Per-step logs: `rl_logs/`.\n")
        df = pd.DataFrame(flat)
        L.append(_md(df.set_index("run")))
        counts = df["state"].value_counts().to_dict()
        L.append(f"\nSummary: {', '.join(f'{v} {k}' for k, v in counts.items())} of {len(df)} runs.\n")
    return "\n".join(L) + "\n"


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:
        return path.name


def _time_summary(out: Path, current: float = 0.0) -> str:
    recs = []
    for f in sorted((out / "timings").glob("seed*.json")) if (out / "timings").is_dir() else ():
        try:
            recs.append(json.loads(f.read_text()))
        except ValueError:
            continue
    done = [r for r in recs if r.get("status") != "cached"]
    total = sum(r.get("seconds", 0.0) for r in done)
    inv = out / "timings" / "invocations.json"
    past = json.loads(inv.read_text()) if inv.is_file() else []
    wall = sum(r["seconds"] for r in past) + current
    return (f"{_hms(total)} of piece time (the sum over the {len(done)} pieces run, side by side where the CPU "
            f"has cores for it) in {_hms(wall)} of wall time over {len(past) + 1} invocation(s) of the command "
            f"(this one: {_hms(current)})")


def main_args(args) -> int:
    """The CLI's ``reproduce`` command (cli.py parses, this runs)."""
    explicit = {key if "." in key else f"tapo.{key}" for key in (item.split("=", 1)[0].strip()
                                                                  for item in (args.set or []))}
    passes = None if explicit & {"tapo.steps", "tapo.epochs"} else args.rl_passes
    config = ReproduceConfig(rl_passes=passes)
    seeds = args.seeds or [args.seed]
    methods = args.methods or ALL_METHODS
    command = "python -m finer1_lib " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(
        ("__main__.py", "finer1_lib")) else None
    res = reproduce(args.profile, args.out or None, seeds, runs=args.runs or None, methods=methods,
                    analysis=not args.no_analysis, config=config, dry_run=args.dry_run, command=command)
    if res["results"]:
        print(f"results: {res['results']}")
    return 0
