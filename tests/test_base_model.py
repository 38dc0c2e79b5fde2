"""The shipped base model (data/base_model): loads offline, its manifest is complete, its metrics reproduce."""
import json

import pytest
import torch

from finer1_lib.benchmark import build_benchmark
from finer1_lib.knowledge import base_model_metrics, target_table
from finer1_lib.model import count_parameters, load_model
from finer1_lib.pretrain import STAGES
from finer1_lib.profiles import BASE_MODEL_DIR, PROFILES
from finer1_lib.world import World


@pytest.fixture(scope="module")
def shipped():
    manifest = json.loads((BASE_MODEL_DIR / "manifest.json").read_text())
    model, processor = load_model(BASE_MODEL_DIR)
    return manifest, model, processor


def test_shipped_model_is_small_and_described(shipped):
    manifest, model, _ = shipped
    size = sum(p.stat().st_size for p in BASE_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 50 * 2**20, f"data/base_model is {size / 2**20:.1f} MB (limit 50 MB)"
    assert count_parameters(model) == manifest["parameters"] <= 20_000_000
    for key in ("world_seed", "steps", "stages", "seed", "train_seconds", "command", "metrics"):
        assert key in manifest, key
    assert sorted(manifest["stages"]) == sorted(STAGES)
    assert manifest["steps"] == sum(s["steps"] for s in manifest["stages"].values())
    for name, stage in manifest["stages"].items():  # each stage's log is shipped and ran to its last step
        last = (BASE_MODEL_DIR / f"pretrain_log_{name}.csv").read_text().splitlines()[-1]
        assert last.startswith(f"{stage['steps']},"), name


def test_manifest_has_every_target_measure(shipped):
    """The cpu-benchmark metrics cover every measure of BASE_MODEL_TARGETS, on both splits (none missing)."""
    table = target_table(shipped[0]["metrics"]["cpu benchmark, seed 0"])
    assert not table[["seen", "unseen"]].isna().any().any(), table


def test_manifest_metrics_match_a_fresh_evaluation(shipped, tmp_path):
    """Greedy decoding is deterministic: the smoke-benchmark metrics of the manifest come out again."""
    manifest, model, processor = shipped
    torch.set_num_threads(2)
    profile = PROFILES["smoke"]
    bench = build_benchmark(profile, tmp_path / "bench", seed=0, progress=False)
    stored = manifest["metrics"]["smoke benchmark, seed 0"]
    extended = any(k.startswith("H1 probe") for k in stored)  # manifests of the staged pretraining
    fresh = base_model_metrics(model, processor, bench, World(profile.world_seed), profile, extended=extended)
    assert fresh.keys() == stored.keys()
    for key in stored:  # tolerance: one greedy decision flipped by float rounding on another CPU
        assert fresh[key] == pytest.approx(stored[key], abs=1.5), key


def test_shipped_zero_shot_answers_are_the_ones_the_manifest_measured(shipped, tmp_path):
    """zero-shot/ holds the answers shipping measured, under the names evaluate_method looks up (so the
    tutorial reuses them), and they give the manifest's naming metrics."""
    from finer1_lib.evaluate import summarize
    from finer1_lib.pipeline import _read_eval, zero_shot_file

    if not (BASE_MODEL_DIR / "zero-shot").is_dir():
        pytest.skip("this base model was shipped before its zero-shot answers were")
    profile = PROFILES["smoke"]
    bench = build_benchmark(profile, tmp_path / "bench", seed=0, progress=False)
    path = BASE_MODEL_DIR / "zero-shot" / zero_shot_file(profile, bench)
    assert path.is_file(), sorted(p.name for p in (BASE_MODEL_DIR / "zero-shot").iterdir())
    naming = summarize(_read_eval(path))["all"]
    stored = shipped[0]["metrics"]["smoke benchmark, seed 0"]
    for (metric, split), value in naming.items():
        assert value == pytest.approx(stored[f"{metric} [{split}]"], abs=0.01), (metric, split)


def test_shipped_model_is_the_cpu_profiles_recipe():
    """A changed pretraining setting in profiles.py without a re-shipped model would leave every notebook and
    number on a model the recipe no longer builds: each shipped stage key is the one the cpu profile computes."""
    from finer1_lib.pretrain import stage_keys

    manifest = json.loads((BASE_MODEL_DIR / "manifest.json").read_text())
    profile = PROFILES["cpu"]
    assert manifest["world_seed"] == profile.world_seed
    for name, key in stage_keys(profile).items():
        assert manifest["stages"][name]["key"] == key, (
            f"stage {name!r}: data/base_model was built with other settings than profiles.py's; "
            "rebuild it with `python -m finer1_lib pretrain --profile cpu --ship`")
