"""The paper's reported numbers as data (Tables 1, 2, 3, 4, 6 and the numbers stated about Fig. 3).

Everything here is transcribed from the paper's text (Fine-R1, ICLR 2026, arXiv 2602.07605), nothing computed.
The notebooks print micro-world results *beside* these numbers, clearly labelled: different models and data,
so compare shapes (who beats whom, seen vs unseen gaps), not values.

Conventions for Tables 1, 2 and 6 (one row per method, as named in the paper, " (ours)" dropped):

* columns are a MultiIndex ``(super_category, split)`` in the paper's column order: the "Seen Categories"
  block (Air., Bird, Car, Dog, Flower, Pet, Avg.), the "Unseen Categories" block (same), then the overall Avg.;
* the paper's "Seen"/"Unseen Categories" (the base-to-new split, 60 % / 40 % of the classes) are ``"seen"`` /
  ``"unseen"``; the dataset columns are the project's super-category keys (:data:`SUPER_TO_DATASET`); each
  block's Avg. is ``("avg", "seen")`` / ``("avg", "unseen")`` (the unweighted mean of the six columns) and the
  last column is ``("avg", "overall")`` (the mean of the two Avg.). Both relations hold for every row as printed
  (checked to rounding);
* bold / underline marks of the paper (best / second best) are not kept.

Use :func:`paper_rows` for a subset, :func:`ours_from_summary` to shape an ``evaluate.summarize`` table like the
paper's, and :func:`side_by_side` to print the two as one table.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import pandas as pd

from .records import SUPER_CATEGORIES

__all__ = ["SUPER_TO_DATASET", "DATASET_NAMES", "PAPER_COLUMN_ABBREV", "SPLITS", "COLUMNS", "METHOD_GROUPS",
           "TABLE1_CLOSED", "TABLE2_OPEN_SS", "TABLE6_OPEN_TI", "TABLE3A_RATIOS", "TABLE3B_NCOTS",
           "TABLE3C_CROSS", "TABLE4", "FIG3_NOTES", "TABLES", "TRANSCRIPTION_NOTES", "METRIC_TABLE",
           "paper_rows", "side_by_side", "ours_from_summary"]

# ------------------------------------------------------------------------------------------ datasets, columns
# The paper's six datasets in its column order (Tables 1, 2, 6), keyed by this project's super-category.
SUPER_TO_DATASET = {
    "aircraft": "FGVC-Aircraft",
    "bird": "CUB-200-2011",
    "car": "Stanford Cars",
    "dog": "Stanford Dogs",
    "flower": "Flowers-102",
    "pet": "Oxford-IIIT Pet",
}
DATASET_NAMES = tuple(SUPER_TO_DATASET.values())
DATASET_TO_SUPER = {v: k for k, v in SUPER_TO_DATASET.items()}
# The column headers as printed in Tables 1, 2 and 6.
PAPER_COLUMN_ABBREV = {"aircraft": "Air.", "bird": "Bird", "car": "Car", "dog": "Dog", "flower": "Flower",
                       "pet": "Pet", "avg": "Avg."}
assert tuple(SUPER_TO_DATASET) == SUPER_CATEGORIES

SPLITS = ("seen", "unseen")  # the paper's "Seen Categories" / "Unseen Categories" (base / new)
COLUMNS = pd.MultiIndex.from_tuples(
    [(sc, split) for split in SPLITS for sc in (*SUPER_CATEGORIES, "avg")] + [("avg", "overall")],
    names=["super_category", "split"])

# Row groups as printed in Table 1 (Tables 2 and 6 have no CLIP rows: CLIP models are closed-world only).
METHOD_GROUPS = {
    "CLIP Models": ("CLIP-L", "EVA-G", "SigLIP-L", "SigLIP2-L"),
    "General MLLMs": ("Idefics2-8B", "Idefics3-LLaMA3-8B", "LLaVA-v1.6-mistral-7B", "LLaVA-Onevision-7B",
                      "InternVL2.5-2B", "InternVL2.5-4B", "InternVL2.5-8B", "Qwen2-VL-2B", "Qwen2-VL-7B",
                      "Qwen2.5-VL-3B", "Qwen2.5-VL-7B"),
    "Reasoning MLLMs": ("DeepPerception-7B", "Fine-R1-3B", "Fine-R1-7B"),
}


def _wide(rows: Mapping[str, list[float]], attrs: dict) -> pd.DataFrame:
    df = pd.DataFrame.from_dict(dict(rows), orient="index", columns=COLUMNS, dtype=float)
    df.index.name = "method"
    df.attrs.update(attrs)
    return df


# ---------------------------------------------------------------------------------------------------- Table 1
# Columns per row: seen Air. Bird Car Dog Flower Pet Avg. | unseen Air. Bird Car Dog Flower Pet Avg. | Avg.
_TABLE1 = {
    # CLIP Models
    "CLIP-L": [47.95, 73.96, 80.50, 77.12, 87.59, 95.45, 77.10, 45.68, 62.35, 79.81, 73.58, 57.24, 89.22, 67.98, 72.54],
    "EVA-G": [40.96, 81.37, 90.06, 76.02, 81.70, 94.21, 77.39, 45.83, 63.39, 87.06, 76.66, 54.83, 89.82, 69.60, 73.49],
    "SigLIP-L": [67.08, 85.10, 96.03, 86.18, 97.59, 98.02, 88.33, 69.35, 74.17, 92.97, 84.44, 69.07, 93.24, 80.54, 84.44],
    "SigLIP2-L": [43.36, 71.26, 93.43, 78.51, 89.05, 92.14, 77.96, 40.87, 58.03, 90.00, 77.15, 61.39, 93.03, 70.08, 74.02],
    # General MLLMs
    "Idefics2-8B": [49.90, 52.37, 90.85, 58.24, 82.10, 81.85, 69.22, 48.53, 40.20, 84.67, 44.79, 60.54, 83.86, 60.43, 64.83],
    "Idefics3-LLaMA3-8B": [43.31, 34.51, 75.18, 47.50, 65.12, 72.98, 56.43, 48.38, 37.47, 70.59, 43.80, 55.30, 68.59, 54.02, 55.23],
    "LLaVA-v1.6-mistral-7B": [49.60, 55.96, 71.02, 45.34, 62.86, 62.59, 57.90, 47.71, 50.32, 67.62, 37.20, 46.16, 65.71, 52.45, 55.17],
    "LLaVA-Onevision-7B": [32.07, 54.81, 71.38, 70.72, 73.83, 76.52, 63.22, 30.43, 52.92, 67.21, 53.78, 48.94, 66.31, 53.27, 58.24],
    "InternVL2.5-2B": [36.71, 65.23, 63.40, 53.70, 65.39, 75.46, 59.98, 40.57, 62.74, 63.53, 42.62, 46.35, 60.21, 52.67, 56.33],
    "InternVL2.5-4B": [38.31, 29.54, 51.44, 34.65, 61.44, 51.01, 44.40, 39.29, 31.29, 44.95, 31.99, 35.83, 54.25, 39.60, 42.00],
    "InternVL2.5-8B": [46.70, 53.14, 62.17, 54.26, 68.25, 76.65, 60.20, 45.38, 47.12, 61.15, 48.82, 47.95, 62.83, 52.21, 56.20],
    "Qwen2-VL-2B": [66.18, 60.15, 94.28, 64.67, 91.93, 85.39, 77.10, 65.51, 44.92, 87.89, 58.60, 50.21, 79.84, 64.50, 70.80],
    "Qwen2-VL-7B": [78.27, 67.41, 94.60, 71.70, 93.84, 91.04, 82.81, 79.86, 56.25, 89.63, 66.16, 67.47, 78.30, 72.95, 77.88],
    "Qwen2.5-VL-3B": [64.24, 65.40, 86.70, 70.51, 94.24, 83.46, 77.43, 68.29, 58.98, 80.65, 67.10, 68.74, 87.88, 71.94, 74.68],
    "Qwen2.5-VL-7B": [74.28, 70.54, 90.75, 80.19, 96.20, 91.91, 83.98, 71.60, 66.29, 84.02, 77.54, 65.63, 93.44, 76.42, 80.20],
    # Reasoning MLLMs
    "DeepPerception-7B": [83.52, 74.16, 94.89, 80.40, 97.05, 91.91, 86.99, 86.48, 61.19, 89.72, 77.85, 72.80, 87.41, 79.24, 83.12],
    "Fine-R1-3B": [76.87, 86.79, 92.14, 87.85, 96.25, 93.89, 88.97, 75.73, 79.10, 87.40, 80.93, 73.93, 91.36, 81.41, 85.19],
    "Fine-R1-7B": [82.32, 90.50, 94.03, 90.11, 97.22, 96.05, 91.71, 77.91, 87.54, 87.99, 89.71, 74.12, 96.92, 85.70, 88.71],
}
TABLE1_CLOSED = _wide(_TABLE1, {
    "source": "Table 1", "metric": "closed-world accuracy (%)",
    "caption": "Closed-world FGVR evaluations in terms of accuracy (%). All results are averaged with 3 trials."})
"""Table 1: closed-world accuracy (%), 18 methods x 15 columns (4 options; correct iff the ground truth is in
the answer). Seen/unseen = the paper's "Seen/Unseen Categories"; ("avg", "overall") = the last "Avg." column."""

