"""The paper's numbers (finer1_lib.paper): transcription checked against the paper's text, shapes, views."""
import math
import os
import re
from pathlib import Path

import pandas as pd
import pytest

import finer1_lib.paper as pp
from finer1_lib.records import SUPER_CATEGORIES

_REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = ([Path(os.environ["FINER1_PAPER_MD"])] if os.environ.get("FINER1_PAPER_MD") else
               [_REPO.parent / "shared" / "reference" / "paper-fine-r1.md",   # shared/ beside the clone
                _REPO / "shared" / "reference" / "paper-fine-r1.md"])
PAPER_MD = next((p for p in _CANDIDATES if p.is_file()), _CANDIDATES[0])
needs_md = pytest.mark.skipif(
    not PAPER_MD.is_file(),
    reason="the paper's text (shared/reference/paper-fine-r1.md beside the clone, or $FINER1_PAPER_MD) is not here")


def _lines() -> list[str]:
    return PAPER_MD.read_text(encoding="utf-8").splitlines()


def _num(cell: str) -> float:
    return float(re.sub(r"</?u>|\*", "", cell).strip())


def _table_rows(caption_prefix: str) -> dict[str, list[float]]:
    """Re-parse a tab-separated results table of the markdown: method -> 15 numbers."""
    lines = _lines()
    start = next(i for i, l in enumerate(lines) if l.startswith(caption_prefix))
    rows: dict[str, list[float]] = {}
    for line in lines[start + 1:start + 40]:
        cells = line.split("\t")
        if len(cells) == 16 and re.fullmatch(r"-?[\d.]+", re.sub(r"</?u>", "", cells[1]).strip()):
            rows[cells[0].strip().removesuffix(" (ours)")] = [_num(c) for c in cells[1:]]
        elif rows and not line.strip("\t "):
            break
    return rows


# ------------------------------------------------------------------- transcription vs the paper's text
@needs_md
@pytest.mark.parametrize("caption, table", [("Table 1:", pp.TABLE1_CLOSED), ("Table 2:", pp.TABLE2_OPEN_SS),
                                            ("Table 6:", pp.TABLE6_OPEN_TI)])
def test_wide_tables_match_the_markdown(caption, table):
    rows = _table_rows(caption)
    assert list(table.index) == list(rows)                      # same methods, same order
    for method, values in rows.items():
        assert table.loc[method].tolist() == values, method      # every cell, exactly


@needs_md
def test_spot_values_in_the_markdown_lines():
    lines = _lines()
    qwen = next(l for l in lines if l.startswith("Qwen2.5-VL-3B\t64.24"))
    assert "\t77.43\t" in qwen and "\t71.94\t" in qwen
    assert "5\t5\t61.29" in "\n".join(lines)                  # Table 3a row
    t4 = next(l for l in lines if l.startswith("Qwen2.5-VL-3B\t84.26"))
    assert t4.split("\t")[1:] == ["84.26", "0.0088", "-0.3872", "0.6993"]
    assert next(l for l in lines if l.startswith("Fine-R1 (ours)\t")).split("\t")[1:3] == ["85.00", "0.0531"]


@needs_md
def test_table3_matches_the_markdown():
    lines = _lines()
    start = next(i for i, l in enumerate(lines) if l.startswith("Table 3:"))
    body = [l.split("\t") for l in lines[start + 1:start + 12] if re.match(r"^\d", l)]
    a = [(int(c[0]), int(c[1]), float(c[2])) for c in body]
    t = pp.TABLE3A_RATIOS
    assert a == list(zip(t["n1"].tolist(), t["n2"].tolist(), t["avg"].tolist()))
    assert [f"{n1}:{n2}" for n1, n2, _ in a] == list(t.index)
    b = [(int(c[3]), float(c[4])) for c in body if len(c) > 4 and c[3]]
    assert b == list(zip(pp.TABLE3B_NCOTS.index, pp.TABLE3B_NCOTS["avg"]))
    c_rows = [l.split("\t") for l in lines[start + 1:start + 12] if len(l.split("\t")) >= 7 and l.split("\t")[5]]
    c = [(r[5], float(r[6])) for r in c_rows if re.fullmatch(r"[\d.]+", r[6])]
    assert c == list(zip(pp.TABLE3C_CROSS.index, pp.TABLE3C_CROSS["avg"]))


@needs_md
def test_fig3_numbers_are_stated_in_the_text():
    text = PAPER_MD.read_text(encoding="utf-8")
    for panel in pp.FIG3_NOTES.values():
        for key, v in panel["numbers"].items():
            assert f"{abs(v):.2f}%" in text, (key, v)


