"""Performance-gain analysis (paper §5.4): why does Fine-R1 recognise better than its base model?

Three hypotheses, each a measurement on the LLM's final-layer hidden states:

- **H1, visual representation** (Table 4 left): :func:`image_token_features` mean-pools the image tokens'
  final-layer states; :func:`linear_probe` trains a linear classifier on them (paper: 84.26 base vs 85.00
  Fine-R1 on CUB-200, "negligible differences").
- **H2, taxonomy-aware encoding** (Table 4 right): :func:`name_embeddings` embeds sub-category names;
  :func:`taxonomy_gap` takes, per species, intra-genus minus inter-genus cosine similarity;
  :func:`compare_gaps` t-tests the two models' per-species gaps (paper: 0.0088 vs 0.0531, p = 0.70).
- **H3, knowledge use** (Fig. 4): :func:`h3_pairs` builds "Is the bird species {correct / incorrect name}?"
  questions, :func:`pair_features` takes the last token's final-layer state, :func:`separability` measures
  how well positive and negative pairs separate after PCA (as numbers, not only a picture) and
  :func:`plot_pca` draws the figure.

"Final layer" means ``outputs.hidden_states[-1]``. In transformers 5 that entry is tied to
``last_hidden_state``, i.e. it is taken AFTER the language model's final RMSNorm (checked in the tests).
Pass ``final_norm=False`` to get the raw residual stream that enters that norm instead.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .inference import _device, _vl_model, build_inputs

__all__ = [
    "image_token_features",
    "linear_probe",
    "name_embeddings",
    "taxonomy_gap",
    "compare_gaps",
    "pair_features",
    "separability",
    "plot_pca",
    "h3_pairs",
]


# --------------------------------------------------------------------------------------------------
# Forward pass returning the final-layer hidden states
# --------------------------------------------------------------------------------------------------


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


@torch.no_grad()
def _final_hidden(model, inputs, final_norm: bool = True) -> torch.Tensor:
    """Final-layer hidden states (B, T, hidden) of one batch, float32, on the model's device.

    Position ids are computed here from the attention mask, so the result does not depend on the padding
    side: 3-D mrope positions (:meth:`get_rope_index`) when the batch has images, else 0, 1, ... over the
    real tokens. ``final_norm=False`` captures the input of the final RMSNorm with a forward hook.
    """
    vl = _vl_model(model)
    device = _device(model)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in dict(inputs).items()}
    mask = inputs["attention_mask"]
    if inputs.get("image_grid_thw") is not None:
        position_ids, _ = vl.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=mask,
        )
    else:
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    vl.rope_deltas = None
    captured: dict[str, torch.Tensor] = {}
    hook = None
    if not final_norm:
        hook = vl.language_model.norm.register_forward_hook(lambda _m, args, _o: captured.update(pre=args[0]))
    try:
        out = model(**inputs, position_ids=position_ids, output_hidden_states=True, use_cache=False,
                    logits_to_keep=1)
    finally:
        vl.rope_deltas = None
        if hook is not None:
            hook.remove()
    hidden = captured["pre"] if not final_norm else out.hidden_states[-1]
    return hidden.float()


def _as_list(x, what: str) -> list:
    items = list(x)
    if not items:
        raise ValueError(f"{what} is empty")
    return items


# --------------------------------------------------------------------------------------------------
# H1: linear probing of image-token representations (Table 4 left)
# --------------------------------------------------------------------------------------------------


def image_token_features(
    model,
    processor,
    images: Sequence[Image.Image],
    prompt: str = "Describe this image.",
    batch_size: int = 16,
    *,
    final_norm: bool = True,
) -> np.ndarray:
    """Mean-pooled final-layer states at the image-token positions, one row per image (Table 4 left).

    Each image is asked ``prompt`` in the chat template (right padding); rows are float32, shape
    ``(len(images), hidden_size)``. See the module docstring for ``final_norm``.
    """
    images = _as_list(images, "images")
    if any(img is None for img in images):
        raise ValueError("images contains None; image_token_features needs an image for every row")
    _check_batch_size(batch_size)
    image_token_id = model.config.image_token_id
    rows = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inputs = build_inputs(processor, chunk, [prompt] * len(chunk), padding_side="right")
        hidden = _final_hidden(model, inputs, final_norm)
        is_image = (inputs["input_ids"] == image_token_id).to(hidden.device)
        for i in range(len(chunk)):
            rows.append(hidden[i][is_image[i]].mean(0))
    return torch.stack(rows).cpu().numpy()


def linear_probe(train_x, train_y, test_x, test_y, seed: int = 0, groups=None):
    """Test accuracy (%) of a linear classifier trained on ``train_x`` (Table 4 left).

    Standardisation + multinomial logistic regression (L2, C = 1; Newton-CG reaches the optimum in ~20
    iterations where L-BFGS needed ~900): a simpler, deterministic stand-in
    for the paper's linear layer trained 500 epochs with Adam, where the best test accuracy is reported.
    ``groups`` (one name per test row, e.g. "seen"/"unseen") adds the accuracy of each group from the same fit:
    the result is then ``{"all": acc, group: acc, ...}``.
    """
    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"{name}_x must be a non-empty 2-D array, got shape {x.shape}")
        if len(x) != len(y):
            raise ValueError(f"{name}_x has {len(x)} rows but {name}_y has {len(y)} labels")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x has {train_x.shape[1]} features but test_x has {test_x.shape[1]}")
    if len(np.unique(train_y)) < 2:
        raise ValueError("train_y needs at least two classes")
    if groups is not None and len(groups) != len(test_y):
        raise ValueError(f"groups has {len(groups)} entries but test_y has {len(test_y)} labels")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(solver="newton-cg", max_iter=2000, random_state=seed))
    clf.fit(train_x, train_y)
    hit = clf.predict(test_x) == test_y
    if groups is None:
        return float(100.0 * np.mean(hit))
    groups = np.asarray(groups)
    return {"all": float(100.0 * np.mean(hit)),
            **{str(g): float(100.0 * np.mean(hit[groups == g])) for g in dict.fromkeys(groups.tolist())}}


# --------------------------------------------------------------------------------------------------
# H2: taxonomy-aware name embeddings (Table 4 right)
# --------------------------------------------------------------------------------------------------


def name_embeddings(
    model,
    processor,
    names: Sequence[str],
    template: str = "The {name}.",
    batch_size: int = 16,
    *,
    final_norm: bool = True,
) -> np.ndarray:
    """Mean final-layer state over the tokens of each name, in a text-only chat prompt (Table 4 right).

    The prompt is ``template.format(name=name)`` as the user turn (no image, default system prompt,
    generation prompt appended); the name's tokens are those whose character offsets overlap the name
    (for byte-level BPE a token may carry the preceding space). Rows are float32, ``(len(names), hidden)``.
    """
    names = _as_list(names, "names")
    if "{name}" not in template:
        raise ValueError(f"template must contain '{{name}}', got {template!r}")
    _check_batch_size(batch_size)
    tokenizer = processor.tokenizer
    prefix = template.split("{name}", 1)[0].replace("{{", "{").replace("}}", "}")
    rows = []
    for start in range(0, len(names), batch_size):
        chunk = names[start : start + batch_size]
        prompts = [template.format(name=n) for n in chunk]
        texts = [
            processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                          tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        enc = tokenizer(texts, padding=True, padding_side="right", return_offsets_mapping=True,
                        return_tensors="pt")
        offsets = enc.pop("offset_mapping")
        hidden = _final_hidden(model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                               final_norm)
        for i, (name, prompt, text) in enumerate(zip(chunk, prompts, texts)):
            lo = text.rindex(prompt) + len(prefix)  # the user turn is the last occurrence of the prompt
            hi = lo + len(name)
            span = (offsets[i, :, 0] < hi) & (offsets[i, :, 1] > lo) & enc["attention_mask"][i].bool()
            if not span.any():
                raise ValueError(f"name {name!r} has no tokens in {text!r}")
            rows.append(hidden[i][span.to(hidden.device)].mean(0))
    return torch.stack(rows).cpu().numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def taxonomy_gap(
    embeddings,
    names: Sequence[str],
    genus_of: Mapping[str, str],
    n_inter: int = 4,
    seed: int = 0,
    super_of: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Per species: intra-genus minus inter-genus cosine similarity of name embeddings (Table 4 right).

    For each target (in ``names`` order): ``intra`` = cosine with one random other species of the same
    genus; ``inter`` = mean cosine with ``n_inter`` random species of other genera (all of them when fewer
    exist), restricted to the target's super-category when ``super_of`` is given; ``delta = intra - inter``.
    Species with no same-genus sibling (or an empty genus), or with no other-genus candidate, are skipped.
    One ``np.random.default_rng(seed)`` drives all draws, so a seed gives one table.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    names = list(names)
    if emb.ndim != 2 or len(emb) != len(names):
        raise ValueError(f"embeddings must be (len(names), d) = ({len(names)}, d), got shape {emb.shape}")
    if len(set(names)) != len(names):
        raise ValueError("names contains duplicates")
    if n_inter < 1:
        raise ValueError(f"n_inter must be >= 1, got {n_inter}")
    missing = [n for n in names if n not in genus_of]
    if missing:
        raise ValueError(f"genus_of has no genus for {missing[:5]}")
    if super_of is not None and (missing := [n for n in names if n not in super_of]):
        raise ValueError(f"super_of has no super-category for {missing[:5]}")
    rng = np.random.default_rng(seed)
    rows = []
    for i, name in enumerate(names):
        genus = genus_of[name]
        same_super = [j for j in range(len(names)) if super_of is None or super_of[names[j]] == super_of[name]]
        siblings = [j for j in same_super if j != i and genus and genus_of[names[j]] == genus]
        others = [j for j in same_super if genus_of[names[j]] != genus]
        if not siblings or not others:
            continue
        intra = _cosine(emb[i], emb[siblings[rng.integers(len(siblings))]])
        picked = rng.choice(others, size=min(n_inter, len(others)), replace=False)
        inter = float(np.mean([_cosine(emb[i], emb[j]) for j in picked]))
        rows.append({"species": name, "intra": intra, "inter": inter, "delta": intra - inter})
    return pd.DataFrame(rows, columns=["species", "intra", "inter", "delta"])


def compare_gaps(delta_a, delta_b, paired: bool = True) -> dict:
    """Mean gap of two models and a t-test between their per-species gaps (Table 4 right layout).

    ``paired=True`` (default: both tables list the same species in the same order, e.g. two
    :func:`taxonomy_gap` calls with the same seed) uses ``scipy.stats.ttest_rel``; ``paired=False`` uses
    Welch's ``ttest_ind(equal_var=False)``. ``t`` has the sign of ``mean(a) - mean(b)`` (the paper's
    t = -0.3872 is base minus Fine-R1). Zero-variance edge cases, where scipy returns nan, are resolved:
    equal samples give t = 0, p = 1; a constant non-zero shift gives t = +-inf, p = 0.
    """
    from scipy import stats

    a, b = np.asarray(delta_a, dtype=np.float64).ravel(), np.asarray(delta_b, dtype=np.float64).ravel()
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"delta_a and delta_b need at least 2 values each, got {len(a)} and {len(b)}")
    if paired and len(a) != len(b):
        raise ValueError(f"paired test needs equal lengths: delta_a has {len(a)}, delta_b has {len(b)}")
    diff_mean = a.mean() - b.mean()
    scale = max(1.0, float(np.abs(a).max()), float(np.abs(b).max()))
    tiny = 1e-12 * scale  # float round-off, e.g. (a - (a + 0.1)) is not exactly constant
    degenerate = np.ptp(a - b) <= tiny if paired else (np.ptp(a) <= tiny and np.ptp(b) <= tiny)
    if degenerate:
        t, p = (0.0, 1.0) if abs(diff_mean) <= tiny else (float(np.sign(diff_mean) * np.inf), 0.0)
    else:
        res = stats.ttest_rel(a, b) if paired else stats.ttest_ind(a, b, equal_var=False)
        t, p = float(res.statistic), float(res.pvalue)
    return {"delta_a": float(a.mean()), "delta_b": float(b.mean()), "t": t, "p": p}


# --------------------------------------------------------------------------------------------------
# H3: does the final state separate correct from incorrect names? (Fig. 4)
# --------------------------------------------------------------------------------------------------


def h3_pairs(
    records: Sequence,
    names_by_super: Mapping[str, Sequence[str]],
    seed: int = 0,
    negatives_per_positive: int = 1,
    genus_of: Mapping[str, str] | None = None,
) -> list[tuple]:
    """(record, name, is_positive) triples for the H3 questions (Fig. 4).

    Per record, in order: ``(record, record.label, True)`` then ``negatives_per_positive`` incorrect names
    from ``names_by_super[record.super_category]``, drawn first among same-genus siblings (hard negatives),
    then among the rest. ``genus_of`` maps names to genera; by default it is read off the records
    (``label -> genus``). Seeded with ``random.Random(seed)``.
    """
    records = _as_list(records, "records")
    if negatives_per_positive < 1:
        raise ValueError(f"negatives_per_positive must be >= 1, got {negatives_per_positive}")
    if genus_of is None:
        genus_of = {r.label: r.genus for r in records}
    rng = random.Random(seed)
    triples = []
    for r in records:
        if r.super_category not in names_by_super:
            raise ValueError(f"names_by_super has no names for super-category {r.super_category!r}")
        candidates = [n for n in dict.fromkeys(names_by_super[r.super_category]) if n != r.label]
        if len(candidates) < negatives_per_positive:
            raise ValueError(f"record {r.image_id!r}: only {len(candidates)} incorrect names in "
                             f"{r.super_category!r}, need {negatives_per_positive}")
        siblings = [n for n in candidates if r.genus and genus_of.get(n) == r.genus]
        rest = [n for n in candidates if n not in siblings]
        rng.shuffle(siblings)
        rng.shuffle(rest)
        triples.append((r, r.label, True))
        triples += [(r, n, False) for n in (siblings + rest)[:negatives_per_positive]]
    return triples


def pair_features(
    model,
    processor,
    images: Sequence[Image.Image],
    super_words: str | Sequence[str],
    names: Sequence[str],
    template: str = "Is the {word} species {name}?",
    batch_size: int = 16,
    *,
    final_norm: bool = True,
) -> np.ndarray:
    """Final-layer state at the last token of each (image, question) input, one row per pair (Fig. 4).

    Row i asks ``template.format(word=super_words[i], name=names[i])`` about ``images[i]`` (a single
    ``super_words`` string is used for every row). The chat ends with the generation prompt, left padding
    puts every row's last real token at position -1. Rows are float32, ``(len(images), hidden_size)``.
    """
    images = _as_list(images, "images")
    names = list(names)
    words = [super_words] * len(images) if isinstance(super_words, str) else list(super_words)
    if not len(images) == len(words) == len(names):
        raise ValueError(f"images, super_words and names must have the same length, got {len(images)}, "
                         f"{len(words)} and {len(names)}")
    _check_batch_size(batch_size)
    prompts = [template.format(word=w, name=n) for w, n in zip(words, names)]
    rows = []
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        inputs = build_inputs(processor, images[sl], prompts[sl], padding_side="left")
        rows.append(_final_hidden(model, inputs, final_norm)[:, -1])
    return torch.cat(rows).cpu().numpy()


def separability(features, labels, seed: int = 0, groups=None) -> dict:
    """How separable positive and negative pairs are, as numbers (Fig. 4).

    Returns ``pca`` (n, 2) projections (PCA on centred raw features, as in the figure), ``explained``
    (variance ratio of the 2 PCs), ``pca2_accuracy`` and ``full_accuracy`` (5-fold stratified, shuffled
    cross-validated accuracy of a standardised logistic regression on the 2 PCs / on the full features; the
    unsupervised PCA is fitted once on all rows) and ``silhouette`` (of the labels on the 2 PCs).
    ``groups`` (e.g. the image of each pair) keeps a group's rows in one fold: a positive and a negative pair of
    the same image split across folds would let the classifier score image identity, which is anti-informative.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"features must be a 2-D array with at least 2 columns, got shape {x.shape}")
    if len(x) != len(y):
        raise ValueError(f"features has {len(x)} rows but labels has {len(y)}")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        raise ValueError(f"labels need at least two classes with >= 2 rows each, got counts {counts.tolist()}")
    pca = PCA(n_components=2, random_state=seed)
    z = pca.fit_transform(x)
    if groups is not None and len(groups) != len(y):
        raise ValueError(f"groups has {len(groups)} entries but labels has {len(y)}")
    folds = int(min(5, counts.min()))
    cv = (StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed) if groups is None
          else StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed))

    def cv_accuracy(data):
        clf = make_pipeline(StandardScaler(), LogisticRegression(solver="newton-cg", max_iter=5000, random_state=seed))
        return float(cross_val_score(clf, data, y, groups=groups, cv=cv, scoring="accuracy").mean())

    return {
        "pca": z,
        "explained": pca.explained_variance_ratio_.copy(),
        "pca2_accuracy": cv_accuracy(z),
        "full_accuracy": cv_accuracy(x),
        "silhouette": float(silhouette_score(z, y)),
    }


