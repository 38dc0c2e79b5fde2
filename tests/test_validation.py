"""Validation renders (issue 19): settings are chosen on images that are neither training nor test images."""
import numpy as np
import pandas as pd
import pytest

from finer1_lib import profiles
from finer1_lib.benchmark import build_benchmark
from finer1_lib.cli import main
from finer1_lib.validation import cot_structured, option_rate, options_copied, parse_variant, validate_sft, validation_rows, validation_summary
from finer1_lib.world import World

SMALL = profiles.PROFILES["smoke"].replace(super_categories=("bird", "car"), test_per_class=1, rl_per_class=1,
                                           reference_per_class=2)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_benchmark(SMALL, tmp_path_factory.mktemp("val") / "benchmark-seed0", seed=0, progress=False)


def test_validation_rows_are_fresh_renders_of_every_class(bench):
    rows = validation_rows(bench, SMALL, per_class=2)
    labels = [lab for s in bench.split.values() for which in ("seen", "unseen") for lab in s[which]]
    assert len(rows) == 2 * len(labels)
    assert {r["ground_truth"] for r in rows} == set(labels)
    test_ids = {r.image_id for r in bench.test}
    train_ids = {r.image_id for role in ("train", "rl", "reference") for r in bench.records[role]}
    ids = {r["image_id"] for r in rows}
    assert not ids & test_ids and not ids & train_ids
    world = World(SMALL.world_seed, SMALL.image_size, SMALL.n_genera)
    r = rows[-1]
    index = int(r["image_id"].rsplit("/", 1)[1])
    assert np.array_equal(np.asarray(bench.image(r["image_path"])),
                          np.asarray(world.render(r["ground_truth"], "val", index)))
    seen = {lab for s in bench.split.values() for lab in s["seen"]}
    for r in rows:
        assert len(r["options"]) == 4 and r["ground_truth"] in r["options"]
        assert r["split"] == ("seen" if r["ground_truth"] in seen else "unseen")
    assert validation_rows(bench, SMALL, per_class=2) == rows  # deterministic, files reused


def test_validation_rows_refuse_the_real_world_and_bad_counts(bench):
    with pytest.raises(ValueError, match="micro world only"):
        validation_rows(bench, profiles.PROFILES["qwen2.5-vl-3b"])
    with pytest.raises(ValueError, match="per_class"):
        validation_rows(bench, SMALL, per_class=0)


def test_summary_counts_answers_outside_the_options():
    rows = [{"image_id": "a", "image_path": "a.png", "options": ["Red Finch", "Blue Finch", "X", "Y"]},
            {"image_id": "b", "image_path": "b.png", "options": ["P", "Q", "R", "S"]}]
    df = pd.DataFrame([
        {"image_id": "a", "mode": "closed", "split": "seen", "prediction": " red  finch", "correct": True,
         "well_formed": True, "output": "<answer>red finch</answer>"},
        {"image_id": "b", "mode": "closed", "split": "seen", "prediction": "Z", "correct": False,
         "well_formed": False, "output": "<think>...cut"},
        {"image_id": "a", "mode": "open", "split": "seen", "prediction": "Red Finch", "correct": True,
         "well_formed": True, "output": "<answer>Red Finch</answer>"},
    ])
    assert option_rate(df, rows).tolist() == [True, False]
    assert cot_structured(df).tolist() == [False, False]
    assert options_copied(df, rows).tolist() == [False, False]
    s = validation_summary(df, rows)
    assert s["closed acc seen"] == 50.0 and s["in options seen"] == 50.0
    assert s["well-formed seen"] == 50.0 and s["cut off seen"] == 50.0
    assert s["open TI seen"] == 100.0 and s["n seen"] == 2
    assert s["CoT structure seen"] == 0.0 and s["options copied seen"] == 0.0


def test_structure_and_copied_options():
    rows = [{"image_id": "a", "image_path": "a.png", "options": ["Red Finch", "Blue Finch", "X Y", "Z"]}]
    full = ("<think><analysis>red wings</analysis><options>Blue Finch, Red Finch, x y, Z</options>"
            "<comparison>...</comparison><prediction>Red Finch</prediction></think><answer>Red Finch</answer>")
    partial = "<think><analysis>red</analysis><options>Red Finch, Blue Finch</options></think><answer>Red Finch</answer>"
    swapped = full.replace("<analysis>red wings</analysis>", "").replace("</comparison>", "</comparison><analysis>a</analysis>")
    df = pd.DataFrame([{"image_id": "a", "mode": "closed", "output": t} for t in (full, partial, swapped)])
    assert cot_structured(df).tolist() == [True, False, False]
    assert options_copied(df, rows).tolist() == [True, False, True]


def test_parse_variant():
    assert parse_variant("epochs=5,lr=1e-4") == {"epochs": 5, "lr": 1e-4}
    assert parse_variant("default") == {}
    assert parse_variant("lora=null") == {"lora": None}
    assert parse_variant('replay=1.0,replay_tasks={"choice":1,"reasoning":2}') == {
        "replay": 1.0, "replay_tasks": {"choice": 1, "reasoning": 2}}
    with pytest.raises(ValueError, match="key=value"):
        parse_variant("lr")


def test_cli_rejects_a_bad_variant(capsys):
    assert main(["validate", "--profile", "smoke", "--grid", "lr"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_validate_sft_trains_each_variant_and_scores_it(tmp_path):
    out = tmp_path / "run"
    table = validate_sft(SMALL, out, 0, variants=[{"max_steps": 2}], per_class=1)
    assert list(table.index) == ["zero-shot (base model)", "cot SFT max_steps=2"]
    for which in ("seen", "unseen"):
        assert table[f"n {which}"].tolist() == [table[f"n {which}"].iloc[0]] * 2
        assert table[f"closed acc {which}"].between(0, 100).all()
    assert table.loc["cot SFT max_steps=2", "SFT seconds"] > 0
    again = validate_sft(SMALL, out, 0, variants=[{"max_steps": 2}], per_class=1)  # cached: same table
    pd.testing.assert_frame_equal(table, again)
    with pytest.raises(ValueError, match="no_such_setting"):
        validate_sft(SMALL, out, 0, variants=[{"no_such_setting": 1}], per_class=1, base=False)
