"""Command line: ``python -m finer1_lib <stage> --profile P --seed S --out DIR [--set key=value ...]``.

Every stage of the tutorial is a function of the library; this file only parses arguments and calls it.
``--set lr=1e-4`` overrides one setting of the command's stage (``--set sft.lr=1e-4`` names the stage); an
unknown key is an error naming it and the valid keys. A bad input (unknown profile or setting, a file that does
not parse, an ``--out`` that cannot be written, a damaged model file) prints one line ``error: ...`` on stderr
and exits with code 2, before anything is written where possible; Ctrl-C exits with 130 and no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .profiles import get_profile, profile_names

#: The settings dict that a bare ``--set key=value`` of a command changes.
SET_STAGE = {"concepts": "concepts", "cot": "cot", "sft": "sft", "tapo": "tapo", "evaluate": "eval",
             "analyze": "eval", "reproduce": "tapo", "validate": "sft"}

STAGES: dict[str, tuple[str, callable]] = {}


def stage(name: str, help: str):
    def register(fn):
        STAGES[name] = (help, fn)
        return fn
    return register


@stage("world", "render the micro world (or read the real datasets) and write split, shots, triplets, eval JSONL")
def _world(args) -> int:
    from .benchmark import build_benchmark

    bench = build_benchmark(args.profile, args.out or None, args.seed)
    print(json.dumps(bench.info, indent=1))
    print(f"benchmark written to {bench.root}")
    return 0


@stage("pretrain", "pretrain the tiny Qwen2.5-VL on the micro world (resumes from its last checkpoint)")
def _pretrain(args) -> int:
    from .pretrain import pretrain

    profile, out = args.profile, args.out or None
    if args.world_seed is not None and args.world_seed != profile.world_seed:
        if args.ship:  # data/base_model serves the profiles' own world
            raise ValueError(f"--ship ships a model of world {profile.world_seed} only; --world-seed "
                             f"{args.world_seed} checks that the recipe is not tuned to one world (use --measure)")
        profile = profile.replace(world_seed=args.world_seed)
        out = out or profile.run_dir() / f"pretrain-world{args.world_seed}"
    final = pretrain(profile, out, steps=args.steps)
    print(f"model written to {final}")
    if args.ship or args.measure:
        from .knowledge import target_table
        from .pipeline import shipping_metrics

        metrics = shipping_metrics(final, world_seed=profile.world_seed)
        print(json.dumps(metrics, indent=1))
        print(target_table(metrics["cpu benchmark, seed 0"]).to_string())
        if args.measure:
            from .io import write_json

            write_json(final.parent / "metrics.json", metrics)
            print(f"metrics written to {final.parent / 'metrics.json'}")
        if args.ship:
            from .pretrain import ship_model

            print(f"shipped to {ship_model(final.parent, metrics=metrics)}")
    return 0


@stage("concepts", "§4.2 (1): caption the few-shot images with the base model, pool and filter concepts")
def _concepts(args) -> int:
    from .concepts import concept_table
    from .pipeline import run_concepts

    results = run_concepts(args.profile, args.out or None, args.seed, force=True)
    table = concept_table(results)
    print(table.head(12).to_string())
    print(f"{len(results)} images; concepts kept per image: {sum(len(r.kept) for r in results) / len(results):.2f}")
    return 0


@stage("cot", "§4.2 (2): teacher rationales with the paper's filters -> sharegpt CoT SFT set + statistics")
def _cot(args) -> int:
    from .pipeline import run_cot

    folder, stats = run_cot(args.profile, args.out or None, args.seed, force=True)
    print(json.dumps(stats, indent=1))
    print(f"SFT sets written to {folder}")
    return 0


@stage("sft", "stage 1: CoT SFT (--data cot) or the direct-answer baseline (--data direct); resumes")
def _sft(args) -> int:
    from .pipeline import run_sft, sft_comparison

    if args.compare:
        print(sft_comparison(args.profile, args.out or None, seeds=args.compare).to_string())
        return 0
    summary = run_sft(args.profile, args.out or None, args.seed, data=args.data)
    print(json.dumps({k: v for k, v in summary.items() if k != "cfg"}, indent=1))
    return 0


@stage("tapo", "stage 2: TAPO (§4.3) or a variant from the CoT-SFT model; --ablation / --ratios: Fig. 3c / Table 3a")
def _tapo(args) -> int:
    from .distributed import prepare_tapo, processes
    from .pipeline import run_tapo, tapo_ablation, tapo_ratios

    seeds = args.seeds or [args.seed]
    procs = processes()  # under `accelerate launch`: the process group, before any model is loaded
    if procs.world > 1:  # one TAPO run, data-parallel (distributed.py); the tables need one process
        if args.ablation or args.ratios or len(seeds) > 1:
            raise ValueError(f"accelerate launch runs one TAPO run at a time ({procs.world} processes): pass one "
                             f"--seed and --variant, without --ablation / --ratios / --seeds; evaluate with one "
                             f"process afterwards (`python -m finer1_lib evaluate`)")
        prepare_tapo(args.profile, args.out or None, seeds[0], args.variant, args.n1, args.n2)
        summary = run_tapo(args.profile, args.out or None, seeds[0], args.variant, n1=args.n1, n2=args.n2,
                           progress=procs.main)
        if procs.main:
            print(json.dumps({k: v for k, v in summary.items() if k != "cfg"}, indent=1))
        return 0
    if args.ablation or args.ratios:
        fn = tapo_ablation if args.ablation else tapo_ratios
        print(fn(args.profile, args.out or None, seeds=seeds, progress=True).to_string())
        return 0
    for seed in seeds:
        summary = run_tapo(args.profile, args.out or None, seed, args.variant, n1=args.n1, n2=args.n2)
        print(json.dumps({k: v for k, v in summary.items() if k != "cfg"}, indent=1))
    return 0


@stage("evaluate", "closed- and open-world evaluation of the methods (Tables 1-2, Fig. 3), mean ± std over seeds")
def _evaluate(args) -> int:
    from .pipeline import METHODS, compare_methods

    unknown = [m for m in args.methods if m not in METHODS and not m.startswith("tapo-")]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)} or tapo-<variant>")
    table = compare_methods(args.profile, args.out or None, args.seeds or [args.seed], args.methods,
                            progress=True, csv_name="evaluation.csv")
    print(table.to_string())
    return 0


@stage("analyze", "§5.4: H1 linear probe, H2 taxonomy gap + t-test, H3 PCA separability (Table 4, Fig. 4)")
def _analyze(args) -> int:
    from .pipeline import run_analysis

    for seed in args.seeds or [args.seed]:
        res = run_analysis(args.profile, args.out or None, seed, progress=True)
        print(f"seed {seed}\nH1 linear probe (%):\n{res['h1'].to_string()}")
        print("H2:", json.dumps(res["h2"], default=float))
        print("H3:", json.dumps({m: {k: v for k, v in s.items() if k in ("pca2_accuracy", "full_accuracy",
                                                                           "silhouette")}
                                 for m, s in res["h3"].items()}, default=float))
    if len(args.seeds or []) > 1:
        from .pipeline import analysis_summary

        summary = analysis_summary(args.profile, args.out or None, args.seeds)
        print(f"seeds {args.seeds} (mean ± std):\n{summary.to_string()}\nH2 paired t-tests per seed: "
              f"{json.dumps(summary.attrs['h2_tests'])}")
    return 0


@stage("diagnose", "issue 19: where structured answers go wrong (perception / candidate recall / choice), per method")
def _diagnose(args) -> int:
    from .diagnose import diagnose_methods

    table = diagnose_methods(args.profile, args.out or None, args.seed, args.methods, progress=True)
    print(table.round(1).to_string())
    if args.csv:
        from .io import atomic_write_text

        atomic_write_text(Path(args.csv), table.to_csv())
        print(f"table written to {args.csv}")
    return 0


@stage("reproduce", "issue 19: every run behind the paper's comparisons (resumable), tables and verdicts in --out")
def _reproduce(args) -> int:
    from .reproduce import main_args

    return main_args(args)


@stage("validate", "issue 19: SFT variants on fresh validation renders (never the test images); a table per variant")
def _validate(args) -> int:
    from .validation import parse_variant, validate_sft

    variants = [parse_variant(v) for v in (args.grid or ["default"])]
    table = validate_sft(args.profile, args.out or None, args.seed, variants, data=args.data,
                         per_class=args.per_class, modes=args.modes, progress=True)
    print(table.T.to_string())
    if args.csv:
        from .io import atomic_write_text

        atomic_write_text(Path(args.csv), table.to_csv())
        print(f"table written to {args.csv}")
    return 0


@stage("export", "write the run's triplets, CoT set and eval sets in the official stack's formats (read back)")
def _export(args) -> int:
    from .export import export_run

    written = export_run(args.profile, args.runs or None, args.seed, args.format, args.out or None)
    for fmt, files in written.items():
        print(f"{fmt}: " + ", ".join(str(f) for f in files))
    return 0


@stage("tutorial", "run the notebooks in order, writing executed copies, figures/ and a results report")
def _tutorial(args) -> int:
    from .tutorial import run_tutorial

    report = run_tutorial(args.profile, args.out or None, only=args.only)
    print(f"report written to {report}")
    return 0


@stage("bench", "benchmarks: `bench generate` (rollout tokens/s, peak memory), `bench tapo` (TAPO/DAPO step time), "
                "`bench train` (GPU memory of full / LoRA / QLoRA at the real size)")
def _bench(args) -> int:
    from .bench import bench_generate
    from .tapo import bench_tapo

    if args.what == "train":
        from .bench import bench_train

        result = bench_train(args.size, args.out or None, modes=args.modes, batch_size=args.batch_size,
                             steps=args.steps, seed=args.seed)
    else:
        result = {"generate": bench_generate, "tapo": bench_tapo}[args.what](args.profile, args.out or None,
                                                                              seed=args.seed)
    print(json.dumps(result, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finer1_lib",
        description="Fine-R1 tutorial: every stage of the pipeline as a command (run one with --help for options).",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (help, _) in STAGES.items():
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--profile", default=None, choices=profile_names(),  # $FINER1_PROFILE: checked in main
                       help="sizes and model (default: $FINER1_PROFILE or cpu)")
        p.add_argument("--seed", type=int, default=0, help="run seed (split, shots, training)")
        p.add_argument("--out", default="", help="output folder (default: data/runs/<profile>/...)")
        if name in SET_STAGE:
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help=f"override a setting of profile.{SET_STAGE[name]} (repeatable; "
                                f"stage.key=value for another stage, e.g. sft.lr=1e-4)")
        if name == "pretrain":
            p.add_argument("--steps", type=int, default=None, help="override the profile's step count")
            p.add_argument("--ship", action="store_true", help="measure the result on the seed-0 smoke and cpu "
                           "benchmarks and copy it with its metrics to data/base_model (the shipped model)")
            p.add_argument("--measure", action="store_true", help="measure as --ship does, write "
                           "<out>/metrics.json and print the targets table, without shipping")
            p.add_argument("--world-seed", type=int, default=None, help="another micro world (default: the "
                           "profile's); its run goes to data/runs/<profile>/pretrain-world<N>")
        if name == "sft":
            p.add_argument("--data", choices=["cot", "direct"], default="cot", help="CoT SFT or direct-answer SFT")
            p.add_argument("--compare", type=int, nargs="+", metavar="SEED",
                           help="train direct and CoT SFT for these seeds, evaluate, print mean ± std (Fig. 3a)")
        if name in ("tapo", "evaluate", "analyze", "reproduce"):
            p.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="several seeds (mean ± std)")
        if name == "tapo":
            from .tapo import VARIANTS

            p.add_argument("--variant", choices=sorted(VARIANTS), default="tapo", help="ablation preset (Fig. 3c)")
            p.add_argument("--n1", type=int, default=None, help="rollouts from the anchor (Eq. 1)")
            p.add_argument("--n2", type=int, default=None, help="rollouts from the positive (Eq. 1)")
            p.add_argument("--ablation", action="store_true", help="all four variants, evaluated (Fig. 3c)")
            p.add_argument("--ratios", action="store_true", help="n1:n2 in 10:0 8:2 5:5 2:8 0:10 (Table 3a)")
        if name == "evaluate":
            from .pipeline import METHODS

            p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                           help=f"rows of the table (default all: {', '.join(METHODS)})")
        if name == "diagnose":
            from .diagnose import DIAGNOSED_METHODS
            from .pipeline import METHODS

            p.add_argument("--methods", nargs="+", default=list(DIAGNOSED_METHODS), metavar="METHOD",
                           help=f"methods (default: {', '.join(DIAGNOSED_METHODS)}; any of {', '.join(METHODS)} "
                                "or tapo-<variant>)")
            p.add_argument("--csv", default="", help="also write the table to this CSV file")
        if name == "bench":
            from .bench import TRAIN_MODES
            from .model import REAL_SIZES, TINY_SIZES

            p.add_argument("what", choices=["generate", "tapo", "train"], help="what to benchmark")
            p.add_argument("--size", default="qwen2.5-vl-3b", choices=sorted(REAL_SIZES) + sorted(TINY_SIZES),
                           help="train: model architecture (random weights)")
            p.add_argument("--modes", nargs="+", default=list(TRAIN_MODES), choices=list(TRAIN_MODES),
                           help="train: full (fp32 master, bf16 autocast), full-bf16, lora, qlora")
            p.add_argument("--batch-size", type=int, default=4, help="train: sequences per step")
            p.add_argument("--steps", type=int, default=4, help="train: optimizer steps per mode")
        if name == "reproduce":
            from .reproduce import ALL_METHODS

            p.add_argument("--rl-passes", type=float, default=3.0, metavar="P",
                           help="RL steps = ceil(P x RL anchors / prompts per step) (default 3; an explicit "
                                "--set tapo.steps=N or tapo.epochs=E wins)")
            p.add_argument("--runs", default="", help="run folders (models, caches; default: <out>/runs)")
            p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                           help=f"restrict the rows (default all: {', '.join(ALL_METHODS)})")
            p.add_argument("--no-analysis", action="store_true", help="skip H1-H3")
            p.add_argument("--dry-run", "--plan", action="store_true", dest="dry_run",
                           help="print the runs, which are cached, and an estimated time; run nothing")
        if name == "validate":
            p.add_argument("--grid", nargs="+", metavar="K=V[,K=V]", help="SFT variants, each a comma-separated "
                           "list of sft settings ('default': the profile's own); default: the profile's own")
            p.add_argument("--data", choices=["cot", "direct"], default="cot", help="CoT SFT or direct-answer SFT")
            p.add_argument("--per-class", type=int, default=3, help="validation renders per class")
            p.add_argument("--modes", nargs="+", choices=["closed", "open"], default=["closed"],
                           help="evaluation modes (default: closed world)")
            p.add_argument("--csv", default="", help="also write the table to this CSV file")
        if name == "export":
            from .export import FORMATS

            p.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS),
                           help="official-rl: TAPO records (images, problem, answer, image_noisy = positive, "
                                "image_aug = negative); sharegpt: the CoT SFT set for LLaMA-Factory; eval-jsonl: "
                                "the eval sets (default: all three, one folder each under --out)")
            p.add_argument("--runs", default="", help="the run folder holding benchmark-seed<S> and cot-seed<S> "
                           "(default: data/runs/<profile>); --out defaults to <runs>/export-seed<S>")
        if name == "tutorial":
            p.add_argument("--only", nargs="*", default=None, help="notebook name prefixes to run, e.g. 00 01")
    return parser


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__


def _check_out(out: str) -> None:
    """``--out`` must be a folder this process can write to; checked before any stage writes there."""
    import tempfile

    if not out:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check.", suffix=".tmp"):
            pass
    except OSError as err:
        raise PermissionError(f"--out {out} cannot be written to ({err.strerror or type(err).__name__}); "
                              f"pass a writable folder") from None


#: Errors that mean a bad input (file, setting, folder): one line on stderr and exit code 2. ValueError covers
#: the library's own types (config.ConfigError, io.DataError, profiles.ProfileError, model.CorruptModelError).
_BAD_INPUT = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, KeyError,
              UnicodeDecodeError)


def main(argv: list[str] | None = None) -> int:
    from .config import parse_sets, with_overrides

    args = build_parser().parse_args(argv)
    try:
        profile = get_profile(args.profile)  # an unknown name (argument or $FINER1_PROFILE): error, exit 2
        if getattr(args, "set", None):
            profile = with_overrides(profile, parse_sets(args.set, SET_STAGE.get(args.stage)))
        args.profile = profile
        _check_out(args.out)
        return STAGES[args.stage][1](args)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): finished checkpoints and files are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except _BAD_INPUT as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a worker process's bad input comes back wrapped (parallel.run_parallel)
        if isinstance(err.__cause__, _BAD_INPUT):
            print(f"error: {_one_line(err)}", file=sys.stderr)
            return 2
        raise
