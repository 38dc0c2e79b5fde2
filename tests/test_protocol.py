"""The evaluation protocol (finer1_lib/protocol.py): splits, shots, similarity, triplets, closed-world sets,
eval records and the eval JSONL format."""
from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from finer1_lib import protocol as P
from finer1_lib.io import DataError
from finer1_lib.records import OFFICIAL_SPLITS_DIR, SUPER_CATEGORIES, ImageRecord
from finer1_lib.world import World


# --------------------------------------------------------------------------------------------- helpers
def rec(label: str, i: int, sc: str = "bird", genus: str = "G", partition: str = "train") -> ImageRecord:
    return ImageRecord(image_id=f"{sc}/{label}/{partition}/{i}", path=f"images/{sc}/{label}/{i}.png",
                       super_category=sc, genus=genus, label=label, partition=partition)


# Handmade class geometry: every image of a class embeds to the same fixed vector. Angles (degrees) in a
# plane: similarity = cos(angle difference). Bird classes A..F; car classes X, Y, Z.
ANGLES = {"A": 0, "B": 10, "C": 35, "D": 65, "E": 100, "F": 150, "X": 0, "Y": 20, "Z": 90}
SUPER = {lab: ("car" if lab in "XYZ" else "bird") for lab in ANGLES}
# Each label gets a unique solid colour; the embedding reads the colour back.
COLOUR = {lab: (10 * i + 5, 200 - 10 * i, 7) for i, lab in enumerate(sorted(ANGLES))}
LABEL_OF_COLOUR = {c: lab for lab, c in COLOUR.items()}


def vec(label: str) -> np.ndarray:
    t = np.deg2rad(ANGLES[label])
    return np.array([np.cos(t), np.sin(t)])


def label_image(label: str) -> Image.Image:
    return Image.new("RGB", (4, 4), COLOUR[label])


def handmade_embed(images) -> np.ndarray:
    return np.stack([vec(LABEL_OF_COLOUR[im.getpixel((0, 0))]) for im in images])


def nearest_order(label: str, among=None) -> list[str]:
    """Known answer: other labels of the same super-category by angular distance."""
    cands = [o for o in ANGLES if o != label and SUPER[o] == SUPER[label] and (among is None or o in among)]
    return sorted(cands, key=lambda o: (abs(ANGLES[o] - ANGLES[label]), o))


@pytest.fixture(scope="module")
def pool() -> list[ImageRecord]:
    return [rec(lab, i, sc=SUPER[lab]) for lab in sorted(ANGLES) for i in range(3)]


@pytest.fixture(scope="module")
def sim(pool) -> P.Similarity:
    return P.build_similarity(pool, lambda r: label_image(r.label), embed_fn=handmade_embed)


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=0)


@pytest.fixture(scope="module")
def world_records(world) -> list[ImageRecord]:
    return [world.record(s.name, "train", i) for s in world.species for i in range(6)]


# ----------------------------------------------------------------------------------------- split_classes
LABELS16 = [f"class{i:02d}" for i in range(16)]


def test_split_disjoint_and_covering():
    sp = P.split_classes(LABELS16, seed=0)
    assert set(sp) == {"seen", "unseen"}
    assert not set(sp["seen"]) & set(sp["unseen"])
    assert set(sp["seen"]) | set(sp["unseen"]) == set(LABELS16)
    assert sp["seen"] == sorted(sp["seen"]) and sp["unseen"] == sorted(sp["unseen"])


@pytest.mark.parametrize("n, n_seen", [
    (16, 10),  # round(9.6) = 10 seen, 6 unseen
    (5, 3),    # round(3.0) = 3 seen, 2 unseen
    (10, 6),
    (2, 1),    # round(1.2) = 1
    (3, 2),    # round(1.8) = 2
    (200, 120),
])
def test_split_sizes_are_rounded_60_percent(n, n_seen):
    # rule in the code: n_seen = min(n - 1, max(1, round(seen_frac * n)))
    sp = P.split_classes([f"c{i}" for i in range(n)], seed=3)
    assert len(sp["seen"]) == n_seen == round(0.6 * n)
    assert len(sp["unseen"]) == n - n_seen


