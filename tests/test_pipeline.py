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
    # a finished run is reused, not retrained (its summary and weights unchanged)
    weights = (tmp_path / "sft-direct-seed0" / "model" / "model.safetensors").read_bytes()
    again = pipeline.run_sft(profile, tmp_path, 0, "direct", progress=False)
    assert again["reused"] and again["seconds"] == summary["seconds"]
    assert (tmp_path / "sft-direct-seed0" / "model" / "model.safetensors").read_bytes() == weights

    # stage 2 from the CoT-SFT model of the same seed (trained on demand), then the cached evaluation
    tapo_profile = profile.replace(tapo=dict(profile.tapo, steps=1, prompts_per_step=1, max_new_tokens=8,
                                             max_retries=0, dynamic_sampling=False, generate_batch_size=10))
    run = pipeline.run_tapo(tapo_profile, tmp_path, 0, "dapo", progress=False)
    folder = tmp_path / "tapo-dapo-seed0"
    assert run["model"] == str(folder / "model") and (tmp_path / "sft-cot-seed0" / "model").is_dir()
    assert run["cfg"]["n1"] == 10 and run["cfg"]["n2"] == 0 and run["cfg"]["gamma"] == 0.0
    assert len((folder / "tapo_log.csv").read_text().splitlines()) == 2  # header + one step
    assert pipeline.run_tapo(tapo_profile, tmp_path, 0, "dapo", progress=False)["reused"]
    df = pipeline.evaluate_method(tapo_profile, tmp_path, 0, "CoT SFT + DAPO")
    assert len(list(folder.glob("eval-*.csv"))) == 1 and set(df["mode"]) == {"closed", "open"}
    cached = pipeline.evaluate_method(tapo_profile, tmp_path, 0, "CoT SFT + DAPO")
    assert cached[["correct", "prediction"]].equals(df[["correct", "prediction"]])


def test_tapo_run_names_and_config():
    assert pipeline._tapo_folder("tapo", 0, None, None) == "tapo-tapo-seed0"
    assert pipeline._tapo_folder("tapo", 1, 5, 5) == "tapo-tapo-seed1"  # the preset's own ratio: same run
    assert pipeline._tapo_folder("tapo", 0, 2, 8) == "tapo-tapo-2x8-seed0"
    assert pipeline._tapo_key("tapo-tapo-2x8") == ("tapo", 2, 8)
    assert pipeline._tapo_key("tapo-intra") == ("intra", None, None)
    with pytest.raises(ValueError, match="bad TAPO run name 'tapo-tapo-two'"):
        pipeline._tapo_key("tapo-tapo-two")
    cfg = pipeline.tapo_config("cpu", seed=3, variant="intra")
    assert (cfg.seed, cfg.n1, cfg.n2, cfg.gamma, cfg.lr) == (3, 5, 5, 0.0, PROFILES["cpu"].tapo["lr"])
    # the real profiles count epochs over the triplets (official: 10 epochs, rollout batch 384)
    real = pipeline.tapo_config("qwen2.5-vl-3b", n_triplets=1000)
    assert real.steps == 27 and real.lr == 1e-6 and real.updates_per_batch == 3
    with pytest.raises(ValueError, match="number of triplets"):
        pipeline.tapo_config("qwen2.5-vl-3b")


def test_mean_std_over_seeds():
    import pandas as pd

    t = {s: pd.DataFrame({"acc": [10.0 + s, 20.0]}, index=pd.Index(["a", "b"], name="method")) for s in (0, 2)}
    out = pipeline.mean_std(t)
    # the sample std (ddof 1): sqrt(2) for 10 and 12, not 1.0 (ddof 0)
    assert out.loc["a", "acc"] == "11.0 ± 1.4" and out.loc["b", "acc"] == "20.0 ± 0.0"
    three = {s: pd.DataFrame({"acc": [v]}, index=pd.Index(["a"], name="method")) for s, v in enumerate((10, 11, 13))}
    assert pipeline.mean_std(three).loc["a", "acc"] == "11.3 ± 1.5"   # ddof 0 would print 1.2
    one = pipeline.mean_std({0: pd.DataFrame({"acc": [10.0, float("nan")]}, index=pd.Index(["a", "b"], name="method"))})
    assert one.loc["a", "acc"] == "10.0" and pd.isna(one.loc["b", "acc"])   # one seed: no spread to show


