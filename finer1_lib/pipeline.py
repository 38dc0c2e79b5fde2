"""The stages glued together, one function each, as the CLI and the notebooks run them.

Artifacts of a run live in one folder (``data/runs/<profile>/`` or ``$FINER1_RUN_DIR``)::

    benchmark-seed{S}/     images, split, triplets, eval JSONL        (world)
    concepts-seed{S}.jsonl extracted + filtered concepts              (concepts, §4.2 (1))
    cot-seed{S}/           cot_sft.json, direct_sft.json, stats.json   (cot, §4.2 (2))
    sft-{cot|direct}-seed{S}/  checkpoints and the fine-tuned model    (sft, §4.2 stage 1)
    tapo-{variant}-seed{S}/    checkpoints, tapo_log.csv, the model    (tapo, §4.3 stage 2)
    */eval*.csv                cached evaluations of a folder's model  (evaluate)

One config per run: each stage's settings are one dict from the profile (``config.stage_config``; the CLI's
``--set key=value`` overrides them). A run's key is a hash of its settings and of its parent's key (base model
weights, benchmark, concepts, CoT set, SFT model): ``run.json`` in the run folder holds it. A run whose key is
the folder's is reused (or resumed); another key is a new run, and the folder's previous run is parked in
``.by-key/`` (``config.claim_run_folder``). Evaluations are cached per model key and evaluation settings.
``force=True`` / ``fresh=True`` redo a stage.
"""
from __future__ import annotations

from pathlib import Path

from .benchmark import Benchmark, build_benchmark, load_benchmark
from .config import claim_run_folder, digest, discard_run, file_digest, read_run_info, run_key, stage_config
from .io import write_json
from .profiles import Profile, current_run_dir, get_profile

__all__ = ["get_benchmark", "load_base_model", "training_dtype", "run_concepts", "run_cot", "run_sft", "sft_samples",
           "shipping_metrics", "sft_comparison", "run_tapo", "tapo_config", "METHODS", "method_model",
           "evaluate_method", "evaluate_methods", "compare_methods", "tapo_ablation", "tapo_ratios", "RATIOS",
           "mean_std", "run_analysis", "ANALYSIS_DEFAULTS", "run_clip", "sft_config", "base_model_key",
           "bench_key", "sft_key", "tapo_key", "method_key"]


def _run_dir(profile: Profile, out) -> Path:
    return Path(out) if out else current_run_dir(profile)


def get_benchmark(profile=None, out=None, seed: int = 0, progress: bool = False) -> Benchmark:
    """The run's benchmark, built on first use."""
    profile = get_profile(profile)
    path = _run_dir(profile, out) / f"benchmark-seed{seed}"
    if (path / "benchmark.json").is_file():
        return _check_eval_files(load_benchmark(path))
    return build_benchmark(profile, path, seed, progress=progress)


def _check_eval_files(bench: Benchmark) -> Benchmark:
    """Every (super-category, seen/unseen) of the split with classes has eval records: an empty or missing
    ``eval/<super>_<split>.jsonl`` would silently drop a column of every table."""
    from collections import Counter

    have = Counter((r["super_category"], r["split"]) for r in bench.eval_rows)
    for sc, parts in bench.split.items():
        for which in ("seen", "unseen"):
            if parts.get(which) and not have[sc, which]:
                f = bench.root / "eval" / f"{sc}_{which}.jsonl"
                state = "is empty" if f.is_file() else "is missing"
                raise ValueError(f"{f} {state}: the benchmark's {which} {sc} classes would have no evaluation "
                                 f"records; rebuild the benchmark (delete {bench.root}) or restore the file")
    return bench


