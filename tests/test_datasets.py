"""Readers of the six real FGVR datasets, on tiny fake trees in the real layouts."""
from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_datasets as fx  # noqa: E402

from finer1_lib import datasets as ds  # noqa: E402
from finer1_lib.io import DataError  # noqa: E402
from finer1_lib.records import SUPER_CATEGORIES  # noqa: E402

EXPECTED_SPLITS = {"aircraft": (60, 40), "bird": (120, 80), "car": (117, 79),
                   "dog": (72, 48), "flower": (61, 41), "pet": (22, 15)}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    return fx.build_all(tmp_path_factory.mktemp("fgvr"), ds.FLOWER_CLASS_NAMES)


@pytest.fixture(scope="module")
def records(roots) -> dict[str, list]:
    return {sc: ds.read_dataset(sc, root) for sc, root in roots.items()}


def _by_label(recs: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in recs:
        out.setdefault(r.label, []).append(r)
    return out


# --------------------------------------------------------------------------- official split

@pytest.mark.parametrize("sc", SUPER_CATEGORIES)
def test_load_official_split(sc):
    split = ds.load_official_split(sc)
    assert (len(split["seen"]), len(split["unseen"])) == EXPECTED_SPLITS[sc]
    assert len(split["questions"]) == 10
    assert split["seen_test_images"] > 0 and split["unseen_test_images"] > 0
    assert not set(split["seen"]) & set(split["unseen"])


def test_load_official_split_unknown_name():
    with pytest.raises(ValueError, match="unknown super-category 'plane'"):
        ds.load_official_split("plane")


def test_flower_names_are_the_official_set():
    split = ds.load_official_split("flower")
    assert len(ds.FLOWER_CLASS_NAMES) == 102 == len(set(ds.FLOWER_CLASS_NAMES))
    assert set(ds.FLOWER_CLASS_NAMES) == set(split["seen"] + split["unseen"])
    assert ds.FLOWER_CLASS_NAMES[:4] == ("pink primrose", "hard-leaved pocket orchid",
                                         "canterbury bells", "sweet pea")


# --------------------------------------------------------------------------- label rules

@pytest.mark.parametrize("fn, raw, label", [
    (ds.cub_label, "001.Black_footed_Albatross", "Black Footed Albatross"),
    (ds.cub_label, "022.Chuck_will_Widow", "Chuck Will Widow"),
    (ds.cub_label, "141.Artic_Tern", "Artic Tern"),
    (ds.dogs_label, "n02089078-black-and-tan_coonhound", "Black And Tan Coonhound"),
    (ds.dogs_label, "n02108000-EntleBucher", "Entlebucher"),
    (ds.dogs_label, "n02086240-Shih-Tzu", "Shih Tzu"),
    (ds.pet_label, "american_bulldog", "American Bulldog"),
    (ds.pet_label, "British_Shorthair_12", "British Shorthair"),
    (ds.car_make, "Aston Martin V8 Vantage Coupe 2012", "Aston Martin"),
    (ds.car_make, "Rolls-Royce Ghost Sedan 2012", "Rolls-Royce"),
])
def test_label_rules(fn, raw, label):
    assert fn(raw) == label


def test_aircraft_rule_yields_every_official_name():
    split = ds.load_official_split("aircraft")
    derived = {ds.aircraft_label(m, v) for v, _, m in fx.AIRCRAFT_VARIANTS}
    assert derived == set(split["seen"] + split["unseen"])
    assert ds.aircraft_label("Boeing", "Boeing 717") == "Boeing 717"
    assert ds.aircraft_label("Airbus", "A300B4") == "Airbus A300B4"
    assert ds.aircraft_label("McDonnell Douglas", "DC-10") == "DC-10"


# --------------------------------------------------------------------------- readers

@pytest.mark.parametrize("sc", SUPER_CATEGORIES)
def test_labels_are_official_and_split_counts(records, sc):
    recs = records[sc]
    matched = ds.match_official_labels(recs, sc)
    assert matched["missing_from_data"] == []
    counts = ds.split_counts(recs, sc)
    assert (counts["seen"], counts["unseen"]) == EXPECTED_SPLITS[sc]
    assert counts["seen_test_images"] + counts["unseen_test_images"] == sum(r.partition == "test" for r in recs)
    classes = ds.official_split_records(recs, sc)
    assert classes["seen"] == ds.load_official_split(sc)["seen"]


@pytest.mark.parametrize("sc", SUPER_CATEGORIES)
def test_records_well_formed(records, roots, sc):
    recs = records[sc]
    assert len({r.image_id for r in recs}) == len(recs)
    assert all(r.super_category == sc and r.image_id.startswith(f"{sc}/{r.partition}/") for r in recs)
    assert all(Path(r.path).is_absolute() and Path(r.path).is_file() for r in recs)
    # every class has one train and one test image in the fixtures
    for label, items in _by_label(recs).items():
        assert Counter(r.partition for r in items) == {"train": 1, "test": 1}, label


def test_partitions_follow_the_dataset_split(records):
    bird = {r.meta["dataset_id"]: r.partition for r in records["bird"]}
    assert bird[1] == "train" and bird[2] == "test"  # train_test_split.txt: "1 1", "2 0"
    flower = {r.meta["subset"]: r.partition for r in records["flower"]}
    assert flower == {"trnid": "train", "valid": "train", "tstid": "test"}
    pet = {r.image_id: r.partition for r in records["pet"]}
    assert pet["pet/train/american_bulldog_100"] == "train" and pet["pet/test/Abyssinian_101"] == "test"
    car = [r for r in records["car"] if r.partition == "test"]
    assert all("/cars_test/" in r.path for r in car)


@pytest.mark.parametrize("sc, label, genus", [
    ("bird", "Black Footed Albatross", "Albatross"),
    ("bird", "Geococcyx", "Geococcyx"),
    ("car", "AM General Hummer SUV 2000", "AM General"),
    ("car", "BMW M3 Coupe 2012", "BMW"),
    ("dog", "Black And Tan Coonhound", ""),
    ("flower", "pink primrose", ""),
    ("pet", "Abyssinian", "cat"),
    ("pet", "American Bulldog", "dog"),
    ("aircraft", "Boeing 707-320", "Boeing 707"),
    ("aircraft", "Model B200", "King Air"),
])
def test_genus(records, sc, label, genus):
    assert {r.genus for r in _by_label(records[sc])[label]} == {genus}


def test_root_variants(roots, records):
    n_bird = len(records["bird"])
    assert len(ds.read_cub(roots["bird"] / "CUB_200_2011")) == n_bird
    air = roots["aircraft"] / "fgvc-aircraft-2013b"
    for root in (air, air / "data"):
        assert [r.image_id for r in ds.read_aircraft(root)] == [r.image_id for r in records["aircraft"]]


def test_cars_test_annotations_in_devkit(tmp_path):
    recs = ds.read_cars(fx.build_cars(tmp_path, test_annos_in_devkit=True))
    assert Counter(r.partition for r in recs) == {"train": 196, "test": 196}


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("sc", SUPER_CATEGORIES)
def test_missing_root_names_expected_file_and_url(tmp_path, sc):
    info = ds.DATASET_INFO[sc]
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        ds.read_dataset(sc, root)
    msg = str(e.value)
    assert f"{info.name} not found at {root}" in msg and info.url in msg
    assert str(root / info.subdirs[0] / info.marker) in msg


def test_cub_message_format(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected .*/CUB_200_2011/images.txt; download it from "
                                                r"https://www.vision.caltech.edu/datasets/cub_200_2011/"):
        ds.read_cub(tmp_path)


@pytest.fixture()
def cub(tmp_path) -> Path:
    return fx.build_cub(tmp_path)


def test_missing_index_file_is_named(cub):
    path = cub / "CUB_200_2011" / "train_test_split.txt"
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"expected {path}"):
        ds.read_cub(cub)