def test_split_sizes_are_clamped_so_both_sides_non_empty():
    labels = ["a", "b", "c"]
    assert len(P.split_classes(labels, seen_frac=0.9)["seen"]) == 2   # round(2.7) = 3 -> clamped to n - 1
    assert len(P.split_classes(labels, seen_frac=0.1)["seen"]) == 1   # round(0.3) = 0 -> clamped to 1
    assert len(P.split_classes(labels, seen_frac=0.5)["seen"]) == 2   # round(1.5) = 2 (banker's rounding)


def test_split_deduplicates_and_ignores_input_order():
    a = P.split_classes(LABELS16, seed=1)
    b = P.split_classes(list(reversed(LABELS16)) + LABELS16[:3], seed=1)
    assert a == b


def test_split_deterministic_and_changes_with_seed_and_salt():
    assert P.split_classes(LABELS16, seed=0) == P.split_classes(LABELS16, seed=0)
    by_seed = {tuple(P.split_classes(LABELS16, seed=s)["seen"]) for s in range(6)}
    assert len(by_seed) > 1
    assert P.split_classes(LABELS16, seed=0, salt="bird") != P.split_classes(LABELS16, seed=0, salt="car")


@pytest.mark.parametrize("frac", [0, 1, 1.5, -0.2])
def test_split_bad_seen_frac_raises(frac):
    with pytest.raises(ValueError, match="seen_frac"):
        P.split_classes(LABELS16, seen_frac=frac)


def test_split_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2"):
        P.split_classes(["only", "only"])
    with pytest.raises(ValueError):
        P.split_classes([])


def test_split_all_over_world(world, world_records):
    splits = P.split_all(world_records, seed=0)
    assert list(splits) == list(SUPER_CATEGORIES)
    for sc in SUPER_CATEGORIES:
        names = {s.name for s in world.species_of(sc)}
        sp = splits[sc]
        assert set(sp["seen"]) | set(sp["unseen"]) == names
        assert not set(sp["seen"]) & set(sp["unseen"])
        assert len(sp["seen"]) == round(0.6 * len(names)) == 10
        # same as split_classes salted with the super-category
        assert sp == P.split_classes(names, 0.6, 0, salt=sc)
    assert P.split_all(world_records, seed=0) == splits
    assert P.split_all(world_records, seed=1) != splits


def test_split_all_only_present_super_categories(world_records):
    birds = [r for r in world_records if r.super_category == "bird"]
    assert list(P.split_all(birds)) == ["bird"]


# ------------------------------------------------------------------------------------------------ shots
def test_sample_shots_k_per_label_from_given_labels(world, world_records):
    labels = [s.name for s in world.species_of("dog")[:5]]
    shots = P.sample_shots(world_records, labels, k=4, seed=0)
    assert len(shots) == 20
    counts = Counter(r.label for r in shots)
    assert counts == {lab: 4 for lab in labels}
    assert len({r.image_id for r in shots}) == 20  # no image twice
    ids = {r.image_id for r in world_records}
    assert all(r.image_id in ids for r in shots)
    # grouped by label in sorted label order
    assert [r.label for r in shots] == [lab for lab in sorted(labels) for _ in range(4)]


def test_sample_shots_deterministic_and_seeded(world, world_records):
    labels = [s.name for s in world.species_of("flower")]
    a = P.sample_shots(world_records, labels, k=2, seed=0)
    assert a == P.sample_shots(list(reversed(world_records)), labels, k=2, seed=0)  # input order irrelevant
    assert a != P.sample_shots(world_records, labels, k=2, seed=1)


def test_sample_shots_too_few_images_raises(world, world_records):
    name = world.species[0].name
    with pytest.raises(ValueError, match=name):
        P.sample_shots(world_records, [name], k=7)  # 6 images per class in world_records
    with pytest.raises(ValueError, match="Missing Label"):
        P.sample_shots(world_records, ["Missing Label"], k=1)
    assert len(P.sample_shots(world_records, [name], k=6)) == 6