def base_model_key(profile=None) -> str:
    """The base model's key: a hash of its folder's config and weight files (a retrained model is another
    model), or the hub id."""
    profile = get_profile(profile)
    folder = Path(profile.model)
    if (folder / "config.json").is_file():
        files = sorted(p for p in folder.iterdir()
                       if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
        return digest({p.name: file_digest(p) for p in files})
    return f"hub:{profile.model}"


def bench_key(bench: Benchmark) -> str:
    """The benchmark's key: a hash of its records, split and triplets (images follow from them)."""
    return digest({name: file_digest(bench.root / name) for name in ("records.jsonl", "split.json", "triplets.jsonl")
                   if (bench.root / name).is_file()})


def training_dtype(profile=None, lora: bool = False) -> str | None:
    """The dtype to load a model in for training: full fine-tuning keeps fp32 master weights and AdamW states
    and computes in bf16 only through autocast (as the official ZeRO-3 / FSDP bf16 runs do). AdamW on bf16
    weights rounds away any update below ~2^-9 of a weight, i.e. nearly every update at lr 5e-6 (SFT) or 1e-6
    (TAPO). LoRA trains fp32 adapters on a frozen base, which stays in the profile's dtype."""
    profile = get_profile(profile)
    if profile.load_dtype is None:
        return None  # the checkpoint's own (fp32) weights
    return profile.load_dtype if lora else "float32"


def load_base_model(profile=None, train: bool = False, lora: bool = False):
    """(model, processor) of the profile's base model (the shipped tiny model, or Qwen2.5-VL by hub id/folder);
    ``train=True`` loads it for training (:func:`training_dtype`)."""
    from .model import load_model

    profile = get_profile(profile)
    return load_model(profile.model, dtype=training_dtype(profile, lora) if train else profile.load_dtype)


def run_concepts(profile=None, out=None, seed: int = 0, model=None, processor=None, force: bool = False,
                 progress: bool = True):
    """§4.2 (1): caption the few-shot images, pool and filter concepts -> ``concepts-seed{S}.jsonl``.

    Reused when ``concepts-seed{S}.run.json`` holds the key of these settings, base model and benchmark;
    recomputed when the key differs. A concepts file without it (written by hand) is used as is."""
    from .concepts import extract_concepts_for, filter_concepts, load_concepts, micro_vocabulary, save_concepts

    profile = get_profile(profile)
    path = _run_dir(profile, out) / f"concepts-seed{seed}.jsonl"
    cfg = stage_config(profile, "concepts")
    bench = get_benchmark(profile, out, seed)
    key = run_key("concepts", cfg, {"base": base_model_key(profile), "bench": bench_key(bench), "seed": seed})
    info = path.with_suffix(".run.json")
    if path.is_file() and not force and (not info.exists() or _sidecar_key(info) == key):
        return load_concepts(path)
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
    write_json(info, {"key": key, "stage": "concepts", "config": cfg})
    return results


def _sidecar_key(path: Path) -> str | None:
    import json

    try:
        return json.loads(path.read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


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
    """§4.2 (2): teacher rationales + filters -> ``cot-seed{S}/cot_sft.json`` (and the direct-answer set).
    Reused when ``cot-seed{S}/run.json`` holds the key of these settings and concepts (a folder without it,
    written by hand or by notebook 02, is used as is)."""
    from .concepts import concepts_by_image
    from .cot import build_cot_dataset, direct_answer_samples, write_sharegpt

    import json

    profile = get_profile(profile)
    folder = _run_dir(profile, out) / f"cot-seed{seed}"
    results = run_concepts(profile, out, seed, progress=progress)
    bench = get_benchmark(profile, out, seed)
    concepts = _run_dir(profile, out) / f"concepts-seed{seed}.jsonl"
    key = run_key("cot", stage_config(profile, "cot"), {"concepts": file_digest(concepts), "bench": bench_key(bench),
                                                       "seed": seed})
    saved = read_run_info(folder)
    if (folder / "stats.json").is_file() and not force and (saved is None or saved["key"] == key):
        return folder, json.loads((folder / "stats.json").read_text())  # (no run.json: written by hand, used as is)
    samples, stats = build_cot_dataset(_teacher(profile, seed), bench, concepts_by_image(results),
                                       max_retries=profile.cot["max_retries"], seed=seed, skip_empty=True,
                                       progress=progress)
    if not samples:
        raise ValueError(f"no CoT sample survived the filters ({stats.to_dict()}); see the concept stage")
    write_sharegpt(folder / "cot_sft.json", samples)
    write_sharegpt(folder / "direct_sft.json", direct_answer_samples(samples))
    write_json(folder / "stats.json", stats.to_dict())
    write_json(folder / "run.json", {"key": key, "stage": "cot", "config": stage_config(profile, "cot")})
    return folder, stats.to_dict()


def sft_samples(profile=None, out=None, seed: int = 0, data: str = "cot") -> list[dict]:
    """The SFT set of a run (``data``: "cot" or "direct"), read back from the sharegpt file."""
    from .cot import read_sharegpt

    profile = get_profile(profile)
    if data not in ("cot", "direct"):
        raise ValueError(f"unknown SFT data {data!r}; expected 'cot' or 'direct'")
    folder, _ = run_cot(profile, out, seed, progress=False)
    return read_sharegpt(folder / f"{data}_sft.json", image_root=get_benchmark(profile, out, seed).root)


def sft_config(profile=None, seed: int = 0, data: str = "cot", **overrides) -> dict:
    """The settings of an SFT run: ``profile.sft`` (complete: ``profiles.SFT_BASE``), then ``overrides``
    (unknown keys are an error), with the run's seed. ``direct_lr`` is resolved, not kept: the direct-answer run
    (``data="direct"``) trains at it when it is set (change it with ``direct_lr=...``; ``direct_lr=None`` gives
    it ``lr``), every other run at ``lr``."""
    cfg = {**stage_config(profile, "sft", overrides), "seed": seed}
    direct_lr = cfg.pop("direct_lr", None)
    if data == "direct" and direct_lr is not None:
        cfg["lr"] = direct_lr
    return cfg


def sft_key(profile=None, out=None, seed: int = 0, data: str = "cot", **overrides) -> str:
    """The key of an SFT run: its settings, the training dtype, the base model, the SFT set's bytes and the
    benchmark (builds the CoT set if missing)."""
    profile = get_profile(profile)
    cfg = sft_config(profile, seed, data, **overrides)
    if data not in ("cot", "direct"):
        raise ValueError(f"unknown SFT data {data!r}; expected 'cot' or 'direct'")
    folder, _ = run_cot(profile, out, seed, progress=False)
    parent = {"base": base_model_key(profile), "data": data, "sft_set": file_digest(folder / f"{data}_sft.json"),
              "bench": bench_key(get_benchmark(profile, out, seed)),
              "dtype": training_dtype(profile, lora=bool(cfg.get("lora")))}
    if cfg.get("replay"):
        parent["replay_world"] = [profile.world_seed, profile.image_size, profile.n_genera]
    return run_key("sft", cfg, parent)


def run_sft(profile=None, out=None, seed: int = 0, data: str = "cot", progress: bool = True,
            max_steps: int | None = None, fresh: bool = False, **overrides) -> dict:
    """Stage 1 of Fine-R1: fine-tune the base model on the CoT set (or the direct-answer baseline).

    The settings are :func:`sft_config` (``max_steps`` and ``overrides`` on top of ``profile.sft``). The run
    with the same key (:func:`sft_key`) is reused when finished and resumed from its last checkpoint when
    interrupted; other settings, another base model or another SFT set are a new run (the previous one is
    parked in ``.by-key/``). ``fresh=True`` starts over. Returns the summary with ``model`` and ``key``."""
    import json

    from .sft import examples_from_samples, replay_examples, train_sft
    from .world import World

    profile = get_profile(profile)
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    cfg = sft_config(profile, seed, data, **overrides)
    key = sft_key(profile, out, seed, data, **overrides)
    folder = _run_dir(profile, out) / f"sft-{data}-seed{seed}"
    if fresh:
        discard_run(folder, key)
    folder, same = claim_run_folder(folder, key, {"stage": "sft", "data": data, "config": cfg})
    done = folder / "sft.json"
    if same and done.is_file() and (folder / "model").is_dir():  # finished: not redone
        summary = json.loads(done.read_text())
        return {**summary, "model": str(folder / "model"), "key": key, "reused": True}
    samples = sft_samples(profile, out, seed, data)
    bench = get_benchmark(profile, out, seed)
    examples = examples_from_samples(samples, bench.image)
    if cfg.get("replay") and profile.world == "micro":
        examples += replay_examples(World(profile.world_seed, profile.image_size, profile.n_genera),
                                    round(cfg["replay"] * len(examples)), seed, tasks=cfg.get("replay_tasks"))
    model, processor = load_base_model(profile, train=True, lora=bool(cfg.get("lora")))
    if cfg.get("lora"):
        from .model import _wrap_lora

        model = _wrap_lora(model, cfg["lora"], quantized=False)
    train_cfg = {k: v for k, v in cfg.items() if k != "max_steps"}
    summary = train_sft(model, processor, examples, folder, train_cfg, progress=progress, max_steps=cfg["max_steps"])
    summary = {**summary, "key": key}
    write_json(done, summary)
    summary["model"] = str(folder / "model")
    return summary


def shipping_metrics(model_dir, out=None, progress: bool = False, world_seed: int | None = None,
                     benchmarks=("smoke", "cpu")) -> dict:
    """The base model's shape on the smoke and cpu benchmarks (seed 0), for the shipped manifest; its zero-shot
    answers go to ``<model_dir>/../zero-shot/`` (shipped with it, reused by ``evaluate_method``).

    ``world_seed``: measure on another micro world (its benchmarks go to ``<out>/benchmark-seed0-world<N>``,
    never beside the default world's cached images)."""
    from .benchmark import build_benchmark
    from .evaluate import evaluate_model
    from .io import atomic_write_text
    from .knowledge import base_model_metrics
    from .model import load_model
    from .profiles import PROFILES
    from .world import World

    model, processor = load_model(model_dir)
    key = base_model_key(get_profile("cpu").replace(model=str(model_dir)))
    metrics = {}
    for name in benchmarks:
        profile = PROFILES[name]
        folder = Path(out or PROFILES[name].run_dir()) / "benchmark-seed0"
        if world_seed is not None and world_seed != profile.world_seed:
            profile = profile.replace(world_seed=world_seed)
            folder = Path(out or PROFILES[name].run_dir()) / f"{name}-benchmark-seed0-world{world_seed}"
        elif out is not None:
            folder = Path(out) / f"{name}-benchmark-seed0"
        bench = build_benchmark(profile, folder, seed=0, progress=False)
        results = evaluate_model(model, processor, bench, profile, progress=progress)
        if world_seed is None or world_seed == PROFILES[name].world_seed:
            # shipped beside the model (ship_model copies zero-shot/): the tutorial reuses it instead of
            # regenerating every answer; the file name holds the model, benchmark, settings and scoring
            atomic_write_text(Path(model_dir).parent / "zero-shot" / zero_shot_file(profile, bench, key),
                              results.to_csv(index=False))
        metrics[f"{name} benchmark, seed 0"] = base_model_metrics(
            model, processor, bench, World(profile.world_seed, profile.image_size, profile.n_genera), profile,
            progress=progress, results=results)
    return metrics


def mean_std(tables: dict[int, "pd.DataFrame"], decimals: int = 1) -> "pd.DataFrame":
    """Per-seed tables (same rows and columns) -> one table of "mean ± std" strings: the sample standard
    deviation over seeds (ddof 1, an unbiased variance: ddof 0 would understate 3 seeds' spread by 1.22x).
    One seed has no spread to report: the mean alone."""
    import pandas as pd

    long = pd.concat(tables, names=["seed", "method"])
    grouped = long.groupby(level="method", sort=False)
    mean, std = grouped.mean(), grouped.std(ddof=1)
    if len(tables) < 2:
        return mean.round(decimals).astype(str).where(mean.notna())
    return mean.round(decimals).astype(str) + " ± " + std.round(decimals).astype(str)


def sft_comparison(profile=None, out=None, seeds=(0, 1, 2), progress: bool = False) -> "pd.DataFrame":
    """Zero-shot vs direct SFT vs CoT SFT over several run seeds (split, shots, CoT set and training all
    follow the seed): the Fig. 3a comparison as mean ± std. Writes ``sft_comparison.csv`` in the run folder."""
    return compare_methods(profile, out, seeds, ("zero-shot", "direct SFT", "CoT SFT"), progress=progress,
                           csv_name="sft_comparison.csv")


# --------------------------------------------------------------------------------------------------
# Stage 2: TAPO (§4.3) and the methods of the evaluation tables
# --------------------------------------------------------------------------------------------------


def tapo_config(profile=None, seed: int = 0, variant: str = "tapo", n_triplets: int | None = None, **overrides):
    """The TapoConfig of a run: the variant's preset (``tapo.VARIANTS``), then ``profile.tapo``, then
    ``overrides`` (a key that is not a setting, in the profile or in the overrides, is an error naming it).
    ``epochs`` (the real profiles) sets the step count from the number of triplets; ``seeds`` is for the
    drivers, not the trainer."""
    import dataclasses
    import math

    from .tapo import TapoConfig

    profile = get_profile(profile)
    merged = stage_config(profile, "tapo", overrides)
    fields = {f.name for f in dataclasses.fields(TapoConfig)}
    cfg = {k: v for k, v in merged.items() if k in fields}
    if "epochs" in merged and "steps" not in overrides:
        if not n_triplets:
            raise ValueError(f"profile {profile.name!r} gives TAPO epochs: the number of triplets is needed")
        cfg["steps"] = max(1, math.ceil(merged["epochs"] * n_triplets / cfg.get("prompts_per_step", 8)))
    cfg.setdefault("bf16_autocast", profile.dtype == "bfloat16")  # fp32 weights, bf16 compute (training_dtype)
    return TapoConfig.variant(variant, **{**cfg, "seed": seed})


def _tapo_folder(variant: str, seed: int, n1: int | None, n2: int | None) -> str:
    """The run folder; an n1:n2 equal to the variant's preset is the preset's run (no duplicate training)."""
    from .tapo import VARIANTS

    preset = VARIANTS.get(variant, {})
    n1 = None if n1 == preset.get("n1") and n2 in (None, preset.get("n2")) else n1
    n2 = None if n1 is None and n2 in (None, preset.get("n2")) else n2
    ratio = f"-{n1}x{n2}" if n1 is not None or n2 is not None else ""
    return f"tapo-{variant}{ratio}-seed{seed}"


def _tapo_key(key: str) -> tuple[str, int | None, int | None]:
    """"tapo-intra" -> ("intra", None, None); "tapo-tapo-2x8" -> ("tapo", 2, 8) (an n1:n2 run, Table 3a);
    a variant with a dash ("tapo-tapo-eq4") is matched whole."""
    from .tapo import VARIANTS

    rest = key[len("tapo-"):]
    for variant in sorted(VARIANTS, key=len, reverse=True):
        if rest == variant:
            return variant, None, None
    variant, _, ratio = rest.rpartition("-") if "-" in rest else (rest, "", "")
    if not ratio:
        return rest, None, None
    try:
        n1, n2 = (int(v) for v in ratio.split("x"))
    except ValueError:
        raise ValueError(f"bad TAPO run name {key!r}: expected tapo-<variant> or tapo-<variant>-<n1>x<n2>") from None
    return variant, n1, n2


def tapo_key(profile=None, out=None, seed: int = 0, variant: str = "tapo", n1: int | None = None,
             n2: int | None = None, **overrides) -> str:
    """The key of a TAPO run: its TapoConfig, the CoT-SFT model's key and the benchmark."""
    profile = get_profile(profile)
    bench = get_benchmark(profile, out, seed)
    ratio = {k: v for k, v in (("n1", n1), ("n2", n2)) if v is not None}
    cfg = tapo_config(profile, seed, variant, n_triplets=len(bench.triplets), **ratio, **overrides)
    return run_key("tapo", cfg.to_dict(), {"sft": sft_key(profile, out, seed, "cot"), "bench": bench_key(bench)})


def run_tapo(profile=None, out=None, seed: int = 0, variant: str = "tapo", progress: bool = True,
             n1: int | None = None, n2: int | None = None, fresh: bool = False, **overrides) -> dict:
    """Stage 2 of Fine-R1 (§4.3): TAPO, or one of its ablation variants (dapo, intra, inter, tapo; any n1:n2),
    from the CoT-SFT model of the same seed (trained first if missing). ``overrides``: TapoConfig settings
    (an unknown one is an error). The run with the same key (:func:`tapo_key`: settings + the SFT model's key)
    is reused when finished and resumed when interrupted; another key is a new run (the previous one is
    parked in ``.by-key/``). ``fresh=True`` starts over. Returns the summary with ``model`` and ``key``."""
    import json

    from .model import load_model
    from .tapo import TapoTrainer

    profile = get_profile(profile)
    bench = get_benchmark(profile, out, seed)
    ratio = {k: v for k, v in (("n1", n1), ("n2", n2)) if v is not None}
    cfg = tapo_config(profile, seed, variant, n_triplets=len(bench.triplets), **ratio, **overrides)
    key = tapo_key(profile, out, seed, variant, n1, n2, **overrides)
    folder = _run_dir(profile, out) / _tapo_folder(variant, seed, n1, n2)
    if fresh:
        discard_run(folder, key)
    folder, same = claim_run_folder(folder, key, {"stage": "tapo", "variant": variant, "config": cfg.to_dict()})
    done = folder / "tapo.json"
    if same and done.is_file() and (folder / "model").is_dir():
        summary = json.loads(done.read_text())
        return {**summary, "model": str(folder / "model"), "key": key, "reused": True}
    sft = run_sft(profile, out, seed, "cot", progress=progress)
    model, processor = load_model(sft["model"], dtype=training_dtype(profile))  # fp32 master weights
    summary = {**TapoTrainer(model, processor, bench, cfg, folder).train(progress=progress), "key": key}
    write_json(done, {k: v for k, v in summary.items() if k != "model"})
    return {**summary, "model": str(folder / "model")}


#: The rows of the evaluation tables (Tables 1-2, Fig. 3): name -> (what model, "step by step" prompt).
METHODS = {
    "zero-shot": ("base", False),
    "zero-shot + step by step": ("base", True),   # Fig. 3b
    "direct SFT": ("sft-direct", False),          # Fig. 3a
    "CoT SFT": ("sft-cot", False),
    "CoT SFT + DAPO": ("tapo-dapo", False),       # Fig. 3c
    "Fine-R1 (TAPO)": ("tapo-tapo", False),
    "CLIP-style dual encoder": ("clip", False),   # Table 1 CLIP rows: closed world only
}


def _clip_config(profile: Profile, seed: int):
    from .clip_baseline import clip_config

    cfg = dict(profile.eval.get("clip", {"preset": "cpu"}))
    return clip_config(cfg.pop("preset"), seed=seed, **cfg)


def _clip_key(profile: Profile, seed: int) -> str:
    from dataclasses import asdict

    return run_key("clip", asdict(_clip_config(profile, seed)),
                   {"world": [profile.world_seed, profile.image_size, profile.n_genera]})


def run_clip(profile=None, out=None, seed: int = 0, progress: bool = False):
    """The contrastive CLIP-style baseline (Table 1, CLIP rows): a dual encoder trained on the base model's
    pretraining data (``clip_baseline``), preset ``profile.eval["clip"]``; resumes, a finished run is reused
    (another config is a new run: the folder is keyed like the others). Micro world only (on real data use a
    real CLIP/SigLIP). Returns (model, folder)."""
    from dataclasses import asdict

    from .clip_baseline import train_clip
    from .world import World

    profile = get_profile(profile)
    if profile.world != "micro":
        raise ValueError("the CLIP-style baseline is trained on the micro world's pretraining data; on real "
                         "data compare with a released CLIP/SigLIP instead")
    cfg = _clip_config(profile, seed)
    folder, _ = claim_run_folder(_run_dir(profile, out) / f"clip-seed{seed}", _clip_key(profile, seed),
                                 {"stage": "clip", "config": asdict(cfg)})
    world = World(profile.world_seed, profile.image_size, profile.n_genera)
    model, _ = train_clip(world, cfg, folder, progress=progress)
    return model, folder


def method_model(profile=None, out=None, seed: int = 0, method: str = "Fine-R1 (TAPO)", progress: bool = False):
    """(model, processor, folder) of a method: the base model, or the run that trains it (done if missing).
    ``method`` is a key of ``METHODS`` or "tapo-<variant>" (e.g. "tapo-intra")."""
    from .model import load_model

    profile = get_profile(profile)
    key = _method_key(method)[0]
    if key == "base":
        model, processor = load_base_model(profile)
        return model, processor, get_benchmark(profile, out, seed).root
    if key.startswith("sft-"):
        summary = run_sft(profile, out, seed, key[4:], progress=progress)
    elif key.startswith("tapo-"):
        variant, n1, n2 = _tapo_key(key)
        summary = run_tapo(profile, out, seed, variant, progress=progress, n1=n1, n2=n2)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)} or 'tapo-<variant>'")
    model, processor = load_model(summary["model"], dtype=profile.load_dtype)
    return model, processor, Path(summary["model"]).parent


