"""Issue 19's `reproduce` command: verdict logic on synthetic numbers, the plan, and one end-to-end run."""
import json
import shutil
import math

import numpy as np
import pandas as pd
import pytest

from finer1_lib import reproduce, verdicts
from finer1_lib.cli import main
from finer1_lib.profiles import PROFILES

R, N, I = verdicts.REPRODUCED, verdicts.NOT_REPRODUCED, verdicts.INCONCLUSIVE


# ------------------------------------------------------------------------------------------- verdict logic


def test_seed_test_known_answers():
    from scipy import stats

    st = verdicts.seed_test([1.0, 2.0, 3.0])
    assert st["n"] == 3 and st["mean"] == 2.0 and st["std"] == 1.0          # sample std, ddof 1
    assert st["p_greater"] == pytest.approx(stats.ttest_1samp([1, 2, 3], 0, alternative="greater").pvalue)
    assert st["sign_p"] == 0.125 and "cannot go below p=0.125" in st["note"]  # 3 seeds: the sign test's floor
    lo, hi = st["ci"]
    assert (lo + hi) / 2 == pytest.approx(2.0) and hi - lo == pytest.approx(2 * 4.302653 / math.sqrt(3), rel=1e-5)
    one = verdicts.seed_test([4.0])
    assert one["n"] == 1 and math.isnan(one["p_greater"]) and one["note"].startswith("1 seed")
    flat = verdicts.seed_test([2.0, 2.0, 2.0], threshold=5.0)   # no spread: decided by the sign of the values
    assert flat["p_greater"] == 0.0 and flat["p_below"] == 0.0


def test_paired_bootstrap_is_deterministic_and_centred():
    rng = np.random.default_rng(1)
    d = rng.normal(3.0, 1.0, 400)
    cells = [("s0", "seen")] * 200 + [("s0", "unseen")] * 200
    a = verdicts.paired_bootstrap(d, cells, n_boot=1000, seed=7)
    b = verdicts.paired_bootstrap(d, cells, n_boot=1000, seed=7)
    assert a == b                                        # fixed RNG seed: same CI
    assert a["estimate"] == pytest.approx(d.mean()) and a["ci"][0] < 3.0 < a["ci"][1]
    assert a["ci"][1] - a["ci"][0] == pytest.approx(2 * 1.96 * d.std() / math.sqrt(400), rel=0.2)
    # split-balanced: a cell with few items weighs as much as a big one
    w = verdicts.paired_bootstrap([0.0] * 90 + [10.0] * 10, [0] * 90 + [1] * 10, n_boot=200)
    assert w["estimate"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="cells has"):
        verdicts.paired_bootstrap([1.0, 2.0], [0])


@pytest.mark.parametrize("effect, ci, seeds, threshold, expected", [
    (4.0, (1.0, 7.0), [3.8, 4.1, 4.2], 0.0, R),        # CI excludes 0 upwards, seeds agree
    (4.0, (1.0, 7.0), [9.0, -4.0, 7.0], 0.0, I),       # CI excludes 0 but the seeds scatter around it
    (-4.0, (-7.0, -1.0), [-3.8, -4.1, -4.2], 0.0, N),  # the opposite direction, seeds agree
    (1.0, (-2.0, 4.0), [0.9, 1.2, 1.1], 0.0, I),       # CI contains 0
    (3.0, (2.0, 4.0), [2.9, 3.1, 3.0], 5.0, N),        # credibly positive but below the 5-point threshold
    (6.0, (5.5, 6.5), [5.9, 6.1, 6.0], 5.0, R),        # above the threshold
    (4.0, (1.0, 7.0), [4.0], 0.0, R),                  # one seed: the bootstrap decides (said in the reason)
    (4.0, (float("nan"), float("nan")), [4.0], 0.0, I),
])
def test_directional_verdict(effect, ci, seeds, threshold, expected):
    verdict, reason = verdicts.directional_verdict(effect, ci, threshold, verdicts.seed_test(seeds, threshold))
    assert verdict == expected, reason
    if len(seeds) == 1 and expected == R:
        assert "one seed" in reason


