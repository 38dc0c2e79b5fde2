"""Bad input on the command line: one line `error: ...` naming the file or setting, exit code 2, nothing written
half; Ctrl-C: one line and exit code 130. Each case used to end in a traceback (or, for an empty eval file, in
a table silently missing a super-category)."""
import os
import shutil
import subprocess
import sys

import pytest

from finer1_lib import cli
from finer1_lib.cli import main
from finer1_lib.profiles import PROFILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in err
    return lines[0]


def test_unknown_profile_from_the_environment_is_one_line_exit_2():
    env = dict(os.environ, FINER1_PROFILE="nonsense")
    r = subprocess.run([sys.executable, "-m", "finer1_lib", "world"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("error: unknown profile 'nonsense' (from FINER1_PROFILE); choose one of cpu, smoke, "
                                "qwen2.5-vl-3b, qwen2.5-vl-7b")


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("mine")
    assert main(["world", "--profile", "smoke", "--out", str(f)]) == 2
    _one_error_line(capsys, f"--out {f} is a file")
    assert f.read_text() == "mine"


def test_out_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)  # as a read-only folder answers (root ignores modes)
    out = tmp_path / "ro"
    assert main(["world", "--profile", "smoke", "--out", str(out)]) == 2
    _one_error_line(capsys, f"--out {out} cannot be written to (Permission denied)")
    assert not list(out.iterdir())


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write to a read-only folder")
def test_out_in_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["world", "--profile", "smoke", "--out", str(ro)]) == 2
        _one_error_line(capsys, f"--out {ro} cannot be written to")
    finally:
        ro.chmod(0o755)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.STAGES, "world", (cli.STAGES["world"][0], interrupted))
    assert main(["world", "--profile", "smoke", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted (Ctrl-C)") and "Traceback" not in err


def test_an_empty_or_missing_eval_file_is_an_error_not_a_missing_column(tmp_path, capsys):
    from finer1_lib import pipeline

    profile = PROFILES["smoke"].replace(super_categories=("bird", "dog"), test_per_class=1, rl_per_class=1,
                                        reference_per_class=1)
    bench = pipeline.get_benchmark(profile, tmp_path, 0)
    empty = bench.root / "eval" / "dog_unseen.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="dog_unseen.jsonl"):
        pipeline.get_benchmark(profile, tmp_path, 0)
    empty.unlink()
    with pytest.raises(ValueError, match=r"dog_unseen\.jsonl is missing"):
        pipeline.get_benchmark(profile, tmp_path, 0)


def test_a_truncated_base_model_is_named(tmp_path, capsys, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(PROFILES["smoke"].model, base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    small = PROFILES["smoke"].replace(model=str(base), super_categories=("bird",), test_per_class=1, rl_per_class=1,
                                      reference_per_class=1)
    monkeypatch.setitem(PROFILES, "smoke", small)
    out = tmp_path / "run"
    assert main(["concepts", "--profile", "smoke", "--out", str(out)]) == 2
    _one_error_line(capsys, f"cannot read the weights of the model folder {base} (model.safetensors)")
    assert not (out / "concepts-seed0.jsonl").exists()


def test_an_unknown_setting_on_the_command_line(tmp_path, capsys):
    assert main(["cot", "--profile", "smoke", "--out", str(tmp_path), "--set", "p_wrng=0.1"]) == 2
    _one_error_line(capsys, "unknown cot setting 'p_wrng'", "valid cot settings:", "p_wrong")
    assert not list(tmp_path.iterdir())


def test_a_bad_input_in_a_worker_process_is_one_line_too(tmp_path, capsys, monkeypatch):
    def failed(args):
        raise RuntimeError("evaluate_method failed for job (0, 'zero-shot'): ValueError: x.jsonl:3: not valid JSON") \
            from ValueError("x.jsonl:3: not valid JSON")

    monkeypatch.setitem(cli.STAGES, "world", (cli.STAGES["world"][0], failed))
    assert main(["world", "--profile", "smoke", "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, "x.jsonl:3: not valid JSON")

    def bug(args):
        raise RuntimeError("a bug, not a bad input")

    monkeypatch.setitem(cli.STAGES, "world", (cli.STAGES["world"][0], bug))
    with pytest.raises(RuntimeError, match="a bug"):  # a real bug keeps its traceback
        main(["world", "--profile", "smoke", "--out", str(tmp_path)])


def test_shipping_a_model_of_another_world_is_refused(tmp_path, capsys):
    """--world-seed checks the recipe on another world; data/base_model only ever holds the profile's world."""
    assert main(["pretrain", "--profile", "smoke", "--world-seed", "1", "--ship", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ship ships a model of world 0 only") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # refused before anything was trained
