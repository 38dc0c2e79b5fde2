"""Performance-gain analysis (§5.4, Table 4 and Fig. 4): known answers on synthetic data and the tiny model."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from finer1_lib.analysis import (
    compare_gaps,
    h3_pairs,
    image_token_features,
    linear_probe,
    name_embeddings,
    pair_features,
    plot_pca,
    separability,
    taxonomy_gap,
)
from finer1_lib.inference import _vl_model
from finer1_lib.model import build_processor, build_tiny_model, build_tokenizer
from finer1_lib.records import ImageRecord

CORPUS = [
    "The Marovi Talsek is a small bird with a red crest, striped wings and a blue breast.",
    "The Marovi Dunel has a yellow crest and spotted wings; its beak is short.",
    "Is the bird species Marovi Talsek? Describe this image.",
]


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer(CORPUS)
    yield build_tiny_model(tokenizer, "tiny-3m", seed=0), build_processor(tokenizer)
    torch.set_num_threads(threads)


def _image(seed, size=(112, 112)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# --------------------------------------------------------------------------------------------------
# H1: linear probe
# --------------------------------------------------------------------------------------------------


def _gaussians(n_per_class, n_classes, dim, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    return centres[y] + rng.normal(0, 1, (len(y), dim)), y


def test_linear_probe_separable_and_random_labels():
    x_train, y_train = _gaussians(40, 4, 16, spread=6.0, seed=0)
    rng = np.random.default_rng(1)
    x_test = x_train + rng.normal(0, 0.5, x_train.shape)  # same centres, fresh noise
    acc = linear_probe(x_train, y_train, x_test, y_train)
    assert 95.0 <= acc <= 100.0
    # labels unrelated to the features: about 1/4 on held-out data
    noise = rng.normal(0, 1, (800, 16))
    labels = rng.integers(0, 4, 800)
    chance = linear_probe(noise[:400], labels[:400], noise[400:], labels[400:])
    assert 15.0 <= chance <= 35.0
    assert linear_probe(x_train, y_train, x_test, y_train, seed=3) == acc  # deterministic


def test_linear_probe_groups_score_one_fit():
    # classes 0-1 well separated, classes 2-3 share one centre: group "easy" ~100 %, "hard" ~50 %
    rng = np.random.default_rng(0)
    centres = np.array([[8.0, 0], [-8.0, 0], [0, 8.0], [0, 8.0]])
    y = np.repeat(np.arange(4), 100)
    x_train = centres[y] + rng.normal(0, 1, (400, 2))
    x_test = centres[y] + rng.normal(0, 1, (400, 2))
    groups = ["easy" if c < 2 else "hard" for c in y]
    acc = linear_probe(x_train, y, x_test, y, groups=groups)
    assert list(acc) == ["all", "easy", "hard"]
    assert acc["easy"] >= 99.0 and 35.0 <= acc["hard"] <= 65.0
    assert acc["all"] == pytest.approx((acc["easy"] + acc["hard"]) / 2)
    assert acc["all"] == linear_probe(x_train, y, x_test, y)
    with pytest.raises(ValueError, match="groups has 3 entries"):
        linear_probe(x_train, y, x_test, y, groups=groups[:3])


def test_linear_probe_bad_inputs():
    x, y = _gaussians(5, 2, 3, 1.0, 0)
    with pytest.raises(ValueError, match="train_x has 10 rows but train_y has 9"):
        linear_probe(x, y[:9], x, y)
    with pytest.raises(ValueError, match="test_x"):
        linear_probe(x, y, x[:, :2], y)
    with pytest.raises(ValueError, match="test_x must be a non-empty"):
        linear_probe(x, y, x[:0], y[:0])


# --------------------------------------------------------------------------------------------------
# H2: taxonomy gap and its t-test
# --------------------------------------------------------------------------------------------------

# Genus A = {A1, A2}, genus B = {B1, B2}; unit vectors at angles 0, 30 (genus A) and 90, 150 degrees (genus B)
_ANGLES = {"A1": 0.0, "A2": 30.0, "B1": 90.0, "B2": 150.0}
_GENUS = {"A1": "A", "A2": "A", "B1": "B", "B2": "B"}


def _unit(deg):
    return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]


def test_taxonomy_gap_known_values():
    names = list(_ANGLES)
    emb = np.array([_unit(a) for a in _ANGLES.values()]) * np.array([[1], [2], [3], [0.5]])  # norms irrelevant
    table = taxonomy_gap(emb, names, _GENUS, n_inter=2, seed=0)
    assert list(table.columns) == ["species", "intra", "inter", "delta"]
    assert table["species"].tolist() == names
    cos = lambda a, b: np.cos(np.radians(_ANGLES[a] - _ANGLES[b]))  # noqa: E731
    # one sibling each, and n_inter=2 takes both other-genus species: nothing random left
    expected = {
        "A1": (cos("A1", "A2"), (cos("A1", "B1") + cos("A1", "B2")) / 2),  # cos30, (0 + cos150) / 2
        "A2": (cos("A2", "A1"), (cos("A2", "B1") + cos("A2", "B2")) / 2),  # cos30, (cos60 + cos120) / 2 = 0
        "B1": (cos("B1", "B2"), (cos("B1", "A1") + cos("B1", "A2")) / 2),  # cos60, (0 + cos60) / 2
        "B2": (cos("B2", "B1"), (cos("B2", "A1") + cos("B2", "A2")) / 2),  # cos60, (cos150 + cos120) / 2
    }
    for row in table.itertuples():
        intra, inter = expected[row.species]
        assert row.intra == pytest.approx(intra, abs=1e-12)
        assert row.inter == pytest.approx(inter, abs=1e-12)
        assert row.delta == pytest.approx(intra - inter, abs=1e-12)
    # by hand: A1: .8660 + .4330 = 1.2990; A2: .8660; B1: .5 - .25 = .25; B2: .5 + .6830 = 1.1830
    assert table["delta"].tolist() == pytest.approx([1.2990381, 0.8660254, 0.25, 1.1830127], abs=1e-6)
    assert (table["delta"] > 0).all()
    # asking for more inter-genus species than exist uses all of them
    pd.testing.assert_frame_equal(taxonomy_gap(emb, names, _GENUS, n_inter=4, seed=5), table)


def test_taxonomy_gap_skips_singletons_and_is_seeded():
    rng = np.random.default_rng(0)
    genus = {f"s{i}": f"g{i // 3}" for i in range(12)}  # 4 genera of 3 species
    genus.update({"lonely": "g9", "no_genus": "", "no_genus2": ""})
    names = list(genus)
    emb = rng.normal(size=(len(names), 8))
    table = taxonomy_gap(emb, names, genus, n_inter=4, seed=1)
    assert table["species"].tolist() == [f"s{i}" for i in range(12)]  # singletons and empty genera skipped
    pd.testing.assert_frame_equal(table, taxonomy_gap(emb, names, genus, n_inter=4, seed=1))
    assert not table.equals(taxonomy_gap(emb, names, genus, n_inter=4, seed=2))
    # super_of restricts the inter-genus pool: with one genus per super-category nothing is left to compare
    assert taxonomy_gap(emb, names, genus, super_of=genus).empty
    with pytest.raises(ValueError, match="embeddings must be"):
        taxonomy_gap(emb[:3], names, genus)
    with pytest.raises(ValueError, match="genus_of has no genus"):
        taxonomy_gap(emb, names, {"s0": "g0"})


def test_compare_gaps_identical_and_shifted():
    rng = np.random.default_rng(0)
    a = rng.normal(0.01, 0.05, 50)
    same = compare_gaps(a, a.copy())
    assert same == {"delta_a": pytest.approx(a.mean()), "delta_b": pytest.approx(a.mean()), "t": 0.0, "p": 1.0}
    b = a + 0.05 + rng.normal(0, 0.01, 50)
    res = compare_gaps(a, b)
    assert res["t"] < 0 and res["p"] < 1e-6  # t has the sign of mean(a) - mean(b), as in the paper
    assert res["delta_b"] - res["delta_a"] == pytest.approx(np.mean(b - a))
    welch = compare_gaps(a, b[:40], paired=False)
    assert welch["t"] < 0 and welch["p"] < 1e-3
    const = compare_gaps(a, a + 0.1)  # constant shift: zero-variance differences
    assert const["t"] == -np.inf and const["p"] == 0.0
    noise = compare_gaps(a, rng.normal(0.01, 0.05, 50))
    assert noise["p"] > 0.05
    with pytest.raises(ValueError, match="paired test needs equal lengths"):
        compare_gaps(a, a[:10])


# --------------------------------------------------------------------------------------------------
# H3: pairs, separability and the figure
# --------------------------------------------------------------------------------------------------


def test_separability_clusters_and_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat([True, False], 100)
    separated = rng.normal(0, 1, (200, 32)) + np.where(labels[:, None], 4.0, -4.0)
    res = separability(separated, labels)
    assert res["pca"].shape == (200, 2) and res["explained"].shape == (2,)
    assert res["pca2_accuracy"] >= 0.95 and res["full_accuracy"] >= 0.95 and res["silhouette"] > 0.5
    same = separability(rng.normal(0, 1, (200, 32)), labels)
    assert same["pca2_accuracy"] <= 0.7 and abs(same["silhouette"]) < 0.1
    with pytest.raises(ValueError, match="features has 200 rows but labels has 10"):
        separability(separated, labels[:10])
    with pytest.raises(ValueError, match="two classes"):
        separability(separated, np.ones(200, dtype=bool))

    fig = plot_pca({"base": same, "Fine-R1": res}, labels)
    axes = fig.get_axes()
    assert len(axes) == 2
    assert "base" in axes[0].get_title() and "1.00" in axes[1].get_title()
    assert len(axes[1].collections) == 2  # negatives and positives
    with pytest.raises(ValueError, match="titles"):
        plot_pca({"base": same}, labels, titles=["a", "b"])


def test_separability_groups_keep_an_images_pairs_together():
    # each "image" gives one positive and one negative pair with (nearly) the same features: no label signal.
    # Folds that split an image's two rows make the classifier learn image identity -> below chance;
    # grouped folds give about chance.
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (60, 16))
    x = np.repeat(images, 2, axis=0) + rng.normal(0, 0.01, (120, 16))
    labels = np.tile([1, 0], 60)
    groups = np.repeat(np.arange(60), 2)
    grouped = separability(x, labels, groups=groups)
    assert 0.35 <= grouped["full_accuracy"] <= 0.65
    assert separability(x, labels)["full_accuracy"] < grouped["full_accuracy"]
    with pytest.raises(ValueError, match="groups has 3 entries"):
        separability(x, labels, groups=groups[:3])



def _record(i, label, genus, sup="bird"):
    return ImageRecord(f"img{i}", f"img{i}.png", sup, genus, label, "test")


def test_h3_pairs_hard_negatives():
    records = [
        _record(0, "Marovi Talsek", "Marovi"),
        _record(1, "Marovi Dunel", "Marovi"),
        _record(2, "Kesh Abor", "Kesh"),  # the only Kesh: no sibling, the negative comes from another genus
        _record(3, "Boeing 737", "Boeing", "aircraft"),
    ]
    names_by_super = {
        "bird": ["Marovi Talsek", "Marovi Dunel", "Marovi Ferro", "Kesh Abor", "Lunt Pell"],
        "aircraft": ["Boeing 737", "Boeing 747", "Airbus A320"],
    }
    genus_of = {"Marovi Talsek": "Marovi", "Marovi Dunel": "Marovi", "Marovi Ferro": "Marovi", "Kesh Abor": "Kesh",
                "Lunt Pell": "Lunt", "Boeing 737": "Boeing", "Boeing 747": "Boeing", "Airbus A320": "Airbus"}
    triples = h3_pairs(records, names_by_super, seed=0, genus_of=genus_of)
    assert len(triples) == 2 * len(records)
    for k, r in enumerate(records):
        (pr, pos, is_pos), (nr, neg, is_neg) = triples[2 * k], triples[2 * k + 1]
        assert pr is r and nr is r and pos == r.label and is_pos is True and is_neg is False
        assert neg != r.label and neg in names_by_super[r.super_category]
        if r.genus == "Kesh":
            assert genus_of[neg] != "Kesh"
        else:
            assert genus_of[neg] == r.genus  # hard negative: a same-genus sibling
    assert triples == h3_pairs(records, names_by_super, seed=0, genus_of=genus_of)
    # two Marovi siblings to draw from: some seed picks each
    picks = {h3_pairs(records[:1], names_by_super, seed=s, genus_of=genus_of)[1][1] for s in range(20)}
    assert picks == {"Marovi Dunel", "Marovi Ferro"}
    # several negatives: siblings first, then the rest; default genus_of comes from the records
    # (here only "Marovi Dunel" is known to be a Marovi: "Marovi Ferro" has no record)
    many = h3_pairs(records[:3], names_by_super, seed=0, negatives_per_positive=4)
    assert len(many) == 15 and many[1][1] == "Marovi Dunel"
    assert {n for _, n, _ in many[:5]} == set(names_by_super["bird"]) and [p for _, _, p in many[:5]].count(True) == 1
    with pytest.raises(ValueError, match="'img3': only 2 incorrect names"):
        h3_pairs(records, names_by_super, negatives_per_positive=3)
    with pytest.raises(ValueError, match="super-category 'dog'"):
        h3_pairs([_record(9, "Pug", "Pug", "dog")], names_by_super)
    with pytest.raises(ValueError, match="records is empty"):
        h3_pairs([], names_by_super)


# --------------------------------------------------------------------------------------------------
# Features from the tiny model
# --------------------------------------------------------------------------------------------------


def test_image_token_features(tiny):
    model, processor = tiny
    hidden = model.config.text_config.hidden_size
    images = [_image(0), _image(1, (168, 112)), _image(2)]  # the wider image has more image tokens: padding
    feats = image_token_features(model, processor, images)
    assert feats.shape == (3, hidden) and feats.dtype == np.float32 and np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, image_token_features(model, processor, images))
    assert np.abs(feats[0] - feats[2]).max() > 1e-3  # different images, different rows
    for i, img in enumerate(images):  # alone == in the batch
        np.testing.assert_allclose(image_token_features(model, processor, [img])[0], feats[i], atol=1e-5, rtol=0)
    np.testing.assert_allclose(image_token_features(model, processor, images, batch_size=2), feats, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="images is empty"):
        image_token_features(model, processor, [])


def test_final_layer_is_after_the_final_norm(tiny):
    """hidden_states[-1] (the default) is the output of the final RMSNorm; final_norm=False is its input."""
    model, processor = tiny
    norm = _vl_model(model).language_model.norm
    images = [_image(3)]
    raw = image_token_features(model, processor, images, final_norm=False)
    normed = image_token_features(model, processor, images)
    assert np.abs(raw - normed).max() > 1e-3
    # per-token norm, then mean: recompute from the raw tokens through a hook
    seen = {}
    handle = norm.register_forward_hook(lambda _m, args, out: seen.update(inp=args[0], out=out))
    try:
        image_token_features(model, processor, images)
    finally:
        handle.remove()
    from finer1_lib.inference import build_inputs

    ids = build_inputs(processor, images, ["Describe this image."], padding_side="right")["input_ids"][0]
    mask = ids == model.config.image_token_id
    np.testing.assert_allclose(seen["out"][0][mask].mean(0).numpy(), normed[0], atol=1e-6)
    np.testing.assert_allclose(seen["inp"][0][mask].mean(0).numpy(), raw[0], atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(norm(seen["inp"])[0][mask].mean(0).numpy(), normed[0], atol=1e-6)


def test_pair_features_shape_and_left_padding(tiny):
    model, processor = tiny
    images = [_image(0), _image(1), _image(0)]
    names = ["Marovi Talsek", "Marovi Talsek", "Marovi Dunel with a red crest and striped wings"]
    feats = pair_features(model, processor, images, "bird", names)
    assert feats.shape == (3, model.config.text_config.hidden_size) and np.isfinite(feats).all()
    alone = pair_features(model, processor, images[:1], ["bird"], names[:1])
    np.testing.assert_allclose(alone[0], feats[0], atol=1e-4, rtol=0)  # row 0 was left-padded in the batch
    assert np.abs(feats[0] - feats[1]).max() > 1e-3  # same question, different image
    assert np.abs(feats[0] - feats[2]).max() > 1e-3  # same image, different question
    with pytest.raises(ValueError, match="same length, got 3, 3 and 2"):
        pair_features(model, processor, images, "bird", names[:2])
    with pytest.raises(ValueError, match="images is empty"):
        pair_features(model, processor, [], "bird", [])


def test_name_embeddings_span_and_padding(tiny):
    model, processor = tiny
    names = ["Marovi Talsek", "Marovi Dunel", "Marovi Talsek"]
    emb = name_embeddings(model, processor, names)
    assert emb.shape == (3, model.config.text_config.hidden_size)
    np.testing.assert_allclose(emb[0], emb[2], atol=1e-6)
    assert np.abs(emb[0] - emb[1]).max() > 1e-3
    # a longer prompt in the batch pads this one: same row
    mixed = name_embeddings(model, processor, ["Marovi Talsek", "The small bird with a red crest"])
    np.testing.assert_allclose(mixed[0], emb[0], atol=1e-5, rtol=0)
    # the span is the name only: text after it (causal model) does not change the embedding
    suffixed = name_embeddings(model, processor, names[:1], template="The {name} is a small bird.")
    np.testing.assert_allclose(suffixed[0], emb[0], atol=1e-5, rtol=0)
    # but text before it does
    prefixed = name_embeddings(model, processor, names[:1], template="A red crest: the {name}.")
    assert np.abs(prefixed[0] - emb[0]).max() > 1e-3
    with pytest.raises(ValueError, match="template must contain"):
        name_embeddings(model, processor, names, template="The bird.")
    with pytest.raises(ValueError, match="names is empty"):
        name_embeddings(model, processor, [])
