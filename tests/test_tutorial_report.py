"""tutorial.collect_report: a partial rerun (``tutorial --only``) keeps the other notebooks' sections and times."""
from finer1_lib.profiles import get_profile
from finer1_lib.tutorial import add_result, collect_report


def test_partial_rerun_keeps_other_sections_and_times(tmp_path):
    profile = get_profile("smoke")
    run = tmp_path / "run"
    add_result("00_the_fgvr_problem", "## 00 · The micro world\n\nold 00", run)
    add_result("00b_the_base_model", "## 00b · The base model\n\nold 00b", run)
    add_result("04_tapo", "## 04 · TAPO\n\nold 04", run)
    report = collect_report(profile, run, {"00_the_fgvr_problem.ipynb": 20.4, "04_tapo.ipynb": 491.0})
    first = report.read_text()
    assert first.index("old 00\n") < first.index("old 00b") < first.index("old 04")
    # a fresh checkout reruns 04 only: its section and time change, the others stay as they were
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "figures").mkdir()
    target = profile.figures_dir(fresh) / "results.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(first)
    add_result("04_tapo", "## 04 · TAPO\n\nnew 04", fresh)
    text = collect_report(profile, fresh, {"04_tapo.ipynb": 1233.2}).read_text()
    assert "old 00\n" in text and "old 00b" in text and "new 04" in text and "old 04" not in text
    assert text.index("old 00b") < text.index("new 04") < text.index("## Run time")
    assert "| 00_the_fgvr_problem.ipynb | 20 |" in text and "| 04_tapo.ipynb | 1233 |" in text
    assert text.count("## Run time") == 1 and text.count("## 04 ·") == 1


def test_the_cpu_dependent_bitsandbytes_notice_never_reaches_an_output(caplog):
    """bitsandbytes logs a missing optional kernel only on CPUs with AVX512-BF16: a notebook cell that printed it
    on one machine and not on another failed nbval. finer1_lib drops that one record, nothing else."""
    import logging

    import finer1_lib  # noqa: F401  (installs the filter)

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "x")
        log.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