def _method_key(method: str) -> tuple[str, bool]:
    """(what model, "step by step" prompt) of a ``METHODS`` row or of "tapo-<variant>"."""
    return METHODS.get(method, (method, False))


def method_key(profile=None, out=None, seed: int = 0, method: str = "zero-shot") -> str:
    """The key of the model a method evaluates (base model, SFT / TAPO run, CLIP-style run)."""
    profile = get_profile(profile)
    key, _ = _method_key(method)
    if key == "base":
        return base_model_key(profile)
    if key == "clip":
        return _clip_key(profile, seed)
    if key.startswith("sft-"):
        return sft_key(profile, out, seed, key[4:])
    if key.startswith("tapo-"):
        variant, n1, n2 = _tapo_key(key)
        return tapo_key(profile, out, seed, variant, n1, n2)
    raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)} or 'tapo-<variant>'")


#: The scoring rules the cached evaluations were scored under (metrics.SCORINGS; official since issue 18).
EVAL_SCORING = "official-v1"


def _eval_name(profile: Profile, bench: Benchmark, model_key: str, think: bool) -> str:
    """The file-name hash of an evaluation: the model's key, the prompt, the evaluation settings, the benchmark
    and the scoring rule (another model or setting: another file)."""
    settings = {k: v for k, v in profile.eval.items() if k in ("max_new_tokens", "batch_size")}
    # the scoring rule is part of the key: a CSV scored under other rules is never reused
    return digest({"model": model_key, "think": think, "eval": settings, "bench": bench_key(bench),
                   "scoring": EVAL_SCORING}, 12)