# ---------------------------------------------------------------------------------------------------- Table 2
_TABLE2 = {
    # General MLLMs
    "Idefics2-8B": [3.64, 19.68, 19.54, 10.03, 14.94, 2.50, 11.72, 3.69, 15.35, 20.81, 10.19, 5.84, 2.47, 9.73, 10.72],
    "Idefics3-LLaMA3-8B": [9.66, 27.72, 22.96, 35.39, 40.92, 20.17, 26.14, 7.09, 24.93, 22.08, 27.67, 21.99, 24.84, 21.43, 23.79],
    "LLaVA-v1.6-mistral-7B": [2.73, 16.02, 21.75, 19.35, 10.33, 12.47, 13.78, 2.51, 17.40, 23.24, 18.16, 8.20, 10.62, 13.36, 13.57],
    "LLaVA-Onevision-7B": [9.90, 31.74, 21.35, 30.13, 45.24, 17.87, 26.04, 7.47, 29.81, 19.56, 25.44, 16.53, 19.35, 19.69, 22.87],
    "InternVL2.5-2B": [7.26, 21.32, 27.29, 25.87, 23.08, 26.56, 21.90, 5.22, 20.12, 24.73, 24.84, 12.59, 24.55, 18.68, 20.29],
    "InternVL2.5-4B": [14.71, 25.41, 32.19, 33.13, 23.84, 28.19, 26.25, 12.64, 23.91, 29.11, 30.80, 13.10, 26.32, 22.65, 24.45],
    "InternVL2.5-8B": [23.76, 28.44, 30.08, 27.11, 21.73, 29.03, 26.69, 20.34, 24.38, 27.55, 24.73, 13.56, 26.23, 22.80, 24.75],
    "Qwen2-VL-2B": [47.49, 48.72, 52.95, 51.22, 66.56, 19.88, 47.80, 48.88, 39.32, 49.33, 45.16, 33.87, 22.43, 39.83, 43.82],
    "Qwen2-VL-7B": [56.47, 56.46, 55.31, 67.03, 75.02, 36.97, 57.88, 52.75, 41.17, 52.46, 61.01, 32.57, 30.74, 45.12, 51.50],
    "Qwen2.5-VL-3B": [56.98, 66.77, 52.49, 65.12, 68.96, 26.27, 56.10, 52.50, 48.09, 51.75, 59.02, 34.19, 28.78, 45.72, 50.91],
    "Qwen2.5-VL-7B": [58.86, 65.97, 56.94, 59.02, 62.61, 35.59, 56.50, 48.62, 45.26, 55.39, 54.59, 32.74, 36.98, 45.60, 51.05],
    # Reasoning MLLMs
    "DeepPerception-7B": [44.24, 47.63, 54.14, 49.16, 47.30, 40.90, 47.23, 40.03, 37.10, 52.27, 49.05, 28.38, 35.57, 40.40, 43.82],
    "Fine-R1-3B": [54.36, 78.90, 82.46, 78.21, 64.55, 81.60, 73.35, 46.43, 58.00, 74.60, 70.08, 39.54, 79.11, 61.29, 67.32],
    "Fine-R1-7B": [73.53, 86.12, 90.73, 80.71, 81.46, 83.14, 82.62, 65.21, 60.69, 82.19, 70.97, 40.74, 82.04, 66.97, 74.80],
}
TABLE2_OPEN_SS = _wide(_TABLE2, {
    "source": "Table 2", "metric": "open-world relative semantic similarity SS (%, Eq. 5, SigLIP text encoder)",
    "caption": "Open-world FGVR evaluations in terms of relative semantic similarity (%). All results are averaged "
               "with 3 trials."})