def test_equivalence_combine_and_flatness():
    assert verdicts.equivalence_verdict(0.5, (-1.0, 2.0), 5.0)[0] == R
    assert verdicts.equivalence_verdict(8.0, (6.0, 10.0), 5.0)[0] == N
    assert verdicts.equivalence_verdict(3.0, (-1.0, 7.0), 5.0)[0] == I
    assert verdicts.equivalence_verdict(0.0, (float("nan"), float("nan")), 5.0)[0] == I
    assert verdicts.combine([R, R]) == R and verdicts.combine([R, I]) == I and verdicts.combine([R, N, I]) == N
    assert verdicts.combine([]) == I
    rng = np.random.default_rng(0)
    steps = np.arange(300)
    plateau = 0.8 - 0.6 * np.exp(-steps / 30) + rng.normal(0, 0.03, 300)   # rises, then flat
    assert verdicts.flatness(plateau)["state"] == "flat"
    rising = 0.2 + 0.002 * steps + rng.normal(0, 0.03, 300)                 # +0.2 over the last third
    f = verdicts.flatness(rising)
    assert f["state"] == "rising" and f["change"] == pytest.approx(0.2, abs=0.05) and f["steps"] == 300
    assert verdicts.flatness([0.1, 0.2])["state"] == "undecided"


def _frame(correct: dict, ss: dict | None = None) -> pd.DataFrame:
    rows = []
    for (split, mode), vals in correct.items():
        for i, v in enumerate(vals):
            rows.append({"image_id": f"{split}{i}", "super_category": "bird", "split": split, "mode": mode,
                         "correct": bool(v), "SS": (ss or {}).get((split, mode), [np.nan] * len(vals))[i]})
    return pd.DataFrame(rows)


def test_findings_from_synthetic_per_image_results():
    """Direct SFT: seen 20 % -> 80 %, unseen 60 % -> 10 % on 50 images each, same in 3 seeds: (i) reproduced."""
    def per_seed(shift):
        zs = _frame({("seen", "closed"): [1] * 10 + [0] * 40, ("unseen", "closed"): [1] * 30 + [0] * 20})
        sft = _frame({("seen", "closed"): [1] * (40 + shift) + [0] * (10 - shift),
                      ("unseen", "closed"): [1] * 5 + [0] * 45})
        return {("zero-shot"): zs, "direct SFT": sft}

    frames = {}
    for s in (0, 1, 2):
        for m, df in per_seed(s).items():
            frames[s, m] = df
    per_image = {s: reproduce._per_image(frames, s, ("zero-shot", "direct SFT")) for s in (0, 1, 2)}
    assert {"zero-shot | correct", "direct SFT | correct", "direct SFT | SS"} <= set(per_image[0].columns)
    found = reproduce._findings(per_image, (0, 1, 2), ("zero-shot", "direct SFT"), None, False,
                                reproduce.ReproduceConfig(n_boot=500))
    (f,) = found
    assert f["id"] == "(i)" and f["verdict"] == R
    seen, unseen = f["parts"]
    assert seen["per_seed"] == pytest.approx([60.0, 62.0, 64.0]) and unseen["per_seed"] == pytest.approx([50.0] * 3)
    assert seen["bootstrap"]["ci"][0] > 40 and unseen["effect"] == pytest.approx(50.0)
    # the same numbers with the SFT better on unseen: not reproduced
    for s in (0, 1, 2):
        frames[s, "direct SFT"] = _frame({("seen", "closed"): [1] * 40 + [0] * 10,
                                          ("unseen", "closed"): [1] * 45 + [0] * 5})
    per_image = {s: reproduce._per_image(frames, s, ("zero-shot", "direct SFT")) for s in (0, 1, 2)}
    (f,) = reproduce._findings(per_image, (0, 1, 2), ("zero-shot", "direct SFT"), None, False,
                               reproduce.ReproduceConfig(n_boot=500))
    assert [p["verdict"] for p in f["parts"]] == [R, N] and f["verdict"] == N


