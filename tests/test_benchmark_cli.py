"""The benchmark of a run (micro world and a fake real dataset), the command line and the tutorial helpers."""
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_datasets as fx  # noqa: E402

from finer1_lib import profiles  # noqa: E402
from finer1_lib.benchmark import ROLES, Benchmark, build_benchmark, load_benchmark  # noqa: E402
from finer1_lib.cli import main  # noqa: E402
from finer1_lib.datasets import load_official_split  # noqa: E402
from finer1_lib.profiles import Profile  # noqa: E402
from finer1_lib.protocol import EVAL_KEYS  # noqa: E402
from finer1_lib.records import DATA_DIR  # noqa: E402
from finer1_lib.world import World  # noqa: E402

SMALL = profiles.PROFILES["smoke"].replace(super_categories=("bird", "car"), test_per_class=1, rl_per_class=1,
                                           reference_per_class=2)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "seed0"
    return build_benchmark(SMALL, out, seed=0, progress=False)


def _labels(records):
    return {r.label for r in records}


# ----------------------------------------------------------------------------------------- micro world


def test_files_exist(micro):
    root = micro.root
    for name in ("records.jsonl", "split.json", "triplets.jsonl", "similarity.json", "benchmark.json",
                 "taxonomy.json"):
        assert (root / name).is_file(), name
    assert sorted(p.name for p in (root / "eval").iterdir()) == [
        "bird_seen.jsonl", "bird_unseen.jsonl", "car_seen.jsonl", "car_unseen.jsonl"]
    pngs = list(root.rglob("*.png"))
    assert len(pngs) == sum(len(micro.records[role]) for role in ROLES)
    for role in ROLES:
        for r in micro.records[role]:
            assert micro.path(r).is_file() and micro.path(r).suffix == ".png"
    info = json.loads((root / "benchmark.json").read_text())
    assert info["world"] == "micro" and info["seed"] == 0 and info["profile"] == "smoke"
    assert info["counts"] == {role: len(micro.records[role]) for role in ROLES}
    assert info["eval_rows"] == len(micro.eval_rows)
    assert set(json.loads((root / "taxonomy.json").read_text())) >= {"species", "schemas", "seed"}


def test_split_and_per_class_counts(micro):
    world = World(SMALL.world_seed, SMALL.image_size, SMALL.n_genera)
    assert set(micro.split) == {"bird", "car"}
    for sc, s in micro.split.items():
        names = {sp.name for sp in world.species_of(sc)}
        assert set(s["seen"]) | set(s["unseen"]) == names and not set(s["seen"]) & set(s["unseen"])
        assert len(s["seen"]) == round(SMALL.seen_frac * len(names))
    seen, unseen = set(micro.seen_labels()), set(micro.unseen_labels())
    counts = {role: Counter(r.label for r in micro.records[role]) for role in ROLES}
    # unseen classes never appear in training data
    assert not _labels(micro.records["train"]) & unseen and not _labels(micro.records["rl"]) & unseen
    assert counts["train"] == {lab: SMALL.shots for lab in seen}
    assert counts["rl"] == {lab: SMALL.rl_per_class for lab in seen}
    assert counts["test"] == {lab: SMALL.test_per_class for lab in seen | unseen}
    assert counts["reference"] == {lab: SMALL.reference_per_class for lab in seen | unseen}
    for role in ROLES:  # each role comes from its own pool of the world
        assert {r.partition for r in micro.records[role]} == {role}


def test_roles_are_disjoint(micro):
    ids = {role: {r.image_id for r in micro.records[role]} for role in ROLES}
    paths = {role: {r.path for r in micro.records[role]} for role in ROLES}
    for i, a in enumerate(ROLES):
        assert len(ids[a]) == len(micro.records[a])  # no duplicates inside a role
        for b in ROLES[i + 1:]:
            assert not ids[a] & ids[b], (a, b)
            assert not paths[a] & paths[b], (a, b)