"""Table 2: open-world relative semantic similarity SS (%, Eq. 5), 14 methods x 15 columns (no CLIP rows)."""

# ---------------------------------------------------------------------------------------------------- Table 6
_TABLE6 = {
    # General MLLMs
    "Idefics2-8B": [7.49, 11.02, 17.94, 18.01, 54.27, 11.12, 19.98, 6.76, 6.01, 13.37, 12.14, 0.38, 11.45, 8.35, 14.16],
    "Idefics3-LLaMA3-8B": [3.30, 4.79, 5.57, 17.04, 32.37, 3.72, 11.13, 3.16, 3.50, 2.97, 9.59, 2.12, 7.57, 4.82, 7.98],
    "LLaVA-v1.6-mistral-7B": [2.00, 3.27, 9.85, 16.05, 24.75, 13.97, 11.65, 2.03, 3.25, 8.39, 9.59, 0.09, 7.97, 5.22, 8.44],
    "LLaVA-Onevision-7B": [6.44, 9.27, 21.33, 22.55, 46.50, 3.26, 18.23, 3.46, 5.54, 15.36, 13.01, 0.14, 2.68, 6.70, 12.46],
    "InternVL2.5-2B": [3.90, 6.03, 10.37, 17.13, 25.79, 20.50, 13.95, 2.33, 4.20, 7.24, 9.41, 1.27, 13.06, 6.25, 10.10],
    "InternVL2.5-4B": [8.59, 7.67, 16.98, 19.92, 25.12, 16.91, 15.87, 7.06, 7.10, 10.96, 11.20, 1.84, 10.11, 8.05, 11.96],
    "InternVL2.5-8B": [10.04, 10.97, 12.78, 18.76, 26.34, 23.12, 17.00, 8.64, 9.00, 8.42, 11.53, 1.79, 13.66, 8.84, 12.92],
    "Qwen2-VL-2B": [34.37, 25.04, 60.42, 41.32, 59.06, 4.50, 37.45, 42.90, 8.91, 42.17, 30.42, 3.49, 4.89, 22.13, 29.79],
    "Qwen2-VL-7B": [45.50, 37.93, 66.16, 53.32, 69.81, 27.48, 50.03, 51.16, 17.52, 45.60, 41.71, 2.26, 15.41, 28.94, 39.49],
    "Qwen2.5-VL-3B": [37.96, 48.78, 58.08, 51.19, 61.15, 13.92, 45.18, 40.80, 22.33, 43.78, 36.62, 5.61, 12.12, 26.88, 36.03],
    "Qwen2.5-VL-7B": [46.85, 58.28, 67.14, 68.90, 73.09, 33.55, 57.97, 44.78, 28.60, 45.88, 49.03, 10.80, 27.19, 34.38, 46.17],
    # Reasoning MLLMs
    "DeepPerception-7B": [40.66, 47.63, 66.62, 64.78, 75.47, 67.37, 60.42, 42.37, 21.33, 47.28, 48.21, 5.04, 40.12, 34.06, 47.24],
    "Fine-R1-3B": [47.30, 66.09, 71.15, 73.45, 77.16, 82.58, 69.62, 37.27, 30.68, 45.73, 49.79, 16.50, 61.02, 40.17, 54.90],
    "Fine-R1-7B": [63.44, 75.22, 78.88, 78.41, 86.92, 86.76, 78.27, 44.85, 29.77, 51.52, 51.24, 10.37, 69.86, 42.94, 60.61],
}
TABLE6_OPEN_TI = _wide(_TABLE6, {
    "source": "Table 6 (Appendix E)", "metric": "open-world text inclusion TI (%)",
    "caption": "Open-world FGVR evaluations in terms of text inclusion (%). All results are averaged with 3 trials."})
