"""Verdicts on the paper's findings, computed from numbers (issue 19): pure functions, no model, no files.

A finding is a claim about a difference between two methods (or one model before and after training), in a
direction the paper states. Two kinds of evidence are used, each oriented so that **positive = the paper's
direction**:

* **paired over seeds** (:func:`seed_test`): one difference per run seed (split, shots, training all follow
  the seed), its mean ± sample std (ddof 1), a one-sided one-sample t-test and a one-sided sign test. This is
  the seed-to-seed noise of training. With 3 seeds a sign test cannot reach p < 0.05 (its smallest one-sided
  p is 1/8) and the t-test has 2 degrees of freedom: the report says so.
* **bootstrap over test images** (:func:`paired_bootstrap`): the per-image differences of the two methods on
  the same test images are resampled (within each seed and split, a fixed RNG seed) and the statistic (the
  mean over seeds of the split-balanced mean difference) recomputed: a percentile CI. This is the noise of a
  finite test set, pooled over the seeds.

:func:`directional_verdict` turns both into "reproduced" / "not reproduced" / "inconclusive":

* **reproduced**: the CI excludes 0 in the paper's direction, the effect is at least the finding's threshold,
  and the seeds agree (one-sided paired t-test p < alpha; skipped, and said, with one seed);
* **not reproduced**: the CI lies entirely below the threshold (for threshold 0: excludes 0 in the opposite
  direction) and the seeds agree (t-test of effect < threshold, p < alpha);
* **inconclusive**: anything else (the evidence is within the noise, or the two kinds disagree).

:func:`equivalence_verdict` is for "changes little" findings (H1, H2): reproduced when the CI lies inside
(-margin, margin), not reproduced when it lies entirely outside, inconclusive otherwise.
:func:`combine` joins the parts of a finding (all reproduced -> reproduced; any not reproduced -> not).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

__all__ = ["REPRODUCED", "NOT_REPRODUCED", "INCONCLUSIVE", "seed_test", "paired_bootstrap", "t_interval",
           "directional_verdict", "equivalence_verdict", "combine", "slope_ci", "flatness", "rate_noise", "versus"]

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The t-based CI of the mean of ``values`` (nan, nan with fewer than 2 values; a point with no spread)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float("nan"), float("nan")
    m, s = float(x.mean()), float(x.std(ddof=1))
    if s == 0:
        return m, m
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1)) * s / math.sqrt(len(x))
    return m - half, m + half


def seed_test(diffs: Sequence[float], threshold: float = 0.0, level: float = 0.95) -> dict:
    """Paired test over seeds of differences oriented so that positive is the paper's direction.

    Returns n, mean, std (ddof 1), the t CI of the mean, ``p_greater`` (one-sided t-test of mean > 0),
    ``p_below`` (one-sided t-test of mean < threshold), ``sign_p`` (one-sided sign test: at least this many
    positive differences under a fair coin), and ``note`` when n is too small for a test to mean much."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d)]
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else float("nan"),
           "std": float(d.std(ddof=1)) if n > 1 else float("nan"),
           "ci": t_interval(d, level), "p_greater": float("nan"), "p_below": float("nan"),
           "sign_p": float("nan"), "note": ""}
    if n == 0:
        out["note"] = "no seeds"
        return out
    positive = int((d > 0).sum())
    out["sign_p"] = float(stats.binomtest(positive, n, 0.5, alternative="greater").pvalue)
    if n < 2:
        out["note"] = "1 seed: no seed-level test"
        return out
    if np.ptp(d) == 0:  # no spread: the t statistic is infinite (or undefined at the threshold itself)
        out["p_greater"] = 0.0 if d[0] > 0 else 1.0
        out["p_below"] = 0.0 if d[0] < threshold else 1.0
    else:
        out["p_greater"] = float(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue)
        out["p_below"] = float(stats.ttest_1samp(d, threshold, alternative="less").pvalue)
    if n < 6:
        out["note"] = (f"n={n} seeds: the t-test has {n - 1} degrees of freedom and a sign test cannot go below "
                       f"p={0.5 ** n:.3g}")
    return out