def zero_shot_file(profile: Profile, bench: Benchmark, model_key: str | None = None, think: bool = False) -> str:
    """The file name of the base model's zero-shot evaluation on ``bench`` (``model_key``: default the profile's
    base model). The same name in the benchmark folder (the cache) and in the shipped model's ``zero-shot/``."""
    name = _eval_name(profile, bench, model_key or base_model_key(profile), think)
    return f"eval-zero-shot{'-step-by-step' if think else ''}-{name}.csv"


def _eval_cache(profile: Profile, out, seed: int, method: str) -> Path:
    """Where ``evaluate_method`` caches a method's evaluation: next to the model it evaluates, named by
    ``_eval_name`` (the base model's: in the benchmark folder, named by ``zero_shot_file``)."""
    key, think = _method_key(method)
    bench = get_benchmark(profile, out, seed)
    if key == "base":
        return bench.root / zero_shot_file(profile, bench, think=think)
    name = _eval_name(profile, bench, method_key(profile, out, seed, method), think)
    if key == "clip":
        return _run_dir(profile, out) / f"clip-seed{seed}" / f"eval-{name}.csv"
    if key.startswith("sft-"):
        return _run_dir(profile, out) / f"sft-{key[4:]}-seed{seed}" / f"eval-{name}.csv"
    variant, n1, n2 = _tapo_key(key)
    return _run_dir(profile, out) / _tapo_folder(variant, seed, n1, n2) / f"eval-{name}.csv"