"""Table 6 (Appendix E): open-world text inclusion TI (%), 14 methods x 15 columns (no CLIP rows)."""

# ---------------------------------------------------------------------------------------------------- Table 3
_NOTE_T3_METRIC = ("The metric of Table 3 is not named in its caption; §5.3 says Table 3b evaluates SS_relative on "
                   "unseen categories. Table 3a's best row (5:5, 61.29) equals Fine-R1-3B's unseen Avg. in Table 2, "
                   "consistent with unseen SS; this is an observation, not stated in the paper.")
TABLE3A_RATIOS = pd.DataFrame(
    {"n1": [10, 8, 5, 2, 0], "n2": [0, 2, 5, 8, 10], "avg": [59.47, 59.21, 61.29, 59.33, 59.39]},
    index=pd.Index(["10:0", "8:2", "5:5", "2:8", "0:10"], name="n1:n2"))
TABLE3A_RATIOS.attrs.update({
    "source": "Table 3a", "caption": "Ablation on n1:n2 (anchor-to-positive rollouts, n1 + n2 = 10), Fine-R1-3B.",
    "note": _NOTE_T3_METRIC})
"""Table 3a: anchor-to-positive rollout ratio n1:n2 with n1 + n2 = 10 (Eq. 4); 5 rows x (n1, n2, avg)."""

