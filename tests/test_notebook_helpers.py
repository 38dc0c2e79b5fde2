"""Helpers of the notebooks: verdicts.rate_noise / versus (the computed "What we saw" text) and tutorial.source."""
import math

from finer1_lib.verdicts import rate_noise, versus


def test_rate_noise_is_the_binomial_band():
    # 50 % on 100 items: se = 5 points, 1.96 se = 9.8
    assert math.isclose(rate_noise(50.0, 100), 9.8)
    # a measured reference adds its variance: sqrt(2) times wider for equal n and p
    assert math.isclose(rate_noise(50.0, 100, 50.0, 100), 9.8 * math.sqrt(2))
    assert math.isnan(rate_noise(50.0, 0))


def test_versus_reads_above_below_within():
    assert versus(60.0, 50.0, 1000) == "above"
    assert versus(40.0, 50.0, 1000) == "below"
    assert versus(52.0, 50.0, 100) == "within noise"
    assert versus(float("nan"), 50.0, 100) == "not measured"
    # 0 % on few items is still below a large reference: the band at p = 0 is 0
    assert versus(0.0, 30.0, 10) == "below"


def test_source_shows_the_code_with_a_short_docstring():
    from finer1_lib.tapo import group_advantages
    from finer1_lib.tutorial import source

    full, short, bare = (source(group_advantages, d) for d in ("full", "first line", "none"))
    assert full.startswith("def group_advantages(") and "Bessel" in full
    assert "Bessel" not in short and '"""(r - mean) / (std + eps)' in short and short.rstrip().endswith(".tolist()")
    assert '"""' not in bare and "r.std()" in bare
    compile(short, "<source>", "exec")
    compile(bare, "<source>", "exec")