def _shipped_eval(profile: Profile, cache: Path, method: str) -> Path | None:
    """The base model's evaluation measured when it was shipped (``shipping_metrics``), if this cache is one."""
    shipped = Path(profile.model) / "zero-shot" / cache.name
    return shipped if _method_key(method)[0] == "base" and shipped.is_file() else None


def _read_eval(path: Path) -> "pd.DataFrame":
    import pandas as pd

    return pd.read_csv(path, keep_default_na=False, dtype={"output": str, "prediction": str},
                       converters={"SS": lambda v: float(v) if v != "" else float("nan")})


def evaluate_method(profile=None, out=None, seed: int = 0, method: str = "zero-shot", progress: bool = False,
                    force: bool = False) -> "pd.DataFrame":
    """Closed- and open-world evaluation of one method on the seed's benchmark (``evaluate.evaluate_model``),
    cached as ``eval*.csv`` in the folder of the model (a retrained model takes its cache with it)."""
    import pandas as pd

    from .evaluate import evaluate_model
    from .io import atomic_write_text

    profile = get_profile(profile)
    key, think = _method_key(method)
    cache = _eval_cache(profile, out, seed, method)
    if cache.is_file() and not force and _folder_holds(cache.parent, method, profile, out, seed):
        return _read_eval(cache)
    shipped = _shipped_eval(profile, cache, method)
    if shipped and not force:
        # measured when the model was shipped (same model, benchmark, prompt, settings and scoring: same name)
        df = _read_eval(shipped)
        atomic_write_text(cache, df.to_csv(index=False))
        return df
    if key == "clip":
        from .clip_baseline import closed_world_eval

        bench = get_benchmark(profile, out, seed)
        clip, _ = run_clip(profile, out, seed, progress=progress)
        df = closed_world_eval(clip, bench.eval_rows, bench.image)
        atomic_write_text(cache, df.to_csv(index=False))
        return df
    model, processor, _ = method_model(profile, out, seed, method, progress=progress)  # claims the folder
    df = evaluate_model(model, processor, get_benchmark(profile, out, seed), profile,
                        think_step_by_step=think, progress=progress)
    atomic_write_text(cache, df.to_csv(index=False))
    return df