# ------------------------------------------------------------------- values the project docs quote
def test_quoted_values():
    t1, t2 = pp.TABLE1_CLOSED, pp.TABLE2_OPEN_SS
    assert t1.loc["Qwen2.5-VL-3B", ("avg", "seen")] == 77.43
    assert t1.loc["Qwen2.5-VL-3B", ("avg", "unseen")] == 71.94
    assert t2.loc["Qwen2.5-VL-3B", ("avg", "seen")] == 56.10
    assert t2.loc["Qwen2.5-VL-3B", ("avg", "unseen")] == 45.72
    assert t1.loc["Fine-R1-7B", ("avg", "overall")] == 88.71
    assert pp.TABLE6_OPEN_TI.loc["Fine-R1-3B", ("pet", "unseen")] == 61.02
    assert pp.TABLE3A_RATIOS.loc["5:5"].tolist() == [5, 5, 61.29]
    assert pp.TABLE4.loc["Qwen2.5-VL-3B"].tolist() == [84.26, 0.0088, -0.3872, 0.6993]
    assert pp.TABLE4.loc["Fine-R1", "probing"] == 85.00 and math.isnan(pp.TABLE4.loc["Fine-R1", "p"])


@pytest.mark.parametrize("table", [pp.TABLE1_CLOSED, pp.TABLE2_OPEN_SS, pp.TABLE6_OPEN_TI])
def test_averages_are_consistent_as_printed(table):
    for split in pp.SPLITS:
        mean = table.loc[:, [(sc, split) for sc in SUPER_CATEGORIES]].mean(axis=1)
        assert (mean - table[("avg", split)]).abs().max() < 0.011
    overall = (table[("avg", "seen")] + table[("avg", "unseen")]) / 2
    assert (overall - table[("avg", "overall")]).abs().max() < 0.011


def test_fig3a_consistent_with_table1():
    n, t1 = pp.FIG3_NOTES["3a"]["numbers"], pp.TABLE1_CLOSED.loc["Qwen2.5-VL-3B"]
    assert n["zero_shot_unseen"] == t1[("avg", "unseen")]
    assert round(t1[("avg", "seen")] + n["sft_seen_delta_vs_zero_shot"], 2) == n["sft_seen"]
    assert round(n["sft_seen"] + n["fine_r1_seen_delta_vs_sft"], 2) == pp.TABLE1_CLOSED.loc["Fine-R1-3B", ("avg", "seen")]
    assert pp.FIG3_NOTES["3b"]["numbers"]["baseline"] == t1[("avg", "overall")]
    assert pp.FIG3_NOTES["3c"]["numbers"]["intra_plus_inter_full"] == pp.TABLE2_OPEN_SS.loc["Fine-R1-3B", ("avg", "overall")]


# ------------------------------------------------------------------- shapes and order
def test_shapes_and_column_order():
    assert pp.TABLE1_CLOSED.shape == (18, 15)
    assert pp.TABLE2_OPEN_SS.shape == pp.TABLE6_OPEN_TI.shape == (14, 15)
    assert pp.TABLE3A_RATIOS.shape == (5, 3) and pp.TABLE3B_NCOTS.shape == (3, 1) and pp.TABLE3C_CROSS.shape == (3, 1)
    assert pp.TABLE4.shape == (2, 4)
    expected = ([(sc, "seen") for sc in (*SUPER_CATEGORIES, "avg")] + [(sc, "unseen") for sc in (*SUPER_CATEGORIES, "avg")]
                + [("avg", "overall")])
    for t in (pp.TABLE1_CLOSED, pp.TABLE2_OPEN_SS, pp.TABLE6_OPEN_TI):
        assert list(t.columns) == expected
        assert list(t.columns.names) == ["super_category", "split"] and t.index.name == "method"
        assert list(t.index[-2:]) == ["Fine-R1-3B", "Fine-R1-7B"]
    assert list(pp.TABLE1_CLOSED.index[:4]) == list(pp.METHOD_GROUPS["CLIP Models"])
    assert list(pp.TABLE1_CLOSED.index) == [m for g in pp.METHOD_GROUPS.values() for m in g]
    assert list(pp.TABLE2_OPEN_SS.index) == list(pp.TABLE1_CLOSED.index[4:]) == list(pp.TABLE6_OPEN_TI.index)
    assert tuple(pp.SUPER_TO_DATASET) == SUPER_CATEGORIES
    assert pp.DATASET_NAMES == ("FGVC-Aircraft", "CUB-200-2011", "Stanford Cars", "Stanford Dogs", "Flowers-102",
                                "Oxford-IIIT Pet")


# ------------------------------------------------------------------- paper_rows
def test_paper_rows_subsets():
    sub = pp.paper_rows(pp.TABLE1_CLOSED, ["Fine-R1-3B (ours)", "Qwen2.5-VL-3B"], ["bird", "Stanford Cars"])
    assert list(sub.index) == ["Fine-R1-3B", "Qwen2.5-VL-3B"]                   # order as asked
    assert list(sub.columns) == [("bird", "seen"), ("car", "seen"), ("bird", "unseen"), ("car", "unseen")]
    assert sub.loc["Qwen2.5-VL-3B", ("bird", "unseen")] == 58.98
    assert list(pp.paper_rows("table2", "Qwen2.5-VL-3B", "avg").columns) == [("avg", "seen"), ("avg", "unseen"),
                                                                           ("avg", "overall")]
    assert pp.paper_rows("table4").equals(pp.TABLE4)
    sub.iloc[0, 0] = -1.0                                                          # a copy
    assert pp.TABLE1_CLOSED.loc["Fine-R1-3B", ("bird", "seen")] == 86.79