def test_eval_rows_use_only_test_images(micro):
    test = {r.image_id: r for r in micro.test}
    seen, unseen = set(micro.seen_labels()), set(micro.unseen_labels())
    assert len(micro.eval_rows) == len(test)
    assert {row["image_id"] for row in micro.eval_rows} == set(test)
    for row in micro.eval_rows:
        rec = test[row["image_id"]]
        assert set(EVAL_KEYS) <= set(row)
        assert row["image_path"] == rec.path and row["ground_truth"] == rec.label
        assert rec.label in (seen if row["split"] == "seen" else unseen)
        assert rec.label in seen | unseen  # every test image belongs to a class of the split
        assert row["super_category"] == rec.super_category
        assert len(row["options"]) == 4 == len(set(row["options"])) and rec.label in row["options"]
        sc_classes = set(micro.split[rec.super_category]["seen"]) | set(micro.split[rec.super_category]["unseen"])
        assert set(row["options"]) <= sc_classes
    for path in (micro.root / "eval").glob("*.jsonl"):
        sc, which = path.stem.split("_")
        assert micro.eval(which, sc) and all(r["super_category"] == sc and r["split"] == which
                                             for r in micro.eval(which, sc))


def test_triplets(micro):
    train_ids = {r.image_id for r in micro.train}
    pool = {r.image_id for r in micro.train + micro.records["rl"]}
    seen = set(micro.seen_labels())
    assert len(micro.triplets) == len(micro.train)
    for t in micro.triplets:
        assert t.anchor.image_id in train_ids
        assert t.positive.label == t.anchor.label and t.positive.image_id != t.anchor.image_id
        assert t.positive.image_id in pool and t.negative.image_id in pool
        assert t.negative.label != t.anchor.label and t.negative.label in seen
        assert t.negative.super_category == t.anchor.super_category


def test_images_are_the_world_renders(micro):
    world = World(SMALL.world_seed, SMALL.image_size, SMALL.n_genera)
    for role in ROLES:
        r = micro.records[role][0]
        im = micro.image(r)
        assert im.mode == "RGB" and im.size == (SMALL.image_size, SMALL.image_size)
        assert im.tobytes() == world.render(r.label, role, r.meta["index"]).tobytes()
        assert micro.image(r.path).tobytes() == im.tobytes()  # a relative path works too


def test_load_benchmark_round_trip(micro):
    loaded = load_benchmark(micro.root)
    assert isinstance(loaded, Benchmark)
    assert loaded.split == micro.split
    assert loaded.eval_rows == micro.eval_rows
    assert loaded.triplets == micro.triplets
    assert [t.to_dict() for t in loaded.triplets] == [t.to_dict() for t in micro.triplets]
    for role in ROLES:
        assert loaded.records[role] == micro.records[role]
        assert [r.to_dict() for r in loaded.records[role]] == [r.to_dict() for r in micro.records[role]]
    assert loaded.similarity.labels == micro.similarity.labels
    assert loaded.similarity.super_of == micro.similarity.super_of
    assert abs(loaded.similarity.matrix - micro.similarity.matrix).max() < 1e-6
    assert loaded.info == micro.info
    lab = micro.seen_labels()[0]
    assert loaded.similarity.ranked(lab) == micro.similarity.ranked(lab)


def test_same_seed_is_byte_identical_and_other_seed_changes_the_split(micro, tmp_path):
    again = build_benchmark(SMALL, tmp_path / "again", seed=0, progress=False)
    files = ["records.jsonl", "split.json", "triplets.jsonl", "similarity.json",
             *(f"eval/{p.name}" for p in (micro.root / "eval").glob("*.jsonl"))]
    for name in files:
        assert (again.root / name).read_bytes() == (micro.root / name).read_bytes(), name
    other = build_benchmark(SMALL, tmp_path / "seed1", seed=1, progress=False)
    assert other.split != micro.split
    assert json.loads((tmp_path / "seed1" / "benchmark.json").read_text())["seed"] == 1