TABLE3B_NCOTS = pd.DataFrame({"avg": [58.66, 62.06, 62.64]}, index=pd.Index([404, 804, 1199], name="#CoTs"))
TABLE3B_NCOTS.attrs.update({
    "source": "Table 3b", "caption": "Number of CoT samples in stage 1 (CoT SFT), SS_relative on unseen categories.",
    "note": "Which row is the default Fine-R1-3B setting is not stated (no row equals 61.29). " + _NOTE_T3_METRIC})
"""Table 3b: number of stage-1 CoT samples (from Qwen2.5-VL-32B) vs SS on unseen categories; 3 rows x (avg)."""

TABLE3C_CROSS = pd.DataFrame({"avg": [48.84, 62.32, 64.65]},
                             index=pd.Index(["Zero-shot", "CoT SFT + DAPO", "CoT SFT + TAPO"], name="method"))
TABLE3C_CROSS.attrs.update({
    "source": "Table 3c", "caption": "Cross-model evaluation on Qwen2-VL-2B(-Instruct).",
    "note": "Metric not stated; the zero-shot 48.84 matches none of Qwen2-VL-2B's Table 2 averages "
            "(47.80 / 39.83 / 43.82). " + _NOTE_T3_METRIC})
"""Table 3c: TAPO on another base model (Qwen2-VL-2B-Instruct); 3 rows x (avg)."""

# ---------------------------------------------------------------------------------------------------- Table 4
TABLE4 = pd.DataFrame(
    {"probing": [84.26, 85.00], "delta": [0.0088, 0.0531], "t": [-0.3872, float("nan")],
     "p": [0.6993, float("nan")]},
    index=pd.Index(["Qwen2.5-VL-3B", "Fine-R1"], name="method"))
TABLE4.attrs.update({
    "source": "Table 4",
    "caption": "Left: linear probing of visual features (CUB-200, %). Right: difference Δ of cosine similarities "
               "between species pairs of the same and of different genus, with a t-test (t, p).",
    "note": "t and p appear once, on the Qwen2.5-VL-3B line (probably one cell spanning both rows: a single test "
            "comparing the two models); they are NaN for Fine-R1. The paper's row reads 'Fine-R1 (ours)' with no "
            "size; §5.4 compares it with Qwen2.5-VL-3B, so presumably Fine-R1-3B."})
"""Table 4 (§5.4, H1/H2): ``probing`` = linear-probing accuracy (%) on CUB-200 image features, ``delta`` = Δ
(intra-genus minus inter-genus cosine similarity), ``t`` / ``p`` = the t-test as printed (one value, see note)."""

