"""The stages glued together, one function each, as the CLI and the notebooks run them.

Artifacts of a run live in one folder (``data/runs/<profile>/`` or ``$FINER1_RUN_DIR``)::

    benchmark-seed{S}/     images, split, triplets, eval JSONL        (world)
    concepts-seed{S}.jsonl extracted + filtered concepts              (concepts, §4.2 (1))
    cot-seed{S}/           cot_sft.json, direct_sft.json, stats.json   (cot, §4.2 (2))
    sft-{cot|direct}-seed{S}/  checkpoints and the fine-tuned model    (sft, §4.2 stage 1)

A stage whose output exists is not redone (pass ``force=True``); training stages resume from checkpoints.
"""
from __future__ import annotations

from pathlib import Path

from .benchmark import Benchmark, build_benchmark, load_benchmark
from .io import write_json
from .profiles import Profile, current_run_dir, get_profile

__all__ = ["get_benchmark", "load_base_model", "run_concepts", "run_cot", "run_sft", "sft_samples", "shipping_metrics",
           "sft_comparison"]


def _run_dir(profile: Profile, out) -> Path:
    return Path(out) if out else current_run_dir(profile)


def get_benchmark(profile=None, out=None, seed: int = 0, progress: bool = False) -> Benchmark:
    """The run's benchmark, built on first use."""
    profile = get_profile(profile)
    path = _run_dir(profile, out) / f"benchmark-seed{seed}"
    if (path / "benchmark.json").is_file():
        return load_benchmark(path)
    return build_benchmark(profile, path, seed, progress=progress)


def load_base_model(profile=None):
    """(model, processor) of the profile's base model (the shipped tiny model, or Qwen2.5-VL by hub id/folder)."""
    from .model import load_model

    profile = get_profile(profile)
    dtype = None if profile.dtype == "float32" else profile.dtype
    return load_model(profile.model, dtype=dtype)


def run_concepts(profile=None, out=None, seed: int = 0, model=None, processor=None, force: bool = False,
                 progress: bool = True):
    """§4.2 (1): caption the few-shot images, pool and filter concepts -> ``concepts-seed{S}.jsonl``."""
    from .concepts import extract_concepts_for, filter_concepts, load_concepts, micro_vocabulary, save_concepts

    profile = get_profile(profile)
    path = _run_dir(profile, out) / f"concepts-seed{seed}.jsonl"
    if path.is_file() and not force:
        return load_concepts(path)
    cfg = profile.concepts
    bench = get_benchmark(profile, out, seed)
    if model is None:
        model, processor = load_base_model(profile)
    results = extract_concepts_for(
        model, processor, bench, vocabulary_fn=micro_vocabulary if profile.world == "micro" else None,
        per_class=cfg["per_class"], samples_per_prompt=cfg["samples_per_prompt"], temperature=cfg["temperature"],
        seed=seed, max_new_tokens=cfg["max_new_tokens"], batch_size=profile.eval.get("batch_size", 32),
        progress=progress)
    results = filter_concepts(results, bench.similarity, beta=cfg["beta"], min_support=cfg["min_support"],
                              neighbours=cfg["neighbours"])
    save_concepts(path, results)
    return results


def _teacher(profile: Profile, seed: int):
    from .cot import HFTeacher, KnowledgeBaseTeacher
    from .model import load_model
    from .world import World

    cfg = profile.cot
    if cfg["teacher"] == "knowledge-base":
        if profile.world != "micro":
            raise ValueError("the knowledge-base teacher only knows the micro world; set cot.teacher to an MLLM id")
        return KnowledgeBaseTeacher(World(profile.world_seed, profile.image_size, profile.n_genera), seed=seed,
                                    p_wrong=cfg["p_wrong"], p_drop_gt=cfg["p_drop_gt"],
                                    p_extra_candidates=cfg["p_extra_candidates"])
    model, processor = load_model(cfg["teacher"], dtype="bfloat16")
    return HFTeacher(model, processor)


def run_cot(profile=None, out=None, seed: int = 0, force: bool = False, progress: bool = True):
    """§4.2 (2): teacher rationales + filters -> ``cot-seed{S}/cot_sft.json`` (and the direct-answer set)."""
    from .concepts import concepts_by_image
    from .cot import build_cot_dataset, direct_answer_samples, write_sharegpt

    profile = get_profile(profile)
    folder = _run_dir(profile, out) / f"cot-seed{seed}"
    if (folder / "stats.json").is_file() and not force:
        import json

        return folder, json.loads((folder / "stats.json").read_text())
    results = run_concepts(profile, out, seed, progress=progress)
    bench = get_benchmark(profile, out, seed)
    samples, stats = build_cot_dataset(_teacher(profile, seed), bench, concepts_by_image(results),
                                       max_retries=profile.cot["max_retries"], seed=seed, skip_empty=True,
                                       progress=progress)
    if not samples:
        raise ValueError(f"no CoT sample survived the filters ({stats.to_dict()}); see the concept stage")
    write_sharegpt(folder / "cot_sft.json", samples)
    write_sharegpt(folder / "direct_sft.json", direct_answer_samples(samples))
    write_json(folder / "stats.json", stats.to_dict())
    return folder, stats.to_dict()