def test_analysis_findings_h1_h2_h3(tmp_path):
    def write(seed, probe_gain, h3_gain):
        (tmp_path / f"analysis-seed{seed}.json").write_text(json.dumps({
            "methods": ["zero-shot", "Fine-R1 (TAPO)"],
            "h1": {"zero-shot": {"probe (all)": 50.0}, "Fine-R1 (TAPO)": {"probe (all)": 50.0 + probe_gain}},
            "h2": {"delta (zero-shot)": 0.10, "delta (Fine-R1 (TAPO))": 0.11, "t": -0.5, "p": 0.6},
            "h3": {"zero-shot": {"full_accuracy": 0.55}, "Fine-R1 (TAPO)": {"full_accuracy": 0.55 + h3_gain}}}))

    for s, (g1, g3) in enumerate([(0.5, 0.10), (-0.5, 0.11), (0.2, 0.12)]):
        write(s, g1, g3)
    a = reproduce._analysis_findings(tmp_path, (0, 1, 2), reproduce.ReproduceConfig())
    assert a["H1 probe (all), points"]["verdict"] == R           # within ±5 points
    assert a["H2 delta"]["verdict"] == R and a["H2 delta"]["effect"] == pytest.approx(0.01)
    assert a["H3 full acc, points"]["verdict"] == R              # +10..12 points, >= 5
    for s in range(3):
        write(s, 0.0, 0.01 + s * 0.001)                          # +1 point: credibly below 5
    assert reproduce._analysis_findings(tmp_path, (0, 1, 2), reproduce.ReproduceConfig())[
        "H3 full acc, points"]["verdict"] == N


# ----------------------------------------------------------------------------------------------- the plan


def test_plan_on_the_smoke_profile(tmp_path):
    """Nothing built yet: every piece is to do, RL steps follow from the passes over the anchors; 10:0 and 5:5
    are not trained twice. Nothing is written."""
    profile = reproduce.prepare_profile("smoke", rl_passes=2)
    anchors = reproduce.n_anchors(profile, tmp_path, 0)
    assert anchors == PROFILES["smoke"].shots * 60        # 4 shots x 60 seen species (10 of 16 per super-category)
    pps = PROFILES["smoke"].tapo["prompts_per_step"]
    assert reproduce.rl_steps(profile, tmp_path, 0) == math.ceil(2 * anchors / pps)
    assert reproduce.rl_steps(reproduce.prepare_profile("smoke", None), tmp_path, 0) == PROFILES["smoke"].tapo["steps"]
    canon = reproduce.canonical_methods(profile, reproduce.ALL_METHODS)
    assert canon["tapo-tapo-10x0"] == "tapo-inter" and canon["tapo-tapo-8x2"] == "tapo-tapo-8x2"
    assert reproduce.RATIO_METHODS[5, 5] == "Fine-R1 (TAPO)"
    pieces = reproduce.plan(profile, tmp_path, seeds=(0, 1), methods=reproduce.ALL_METHODS)
    assert not any(tmp_path.iterdir())                    # a plan writes nothing
    by = {(p["seed"], p["piece"]): p for p in pieces}
    assert by[0, "benchmark"]["status"] == "to do" and by[1, "H1-H3 analysis"]["status"] == "to do"
    assert by[0, "tapo-tapo-10x0"]["kind"] == "alias"
    tapo = [p for p in pieces if p["kind"] == "tapo"]
    assert len(tapo) == 2 * 8 and {p["steps"] for p in tapo} == {math.ceil(2 * anchors / pps)}
    assert all(p["status"] == "train + evaluate" and p["seconds"] > 0 for p in tapo)
    text = reproduce.format_plan(pieces)
    assert "estimated wall time" in text and "= tapo-inter (same settings)" in text
    # measured times of this folder replace the defaults (the invocation list beside them is skipped)
    (tmp_path / "timings").mkdir()
    (tmp_path / "timings" / "invocations.json").write_text(json.dumps([{"seconds": 5.0}]))
    (tmp_path / "timings" / "seed0-tapo-intra.json").write_text(json.dumps(
        {"kind": "tapo", "variant": "intra", "train_seconds": 100.0, "steps_trained": 10, "prompts_per_step": 2,
         "eval_seconds": 7.0, "status": "done"}))
    intra = [p for p in reproduce.plan(profile, tmp_path, seeds=(0,), methods=("tapo-intra",), analysis=False)
             if p["kind"] == "tapo"][0]
    assert intra["seconds"] == pytest.approx(intra["steps"] * pps * 5.0 + 7.0)   # 5 s per group, 7 s to evaluate
    # the CLI's --dry-run prints the plan and writes nothing; an explicit tapo.steps wins over --rl-passes
    out = tmp_path / "results"
    assert main(["reproduce", "--profile", "smoke", "--seeds", "0", "--out", str(out), "--dry-run",
                 "--set", "tapo.steps=7", "--methods", "zero-shot", "Fine-R1 (TAPO)"]) == 0
    assert not (out / "results.md").exists() and not (out / "runs").exists()