# --------------------------------------------------------------------------------------- check_disjoint
def test_check_disjoint_passes_on_disjoint_groups():
    a = [rec("A", i, partition="train") for i in range(3)]
    b = [rec("A", i, partition="test") for i in range(3)]
    assert P.check_disjoint(train=a, test=b) is None
    # duplicates within one group are allowed
    assert P.check_disjoint(train=a + a, test=b) is None


def test_check_disjoint_raises_naming_groups_and_image():
    a = [rec("A", i) for i in range(3)]
    b = [rec("B", 0), rec("A", 1)]
    with pytest.raises(ValueError) as ei:
        P.check_disjoint(train=a, test=b)
    msg = str(ei.value)
    assert "bird/A/train/1" in msg and "'train'" in msg and "'test'" in msg


def test_check_disjoint_world_pools(world):
    names = [s.name for s in world.species[:4]]
    groups = {p: [world.record(n, p, i) for n in names for i in range(3)] for p in ("train", "rl", "test")}
    P.check_disjoint(**groups)
    with pytest.raises(ValueError, match="rl"):
        P.check_disjoint(train=groups["train"], rl=groups["rl"] + groups["train"][:1])


# ------------------------------------------------------------------------------------------- similarity
def test_thumbnail_embedding_shape_and_unit_norm(world):
    imgs = [world.render(world.species[i].name, "test", 0) for i in (0, 20, 40)]
    E = P.thumbnail_embedding(imgs)
    assert E.shape == (3, 12 * 12 * 3)
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(E.mean(axis=1), 0.0, atol=1e-6)  # mean-centred
    assert P.thumbnail_embedding(imgs, side=5).shape == (3, 75)
    # same image, same embedding; grey-scale and RGBA inputs are converted
    np.testing.assert_array_equal(P.thumbnail_embedding(imgs[:1])[0], E[0])
    assert P.thumbnail_embedding([imgs[0].convert("L")]).shape == (1, 432)


def test_class_similarity_default_embedding(world):
    by_label = {s.name: [world.render(s.name, "test", i) for i in range(2)] for s in world.species[:3]}
    labels, S = P.class_similarity(by_label)
    assert labels == sorted(by_label)
    assert S.shape == (3, 3)
    np.testing.assert_allclose(np.diag(S), 1.0, atol=1e-9)
    np.testing.assert_allclose(S, S.T, atol=1e-12)
    assert np.all(S <= 1.0 + 1e-9)


def test_class_similarity_handmade_embedding():
    by_label = {lab: [label_image(lab)] * 2 for lab in ("A", "B", "D")}
    labels, S = P.class_similarity(by_label, handmade_embed)
    assert labels == ["A", "B", "D"]
    np.testing.assert_allclose(S[0, 1], np.cos(np.deg2rad(10)), atol=1e-12)
    np.testing.assert_allclose(S[0, 2], np.cos(np.deg2rad(65)), atol=1e-12)
    np.testing.assert_allclose(S[1, 2], np.cos(np.deg2rad(55)), atol=1e-12)


def test_class_similarity_errors():
    with pytest.raises(ValueError, match="at least one class"):
        P.class_similarity({}, handmade_embed)
    with pytest.raises(ValueError, match="'B'"):
        P.class_similarity({"A": [label_image("A")], "B": []}, handmade_embed)


def test_build_similarity_and_ranked_equal_known_order(sim):
    assert sim.labels == sorted(ANGLES)
    assert sim.super_of == SUPER
    for lab in ANGLES:
        r = sim.ranked(lab)
        assert lab not in r
        assert r == nearest_order(lab), lab
        assert all(SUPER[o] == SUPER[lab] for o in r)  # never another super-category
    assert sim.ranked("A") == ["B", "C", "D", "E", "F"]
    assert sim.ranked("D") == ["C", "E", "B", "A", "F"]
    assert sim.ranked("X") == ["Y", "Z"]