def test_a_relative_benchmark_folder_reads_its_images_through_the_sft_set(micro, tmp_path, monkeypatch):
    """`--out runs/x`: the root is made absolute, so an image path joined to it (read_sharegpt's image_root) is
    not joined to it a second time."""
    import shutil

    from finer1_lib.cot import read_sharegpt

    shutil.copytree(micro.root, tmp_path / "rel" / "bench")
    monkeypatch.chdir(tmp_path)
    bench = load_benchmark("rel/bench")
    assert bench.root.is_absolute() and bench.root == (tmp_path / "rel" / "bench").resolve()
    rec = bench.train[0]
    record = {"messages": [{"role": "user", "content": "<image>What is this?"},
                           {"role": "assistant", "content": "<think>x</think><answer>y</answer>"}],
              "images": [rec.path]}
    (tmp_path / "set.json").write_text(json.dumps([record]))
    (back,) = read_sharegpt(tmp_path / "set.json", image_root=bench.root)
    assert bench.image(back["image_path"]).size == bench.image(rec).size


def test_load_benchmark_on_an_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmark.json") as info:
        load_benchmark(tmp_path)
    assert "python -m finer1_lib world" in str(info.value)


def test_missing_image_has_a_helpful_message(micro, tmp_path):
    bench = Benchmark(tmp_path, micro.split, micro.records, micro.triplets, micro.similarity, micro.eval_rows)
    with pytest.raises(FileNotFoundError) as info:
        bench.image(micro.test[0])
    message = str(info.value)
    assert str(tmp_path / micro.test[0].path) in message
    assert "rebuild the benchmark" in message and f"--out {tmp_path}" in message


def test_unknown_world_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown world 'mars'"):
        build_benchmark(SMALL.replace(world="mars"), tmp_path, progress=False)


# ----------------------------------------------------------------------------------------- real world


def _build_cub(root: Path, n_classes: int = 40, n_train: int = 3, n_test: int = 2) -> Path:
    """A fake CUB_200_2011 with the first ``n_classes`` classes (a partial copy), several images per class."""
    base = root / "CUB_200_2011"
    classes, images, labels, split = [], [], [], []
    img_id = 0
    for class_id, name in enumerate(fx.CUB_FOLDERS[:n_classes], 1):
        folder = f"{class_id:03d}.{name}"
        classes.append(f"{class_id} {folder}")
        for k in range(n_train + n_test):
            img_id += 1
            rel = f"{folder}/{name}_{k + 1:04d}_{700000 + img_id}.jpg"
            images.append(f"{img_id} {rel}")
            labels.append(f"{img_id} {class_id}")
            split.append(f"{img_id} {1 if k < n_train else 0}")
            fx.write_jpeg(base / "images" / rel)
    for fname, lines in (("classes.txt", classes), ("images.txt", images),
                         ("image_class_labels.txt", labels), ("train_test_split.txt", split)):
        fx._write_lines(base / fname, lines)
    return root


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = _build_cub(tmp_path_factory.mktemp("cub"))
    profile = Profile(name="real-fixture", world="real", data_root=str(root), super_categories=("bird",),
                      shots=1, rl_per_class=1, reference_per_class=1, test_per_class=1)
    out = tmp_path_factory.mktemp("real-bench")
    return profile, build_benchmark(profile, out, seed=0, progress=False)


def test_real_world_split_uses_the_official_names_present(real):
    _, bench = real
    official = load_official_split("bird")
    present = {r.label for role in ROLES for r in bench.records[role]}
    assert len(present) == 40
    assert bench.split["bird"]["seen"] == [c for c in official["seen"] if c in present]
    assert bench.split["bird"]["unseen"] == [c for c in official["unseen"] if c in present]
    assert set(bench.split["bird"]["seen"]) | set(bench.split["bird"]["unseen"]) == present
    assert bench.split["bird"]["seen"] and bench.split["bird"]["unseen"]
    assert "Black Footed Albatross" in present
    assert bench.info["world"] == "real" and not (bench.root / "taxonomy.json").exists()