def test_missing_image_folder_is_named(cub):
    shutil.rmtree(cub / "CUB_200_2011" / "images")
    with pytest.raises(FileNotFoundError, match="image folder .*CUB_200_2011/images"):
        ds.read_cub(cub)


@pytest.mark.parametrize("fname, lineno, bad, match", [
    ("images.txt", 3, "3", "expected '<image id> <relative path>'"),
    ("image_class_labels.txt", 5, "5 x", "the class id must be an integer"),
    ("image_class_labels.txt", 5, "5 999", "class id 999 is not in"),
    ("train_test_split.txt", 2, "2 7", "is_training_image must be 0 or 1"),
])
def test_malformed_cub_line_names_file_and_line(cub, fname, lineno, bad, match):
    path = cub / "CUB_200_2011" / fname
    lines = path.read_text().splitlines()
    lines[lineno - 1] = bad
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{path}:{lineno}: .*{match}"):
        ds.read_cub(cub)


def test_malformed_pet_and_aircraft_lines(tmp_path):
    pets = fx.build_pets(tmp_path / "pet")
    path = pets / "annotations" / "test.txt"
    path.write_text(path.read_text() + "Bengal_9 2 3 1\n")
    n = len(path.read_text().splitlines())
    with pytest.raises(ValueError, match=f"{path}:{n}: species must be 1"):
        ds.read_pets(pets)

    air = fx.build_aircraft(tmp_path / "air")
    path = air / "fgvc-aircraft-2013b" / "data" / "images_variant_test.txt"
    path.write_text("0999999 Concorde\n" + path.read_text())
    with pytest.raises(ValueError, match=f"{path}:1: variant 'Concorde' is not in"):
        ds.read_aircraft(air)