def test_plan_marks_archived_pieces_of_a_fresh_checkout(tmp_path):
    """A fresh checkout has the committed archive (evals/seed{S}/) but no run folders: the plan marks those
    pieces "archived" (0 s: restored once the CoT data is rebuilt), the rest "to do"; a seed without an
    archive is all "to do"."""
    profile = reproduce.prepare_profile("smoke", rl_passes=2)
    arch = tmp_path / "evals" / "seed0"
    arch.mkdir(parents=True)
    for m in ("zero-shot", "Fine-R1 (TAPO)"):
        (arch / f"{reproduce._safe(m)}--eval-0123456789ab.csv").write_text("image_id\n")
    (tmp_path / "analysis-seed0.json").write_text("{}")
    (tmp_path / "analysis-seed0.run.json").write_text(json.dumps({"key": "k"}))
    methods = ("zero-shot", "CoT SFT", "Fine-R1 (TAPO)")
    by = {(p["seed"], p["piece"]): p for p in reproduce.plan(profile, tmp_path, (0, 1), methods=methods)}
    assert [by[0, m]["status"] for m in methods] == ["archived", "to do", "archived"]
    assert by[0, "Fine-R1 (TAPO)"]["seconds"] == 0 and by[0, "CoT SFT"]["seconds"] > 0
    assert by[0, "H1-H3 analysis"]["status"] == "archived" and by[1, "H1-H3 analysis"]["status"] == "to do"
    assert [by[1, m]["status"] for m in methods] == ["to do", "to do", "train + evaluate"]
    assert "3 archived in evals/" in reproduce.format_plan(list(by.values()))