def _folder_holds(folder: Path, method: str, profile: Profile, out, seed: int) -> bool:
    """Whether a run folder holds the run an evaluation cache belongs to (the benchmark folder always does:
    its file names carry the base model's key)."""
    key, _ = _method_key(method)
    if key == "base":
        return True
    info = read_run_info(folder)
    return info is not None and info["key"] == method_key(profile, out, seed, method)


def evaluate_methods(profile=None, out=None, seeds=(0,), methods=tuple(METHODS), progress: bool = False
                     ) -> dict[tuple[int, str], "pd.DataFrame"]:
    """``evaluate_method`` for every (seed, method); the ones not cached yet are trained and evaluated side by
    side (``parallel.run_parallel``: one core each on a CPU), after what they share (benchmark, CoT data,
    SFT models) is built here: batched SFT uses every core well and runs in this process, while generation-bound
    work (TAPO rollouts, evaluation) and the CLIP-style baseline gain from one core per job.
    Returns ``{(seed, method): frame}``."""
    from .parallel import run_parallel, workers_for

    profile = get_profile(profile)
    todo = {}
    for s in seeds:
        for m in methods:
            cache = _eval_cache(profile, out, s, m)
            if not (cache.is_file() and _folder_holds(cache.parent, m, profile, out, s)) \
                    and not _shipped_eval(profile, cache, m):
                todo[s, m] = dict(profile=profile, out=out, seed=s, method=m)
    if workers_for(len(todo)) > 1:
        for seed in sorted({s for s, _ in todo}):
            keys = [_method_key(m)[0] for s, m in todo if s == seed]
            if any(k.startswith(("sft-", "tapo-")) for k in keys):
                sft_samples(profile, out, seed, "cot")  # concepts + CoT data (both SFT sets)
            # SFT uses both cores well (batched forward/backward); TAPO runs start from the CoT SFT model
            for data in sorted({k[4:] for k in keys if k.startswith("sft-")}
                               | ({"cot"} if any(k.startswith("tapo-") for k in keys) else set())):
                run_sft(profile, out, seed, data, progress=False)
        run_parallel(evaluate_method, todo, progress=progress)
    return {(s, m): evaluate_method(profile, out, s, m, progress=progress) for s in seeds for m in methods}