def test_ranked_honours_among(sim):
    assert sim.ranked("A", among=["D", "F", "C"]) == ["C", "D", "F"]
    assert sim.ranked("A", among={"E"}) == ["E"]
    assert sim.ranked("A", among=["A", "B"]) == ["B"]           # never the label itself
    assert sim.ranked("A", among=["X", "Y"]) == []              # other super-category excluded
    assert sim.ranked("A", among=[]) == []
    with pytest.raises(KeyError, match="Nope"):
        sim.ranked("Nope")


def test_ranked_ties_broken_by_name():
    # identical vectors for B and C -> exact tie, broken alphabetically
    S = np.array([[1.0, 0.5, 0.5, 0.9], [0.5, 1.0, 1.0, 0.4], [0.5, 1.0, 1.0, 0.4], [0.9, 0.4, 0.4, 1.0]])
    s = P.Similarity(["A", "C", "B", "D"], S, {k: "bird" for k in "ABCD"})
    assert s.ranked("A") == ["D", "B", "C"]


def test_build_similarity_uses_first_per_class_images_by_id():
    loaded = []
    records = [rec("A", i) for i in (5, 3, 9, 1)] + [rec("B", i) for i in range(2)]

    def load(r):
        loaded.append(r.image_id)
        return label_image(r.label)

    s = P.build_similarity(records, load, embed_fn=handmade_embed, per_class=2)
    assert sorted(x for x in loaded if "/A/" in x) == ["bird/A/train/1", "bird/A/train/3"]
    assert s.labels == ["A", "B"]


# --------------------------------------------------------------------------------------------- triplets
def test_make_triplets_positive_and_negative(pool, sim):
    anchors = [r for r in pool if r.image_id.endswith("/0")]
    trips = P.make_triplets(anchors, pool, sim, seed=0)
    assert len(trips) == len(anchors)
    for t, a in zip(trips, anchors):
        assert t.anchor == a
        assert t.positive.label == a.label and t.positive.image_id != a.image_id
        assert t.negative.label != a.label
        assert t.negative.super_category == a.super_category
        assert t.negative.label == nearest_order(a.label)[0]
    d = trips[0].to_dict()
    assert set(d) == {"anchor", "positive", "negative"} and d["anchor"]["image_id"] == anchors[0].image_id


def test_make_triplets_negative_among(pool, sim):
    a = [r for r in pool if r.label == "A"][0]
    (t,) = P.make_triplets([a], pool, sim, negative_among=["D", "E", "F"])
    assert t.negative.label == "D"
    (t,) = P.make_triplets([a], pool, sim, negative_among={"F"})
    assert t.negative.label == "F"


def test_make_triplets_skips_classes_without_images(pool, sim):
    a = [r for r in pool if r.label == "A"][0]
    no_b = [r for r in pool if r.label != "B"]
    (t,) = P.make_triplets([a], no_b, sim)
    assert t.negative.label == "C"


def test_make_triplets_deterministic(pool, sim):
    anchors = pool[::3]
    a = P.make_triplets(anchors, pool, sim, seed=0)
    assert a == P.make_triplets(anchors, list(reversed(pool)), sim, seed=0)
    different = [P.make_triplets(anchors, pool, sim, seed=s) for s in range(1, 6)]
    assert any(d != a for d in different)


def test_make_triplets_errors(pool, sim):
    a = [r for r in pool if r.label == "A"][0]
    with pytest.raises(ValueError, match="no positive"):
        P.make_triplets([a], [a] + [r for r in pool if r.label == "B"], sim)
    with pytest.raises(ValueError, match="no negative"):
        P.make_triplets([a], [r for r in pool if r.label == "A"], sim)
    with pytest.raises(ValueError, match="no negative"):
        P.make_triplets([a], pool, sim, negative_among=["X"])


# ------------------------------------------------------------------------------------------ closed world
RANKED = ["B", "C", "D", "E", "F"]


def test_closed_world_options_content():
    for seed in range(20):
        opts = P.closed_world_options("A", RANKED, rng=random.Random(seed))
        assert len(opts) == 4
        assert opts.count("A") == 1
        assert [o for o in opts if o != "A"] == ["B", "C", "D"]  # most similar first, in order