def test_committed_reads_a_reproduction_folder_and_rl_curves_plots_it(tmp_path):
    """committed(): the seed's RL logs in the paper's order (DAPO first), the evaluation table, the flatness rows,
    the config; an absent folder gives empty results (a notebook then shows only its live run)."""
    import matplotlib.pyplot as plt
    from finer1_lib.plots import rl_curves

    empty = reproduce.committed(tmp_path / "none")
    assert empty["logs"] == {} and empty["evaluation"] is None and empty["flatness"].empty
    (tmp_path / "rl_logs").mkdir()
    for run, r in (("tapo-tapo", 0.5), ("tapo-dapo", 0.4), ("tapo-intra", 0.3)):
        pd.DataFrame({"step": range(1, 31), "reward": np.linspace(r, r + 0.2, 30), "kept_ratio": 0.5}).to_csv(
            tmp_path / "rl_logs" / f"{run}-seed0.csv", index=False)
    pd.DataFrame({"step": [1], "reward": [0.0], "kept_ratio": [0.0]}).to_csv(
        tmp_path / "rl_logs" / "tapo-tapo-seed1.csv", index=False)
    (tmp_path / "config.json").write_text(json.dumps({"command": "python -m finer1_lib reproduce"}))
    got = reproduce.committed(tmp_path, seed=0)
    assert list(got["logs"]) == ["tapo-dapo", "tapo-intra", "tapo-tapo"]
    assert got["logs"]["tapo-tapo"]["reward"].iloc[-1] == pytest.approx(0.7)
    assert got["config"]["command"].startswith("python -m finer1_lib") and list(reproduce.committed(tmp_path, 1)["logs"]) == ["tapo-tapo"]
    fig = rl_curves(got["logs"], ("reward", "kept_ratio", "kl"), title="long run")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "RL step" and ax.get_ylabel() == "mean reward (0 to 1)"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["CoT SFT + DAPO", "CoT SFT + DAPO + intra-class x_pos",
                                                                 "Fine-R1 (TAPO)"]
    assert fig.axes[2].texts[0].get_text() == "not in these logs"                     # no KL column
    plt.close(fig)
    with pytest.raises(ValueError, match="unknown TAPO log columns"):
        rl_curves(got["logs"], ("rewards",))


# ------------------------------------------------------------------------------------- one end-to-end run

E2E_METHODS = ("zero-shot", "direct SFT", "CoT SFT", "CoT SFT + DAPO", "Fine-R1 (TAPO)", "tapo-tapo-10x0",
               "tapo-inter")