def test_bad_mat_files(tmp_path):
    flowers = fx.build_flowers(tmp_path / "flower", ds.FLOWER_CLASS_NAMES)
    (flowers / "setid.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match="setid.mat: not a readable MATLAB"):
        ds.read_flowers(flowers)
    savemat(flowers / "setid.mat", {"trnid": np.array([[1]]), "tstid": np.array([[2]])})
    with pytest.raises(ValueError, match="setid.mat: missing variable 'valid'"):
        ds.read_flowers(flowers)

    cars = fx.build_cars(tmp_path / "car")
    (cars / "cars_test_annos_withlabels.mat").unlink()
    shutil.copy(cars / "devkit" / "cars_test_annos.mat", cars / "cars_test_annos_withlabels.mat")
    with pytest.raises(ValueError, match="no 'class' field"):
        ds.read_cars(cars)


def test_match_official_labels_rejects_unknown(records):
    recs = list(records["bird"])
    bad = recs[0].__class__(**{**recs[0].to_dict(), "label": "Arctic Tern", "image_id": "bird/test/x"})
    with pytest.raises(ValueError, match=r"'Arctic Tern' \(closest official: 'Artic Tern'\)"):
        ds.match_official_labels(recs + [bad], "bird")
    partial = [r for r in recs if r.label != "Artic Tern"]
    assert ds.match_official_labels(partial, "bird")["missing_from_data"] == ["Artic Tern"]


def test_read_dataset_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown super-category"):
        ds.read_dataset("fish", tmp_path)


# --------------------------------------------------------------------------- official folder names

@pytest.fixture(scope="module")
def foci(tmp_path_factory) -> Path:
    return fx.build_official_eval_tree(tmp_path_factory.mktemp("foci"), ds.FLOWER_CLASS_NAMES)


@pytest.mark.parametrize("sc", SUPER_CATEGORIES)
def test_official_eval_folder_names_are_aliases(foci, records, sc):
    """The readers find a dataset under its folder name of the official eval files (bird_200/, stanford-cars/,
    ...), given that folder, its parent, or the FOCI-Benchmark/data folder above train/ and test/."""
    want = [(r.image_id, r.label, r.partition) for r in records[sc]]
    folder = foci / fx.OFFICIAL_EVAL_FOLDERS[sc]
    for root in (foci, folder.parent, folder):
        got = ds.read_dataset(sc, root)
        assert [(r.image_id, r.label, r.partition) for r in got] == want
        assert all(Path(r.path).is_file() for r in got[:3])
        assert all(ds.super_category_from_path(r.path) == sc for r in got[:3])


@pytest.mark.parametrize("sc", SUPER_CATEGORIES)
def test_stage1_image_folders_map_onto_a_standard_copy(roots, records, sc):
    """An image path of the official Stage-1 file (bird_200/images_train/<class>/<file>, stanford_cars_train/
    images/<file>, ...) names a file of the standard dataset: stage1_dataset_path finds it."""
    info = ds.DATASET_INFO[sc]
    base = ds._locate(sc, roots[sc])
    for r in [r for r in records[sc] if r.partition == "train"][:3]:
        rel = Path(r.path).relative_to(base / info.image_dir).as_posix()
        stage1 = f"{info.stage1_dir}/{rel}"
        assert ds.super_category_from_path(stage1) == sc
        assert ds.stage1_dataset_path(stage1, roots[sc]) == Path(r.path)
        assert ds.stage1_dataset_path("/somewhere/" + stage1, roots[sc], sc) == Path(r.path)
    with pytest.raises(ValueError, match="not under an official Stage-1 image folder"):
        ds.stage1_dataset_path("images/x.jpg", roots[sc], sc)


@pytest.mark.parametrize("path, sc", [
    ("fgvc-aircraft-2013b-train/images/1838247.jpg", "aircraft"),
    ("stanford_cars_train/images/07208.jpg", "car"),
    ("dogs_120/image_train/train/n02113023-Pembroke/n02113023_11103.jpg", "dog"),
    ("bird_200/images_train/174.Palm_Warbler/Palm_Warbler_0055_170219.jpg", "bird"),
    ("oxford-pet-train/train/Siamese_161.jpg", "pet"),
    ("flower102_train/image/train/image_03510.jpg", "flower"),
    ("/data/u/FOCI-Benchmark/data/test/stanford-cars/cars_test/05409.jpg", "car"),
    ("/data/CUB_200_2011/images/001.Black_footed_Albatross/x.jpg", "bird"),
    ("C:\\data\\oxford-iiit-pet\\images\\Bombay_16.jpg", "pet"),
    ("images/n02085936-Maltese_dog/y.jpg", None),
    ("mydata/birds/x.jpg", None),
])
def test_super_category_from_path(path, sc):
    assert ds.super_category_from_path(path) == sc


def test_index_file_not_utf8_names_file_and_line(cub):
    path = cub / "CUB_200_2011" / "classes.txt"
    path.write_bytes(path.read_bytes().replace(b"Laysan", b"Lays\xe1n", 1))
    with pytest.raises(DataError, match=r"classes\.txt:2: index file is not UTF-8 text"):
        ds.read_cub(cub)


def test_official_split_file_bad_json_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "OFFICIAL_SPLITS_DIR", tmp_path)
    (tmp_path / "bird.json").write_text('{"seen": ["A",]}')
    with pytest.raises(DataError, match=r"bird\.json:1: official split file is not valid JSON"):
        ds.load_official_split("bird")
