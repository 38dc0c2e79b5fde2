"""One config per run: settings resolved from the profile with overrides (unknown keys are errors), run folders
keyed by a hash of the settings and of the parent model, so a changed setting is a new run and an identical one
is reused; one place for each default."""
import inspect
import json

import pytest
import torch

from finer1_lib import pipeline
from finer1_lib.cli import main
from finer1_lib.concepts import ConceptResult, filter_concepts, save_concepts
from finer1_lib.config import ConfigError, claim_run_folder, parse_sets, read_run_info, stage_config, with_overrides
from finer1_lib.model import build_processor, build_tiny_model, build_tokenizer, save_model
from finer1_lib.profiles import PROFILES, SFT_BASE
from finer1_lib.rationale import corpus
from finer1_lib.world import World


# ----------------------------------------------------------------------------------------- settings


def test_stage_settings_come_from_the_profile_with_checked_overrides():
    assert stage_config("cpu", "sft")["lr"] == PROFILES["cpu"].sft["lr"]
    assert stage_config("cpu", "sft", {"lr": 2e-4})["lr"] == 2e-4
    with pytest.raises(ConfigError, match=r"unknown sft setting 'lrr' \(override\); valid sft settings: .*lr, "):
        stage_config("cpu", "sft", {"lrr": 2e-4})
    sets = parse_sets(["lr=2e-4", "tapo.gamma=0.5", "sft.lora={\"r\": 4}", "bf16=true"], "sft")
    assert sets == {"sft": {"lr": 2e-4, "lora": {"r": 4}, "bf16": True}, "tapo": {"gamma": 0.5}}
    profile = with_overrides("cpu", sets)
    assert profile.sft["lr"] == 2e-4 and profile.tapo["gamma"] == 0.5 and profile.name == "cpu"
    assert PROFILES["cpu"].sft["lr"] == 2e-6  # the registered profile is not changed
    with pytest.raises(ConfigError, match="unknown stage 'foo'"):
        parse_sets(["foo.lr=1"], "sft")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_sets(["lr"], "sft")


def test_the_direct_sft_baseline_trains_at_direct_lr_and_the_key_does_not_carry_it():
    """direct_lr is resolved into lr for the direct-answer run only, and dropped from the settings (so the CoT
    run's settings, and its cache key, are what they were before the setting existed)."""
    from finer1_lib.pipeline import sft_config

    cot, direct = sft_config("cpu", 0, "cot"), sft_config("cpu", 0, "direct")
    assert cot["lr"] == PROFILES["cpu"].sft["lr"] == 2e-6 and direct["lr"] == PROFILES["cpu"].sft["direct_lr"] == 3e-4
    assert "direct_lr" not in cot and "direct_lr" not in direct
    assert {k: v for k, v in direct.items() if k != "lr"} == {k: v for k, v in cot.items() if k != "lr"}
    assert sft_config("cpu", 0, "direct", direct_lr=None)["lr"] == 2e-6        # None: the run's lr
    assert sft_config("cpu", 0, "direct", direct_lr=5e-5)["lr"] == 5e-5
    assert sft_config("cpu", 0, "direct", lr=2e-4)["lr"] == 3e-4                # lr is the other runs'
    assert sft_config("qwen2.5-vl-3b", 0, "direct")["lr"] == 5e-6              # the paper: one rate for both


def test_a_misspelled_tapo_key_is_an_error_not_dropped():
    bad = PROFILES["smoke"].replace(tapo=dict(PROFILES["smoke"].tapo, learning_rate=1e-3))
    with pytest.raises(ConfigError, match=r"unknown tapo setting 'learning_rate' \(profile 'smoke'\); valid tapo "
                                          r"settings: .*\blr\b"):
        pipeline.tapo_config(bad)
    with pytest.raises(ConfigError, match="'gama'"):
        pipeline.tapo_config("smoke", gama=0.5)
    assert pipeline.tapo_config("smoke", gamma=0.5).gamma == 0.5


def test_one_place_for_each_default():
    import finer1_lib.sft as sft

    # SFT: the profile's base dict is the train_sft default; the cpu profile is that dict
    assert {k: v for k, v in sft.SFT_DEFAULTS.items() if k in SFT_BASE} == SFT_BASE
    assert PROFILES["cpu"].sft == SFT_BASE
    # the concept filter's defaults are the profile's (were beta 0.1 / min_support 0.5 / 3 in the signature)
    params = inspect.signature(filter_concepts).parameters
    assert params["beta"].default is params["min_support"].default is params["neighbours"].default is None
    # TAPO through the pipeline: the profile's values, not TapoConfig's
    cfg = pipeline.tapo_config("cpu")
    assert (cfg.lr, cfg.steps) == (PROFILES["cpu"].tapo["lr"], PROFILES["cpu"].tapo["steps"])