def paired_bootstrap(diffs: Sequence[float], cells: Sequence, weights: dict | None = None, n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap CI of a weighted mean of per-cell mean differences.

    ``diffs``: one paired difference per test item (method B minus method A on the same image, oriented);
    ``cells``: each item's cell (e.g. ``(seed, split)``); items are resampled with replacement within their
    cell. The statistic is ``sum_c weights[c] * mean(diffs in c)`` (default: equal weights summing to 1, i.e.
    the mean over cells). Returns ``{"estimate", "ci": (lo, hi), "n_items", "n_boot", "seed"}``."""
    d = np.asarray(diffs, dtype=float)
    keys = list(cells)
    if len(keys) != len(d):
        raise ValueError(f"diffs has {len(d)} items but cells has {len(keys)}")
    order = list(dict.fromkeys(keys))
    if not order:
        return {"estimate": float("nan"), "ci": (float("nan"), float("nan")), "n_items": 0, "n_boot": n_boot,
                "seed": seed}
    w = weights or {c: 1.0 / len(order) for c in order}
    missing = [c for c in order if c not in w]
    if missing:
        raise ValueError(f"no weight for cells {missing}")
    rng = np.random.default_rng(seed)
    estimate, boot = 0.0, np.zeros(n_boot)
    index = np.asarray([order.index(k) for k in keys]) if len(order) > 1 else np.zeros(len(d), dtype=int)
    for i, c in enumerate(order):
        x = d[index == i]
        estimate += w[c] * float(x.mean())
        draws = rng.integers(0, len(x), size=(n_boot, len(x)))
        boot += w[c] * x[draws].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return {"estimate": estimate, "ci": (float(lo), float(hi)), "n_items": len(d), "n_boot": n_boot, "seed": seed}


def _finite(ci) -> bool:
    return ci is not None and all(v is not None and not math.isnan(v) for v in ci)


def directional_verdict(effect: float, ci: tuple[float, float] | None, threshold: float = 0.0,
                        seeds: dict | None = None, alpha: float = 0.05) -> tuple[str, str]:
    """(verdict, reason) for "the effect is positive (and at least ``threshold``)", see the module docstring.

    ``effect`` and ``ci`` are oriented (positive = the paper's direction); ``seeds`` is a :func:`seed_test`
    result (None or n < 2: the seed condition is skipped and the reason says so)."""
    if not _finite(ci) or effect is None or math.isnan(effect):
        return INCONCLUSIVE, "no confidence interval (too little data)"
    lo, hi = ci
    use_seeds = seeds is not None and seeds.get("n", 0) >= 2
    seed_for = use_seeds and seeds["p_greater"] < alpha
    seed_against = use_seeds and seeds["p_below"] < alpha
    skipped = "" if use_seeds else " (one seed: no seed-level test)"
    need = f" >= {threshold:g}" if threshold else ""
    if lo > 0 and effect >= threshold:
        if not use_seeds or seed_for:
            return REPRODUCED, f"CI [{lo:.2f}, {hi:.2f}] excludes 0 in the paper's direction{need}" + (
                f"; seeds agree (t-test p={seeds['p_greater']:.3f})" if use_seeds else skipped)
        return INCONCLUSIVE, (f"CI [{lo:.2f}, {hi:.2f}] excludes 0 but the seeds do not agree (paired t-test "
                              f"p={seeds['p_greater']:.3f} >= {alpha})")
    if hi < threshold:
        where = "below the threshold" if threshold else "in the opposite direction"
        if not use_seeds or seed_against:
            return NOT_REPRODUCED, f"CI [{lo:.2f}, {hi:.2f}] lies {where}" + (
                f"; seeds agree (t-test p={seeds['p_below']:.3f})" if use_seeds else skipped)
        return INCONCLUSIVE, (f"CI [{lo:.2f}, {hi:.2f}] lies {where} but the seeds do not agree (t-test "
                              f"p={seeds['p_below']:.3f} >= {alpha})")
    if lo > 0:
        return INCONCLUSIVE, f"CI [{lo:.2f}, {hi:.2f}] excludes 0 but the effect {effect:.2f} is below {threshold:g}"
    return INCONCLUSIVE, f"CI [{lo:.2f}, {hi:.2f}] contains 0" + (f" and {threshold:g}" if threshold else "")


def equivalence_verdict(effect: float, ci: tuple[float, float] | None, margin: float) -> tuple[str, str]:
    """(verdict, reason) for "changes little": the CI of the change inside (-margin, margin) -> reproduced;
    entirely outside it -> not reproduced; else inconclusive."""
    if not _finite(ci) or effect is None or math.isnan(effect):
        return INCONCLUSIVE, "no confidence interval (too little data: at least 2 seeds needed)"
    lo, hi = ci
    if -margin < lo and hi < margin:
        return REPRODUCED, f"CI [{lo:.3g}, {hi:.3g}] inside ±{margin:g}"
    if lo >= margin or hi <= -margin:
        return NOT_REPRODUCED, f"CI [{lo:.3g}, {hi:.3g}] entirely outside ±{margin:g}"
    return INCONCLUSIVE, f"CI [{lo:.3g}, {hi:.3g}] overlaps the margin ±{margin:g}"


def combine(verdicts: Iterable[str]) -> str:
    """One verdict for a finding with several parts: all reproduced -> reproduced; any not reproduced -> not
    reproduced; otherwise inconclusive."""
    v = list(verdicts)
    if not v:
        return INCONCLUSIVE
    if all(x == REPRODUCED for x in v):
        return REPRODUCED
    if any(x == NOT_REPRODUCED for x in v):
        return NOT_REPRODUCED
    return INCONCLUSIVE


def slope_ci(y: Sequence[float], level: float = 0.95) -> dict:
    """OLS slope of ``y`` against its index, with its t-based CI (per step); nan with fewer than 3 points."""
    from scipy import stats

    y = np.asarray(y, dtype=float)
    y = y[~np.isnan(y)]
    n = len(y)
    if n < 3:
        return {"slope": float("nan"), "ci": (float("nan"), float("nan")), "n": n}
    x = np.arange(n, dtype=float)
    res = stats.linregress(x, y)
    half = float(stats.t.ppf(0.5 + level / 2, n - 2)) * float(res.stderr)
    return {"slope": float(res.slope), "ci": (float(res.slope) - half, float(res.slope) + half), "n": n}


def flatness(rewards: Sequence[float], tolerance: float = 0.05, window: int = 5, level: float = 0.95) -> dict:
    """Has a reward curve flattened? The OLS slope over the last third of the steps (fitted on the per-step
    rewards; the smoothed curve is reported too), as the change it implies over that third, with its CI.

    ``flat``: the CI of that change lies inside ±``tolerance`` (reward units); ``rising`` / ``falling``: the CI
    excludes 0 beyond the tolerance on one side; ``undecided`` otherwise (or too few steps)."""
    y = np.asarray(rewards, dtype=float)
    y = y[~np.isnan(y)]
    n = len(y)
    third = y[n - n // 3:] if n >= 9 else y[0:0]
    fit = slope_ci(third, level)
    span = max(len(third) - 1, 1)
    change = fit["slope"] * span
    lo, hi = (v * span for v in fit["ci"])
    smooth = np.convolve(y, np.ones(window) / window, mode="valid") if n >= window else y
    if math.isnan(change):
        state = "undecided"
    elif -tolerance < lo and hi < tolerance:
        state = "flat"
    elif lo > 0 and hi >= tolerance:
        state = "rising"
    elif hi < 0 and lo <= -tolerance:
        state = "falling"
    else:
        state = "undecided"
    return {"steps": n, "last_third": len(third), "slope_per_step": fit["slope"], "change": change,
            "change_ci": (lo, hi), "state": state, "tolerance": tolerance,
            "first_smoothed": float(smooth[0]) if len(smooth) else float("nan"),
            "last_smoothed": float(smooth[-1]) if len(smooth) else float("nan")}


def rate_noise(value: float, n: int, reference: float | None = None, n_ref: int | None = None,
               z: float = 1.96) -> float:
    """Half-width (in percentage points) of the noise band of a percentage measured on ``n`` test items.

    The binomial standard error ``sqrt(p (1 - p) / n)`` of ``value`` (a percentage); with ``n_ref`` the
    reference is measured too (e.g. the zero-shot model on other or the same images) and its variance is added
    (unpaired: a conservative band for a paired comparison). ``reference`` without ``n_ref`` is a fixed
    number (e.g. the paper's). For a score in [0, 100] that is not a rate (SS, Eq. 5) the binomial variance
    is an upper bound of the true one, so the band errs on the wide side. Returns ``z`` standard errors."""
    if n is None or n < 1:
        return float("nan")
    var = (value / 100) * (1 - value / 100) / n
    if n_ref:
        r = value if reference is None else reference
        var += (r / 100) * (1 - r / 100) / n_ref
    return 100 * z * math.sqrt(max(var, 0.0))


def versus(value: float, reference: float, n: int, n_ref: int | None = None, z: float = 1.96) -> str:
    """"above", "below" or "within noise": ``value`` (a percentage on ``n`` items) against ``reference``
    (:func:`rate_noise` decides the band). For the notebooks' computed "What we saw" text."""
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (value, reference)):
        return "not measured"
    band = rate_noise(value, n, reference, n_ref, z)
    if math.isnan(band) or abs(value - reference) <= band:
        return "within noise"
    return "above" if value > reference else "below"