# ----------------------------------------------------------------------------------------------------- Fig. 3
# Fig. 3 is a bar chart with no numbers in the text file; these are the numbers §5.3 states about it, verbatim.
# "delta" values are percentage points relative to the reference named in the key; nothing is derived here.
FIG3_NOTES = {
    "3a": {
        "what": "training methods, closed world, Qwen2.5-VL-3B base (zero-shot = Table 1 row)",
        "metric": "closed-world accuracy (%), seen / unseen Avg.",
        "numbers": {
            "sft_seen_delta_vs_zero_shot": +3.98,
            "sft_unseen_delta_vs_zero_shot": -6.12,
            "cls_rl_unseen": 71.13,
            "zero_shot_unseen": 71.94,
            "cls_rl_seen_delta_vs_zero_shot": -5.92,
            "no_thinking_rl_seen": 80.86,
            "sft_seen": 81.41,
            "fine_r1_seen_delta_vs_sft": +7.56,
            "fine_r1_unseen_delta_vs_no_thinking_rl": +10.05,
        },
        "note": "'degrades the accuracy by 5.92% on seen categories' is read as relative to zero-shot. Consistent "
                "with Table 1: 77.43 + 3.98 = 81.41 (SFT seen) and 81.41 + 7.56 = 88.97 (Fine-R1-3B seen Avg.).",
    },
    "3b": {
        "what": "inference strategies, closed world (CoT prompting 'let's think step by step', ICL; SigLIP with "
                "80-template prompt ensembling)",
        "metric": "closed-world accuracy (%), overall Avg.",
        "numbers": {
            "baseline": 74.68,
            "cot_prompting": 74.79,
            "fine_r1_3b_delta_vs_qwen2_5_vl_3b_icl": +17.90,
        },
        "note": "baseline 74.68 = Qwen2.5-VL-3B's overall Avg. in Table 1. No number is stated for ICL itself or "
                "for SigLIP with prompt ensembling (only that Fine-R1 outperforms CLIP-like models with it).",
    },
    "3c": {
        "what": "key components: CoT SFT, + DAPO, + intra-class aug., + inter-class aug., both (= Fine-R1-3B)",
        "metric": "open-world relative SS (%)",
        "numbers": {
            "cot_sft_delta": +13.30,
            "dapo_after_cot_sft_delta": +1.60,
            "intra_plus_inter_full": 67.32,
        },
        "note": "'CoT SFT improves relative semantic similarity by 13.30%' (reference not named, presumably "
                "zero-shot); 67.32 = Fine-R1-3B's overall Avg. in Table 2. No numbers are stated for intra-class "
                "or inter-class augmentation alone (only that both beat CoT SFT + DAPO).",
    },
}

TABLES = {"table1": TABLE1_CLOSED, "table2": TABLE2_OPEN_SS, "table6": TABLE6_OPEN_TI, "table3a": TABLE3A_RATIOS,
          "table3b": TABLE3B_NCOTS, "table3c": TABLE3C_CROSS, "table4": TABLE4}

TRANSCRIPTION_NOTES = {
    "tables 1, 2, 6": "Complete and unambiguous in the source; ' (ours)' dropped from method names; underline "
                      "markup (<u>...</u>, second best) removed, bold not present in the text file.",
    "table3": _NOTE_T3_METRIC,
    "table3b": TABLE3B_NCOTS.attrs["note"],
    "table3c": TABLE3C_CROSS.attrs["note"],
    "table4": TABLE4.attrs["note"],
    "fig3": "Numbers stated in §5.3's text only; see FIG3_NOTES[panel]['note'].",
}

# Which paper table matches which metric of ``evaluate.summarize`` (micro world or real data).
METRIC_TABLE = {"closed-world acc": "table1", "open-world SS": "table2", "open-world TI": "table6"}


# ------------------------------------------------------------------------------------------------------ views
def _table(table) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    if isinstance(table, str) and table.lower().replace(" ", "") in TABLES:
        return TABLES[table.lower().replace(" ", "")]
    raise KeyError(f"unknown paper table {table!r}; pass a DataFrame from finer1_lib.paper or one of {sorted(TABLES)}")


def _as_list(x) -> list:
    return [x] if isinstance(x, (str, int)) else list(x)


def _super_key(name: str) -> str:
    """'bird', 'CUB-200-2011' or 'avg' -> the column key."""
    if name in SUPER_TO_DATASET or name == "avg":
        return name
    if name in DATASET_TO_SUPER:
        return DATASET_TO_SUPER[name]
    raise ValueError(f"unknown super-category {name!r}; expected one of {[*SUPER_CATEGORIES, 'avg']} "
                     f"(or a dataset name: {list(DATASET_NAMES)})")