def test_paper_rows_bad_names():
    with pytest.raises(KeyError, match="GPT-4o"):
        pp.paper_rows(pp.TABLE1_CLOSED, ["Qwen2.5-VL-3B", "GPT-4o"])
    with pytest.raises(KeyError, match="CLIP-L"):                                 # no CLIP rows in Table 2
        pp.paper_rows(pp.TABLE2_OPEN_SS, "CLIP-L")
    with pytest.raises(ValueError, match="butterfly"):
        pp.paper_rows(pp.TABLE1_CLOSED, super_categories=["bird", "butterfly"])
    with pytest.raises(ValueError, match="super_categories"):
        pp.paper_rows(pp.TABLE3A_RATIOS, super_categories="bird")
    with pytest.raises(KeyError, match="table9"):
        pp.paper_rows("table9")


# ------------------------------------------------------------------- side_by_side, ours_from_summary
def _summary(values_seen, values_unseen):
    rows = []
    for split, vals in (("seen", values_seen), ("unseen", values_unseen)):
        rows.append({"metric": "closed-world acc", "split": split, "all": 0.0, **vals})
    return pd.DataFrame(rows).set_index(["metric", "split"])


def test_ours_from_summary_and_side_by_side():
    seen = dict(zip(SUPER_CATEGORIES, [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]))
    unseen = dict(zip(SUPER_CATEGORIES, [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]))
    ours = pp.ours_from_summary(_summary(seen, unseen), "closed-world acc", name="tiny Qwen")
    assert list(ours.columns) == list(pp.COLUMNS)
    assert ours.loc["tiny Qwen", ("avg", "seen")] == 35.0 and ours.loc["tiny Qwen", ("avg", "overall")] == 20.0

    paper = pp.paper_rows(pp.TABLE1_CLOSED, ["Qwen2.5-VL-3B", "Fine-R1-3B"])
    both = pp.side_by_side(ours, paper)
    assert list(both.index.names) == ["source", "method"]
    assert list(both.index) == [("micro world (this run)", "tiny Qwen"),
                                ("paper (Qwen2.5-VL, real data)", "Qwen2.5-VL-3B"),
                                ("paper (Qwen2.5-VL, real data)", "Fine-R1-3B")]
    assert list(both.columns) == list(pp.COLUMNS)
    assert both.loc[("paper (Qwen2.5-VL, real data)", "Qwen2.5-VL-3B"), ("avg", "seen")] == 77.43
    assert both.loc[("micro world (this run)", "tiny Qwen"), ("dog", "seen")] == 40.0


def test_side_by_side_keeps_common_columns_in_paper_order():
    cols = pd.MultiIndex.from_tuples([("avg", "unseen"), ("pet", "seen"), ("bird", "seen"), ("zebra", "seen")])
    ours = pd.DataFrame([[1.0, 2.0, 3.0, 4.0]], index=["run"], columns=cols)
    both = pp.side_by_side(ours, pp.TABLE2_OPEN_SS, ours_label="ours", paper_label="paper")
    assert list(both.columns) == [("bird", "seen"), ("pet", "seen"), ("avg", "unseen")]
    assert both.loc[("ours", "run")].tolist() == [3.0, 2.0, 1.0]
    assert both.loc[("paper", "Qwen2.5-VL-3B")].tolist() == [66.77, 26.27, 45.72]
    assert set(both.index.get_level_values("source")) == {"ours", "paper"}


def test_side_by_side_flat_tables_and_series():
    ours = pd.Series({"avg": 40.0, "n1": 5, "n2": 5}, name="5:5")
    both = pp.side_by_side(ours, pp.TABLE3A_RATIOS)
    assert list(both.columns) == ["n1", "n2", "avg"]
    assert both.shape == (6, 3) and both.loc[("paper (Qwen2.5-VL, real data)", "5:5"), "avg"] == 61.29


def test_side_by_side_errors():
    with pytest.raises(ValueError, match="no columns in common"):
        pp.side_by_side(pd.DataFrame({"accuracy": [1.0]}), pp.TABLE1_CLOSED)
    with pytest.raises(ValueError, match="both"):
        pp.side_by_side(pp.TABLE1_CLOSED, pp.TABLE1_CLOSED, ours_label="x", paper_label="x")
    with pytest.raises(ValueError, match="open-world XX"):
        pp.ours_from_summary(_summary({}, {}), "open-world XX")


def test_ours_from_summary_partial_has_no_average():
    ours = pp.ours_from_summary(_summary({"bird": 10.0}, {"bird": 8.0}), "closed-world acc")
    assert list(ours.columns) == [("bird", "seen"), ("bird", "unseen")]             # no avg over 1 of 6