def test_cli_pretrain_smoke_runs_and_resumes(tmp_path, capsys):
    """`python -m finer1_lib pretrain --profile smoke` (CI-sized): writes model, log, manifest."""
    assert main(["pretrain", "--profile", "smoke", "--out", str(tmp_path), "--steps", "3"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["steps"] == 3 * len(manifest["stages"]) and manifest["profile"] == "smoke"
    assert (tmp_path / "model" / "model.safetensors").is_file()
    for stage in manifest["stages"]:  # one log per stage (finer1_lib.pretrain.STAGES)
        rows = (tmp_path / stage / "log.csv").read_text().splitlines()
        assert rows[0].startswith("step,loss") and rows[-1].startswith("3,")


def test_clip_baseline_and_analysis_glue(profile, tmp_path):
    """The CLIP-style row of the evaluation and the H1-H3 analysis, through the run folder (tiny sizes)."""
    df = pipeline.evaluate_method(profile, tmp_path, 0, "CLIP-style dual encoder")
    bench = pipeline.get_benchmark(profile, tmp_path, 0)
    assert list((tmp_path / "clip-seed0").glob("eval-*.csv")) and set(df["mode"]) == {"closed"}
    assert len(df) == len(bench.eval_rows) and df["correct"].isin([0, 1]).all()

    with pytest.raises(ValueError, match="compares two methods"):
        pipeline.run_analysis(profile, tmp_path, 0, methods=("zero-shot",))
    # the same base model twice: identical H1 rows, zero H2 difference, identical H3 scores
    res = pipeline.run_analysis(profile, tmp_path, 0, methods=("zero-shot", "zero-shot + step by step"))
    h1 = res["h1"]
    assert list(h1.columns) == ["probe (all)", "probe (seen)", "probe (unseen)"]
    assert h1.iloc[0].tolist() == h1.iloc[1].tolist() and ((h1 >= 0) & (h1 <= 100)).all().all()
    assert res["h2"]["species"] == 16 and res["h2"]["delta (zero-shot)"] == res["h2"]["delta (zero-shot + step by step)"]
    a, b = res["h3"].values()
    assert a["full_accuracy"] == b["full_accuracy"] and sorted(set(res["h3_labels"])) == [0, 1]
    saved = json.loads((tmp_path / "analysis-seed0.json").read_text())
    assert saved["methods"] == ["zero-shot", "zero-shot + step by step"] and set(saved["h3"]) == set(saved["methods"])


def test_analysis_summary_over_seeds(tmp_path):
    def result(shift):
        return {"methods": ["zero-shot", "Fine-R1 (TAPO)"],
                "h1": {m: {"probe (all)": 10.0 + shift + i, "probe (seen)": 20.0, "probe (unseen)": 5.0}
                       for i, m in enumerate(["zero-shot", "Fine-R1 (TAPO)"])},
                "h2": {"delta (zero-shot)": 0.01 + shift / 100, "delta (Fine-R1 (TAPO))": 0.05, "t": -2.0 - shift,
                       "p": 0.05, "species": 96},
                "h3": {m: {"pca2_accuracy": 0.5, "full_accuracy": 0.6 + shift / 10, "silhouette": 0.0}
                       for m in ["zero-shot", "Fine-R1 (TAPO)"]}}
    for seed, shift in ((0, 0.0), (1, 2.0)):
        (tmp_path / f"analysis-seed{seed}.json").write_text(json.dumps(result(shift)))
    table = pipeline.analysis_summary("smoke", tmp_path, seeds=(0, 1))
    assert list(table.index) == ["zero-shot", "Fine-R1 (TAPO)"]
    assert table.loc["zero-shot", "H1 probe (all)"] == "11.0 ± 1.4"          # sample std (ddof 1)
    assert table.loc["Fine-R1 (TAPO)", "H1 probe (all)"] == "12.0 ± 1.4"
    assert table.loc["zero-shot", "H2 delta"] == "0.020 ± 0.014"
    assert table.loc["zero-shot", "H3 full acc"] == "70.0 ± 14.1"
    assert pipeline.analysis_summary("smoke", tmp_path, seeds=(1,)).loc["zero-shot", "H1 probe (all)"] == "12.0"
    assert table.attrs["h2_tests"] == {0: {"t": -2.0, "p": 0.05}, 1: {"t": -4.0, "p": 0.05}}
    with pytest.raises(FileNotFoundError, match="analysis-seed2.json is missing"):
        pipeline.analysis_summary("smoke", tmp_path, seeds=(2,))


def test_committed_three_seed_tables_are_the_sample_std_of_their_per_seed_numbers():
    """data/results/cpu-3seeds/results.md: every "mean ± std" cell recomputed from the per-seed CSVs (ddof 1)."""
    import pandas as pd

    from finer1_lib.records import REPO_ROOT

    folder = REPO_ROOT / "data" / "results" / "cpu-3seeds"
    text = (folder / "results.md").read_text(encoding="utf-8")
    long = pd.read_csv(folder / "evaluation.csv", header=[0, 1], index_col=[0, 1])
    table = pipeline.mean_std({s: g.droplevel("seed") for s, g in long.groupby(level="seed")})
    for method, row in table.iterrows():
        if method.startswith("CLIP"):
            row = row.iloc[:2]
        assert f"| {method} | " + " | ".join(row) in text, method
    summary = pipeline.analysis_summary("cpu", folder, seeds=(0, 1, 2))
    for method, row in summary.iterrows():
        assert f"| {method} | " + " | ".join(row) + " |" in text, method


def test_shipped_zero_shot_answers_are_reused_only_when_everything_matches(profile, tmp_path, monkeypatch):
    """A model folder's zero-shot/ (written at shipping) stands in for generating every answer again, but only
    under the name its model, benchmark, settings and scoring give; another setting generates afresh."""
    import shutil

    import pandas as pd

    from finer1_lib import evaluate

    model = tmp_path / "model"
    shutil.copytree(profile.model, model)
    prof = profile.replace(model=str(model))
    bench = pipeline.get_benchmark(prof, tmp_path / "run", 0)
    shipped = pd.DataFrame({"output": ["<answer>a shipped answer</answer>"], "prediction": ["x"], "SS": [0.5]})
    (model / "zero-shot").mkdir()
    shipped.to_csv(model / "zero-shot" / pipeline.zero_shot_file(prof, bench), index=False)
    assert pipeline.base_model_key(prof) == pipeline.base_model_key(profile)  # zero-shot/ is not part of the model

    def generate_afresh(*args, **kwargs):
        return pd.DataFrame({"output": ["fresh"], "prediction": ["y"], "SS": [0.0]})

    monkeypatch.setattr(evaluate, "evaluate_model", generate_afresh)
    df = pipeline.evaluate_method(prof, tmp_path / "run", 0, "zero-shot")
    assert df["output"].tolist() == ["<answer>a shipped answer</answer>"]
    assert (bench.root / pipeline.zero_shot_file(prof, bench)).is_file()  # now in the run's cache too
    other = prof.replace(eval=dict(prof.eval, max_new_tokens=prof.eval["max_new_tokens"] + 1))
    assert pipeline.evaluate_method(other, tmp_path / "run", 0, "zero-shot")["output"].tolist() == ["fresh"]
    step = pipeline.evaluate_method(prof, tmp_path / "run", 0, "zero-shot + step by step")
    assert step["output"].tolist() == ["fresh"]  # another prompt: not what was shipped


def test_ship_model_takes_the_zero_shot_answers_along(profile, tmp_path):
    import shutil

    from finer1_lib.pretrain import ship_model

    run = tmp_path / "run"
    shutil.copytree(profile.model, run / "model")
    (run / "manifest.json").write_text(json.dumps({"profile": "smoke", "stages": {}}))
    (run / "zero-shot").mkdir()
    (run / "zero-shot" / "eval-zero-shot-abc.csv").write_text("output\nx\n")
    dest = ship_model(run, tmp_path / "shipped")
    assert (dest / "zero-shot" / "eval-zero-shot-abc.csv").read_text() == "output\nx\n"
    assert (dest / "config.json").is_file()