def test_cli_set_with_an_unknown_key_names_it_and_the_valid_keys(tmp_path, capsys):
    assert main(["sft", "--profile", "smoke", "--out", str(tmp_path), "--set", "lrr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown sft setting 'lrr'") and "valid sft settings:" in err and " lr," in err
    assert err.count("\n") == 1 and not list(tmp_path.iterdir())  # one line; nothing written
    assert main(["tapo", "--profile", "smoke", "--out", str(tmp_path), "--set", "gama=0.5"]) == 2
    assert "unknown tapo setting 'gama'" in capsys.readouterr().err


def test_claim_run_folder_parks_and_brings_back(tmp_path):
    folder = tmp_path / "sft-cot-seed0"
    f, same = claim_run_folder(folder, "aaa", {"config": {"lr": 1}})
    assert not same and read_run_info(f)["key"] == "aaa"
    (f / "weights").write_text("A")
    assert claim_run_folder(folder, "aaa", {})[1]                         # same key: the same run
    f, same = claim_run_folder(folder, "bbb", {"config": {"lr": 2}})       # another key: a new run
    assert not same and not (f / "weights").exists() and read_run_info(f)["key"] == "bbb"
    assert (tmp_path / ".by-key" / "sft-cot-seed0@aaa" / "weights").read_text() == "A"
    f, same = claim_run_folder(folder, "aaa", {})                          # back to the first: it comes back
    assert same and (f / "weights").read_text() == "A"
    from finer1_lib.config import discard_run

    claim_run_folder(folder, "bbb", {})                                    # park aaa again, then start aaa over:
    discard_run(folder, "aaa")                                             # fresh=True drops the parked copy too
    f, same = claim_run_folder(folder, "aaa", {})
    assert not same and not (f / "weights").exists()
    assert read_run_info(tmp_path / ".by-key" / "sft-cot-seed0@bbb")["key"] == "bbb"   # another key's run: kept
    (tmp_path / "old-run").mkdir()                                         # a folder from before run keys
    claim_run_folder(tmp_path / "old-run", "ccc", {})
    assert (tmp_path / ".by-key" / "old-run@unkeyed").is_dir()


# ----------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    torch.set_num_threads(1)
    world = World(0)
    tok = build_tokenizer(corpus(world))
    folder = save_model(build_tiny_model(tok, "tiny-3m"), build_processor(tok), tmp_path_factory.mktemp("m") / "m")
    return PROFILES["smoke"].replace(
        model=str(folder), super_categories=("bird",), test_per_class=1, rl_per_class=1, reference_per_class=2,
        cot=dict(PROFILES["smoke"].cot, p_wrong=0.0, p_drop_gt=0.0, p_extra_candidates=0.0),
        sft=dict(PROFILES["smoke"].sft, epochs=1, batch_size=4),
        tapo=dict(PROFILES["smoke"].tapo, steps=1, prompts_per_step=1, max_new_tokens=8, max_retries=0,
                  dynamic_sampling=False, generate_batch_size=10),
        eval=dict(PROFILES["smoke"].eval, max_new_tokens=8))


def _known_concepts(profile, out):
    world = World(0)
    bench = pipeline.get_benchmark(profile, out, 0)
    shots = {}
    for r in bench.train:
        shots.setdefault(r.label, r)
    save_concepts(out / "concepts-seed0.jsonl",
                  [ConceptResult(r, [], ["x"], {p: 1 for p in world.get(r.label).phrases()},
                                 kept=world.get(r.label).phrases(), filtered=True) for r in shots.values()])


def _weights(folder):
    return (folder / "model" / "model.safetensors").read_bytes()


def test_another_sft_setting_is_a_new_run_and_the_same_one_is_reused(profile, tmp_path):
    """run_sft with another lr or max_steps used to "resume" the finished checkpoint, train 0 steps and return
    the old weights stamped with the new settings."""
    _known_concepts(profile, tmp_path)
    folder = tmp_path / "sft-direct-seed0"
    a = pipeline.run_sft(profile, tmp_path, 0, "direct", progress=False)
    w_a = _weights(folder)
    b = pipeline.run_sft(profile, tmp_path, 0, "direct", progress=False, direct_lr=1e-3)  # the direct run's lr
    assert not b.get("reused") and b["resumed_from"] is None and b["key"] != a["key"] and b["steps"] == a["steps"]
    assert b["cfg"]["lr"] == 1e-3 and _weights(folder) != w_a
    assert json.loads((folder / "run.json").read_text())["config"]["lr"] == 1e-3     # the config, saved
    c = pipeline.run_sft(profile, tmp_path, 0, "direct", progress=False, max_steps=1)
    assert not c.get("reused") and c["steps"] == 1 and c["resumed_from"] is None
    again = pipeline.run_sft(profile, tmp_path, 0, "direct", progress=False)          # the first settings:
    assert again["reused"] and again["key"] == a["key"] and _weights(folder) == w_a  # the first run, back
    # the same settings through the profile (what --set does) are the same run
    same = pipeline.run_sft(profile.replace(sft=dict(profile.sft, direct_lr=1e-3)), tmp_path, 0, "direct",
                            progress=False)
    assert same["reused"] and same["key"] == b["key"]
    # another base model is another run
    other = profile.replace(model=str(_copy_model(profile, tmp_path / "other-base")))
    assert pipeline.sft_key(other, tmp_path, 0, "direct") != a["key"]


def _copy_model(profile, dest):
    from finer1_lib.model import load_model

    model, processor = load_model(profile.model)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    return save_model(model, processor, dest)


def test_another_tapo_setting_is_a_new_run_and_evaluations_follow_the_model(profile, tmp_path):
    """run_tapo with another lr or gamma used to return reused=True with the old weights; evaluations were
    cached by folder name."""
    _known_concepts(profile, tmp_path)
    folder = tmp_path / "tapo-dapo-seed0"
    a = pipeline.run_tapo(profile, tmp_path, 0, "dapo", progress=False)
    assert pipeline.run_tapo(profile, tmp_path, 0, "dapo", progress=False)["reused"]
    b = pipeline.run_tapo(profile, tmp_path, 0, "dapo", progress=False, lr=1e-3, gamma=0.5)
    assert not b.get("reused") and b["key"] != a["key"] and b["cfg"]["lr"] == 1e-3 and b["cfg"]["gamma"] == 0.5
    assert read_run_info(folder)["key"] == b["key"]
    # evaluations: keyed by the model's key; another TAPO setting (via the profile) is evaluated anew
    p_a = pipeline._eval_cache(profile, tmp_path, 0, "CoT SFT + DAPO")
    changed = profile.replace(tapo=dict(profile.tapo, lr=1e-3, gamma=0.5))
    p_b = pipeline._eval_cache(changed, tmp_path, 0, "CoT SFT + DAPO")
    assert p_a != p_b and p_a.parent == p_b.parent == folder
    df = pipeline.evaluate_method(changed, tmp_path, 0, "CoT SFT + DAPO")
    assert p_b.is_file() and not p_a.exists() and len(df)
    assert pipeline.evaluate_method(profile, tmp_path, 0, "CoT SFT + DAPO") is not None  # runs A back, evaluates
    assert read_run_info(folder)["key"] == a["key"] and p_a.is_file()
    assert (tmp_path / ".by-key" / f"tapo-dapo-seed0@{b['key']}" / p_b.name).is_file()  # B's eval went with B


def test_tapo_config_defaults_are_the_cpu_profile():
    """TapoConfig() used to say lr 3e-5 / 100 steps while the cpu profile ran 5e-5 / 16."""
    from finer1_lib.tapo import TapoConfig

    cfg = TapoConfig()
    assert (cfg.lr, cfg.steps) == (PROFILES["cpu"].tapo["lr"], PROFILES["cpu"].tapo["steps"])


def test_evaluation_cache_key_includes_the_scoring_rules(profile, tmp_path, monkeypatch):
    """The official scoring became the default: a CSV scored under other rules must never be reused."""
    before = pipeline._eval_cache(profile, tmp_path, 0, "zero-shot")
    monkeypatch.setattr(pipeline, "EVAL_SCORING", "strict-v0")
    after = pipeline._eval_cache(profile, tmp_path, 0, "zero-shot")
    assert before.parent == after.parent and before.name != after.name