def paper_rows(table, methods: Iterable[str] | str | None = None,
               super_categories: Iterable[str] | str | None = None) -> pd.DataFrame:
    """A copy of some rows (methods, in the order given) and super-category columns of a paper table.

    ``table``: a DataFrame of this module or its name ("table1", "table2", "table6", "table3a", ...).
    ``methods``: row labels as in the paper ("Qwen2.5-VL-3B", "Fine-R1-3B"; a trailing " (ours)" is accepted).
    ``super_categories``: project keys ("bird"), dataset names ("CUB-200-2011") or "avg"; keeps both splits of
    each, in the paper's column order (only for Tables 1, 2, 6). The paper's Avg. columns are kept only when
    "avg" is asked for, since they average all six datasets.
    Unknown names raise ``KeyError`` (methods) / ``ValueError`` (super-categories) naming them.
    """
    df = _table(table)
    out = df
    if methods is not None:
        wanted = [str(m).removesuffix(" (ours)") if isinstance(m, str) else m for m in _as_list(methods)]
        missing = [m for m in wanted if m not in df.index]
        if missing:
            raise KeyError(f"method(s) {missing} not in {df.attrs.get('source', 'this table')}; "
                           f"available: {list(df.index)}")
        out = out.loc[wanted]
    if super_categories is not None:
        if not (isinstance(df.columns, pd.MultiIndex) and "super_category" in df.columns.names):
            raise ValueError(f"{df.attrs.get('source', 'this table')} has no per-super-category columns "
                             f"(columns: {list(df.columns)}); super_categories applies to Tables 1, 2 and 6")
        keys = {_super_key(s) for s in _as_list(super_categories)}
        out = out.loc[:, out.columns.get_level_values("super_category").isin(keys)]
    return out.copy()


def side_by_side(ours: pd.DataFrame, paper: pd.DataFrame, ours_label: str = "micro world (this run)",
                 paper_label: str = "paper (Qwen2.5-VL, real data)") -> pd.DataFrame:
    """One table: ``ours`` rows above ``paper`` rows, an outer index level ``source`` naming where each comes from.

    Only the columns present in both are kept, in the paper's column order (for Tables 1, 2, 6 build ``ours``
    with ``(super_category, split)`` columns, e.g. with :func:`ours_from_summary`). Different models and data:
    compare shapes, not values. ``ours`` may be a Series (one row).
    """
    if isinstance(ours, pd.Series):
        ours = ours.to_frame().T
    paper = _table(paper)
    if ours_label == paper_label:
        raise ValueError(f"ours_label and paper_label are both {ours_label!r}; the source level needs two names")
    theirs = set(ours.columns)
    common = paper.columns[[c in theirs for c in paper.columns]]
    if len(common) == 0:
        raise ValueError(f"no columns in common: ours has {list(ours.columns)[:8]}, the paper table has "
                         f"{list(paper.columns)[:8]}...; name ours' columns like the paper's "
                         f"(e.g. ('bird', 'seen'), see ours_from_summary)")
    inner = paper.index.name or ours.index.name or "row"
    parts = {ours_label: ours.loc[:, list(common)], paper_label: paper.loc[:, list(common)]}
    out = pd.concat(parts, names=["source", inner])
    out.columns = common
    out.attrs = {"source": f"{ours_label} vs {paper_label} ({paper.attrs.get('source', 'paper')})",
                 "note": "different models and data: compare shapes, not values"}
    return out


def ours_from_summary(summary: pd.DataFrame, metric: str, name: str = "micro world") -> pd.DataFrame:
    """One row shaped like Tables 1 / 2 / 6 from ``evaluate.summarize(df, per_super=True)``.

    ``metric``: "closed-world acc" (Table 1), "open-world SS" (Table 2) or "open-world TI" (Table 6).
    The per-split Avg. is, as in the paper, the unweighted mean of the six super-categories (``summarize``'s
    pooled "all" column is not used), given only when all six are present, so that it compares with the paper's;
    ("avg", "overall") is the mean of the seen and unseen Avg.
    """
    if metric not in METRIC_TABLE:
        raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRIC_TABLE)}")
    if metric not in summary.index.get_level_values(0):
        raise ValueError(f"metric {metric!r} not in this summary (it has {sorted(set(summary.index.get_level_values(0)))})")
    row: dict = {}
    for split in SPLITS:
        if (metric, split) not in summary.index:
            continue
        s = summary.loc[(metric, split)]
        vals = {sc: float(s[sc]) for sc in SUPER_CATEGORIES if sc in s.index and pd.notna(s[sc])}
        row.update({(sc, split): v for sc, v in vals.items()})
        if len(vals) == len(SUPER_CATEGORIES):
            row[("avg", split)] = sum(vals.values()) / len(vals)
    if ("avg", "seen") in row and ("avg", "unseen") in row:
        row[("avg", "overall")] = (row[("avg", "seen")] + row[("avg", "unseen")]) / 2
    cols = [c for c in COLUMNS if c in row]
    out = pd.DataFrame([[row[c] for c in cols]], index=pd.Index([name], name="method"),
                       columns=pd.MultiIndex.from_tuples(cols, names=COLUMNS.names))
    return out