def sft_samples(profile=None, out=None, seed: int = 0, data: str = "cot") -> list[dict]:
    """The SFT set of a run (``data``: "cot" or "direct"), read back from the sharegpt file."""
    from .cot import read_sharegpt

    profile = get_profile(profile)
    if data not in ("cot", "direct"):
        raise ValueError(f"unknown SFT data {data!r}; expected 'cot' or 'direct'")
    folder, _ = run_cot(profile, out, seed, progress=False)
    return read_sharegpt(folder / f"{data}_sft.json", image_root=get_benchmark(profile, out, seed).root)


def run_sft(profile=None, out=None, seed: int = 0, data: str = "cot", progress: bool = True,
            max_steps: int | None = None, fresh: bool = False) -> dict:
    """Stage 1 of Fine-R1: fine-tune the base model on the CoT set (or the direct-answer baseline).

    Resumes from the folder's last checkpoint (a finished run is not redone); ``fresh=True`` starts over."""
    from .sft import examples_from_samples, replay_examples, train_sft
    from .world import World

    profile = get_profile(profile)
    samples = sft_samples(profile, out, seed, data)
    bench = get_benchmark(profile, out, seed)
    examples = examples_from_samples(samples, bench.image)
    cfg = dict(profile.sft, seed=seed)
    if cfg.get("replay") and profile.world == "micro":
        examples += replay_examples(World(profile.world_seed, profile.image_size, profile.n_genera),
                                    round(cfg["replay"] * len(examples)), seed)
    model, processor = load_base_model(profile)
    if cfg.get("lora"):
        from .model import _wrap_lora

        model = _wrap_lora(model, cfg["lora"], quantized=False)
    folder = _run_dir(profile, out) / f"sft-{data}-seed{seed}"
    if fresh and folder.exists():
        import shutil

        shutil.rmtree(folder)
    summary = train_sft(model, processor, examples, folder, cfg, progress=progress, max_steps=max_steps)
    summary["model"] = str(folder / "model")
    return summary


def shipping_metrics(model_dir, out=None, progress: bool = False) -> dict:
    """The base model's shape on the smoke and cpu benchmarks (seed 0), for the shipped manifest."""
    from .benchmark import build_benchmark
    from .knowledge import base_model_metrics
    from .model import load_model
    from .profiles import PROFILES
    from .world import World

    model, processor = load_model(model_dir)
    metrics = {}
    for name in ("smoke", "cpu"):
        profile = PROFILES[name]
        folder = Path(out or PROFILES[name].run_dir()) / "benchmark-seed0"
        bench = build_benchmark(profile, folder, seed=0, progress=False)
        metrics[f"{name} benchmark, seed 0"] = base_model_metrics(
            model, processor, bench, World(profile.world_seed, profile.image_size, profile.n_genera), profile,
            progress=progress)
    return metrics


def sft_comparison(profile=None, out=None, seeds=(0, 1, 2), progress: bool = False) -> "pd.DataFrame":
    """Zero-shot vs direct SFT vs CoT SFT over several run seeds (split, shots, CoT set and training all
    follow the seed): the Fig. 3a comparison as mean ± std. Writes ``sft_comparison.csv`` in the run folder."""
    import pandas as pd

    from .evaluate import compare, evaluate_model
    from .model import load_model

    profile = get_profile(profile)
    base, processor = load_base_model(profile)
    tables = []
    for seed in seeds:
        bench = get_benchmark(profile, out, seed)
        results = {"zero-shot": evaluate_model(base, processor, bench, profile)}
        for data in ("direct", "cot"):
            summary = run_sft(profile, out, seed, data, progress=progress)
            model, proc = load_model(summary["model"])
            results[f"{data} SFT"] = evaluate_model(model, proc, bench, profile)
        table = compare(results)
        table["seed"] = seed
        tables.append(table)
    long = pd.concat(tables)
    long.to_csv(_run_dir(profile, out) / "sft_comparison.csv")
    grouped = long.drop(columns="seed").groupby(level=0, sort=False)
    mean, std = grouped.mean(), grouped.std(ddof=0)
    return mean.round(1).astype(str) + " ± " + std.round(1).astype(str)