def plot_pca(results: Mapping[str, dict], labels, titles: Sequence[str] | None = None):
    """Fig. 4: one scatter panel per model (first two PCs), positive vs negative pairs coloured.

    ``results`` maps a model name to its :func:`separability` dict; ``labels`` (truthy = positive pair)
    are shared by all panels. Each title carries the 2-PC cross-validated accuracy. Returns the Figure.
    """
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("results is empty")
    keys = list(results)
    titles = list(titles) if titles is not None else keys
    if len(titles) != len(keys):
        raise ValueError(f"{len(titles)} titles for {len(keys)} models")
    positive = np.asarray(labels).astype(bool)
    fig = Figure(figsize=(4.2 * len(keys), 3.8))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key, title in zip(axes, keys, titles):
        z = np.asarray(results[key]["pca"])
        if len(z) != len(positive):
            raise ValueError(f"results[{key!r}]['pca'] has {len(z)} rows but labels has {len(positive)}")
        ax.scatter(z[~positive, 0], z[~positive, 1], s=12, alpha=0.7, c="tab:red", label="negative")
        ax.scatter(z[positive, 0], z[positive, 1], s=12, alpha=0.7, c="tab:blue", label="positive")
        ax.set_title(f"{title}  (2-PC acc {results[key]['pca2_accuracy']:.2f})", fontsize=10)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
