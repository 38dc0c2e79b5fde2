"""The stages chained through the run folder, with a tiny random base model (the real classes)."""
import json

import pytest
import torch

from finer1_lib import pipeline
from finer1_lib.cli import main
from finer1_lib.concepts import ConceptResult, load_concepts, save_concepts
from finer1_lib.model import build_processor, build_tiny_model, build_tokenizer, save_model
from finer1_lib.profiles import PROFILES
from finer1_lib.rationale import corpus
from finer1_lib.world import World


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    torch.set_num_threads(1)
    world = World(0)
    tok = build_tokenizer(corpus(world))
    folder = save_model(build_tiny_model(tok, "tiny-3m"), build_processor(tok), tmp_path_factory.mktemp("m") / "m")
    return PROFILES["smoke"].replace(
        model=str(folder), super_categories=("bird",), test_per_class=1, rl_per_class=1, reference_per_class=2,
        concepts=dict(PROFILES["smoke"].concepts, per_class=1, samples_per_prompt=1, max_new_tokens=8),
        sft=dict(PROFILES["smoke"].sft, epochs=1, batch_size=4))


def test_concepts_stage_writes_and_reuses(profile, tmp_path):
    results = pipeline.run_concepts(profile, tmp_path, seed=0, progress=False)
    assert len(results) == 10 and all(r.filtered for r in results)  # 10 seen birds, one image each
    path = tmp_path / "concepts-seed0.jsonl"
    assert path.is_file()
    assert [r.image_id for r in pipeline.run_concepts(profile, tmp_path, 0)] == [r.image_id for r in results]


def test_cot_then_sft_from_known_concepts(profile, tmp_path):
    """A random model sees nothing, so give the CoT stage true concepts; then SFT trains on its output."""
    world = World(0)
    bench = pipeline.get_benchmark(profile, tmp_path, 0)
    shots = {}
    for r in bench.train:
        shots.setdefault(r.label, r)
    results = [ConceptResult(r, [], ["x"], {p: 1 for p in world.get(r.label).phrases()},
                             kept=world.get(r.label).phrases(), filtered=True) for r in shots.values()]
    save_concepts(tmp_path / "concepts-seed0.jsonl", results)
    folder, stats = pipeline.run_cot(profile.replace(cot=dict(profile.cot, p_wrong=0.0, p_drop_gt=0.0,
                                                              p_extra_candidates=0.0)), tmp_path, 0, progress=False)
    assert stats["kept"] == 10 and stats["attempts"] == 10  # true concepts, no mistakes: all accepted at once
    cot = pipeline.sft_samples(profile, tmp_path, 0, "cot")
    direct = pipeline.sft_samples(profile, tmp_path, 0, "direct")
    assert [s["answer"] for s in cot] == [s["answer"] for s in direct]
    assert sorted(s["answer"] for s in cot) == sorted(shots)
    assert all(s["response"].startswith("<think><analysis>") for s in cot)
    assert all(s["response"] == f"<answer>{s['answer']}</answer>" for s in direct)
    summary = pipeline.run_sft(profile, tmp_path, 0, "direct", progress=False)
    assert summary["steps"] == 3 and (tmp_path / "sft-direct-seed0" / "model" / "config.json").is_file()
    with pytest.raises(ValueError, match="unknown SFT data 'both'"):
        pipeline.sft_samples(profile, tmp_path, 0, "both")


def test_cli_pretrain_smoke_runs_and_resumes(tmp_path, capsys):
    """`python -m finer1_lib pretrain --profile smoke` (CI-sized): writes model, log, manifest."""
    assert main(["pretrain", "--profile", "smoke", "--out", str(tmp_path), "--steps", "6"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["steps"] == 6 and manifest["profile"] == "smoke"
    assert (tmp_path / "model" / "model.safetensors").is_file()
    rows = (tmp_path / "pretrain_log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and rows[-1].startswith("6,")