def compare_methods(profile=None, out=None, seeds=(0,), methods=tuple(METHODS), progress: bool = False,
                    csv_name: str | None = None) -> "pd.DataFrame":
    """``evaluate.compare`` of several methods (trained and evaluated as needed, cached) over seeds: one row per
    method, "mean ± std" over the seeds; the per-seed numbers go to ``csv_name`` in the run folder."""
    import pandas as pd

    from .evaluate import compare
    from .io import atomic_write_text

    profile = get_profile(profile)
    frames = evaluate_methods(profile, out, seeds, methods, progress=progress)
    tables = {s: compare({m: frames[s, m] for m in methods}) for s in seeds}
    if csv_name:
        atomic_write_text(_run_dir(profile, out) / csv_name,
                          pd.concat(tables, names=["seed", "method"]).to_csv())
    return mean_std(tables)


def tapo_ablation(profile=None, out=None, seeds=(0,), variants=("dapo", "intra", "inter", "tapo"),
                  progress: bool = False) -> "pd.DataFrame":
    """Fig. 3c analog (key components): CoT SFT + each TAPO variant (DAPO, + intra-class positives, + inter-class negatives,
    both), mean ± std over seeds; per-seed rows in ``tapo_ablation.csv``."""
    methods = ("CoT SFT",) + tuple(f"tapo-{v}" for v in variants)
    return compare_methods(profile, out, seeds, methods, progress=progress, csv_name="tapo_ablation.csv")


#: Table 3a: rollouts from the anchor : from the positive, in a group of 10.
RATIOS = ((10, 0), (8, 2), (5, 5), (2, 8), (0, 10))


def tapo_ratios(profile=None, out=None, seeds=(0,), ratios=RATIOS, progress: bool = False) -> "pd.DataFrame":
    """Table 3a analog: full TAPO with n1:n2 anchor:positive rollouts; per-seed rows in ``tapo_ratios.csv``."""
    methods = tuple(f"tapo-tapo-{n1}x{n2}" for n1, n2 in ratios)
    return compare_methods(profile, out, seeds, methods, progress=progress, csv_name="tapo_ratios.csv")


# --------------------------------------------------------------------------------------------------
# §5.4: why it works (H1-H3, Table 4 and Fig. 4)
# --------------------------------------------------------------------------------------------------


def _analysis_features(model, processor, bench, profile: Profile, seed: int) -> dict:
    """The hidden states H1-H3 need from one model (``analysis`` module), on the seed's benchmark."""
    from .analysis import h3_pairs, image_token_features, name_embeddings, pair_features
    from .records import SUPER_CATEGORY_WORD

    cfg = {**ANALYSIS_DEFAULTS, **profile.eval.get("analysis", {})}
    probe_train = [r for role in ("train", "rl", "reference") for r in bench.records[role]]
    probe_test = bench.records["test"]
    load = lambda recs: [bench.image(r) for r in recs]  # noqa: E731
    names = sorted({r.label for r in probe_test})
    pairs = h3_pairs(probe_test, {sc: sorted({r.label for r in probe_test if r.super_category == sc})
                                  for sc in bench.split}, seed=seed)
    return {
        "probe_train": image_token_features(model, processor, load(probe_train), batch_size=cfg["batch_size"]),
        "probe_test": image_token_features(model, processor, load(probe_test), batch_size=cfg["batch_size"]),
        "names": names,
        "name_emb": name_embeddings(model, processor, names, batch_size=cfg["batch_size"]),
        "pairs": pair_features(model, processor, [bench.image(r) for r, _, _ in pairs],
                               [SUPER_CATEGORY_WORD[r.super_category] for r, _, _ in pairs],
                               [n for _, n, _ in pairs], batch_size=cfg["batch_size"]),
        "pair_labels": [int(p) for _, _, p in pairs],
        "pair_groups": [r.image_id for r, _, _ in pairs],
        "pair_split": ["seen" if r.label in set(bench.seen_labels()) else "unseen" for r, _, _ in pairs],
    }


#: Settings of the analysis (override with ``profile.eval["analysis"]``).
ANALYSIS_DEFAULTS = dict(batch_size=16, n_inter=4)