@pytest.mark.expensive
def test_reproduce_end_to_end_on_smoke_then_everything_cached(tmp_path, capsys, monkeypatch):
    """The smoke profile cut to one super-category (16 species, one test image each), one seed, one RL step per
    run: results.md and the per-seed files with their columns; a second invocation trains nothing (every piece
    "cached", no run file rewritten) and only rebuilds the tables."""
    monkeypatch.setenv("FINER1_WORKERS", "1")
    smoke = PROFILES["smoke"]
    profile = smoke.replace(super_categories=("bird",), test_per_class=1,
                            tapo=dict(smoke.tapo, steps=1), eval=dict(smoke.eval, max_new_tokens=64))
    out = tmp_path / "res"
    kw = dict(seeds=(0,), methods=E2E_METHODS, analysis=False,
              config=reproduce.ReproduceConfig(rl_passes=None, n_boot=200))
    res = reproduce.reproduce(profile, out, **kw)
    first = capsys.readouterr().out
    assert res["results"] == out / "results.md" and not res["cached"]
    md = (out / "results.md").read_text()
    for heading in ("## Verdicts", "## All methods", "## Key components", "## RL reward curves", "| (i) ", "| (ii) "):
        assert heading in md, heading
    ev = pd.read_csv(out / "evaluation-seed0.csv", header=[0, 1], index_col=0)
    assert list(ev.index) == list(E2E_METHODS)
    wanted = {("closed-world acc", "seen"), ("closed-world acc", "unseen"), ("open-world SS", "unseen")}
    assert wanted <= set(ev.columns)
    assert ev.loc["tapo-tapo-10x0"].equals(ev.loc["tapo-inter"])      # one run, two rows
    img = pd.read_csv(out / "per_image-seed0.csv")
    assert {"image_id", "split", "mode", "zero-shot | correct", "Fine-R1 (TAPO) | SS"} <= set(img.columns)
    assert len(img) == 2 * 16                                           # 16 test images x closed / open
    logs = sorted(p.name for p in (out / "rl_logs").iterdir())
    assert logs == ["tapo-dapo-seed0.csv", "tapo-inter-seed0.csv", "tapo-tapo-seed0.csv"]  # 10:0 is "+ inter"
    assert pd.read_csv(out / "rl_logs" / "tapo-tapo-seed0.csv")["step"].tolist() == [1]
    assert list(pd.read_csv(out / "rl_flatness.csv")["state"]) == ["undecided"] * 3      # 1 step: no verdict
    assert (out / "rl_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(reproduce.committed(out)["logs"]) == ["tapo-dapo", "tapo-inter", "tapo-tapo"]
    found = json.loads((out / "verdicts.json").read_text())
    assert [f["id"] for f in found][:2] == ["(i)", "(ii)"] and all(f["verdict"] in (R, N, I) for f in found)
    assert "train + evaluate" in first and "trained 1 RL steps" in (out / "reproduce.log").read_text()
    for name, cols in (("hedging.csv", {"official", "one name required"}),
                       ("stopping.csv", {"several <answer> tags", "clean single answer"})):
        table = pd.read_csv(out / name)
        assert cols <= set(table.columns) and {"zero-shot", "CoT SFT", "Fine-R1 (TAPO)"} <= set(table["method"]), name
    assert "## Does the answer stop after `</answer>`?" in md
    diag = pd.read_csv(out / "diagnosis.csv")
    assert {"seed", "method", "mode", "split", "step: right", "attribute precision"} <= set(diag.columns)
    right = diag.set_index(["method", "mode", "split"])["step: right"]
    closed = ev["closed-world acc"]
    for m in ("zero-shot", "CoT SFT", "Fine-R1 (TAPO)"):   # the first step "right" is the accuracy, to rounding
        assert right[m, "closed", "unseen"] == pytest.approx(closed.loc[m, "unseen"], abs=0.06), m
    assert "## Where the answers go wrong" in md

    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    again = reproduce.reproduce(profile, out, **kw)
    second = capsys.readouterr().out
    assert not again["ran"] and len(again["cached"]) == len(E2E_METHODS) - 1 + 4   # + bench, data, 2 SFT
    assert "0 pieces to run" in second and "trained" not in second
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    changed = [str(p) for p in after if before.get(p) != after[p]]
    assert not changed, changed           # no model, checkpoint or cache rewritten: nothing retrained
    assert (out / "results.md").read_text().split("## Verdicts")[1] == md.split("## Verdicts")[1]

    # a fresh checkout: the run folders are gone, the archive (committed with the results) is there
    archive = out / "evals" / "seed0"
    evals = [p for p in archive.glob("*--eval-*.csv") if not p.name.endswith(".tapo_log.csv")]
    assert len(evals) == len(E2E_METHODS) - 1                                       # 10:0 is "+ inter"
    assert len(list(archive.glob("*.tapo_log.csv"))) == 3
    shutil.rmtree(out / "runs")
    plan_text = reproduce.format_plan(reproduce.plan(profile, out, (0,), methods=E2E_METHODS, analysis=False))
    assert "archived" in plan_text and "train + evaluate" not in plan_text
    third = reproduce.reproduce(profile, out, **kw)
    log = capsys.readouterr().out
    assert "restored from evals/seed0" in log and "trained" not in log and "RL steps" not in log
    assert "sft-cot: not needed" in log and "sft-direct: not needed" in log
    assert not (out / "runs" / "sft-cot-seed0" / "model").exists()          # nothing retrained
    assert {p["piece"] for p in third["ran"]} == {"benchmark", "concepts + CoT data", "sft-cot", "sft-direct"}
    pd.testing.assert_frame_equal(pd.read_csv(out / "evaluation-seed0.csv", header=[0, 1], index_col=0), ev)
    assert pd.read_csv(out / "rl_logs" / "tapo-tapo-seed0.csv")["step"].tolist() == [1]
    assert (out / "results.md").read_text().split("## Verdicts")[1] == md.split("## Verdicts")[1]
