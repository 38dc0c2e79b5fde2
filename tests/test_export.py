"""Export to the official stack (finer1_lib/export.py): the benchmark's triplets as official RL records, the CoT
set as sharegpt, the eval sets as the official JSONL; each read back by the readers of the official files and
compared field by field with what it came from; bad input is one line on stderr and exit code 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finer1_lib.benchmark import build_benchmark
from finer1_lib.cli import main
from finer1_lib.cot import CotSample, read_sharegpt, write_sharegpt
from finer1_lib.export import RL_KEYS, export_run, read_official_rl
from finer1_lib.io import DataError
from finer1_lib.profiles import PROFILES
from finer1_lib.prompts import SFT_SYSTEM_PROMPT, TAPO_SUFFIX, tapo_prompt
from finer1_lib.protocol import question_templates, read_eval_jsonl

PROFILE = PROFILES["smoke"].replace(super_categories=("bird", "car"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with a benchmark and a small CoT set (two samples, written as the cot stage writes them)."""
    runs = tmp_path_factory.mktemp("runs")
    bench = build_benchmark(PROFILE, runs / "benchmark-seed0", 0, progress=False)
    samples = [CotSample(image_id=r.image_id, image_path=r.path, label=r.label, super_category=r.super_category,
                         question=f"What is this {r.super_category}?", concepts=["red crest"], cot={},
                         response=f"<think><analysis>red crest</analysis><prediction>{r.label}</prediction></think>"
                                  f"<answer>{r.label}</answer>") for r in bench.train[:2]]
    write_sharegpt(runs / "cot-seed0" / "cot_sft.json", samples)
    return runs, bench, samples


def test_official_rl_records_round_trip(run, tmp_path):
    runs, bench, _ = run
    files = export_run(PROFILE, runs, 0, ["official-rl"], tmp_path)
    assert list(files) == ["official-rl"] and files["official-rl"] == [tmp_path / "official-rl" / "train.jsonl"]
    raw = [json.loads(line) for line in files["official-rl"][0].read_text().splitlines()]
    assert len(raw) == len(bench.triplets) > 0 and all(list(r) == list(RL_KEYS) for r in raw)
    back = read_official_rl(files["official-rl"][0])
    for t, r, rec in zip(bench.triplets, raw, back):
        assert r["problem"].startswith("<image>") and TAPO_SUFFIX not in r["problem"]  # the jinja adds it
        assert rec["question"] in question_templates(t.anchor.super_category)
        assert tapo_prompt(rec["question"]) == r["problem"].removeprefix("<image>") + "\n\n" + TAPO_SUFFIX
        assert rec["answer"] == t.anchor.label
        assert [Path(rec[k]) for k in ("anchor", "positive", "negative")] == \
            [bench.path(x).resolve() for x in (t.anchor, t.positive, t.negative)]
        assert all(Path(p).is_absolute() for k in ("images", "image_noisy", "image_aug") for p in r[k])
    # the positive is the anchor's class, the negative another class (image_noisy / image_aug as the official code)
    labels = {str(bench.path(x).resolve()): x.label for t in bench.triplets for x in (t.anchor, t.positive, t.negative)}
    assert all(labels[b["positive"]] == b["answer"] != labels[b["negative"]] for b in back)


def test_the_official_prompt_rendering_is_read_back_too(tmp_path):
    """A record whose problem holds the rendered prompt (suffix included) and relative paths."""
    (tmp_path / "a.png").write_bytes(b"x")
    row = {"images": ["a.png"], "problem": "<image>" + tapo_prompt("What is the name of this bird?"),
           "answer": "Crow", "image_noisy": [{"path": "a.png", "bytes": None}], "image_aug": ["a.png"]}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    (rec,) = read_official_rl(tmp_path / "train.jsonl", image_root=tmp_path)
    assert rec == {"question": "What is the name of this bird?", "answer": "Crow", "anchor": str(tmp_path / "a.png"),
                   "positive": str(tmp_path / "a.png"), "negative": str(tmp_path / "a.png")}


def test_sharegpt_round_trip(run, tmp_path):
    runs, bench, samples = run
    files = export_run(PROFILE, runs, 0, ["sharegpt"], tmp_path)
    data, info = files["sharegpt"]
    assert json.loads(info.read_text())["fine_r1_cot_sft"]["file_name"] == data.name
    assert json.loads(info.read_text())["fine_r1_cot_sft"]["formatting"] == "sharegpt"
    raw = json.loads(data.read_text())
    assert [sorted(r) for r in raw] == [["images", "messages"]] * 2  # the official record, nothing else
    back = read_sharegpt(data)
    for s, b in zip(samples, back):
        assert b["system"] == SFT_SYSTEM_PROMPT and b["prompt"] == s.question and b["response"] == s.response
        assert Path(b["image_path"]) == bench.path(s.image_path).resolve() and b["answer"] == s.label


def test_eval_jsonl_round_trip(run, tmp_path):
    runs, bench, _ = run
    files = export_run(PROFILE, runs, 0, ["eval-jsonl"], tmp_path)["eval-jsonl"]
    assert sorted(f.name for f in files) == ["bird_seen.jsonl", "bird_unseen.jsonl", "car_seen.jsonl",
                                             "car_unseen.jsonl"]
    back = [r for f in sorted(files) for r in read_eval_jsonl(f)]
    ours = sorted(bench.eval_rows, key=lambda r: (r["super_category"], r["split"]))
    assert len(back) == len(ours) > 0
    first = json.loads(files[0].read_text().splitlines()[0])
    assert list(first) == ["image_path", "question", "options", "ground_truth"]  # the official record only
    for a, b in zip(ours, back):
        assert (b["question"], b["options"], b["ground_truth"], b["super_category"], b["split"]) == \
            (a["question"], a["options"], a["ground_truth"], a["super_category"], a["split"])
        assert Path(b["image_path"]) == bench.path(a["image_path"]).resolve()


def test_the_export_command_writes_all_three(run, tmp_path, capsys):
    runs, _, _ = run
    assert main(["export", "--profile", "smoke", "--runs", str(runs), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines()] == ["official-rl", "sharegpt", "eval-jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval-jsonl", "official-rl", "sharegpt"]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # atomic writes leave no temp file


@pytest.mark.parametrize("case", ["no-benchmark", "no-cot", "bad-record"])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, case):
    runs, _, _ = run
    if case == "no-benchmark":
        args, expect = ["--runs", str(tmp_path / "empty")], "no benchmark at"
    elif case == "no-cot":
        (tmp_path / "runs").mkdir()
        os.symlink(runs / "benchmark-seed0", tmp_path / "runs" / "benchmark-seed0")
        args, expect = ["--runs", str(tmp_path / "runs"), "--format", "sharegpt"], "no CoT SFT set at"
    else:
        bad = tmp_path / "train.jsonl"
        bad.write_text(json.dumps({"images": ["a.png"], "problem": "<image>q", "answer": "A"}) + "\n")
        with pytest.raises(DataError, match=r"train.jsonl:1: official RL record is missing \['image_noisy', "
                                            r"'image_aug'\]"):
            read_official_rl(bad)
        return
    done = subprocess.run([sys.executable, "-m", "finer1_lib", "export", "--profile", "smoke",
                           "--out", str(tmp_path / "out"), *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert expect in done.stderr and str(tmp_path) in done.stderr  # names the file