def test_real_world_shots_from_train_and_test_from_test(real):
    profile, bench = real
    seen, unseen = set(bench.split["bird"]["seen"]), set(bench.split["bird"]["unseen"])
    assert all(r.partition == "train" for role in ("train", "rl", "reference") for r in bench.records[role])
    assert all(r.partition == "test" for r in bench.test)
    assert Counter(r.label for r in bench.train) == {lab: profile.shots for lab in seen}
    assert Counter(r.label for r in bench.records["rl"]) == {lab: profile.rl_per_class for lab in seen}
    assert Counter(r.label for r in bench.test) == {lab: profile.test_per_class for lab in seen | unseen}
    assert not _labels(bench.train) & unseen and not _labels(bench.records["rl"]) & unseen
    ids = {role: {r.image_id for r in bench.records[role]} for role in ROLES}
    assert not ids["train"] & ids["rl"] and not ids["test"] & (ids["train"] | ids["rl"] | ids["reference"])
    assert len(bench.eval_rows) == len(seen | unseen)
    assert {row["image_path"] for row in bench.eval_rows} == {r.path for r in bench.test}
    assert all(Path(row["image_path"]).is_absolute() for row in bench.eval_rows)
    assert bench.image(bench.test[0]).size == (8, 8)
    loaded = load_benchmark(bench.root)
    assert loaded.split == bench.split and loaded.eval_rows == bench.eval_rows
    assert loaded.triplets == bench.triplets


def test_real_world_without_data_root_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no data_root"):
        build_benchmark(Profile(name="nowhere", world="real", super_categories=("bird",)), tmp_path,
                        progress=False)


# ----------------------------------------------------------------------------------------- command line


