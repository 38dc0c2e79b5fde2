"""The shipped base model (data/base_model): loads offline, its manifest is complete, its metrics reproduce."""
import json

import pytest
import torch

from finer1_lib.benchmark import build_benchmark
from finer1_lib.knowledge import base_model_metrics
from finer1_lib.model import count_parameters, load_model
from finer1_lib.profiles import BASE_MODEL_DIR, PROFILES
from finer1_lib.world import World


@pytest.fixture(scope="module")
def shipped():
    manifest = json.loads((BASE_MODEL_DIR / "manifest.json").read_text())
    model, processor = load_model(BASE_MODEL_DIR)
    return manifest, model, processor


def test_shipped_model_is_small_and_described(shipped):
    manifest, model, _ = shipped
    size = sum(p.stat().st_size for p in BASE_MODEL_DIR.iterdir())
    assert size <= 50 * 2**20, f"data/base_model is {size / 2**20:.1f} MB (limit 50 MB)"
    assert count_parameters(model) == manifest["parameters"] <= 20_000_000
    for key in ("world_seed", "steps", "mixture", "seed", "train_seconds", "command", "metrics"):
        assert key in manifest, key
    assert (BASE_MODEL_DIR / "pretrain_log.csv").read_text().splitlines()[-1].startswith(f"{manifest['steps']},")


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