def test_closed_world_options_ground_truth_in_ranked_list_not_duplicated():
    opts = P.closed_world_options("C", ["B", "C", "D", "E"], rng=random.Random(1))
    assert opts.count("C") == 1 and [o for o in opts if o != "C"] == ["B", "D", "E"]


def test_closed_world_options_position_varies():
    positions = Counter(P.closed_world_options("A", RANKED, rng=random.Random(s)).index("A") for s in range(200))
    assert set(positions) == {0, 1, 2, 3}
    assert min(positions.values()) > 20  # roughly uniform, never always first
    rng = random.Random(0)
    shared = Counter(P.closed_world_options("A", RANKED, rng=rng).index("A") for _ in range(200))
    assert set(shared) == {0, 1, 2, 3}


def test_closed_world_options_k_and_default_rng():
    opts = P.closed_world_options("A", RANKED, k=6, rng=random.Random(0))
    assert len(opts) == 6 and sorted(opts) == sorted(["A"] + RANKED)
    # without an rng the position is fixed (random.Random(0)): deterministic
    assert P.closed_world_options("A", RANKED) == P.closed_world_options("A", RANKED)


def test_closed_world_options_too_few_distractors():
    with pytest.raises(ValueError, match="need 3 distractors"):
        P.closed_world_options("A", ["B", "A", "C"])


# ------------------------------------------------------------------------------------------ questions
def test_question_templates():
    for sc in SUPER_CATEGORIES:
        qs = P.question_templates(sc)
        assert len(qs) == 10
        assert all(isinstance(q, str) and q for q in qs)
        assert len(set(qs)) == 10
        assert qs == json.loads((OFFICIAL_SPLITS_DIR / f"{sc}.json").read_text())["questions"]


def test_question_templates_unknown_super_category():
    with pytest.raises(ValueError, match="boat"):
        P.question_templates("boat")


# ---------------------------------------------------------------------------------------- eval records
@pytest.fixture(scope="module")
def eval_setup(sim):
    test = [rec(lab, i, sc=SUPER[lab], genus="Gx" if lab < "D" else "Gy", partition="test")
            for lab in sorted(ANGLES) for i in range(10, 14)]
    split = {"bird": {"seen": ["A", "B", "C", "E"], "unseen": ["D", "F"]},
             "car": {"seen": ["X", "Y"], "unseen": ["Z"]}}
    return test, split


def test_eval_records_shape_and_metadata(sim, eval_setup):
    test, split = eval_setup
    birds = [r for r in test if r.super_category == "bird"]
    cars = [r for r in test if r.super_category == "car"]
    rows = P.eval_records(birds, sim, split, seed=0) + P.eval_records(cars, sim, split, seed=0, k=3)
    test = birds + cars
    assert len(rows) == len(test)
    birds_q = P.question_templates("bird")
    cars_q = P.question_templates("car")
    for row, r in zip(rows, test):
        assert set(row) == set(P.EVAL_KEYS) | {"super_category", "genus", "split", "image_id"}
        assert P.EVAL_KEYS == ("image_path", "question", "options", "ground_truth")
        assert row["image_path"] == r.path
        assert row["ground_truth"] == r.label
        assert row["question"] in (birds_q if r.super_category == "bird" else cars_q)
        assert row["super_category"] == r.super_category and row["genus"] == r.genus
        assert row["image_id"] == r.image_id
        assert row["split"] == ("seen" if r.label in split[r.super_category]["seen"] else "unseen")
        opts = row["options"]
        k = 4 if r.super_category == "bird" else 3
        assert len(opts) == k and opts.count(r.label) == 1
        # distractors: the k - 1 most similar classes, seen and unseen alike
        assert [o for o in opts if o != r.label] == sim.ranked(r.label)[: k - 1]
    assert {row["split"] for row in rows} == {"seen", "unseen"}


def test_eval_records_needs_enough_classes(sim, eval_setup):
    test, split = eval_setup
    cars = [r for r in test if r.super_category == "car"]
    with pytest.raises(ValueError, match="distractors"):  # car has only 2 other classes
        P.eval_records(cars, sim, split)
    assert len(P.eval_records(cars, sim, split, k=3)[0]["options"]) == 3