def test_cli_world_builds_the_smoke_benchmark(tmp_path, capsys):
    assert main(["world", "--profile", "smoke", "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "benchmark.json").read_text())
    assert info["profile"] == "smoke" and info["seed"] == 0
    assert set(info["classes"]) == set(profiles.PROFILES["smoke"].super_categories)
    assert f"benchmark written to {tmp_path}" in capsys.readouterr().out
    assert load_benchmark(tmp_path).info == info


def test_cli_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for stage in ("world", "pretrain", "tutorial"):
        assert stage in out
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--help"])
    assert info.value.code == 0
    assert "--steps" in capsys.readouterr().out


def test_cli_rejects_an_unknown_profile_and_stage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["world", "--profile", "no-such-profile"])
    assert info.value.code == 2
    assert "no-such-profile" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["paint"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_cli_reports_missing_data_as_an_error(tmp_path, capsys):
    if (DATA_DIR / "datasets").exists():
        pytest.skip("real datasets are present; this would build the real benchmark")
    assert main(["world", "--profile", "qwen2.5-vl-3b", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not found" in err


# ----------------------------------------------------------------------------------------- tutorial helpers


def test_markdown_table():
    import pandas as pd

    from finer1_lib.tutorial import markdown_table

    frame = pd.DataFrame({"acc": [0.5, 0.256], "model": ["base", "sft"]},
                         index=pd.Index(["seen", "unseen"], name="split"))
    assert markdown_table(frame) == ("| split | acc | model |\n"
                                     "|---|---|---|\n"
                                     "| seen | 0.50 | base |\n"
                                     "| unseen | 0.26 | sft |")
    assert markdown_table(frame, floatfmt=".1%").splitlines()[2] == "| seen | 50.0% | base |"
    unnamed = pd.DataFrame({"x": [1.0]})
    assert markdown_table(unnamed) == "|  | x |\n|---|---|\n| 0 | 1.00 |"


def test_markdown_table_keeps_integer_columns():
    import pandas as pd

    from finer1_lib.tutorial import markdown_table

    frame = pd.DataFrame({"acc": [0.5, 0.25], "n": [3, 40]}, index=pd.Index(["seen", "unseen"], name="split"))
    assert markdown_table(frame).splitlines()[2:] == ["| seen | 0.50 | 3 |", "| unseen | 0.25 | 40 |"]


def test_add_result_writes_a_section(tmp_path, monkeypatch):
    from finer1_lib.tutorial import add_result

    path = add_result("02_zero_shot", "## Zero-shot\n\n| a |\n|---|\n\n\n", run_dir=tmp_path)
    assert path == tmp_path / "results" / "02_zero_shot.md"
    assert path.read_text() == "## Zero-shot\n\n| a |\n|---|\n"
    add_result("02_zero_shot", "## Replaced", run_dir=tmp_path)  # same section: replaced
    assert path.read_text() == "## Replaced\n"
    monkeypatch.setenv("FINER1_RUN_DIR", str(tmp_path / "run"))  # default: the current run folder
    assert add_result("03_x", "text") == tmp_path / "run" / "results" / "03_x.md"
    assert (tmp_path / "run" / "results" / "03_x.md").read_text() == "text\n"


def test_executed_notebooks_show_no_machine_path(tmp_path):
    from finer1_lib.records import REPO_ROOT
    from finer1_lib.tutorial import scrub_paths

    root = str(REPO_ROOT.resolve())
    text = (f"figures -> {root}/figures\nPosixPath('{root}/data/runs/cpu/results/00.md')\n"
            f"{root}/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning\ncwd {root}\n"
            f"{root}2/other {tmp_path}/results/01.md")
    out = scrub_paths(text, run_dir=tmp_path)
    assert out == ("figures -> figures\nPosixPath('data/runs/cpu/results/00.md')\n"
                   ".venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning\ncwd .\n"
                   f"{root}2/other $FINER1_RUN_DIR/results/01.md")


def test_committed_files_hold_no_machine_path():
    """Library, tests, README and results never name this machine's folders (notebook outputs: scrub_paths)."""
    import re
    import subprocess

    from finer1_lib.records import REPO_ROOT

    try:
        files = subprocess.run(["git", "ls-files", "finer1_lib", "tests", "README.md", "Makefile", "data/results",
                                "notebooks", "figures"],
                               cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    pattern = re.compile(r"(?<![\w.])/(?:work|home|Users|tmp)/[\w.-]+/")
    hits = [f"{f}: {m.group(0)}" for f in files if (REPO_ROOT / f).is_file() and f.endswith((".py", ".md", ".csv",
                                                                                               ".json", "Makefile", ".ipynb"))
            for m in pattern.finditer((REPO_ROOT / f).read_text(encoding="utf-8", errors="replace"))]
    assert not hits, hits


def test_bench_train_reports_each_mode_on_a_tiny_size(tmp_path):
    """`bench train` (README "Which GPU") through the real load/SFT/generate calls, at a tiny size on CPU."""
    import json

    from finer1_lib.bench import bench_train

    r = bench_train("tiny-3m", tmp_path, modes=("full", "lora", "qlora"), batch_size=1, response_words=30,
                    image_size=56, steps=1, rollouts=(1, 2), max_new_tokens=4)
    rows = {row["mode"]: row for row in r["train"]}
    assert rows["qlora"]["error"] == "4-bit needs a CUDA GPU"
    assert rows["full"]["trainable_b"] == rows["full"]["params_b"] > 0
    assert 0 < rows["lora"]["trainable_b"] < rows["lora"]["params_b"]
    assert all(row["seconds_per_step"] > 0 and row["loss"] > 0 for m, row in rows.items() if m != "qlora")
    assert r["sequence_tokens"] > 30 and 0 < r["generate"]["generated_tokens"] <= 2 * 4
    assert json.loads((tmp_path / "bench_train.json").read_text())["train"][0]["mode"] == "full"