def run_analysis(profile=None, out=None, seed: int = 0, methods=("zero-shot", "Fine-R1 (TAPO)"),
                 progress: bool = False) -> dict:
    """H1-H3 (paper §5.4) for the base model and Fine-R1 (any two ``METHODS``) on the seed's benchmark.

    H1 (Table 4 left): linear probe of mean-pooled image-token states, trained on the train/rl/reference
    images, tested on the test images (all classes). H2 (Table 4 right): per species, intra-genus minus
    inter-genus cosine of name embeddings; paired t-test between the two models. H3 (Fig. 4): last-token state
    of "<image> Is the <super> species <correct / sibling name>?", PCA, and how separable the two kinds are.
    Returns ``{"h1": DataFrame, "h2": dict, "h2_gaps": {method: DataFrame}, "h3": {method: separability},
    "h3_labels": [...]}``; ``analysis-seed{S}.json`` in the run folder holds the numbers.
    """
    import pandas as pd

    from .analysis import compare_gaps, linear_probe, separability, taxonomy_gap

    profile = get_profile(profile)
    if len(methods) != 2:
        raise ValueError(f"the analysis compares two methods (base, Fine-R1); got {list(methods)}")
    bench = get_benchmark(profile, out, seed)
    cfg = {**ANALYSIS_DEFAULTS, **profile.eval.get("analysis", {})}
    genus_of = {r.label: r.genus for role in bench.records.values() for r in role}
    super_of = {r.label: r.super_category for role in bench.records.values() for r in role}
    feats = {}
    for m in methods:
        model, processor, _ = method_model(profile, out, seed, m, progress=progress)
        feats[m] = _analysis_features(model, processor, bench, profile, seed)
        del model
    ytr = [r.label for role in ("train", "rl", "reference") for r in bench.records[role]]
    yte = [r.label for r in bench.records["test"]]
    seen = set(bench.seen_labels())
    h1 = {}
    split_of = ["seen" if y in seen else "unseen" for y in yte]
    for m, f in feats.items():  # one fit per model, scored on all / seen / unseen test classes
        acc = linear_probe(f["probe_train"], ytr, f["probe_test"], yte, seed=seed, groups=split_of)
        h1[m] = {f"probe ({k})": acc[k] for k in ("all", "seen", "unseen")}
    gaps = {m: taxonomy_gap(f["name_emb"], f["names"], genus_of, n_inter=cfg["n_inter"], seed=seed,
                            super_of=super_of) for m, f in feats.items()}
    a, b = methods
    h2 = compare_gaps(gaps[a]["delta"].to_numpy(), gaps[b]["delta"].to_numpy())
    h2 = {f"delta ({a})": h2["delta_a"], f"delta ({b})": h2["delta_b"], "t": h2["t"], "p": h2["p"],
          "species": len(gaps[a])}
    h3 = {m: separability(f["pairs"], f["pair_labels"], seed=seed, groups=f["pair_groups"]) for m, f in feats.items()}
    result = {"h1": pd.DataFrame(h1).T.round(2), "h2": h2, "h2_gaps": gaps, "h3": h3,
              "h3_labels": feats[a]["pair_labels"], "h3_split": feats[a]["pair_split"]}
    write_json(_run_dir(profile, out) / f"analysis-seed{seed}.json", {
        "methods": list(methods), "h1": h1, "h2": h2,
        "h3": {m: {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in s.items() if k != "pca"}
               for m, s in h3.items()}})
    return result


def analysis_summary(profile=None, out=None, seeds=(0,)) -> "pd.DataFrame":
    """H1-H3 of several seeds (``analysis-seed{S}.json``, written by :func:`run_analysis`) as mean ± std:
    probe accuracy (%), the H2 gap Δ = intra − inter genus cosine, H3 cross-validated accuracy (%) and
    silhouette of positive vs negative pairs. The per-seed paired t-tests of H2 are in ``.attrs["h2_tests"]``."""
    import json

    import pandas as pd

    tables, tests = {}, {}
    for seed in seeds:
        path = _run_dir(get_profile(profile), out) / f"analysis-seed{seed}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `python -m finer1_lib analyze --seed {seed}` first")
        res = json.loads(path.read_text())
        tables[seed] = pd.DataFrame({m: {**{f"H1 {k}": v for k, v in res["h1"][m].items()},
                                         "H2 delta": res["h2"][f"delta ({m})"],
                                         "H3 PCA-2 acc": 100 * res["h3"][m]["pca2_accuracy"],
                                         "H3 full acc": 100 * res["h3"][m]["full_accuracy"],
                                         "H3 silhouette": res["h3"][m]["silhouette"]}
                                     for m in res["methods"]}).T
        tests[seed] = {"t": res["h2"]["t"], "p": res["h2"]["p"]}
    grouped = pd.concat(tables, names=["seed", "method"]).groupby(level="method", sort=False)
    mean, std = grouped.mean(), grouped.std(ddof=1)  # sample std over seeds (see mean_std)

    def cell(c, a, b):
        digits = 3 if c in ("H2 delta", "H3 silhouette") else 1
        return f"{a:.{digits}f}" if len(tables) < 2 else f"{a:.{digits}f} ± {b:.{digits}f}"

    summary = pd.DataFrame({c: [cell(c, a, b) for a, b in zip(mean[c], std[c])] for c in mean.columns},
                           index=mean.index)
    summary.attrs["h2_tests"] = tests
    return summary