def test_eval_records_deterministic_and_varied(sim, eval_setup):
    test, split = eval_setup
    birds = [r for r in test if r.super_category == "bird"]
    a = P.eval_records(birds, sim, split, seed=0)
    assert a == P.eval_records(birds, sim, split, seed=0)
    assert a != P.eval_records(birds, sim, split, seed=1)
    assert len({row["options"].index(row["ground_truth"]) for row in a}) > 1  # not always first
    assert len({row["question"] for row in a}) > 1


def test_eval_records_label_outside_split(sim, eval_setup):
    test, _ = eval_setup
    bad = {"bird": {"seen": ["B"], "unseen": ["C"]}, "car": {"seen": ["X"], "unseen": ["Y", "Z"]}}
    with pytest.raises(ValueError, match="'A'"):
        P.eval_records([r for r in test if r.label == "A"], sim, bad)


def test_write_read_eval_round_trip(sim, eval_setup, tmp_path):
    test, split = eval_setup
    rows = P.eval_records([r for r in test if r.super_category == "bird"], sim, split)
    path = P.write_eval_jsonl(tmp_path / "sub" / "eval.jsonl", rows)
    assert path.is_file()
    assert len(path.read_text().splitlines()) == len(rows)
    assert P.read_eval_jsonl(path) == rows


def _official_row(i=0):
    return {"image_path": f"CUB/images/{i}.jpg", "question": "What is the name of the bird in this image?",
            "options": ["Laysan Albatross", "Sooty Albatross", "Crested Auklet", "Least Auklet"],
            "ground_truth": "Laysan Albatross"}


def test_read_official_format_fills_metadata_from_file_name(tmp_path):
    path = tmp_path / "bird_unseen.jsonl"
    path.write_text("".join(json.dumps(_official_row(i)) + "\n" for i in range(3)))
    rows = P.read_eval_jsonl(path)
    assert len(rows) == 3
    for i, row in enumerate(rows):
        assert {k: row[k] for k in P.EVAL_KEYS} == _official_row(i)
        assert row["super_category"] == "bird"
        assert row["split"] == "unseen"
    seen = tmp_path / "Car_Seen.jsonl"
    seen.write_text(json.dumps(_official_row()) + "\n")
    (row,) = P.read_eval_jsonl(seen)
    assert row["super_category"] == "car" and row["split"] == "seen"


def test_read_official_format_arguments_override_file_name(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(_official_row()) + "\n\n")  # blank lines are skipped
    (row,) = P.read_eval_jsonl(path, super_category="dog", split="seen")
    assert row["super_category"] == "dog" and row["split"] == "seen"
    # metadata already present in the row wins over the arguments
    tagged = tmp_path / "bird_seen.jsonl"
    tagged.write_text(json.dumps({**_official_row(), "super_category": "pet", "split": "unseen"}) + "\n")
    (row,) = P.read_eval_jsonl(tagged, super_category="dog", split="seen")
    assert row["super_category"] == "pet" and row["split"] == "unseen"


def test_read_eval_missing_key_names_file_line_and_key(tmp_path):
    path = tmp_path / "bird_seen.jsonl"
    bad = _official_row(1)
    del bad["ground_truth"]
    path.write_text(json.dumps(_official_row(0)) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError) as ei:
        P.read_eval_jsonl(path)
    msg = str(ei.value)
    assert f"{path}:2" in msg and "ground_truth" in msg


def test_read_eval_bad_options(tmp_path):
    path = tmp_path / "bird_seen.jsonl"
    path.write_text(json.dumps({**_official_row(), "options": "Laysan Albatross"}) + "\n")
    with pytest.raises(ValueError, match="options"):
        P.read_eval_jsonl(path)
    path.write_text(json.dumps({**_official_row(), "options": ["only one"]}) + "\n")
    with pytest.raises(ValueError, match=":1:"):
        P.read_eval_jsonl(path)


def test_read_eval_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        P.read_eval_jsonl(tmp_path / "nothere.jsonl")


# ------------------------------------------------------------------------ bad input: clear errors
def test_read_eval_metadata_not_guessable_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "mydata.jsonl"
    path.write_text(json.dumps(_official_row()) + "\n")
    with pytest.raises(DataError, match=r"mydata\.jsonl:1: cannot tell the super-category.*super_category=") as e:
        P.read_eval_jsonl(path)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"mydata\.jsonl:1: cannot tell whether .* split='seen'"):
        P.read_eval_jsonl(path, super_category="bird")
    (row,) = P.read_eval_jsonl(path, super_category="bird", split="unseen")
    assert (row["super_category"], row["split"]) == ("bird", "unseen")
    with pytest.raises(ValueError, match="boat"):
        P.read_eval_jsonl(path, super_category="boat", split="seen")


def test_read_eval_metadata_from_records_or_official_image_paths(tmp_path):
    # present in the records: used as is
    path = tmp_path / "mydata.jsonl"
    path.write_text(json.dumps({**_official_row(), "super_category": "pet", "split": "seen"}) + "\n")
    (row,) = P.read_eval_jsonl(path)
    assert (row["super_category"], row["split"]) == ("pet", "seen")
    # the official eval files' dataset folders (FOCI-Benchmark layout), as the official code reads them
    rows = [{**_official_row(), "image_path": f"/data/FOCI-Benchmark/data/{p}"} for p in
            ("train/bird_200/images/001.Black_footed_Albatross/a.jpg", "test/stanford-cars/cars_test/00210.jpg",
             "train/dogs_120/Images/n02085936-Maltese_dog/b.jpg", "test/flower102/jpg/image_04465.jpg",
             "test/fgvc_aircraft/data/images/0522973.jpg", "test/oxford-pet/images/american_bulldog_203.jpg")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [r["super_category"] for r in P.read_eval_jsonl(path, split="seen")]
    assert got == ["bird", "car", "dog", "flower", "aircraft", "pet"]
    bad = tmp_path / "bird_seen.jsonl"
    bad.write_text(json.dumps({**_official_row(), "super_category": "plane"}) + "\n")
    with pytest.raises(DataError, match="bird_seen.jsonl:1: unknown super_category 'plane'"):
        P.read_eval_jsonl(bad)


def test_read_eval_empty_file_is_an_error(tmp_path):
    path = tmp_path / "bird_seen.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="bird_seen.jsonl: no eval records"):
        P.read_eval_jsonl(path)
    assert P.read_eval_jsonl(path, allow_empty=True) == []


def test_read_eval_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "bird_seen.jsonl"
    path.write_text(json.dumps(_official_row()) + "\n\n\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"bird_seen\.jsonl:4: eval record is missing"):
        P.read_eval_jsonl(path)


def test_read_eval_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "bird_seen.jsonl"
    path.write_bytes(json.dumps(_official_row()).encode() + b"\n" + '{"question": "Quel oiseau ?"}'.encode("latin-1")
                     + b"\xe9\n")
    with pytest.raises(DataError, match=r"bird_seen\.jsonl:2: JSONL file is not UTF-8 text"):
        P.read_eval_jsonl(path)


def test_question_templates_bad_json_names_the_file(tmp_path, monkeypatch):
    import finer1_lib.protocol as protocol

    (tmp_path / "bird.json").write_text('{"seen": [], "questions": [\n  "What bird?",\n}')
    (tmp_path / "car.json").write_bytes(b'{"questions": ["Which car\xff?"]}')
    (tmp_path / "dog.json").write_text('{"questions": "What dog?"}')
    monkeypatch.setattr(protocol, "OFFICIAL_SPLITS_DIR", tmp_path)
    with pytest.raises(DataError, match=r"bird\.json:3: official split file is not valid JSON"):
        protocol.question_templates("bird")
    with pytest.raises(DataError, match=r"car\.json:1: official split file is not UTF-8"):
        protocol.question_templates("car")
    with pytest.raises(DataError, match=r"dog\.json: expected a JSON object with a 'questions' list"):
        protocol.question_templates("dog")
