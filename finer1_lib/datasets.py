"""Readers for the six real FGVR datasets in their standard on-disk layouts.

Every reader returns ``ImageRecord``s whose ``label`` is spelled exactly as in the official
seen/unseen class lists (``data/official_splits/<super_category>.json``). Readers parse only
the index files; images are never opened and their existence is not checked one by one.

``image_id`` is ``"<super_category>/<partition>/<dataset id>"`` and ``partition`` is the
dataset's own ``"train"`` / ``"test"`` split.

Folder names of the official release are accepted as aliases: the eval files' dataset folders (FOCI-Benchmark
layout: ``bird_200/``, ``stanford-cars/``, ``dogs_120/``, ``flower102/``, ``fgvc_aircraft/data/``,
``oxford-pet/``, also under ``train/`` or ``test/`` of the ``FOCI-Benchmark/data`` folder) are found by the
readers like the standard names; the Stage-1 SFT image folders (``bird_200/images_train/``,
``stanford_cars_train/images/``, ...) map onto a standard copy with :func:`stage1_dataset_path`, and
:func:`super_category_from_path` tells the super-category of an image path in any of these layouts.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .io import DataError, read_json, read_text
from .records import OFFICIAL_SPLITS_DIR, SUPER_CATEGORIES, ImageRecord

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- dataset info

@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset folder must look like; used in every error message.

    subdirs: folders under the given root that may hold the dataset ("" = the root itself);
             the first one is the layout named in "not found" messages.
    marker:  the file (relative to the dataset folder) that identifies the layout.
    official_dirs: the dataset's folder in the official eval files (FOCI-Benchmark layout, e.g.
             ``.../FOCI-Benchmark/data/train/bird_200/images/...``); searched like ``subdirs``, and also
             under ``train/`` and ``test/`` of the given root.
    stage1_dir: the image folder of the official Stage-1 SFT file (``Fine-R1-Stage1-data.json``), e.g.
             ``bird_200/images_train``; the rest of such a path is the file's path under ``image_dir``.
    image_dir: the image folder inside the dataset folder (the standard layout).
    """

    name: str
    layout: str
    url: str
    marker: str
    subdirs: tuple[str, ...] = ("",)
    official_dirs: tuple[str, ...] = ()
    stage1_dir: str = ""
    image_dir: str = ""


DATASET_INFO: dict[str, DatasetInfo] = {
    "bird": DatasetInfo(
        name="CUB-200-2011",
        layout="CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, "
               "images/001.Black_footed_Albatross/*.jpg}",
        url="https://www.vision.caltech.edu/datasets/cub_200_2011/",
        marker="images.txt",
        subdirs=("CUB_200_2011", ""),
        official_dirs=("bird_200", "bird_200/CUB_200_2011"),
        stage1_dir="bird_200/images_train",
        image_dir="images",
    ),
    "car": DatasetInfo(
        name="Stanford Cars",
        layout="{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, cars_test/, "
               "cars_test_annos_withlabels.mat (here or in devkit/)}",
        url="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        marker="devkit/cars_meta.mat",
        subdirs=("", "stanford_cars"),
        official_dirs=("stanford-cars",),
        stage1_dir="stanford_cars_train/images",
        image_dir="cars_train",
    ),
    "dog": DatasetInfo(
        name="Stanford Dogs",
        layout="{Images/n02085620-Chihuahua/*.jpg, train_list.mat, test_list.mat}",
        url="http://vision.stanford.edu/aditya86/ImageNetDogs/",
        marker="train_list.mat",
        subdirs=("", "stanford_dogs"),
        official_dirs=("dogs_120",),
        stage1_dir="dogs_120/image_train/train",
        image_dir="Images",
    ),
    "flower": DatasetInfo(
        name="Oxford Flowers-102",
        layout="{jpg/image_00001.jpg, imagelabels.mat, setid.mat}",
        url="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        marker="imagelabels.mat",
        subdirs=("", "flowers-102"),
        official_dirs=("flower102",),
        stage1_dir="flower102_train/image/train",
        image_dir="jpg",
    ),
    "pet": DatasetInfo(
        name="Oxford-IIIT Pet",
        layout="{images/Abyssinian_1.jpg, annotations/list.txt, annotations/trainval.txt, annotations/test.txt}",
        url="https://www.robots.ox.ac.uk/~vgg/data/pets/",
        marker="annotations/trainval.txt",
        subdirs=("", "oxford-iiit-pet"),
        official_dirs=("oxford-pet",),
        stage1_dir="oxford-pet-train/train",
        image_dir="images",
    ),
    "aircraft": DatasetInfo(
        name="FGVC-Aircraft",
        layout="fgvc-aircraft-2013b/data/{images/*.jpg, variants.txt, images_variant_{trainval,test}.txt, "
               "images_manufacturer_{trainval,test}.txt, images_family_{trainval,test}.txt}",
        url="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
        marker="variants.txt",
        subdirs=("fgvc-aircraft-2013b/data", "data", ""),
        official_dirs=("fgvc_aircraft/data", "fgvc_aircraft/fgvc-aircraft-2013b/data"),
        stage1_dir="fgvc-aircraft-2013b-train/images",
        image_dir="images",
    ),
}


# --------------------------------------------------------------------------- official split

_SPLIT_KEYS = ("seen", "unseen", "questions", "seen_test_images", "unseen_test_images")


def _check_super_category(super_category: str) -> None:
    if super_category not in SUPER_CATEGORIES:
        raise ValueError(f"unknown super-category {super_category!r}; expected one of {SUPER_CATEGORIES}")


def load_official_split(super_category: str) -> dict:
    """The official seen/unseen class lists, the 10 questions and the test-image counts."""
    _check_super_category(super_category)
    path = OFFICIAL_SPLITS_DIR / f"{super_category}.json"
    if not path.is_file():
        raise FileNotFoundError(f"official split for {super_category!r} not found: expected {path}")
    data = read_json(path, "official split file")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with keys {list(_SPLIT_KEYS)}")
    missing = [k for k in _SPLIT_KEYS if k not in data]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    if len(data["questions"]) != 10:
        raise DataError(f"{path}: expected 10 questions, found {len(data['questions'])}")
    return {k: (list(data[k]) if isinstance(data[k], list) else data[k]) for k in _SPLIT_KEYS}


def match_official_labels(records: list[ImageRecord], super_category: str) -> dict:
    """Check every label against the official lists.

    Raises ValueError listing labels found in the data but not in the official lists.
    Returns {"matched": [...], "missing_from_data": [...]}: the second list holds official
    labels with no image (a warning, e.g. for a partial copy of a dataset).
    """
    split = load_official_split(super_category)
    official = split["seen"] + split["unseen"]
    official_set = set(official)
    present = {r.label for r in records}
    unknown = sorted(present - official_set)
    if unknown:
        hints = []
        for lab in unknown:
            close = difflib.get_close_matches(lab, official, n=1)
            hints.append(f"{lab!r}" + (f" (closest official: {close[0]!r})" if close else ""))
        raise ValueError(
            f"{len(unknown)} {super_category} label(s) are not in the official lists "
            f"({OFFICIAL_SPLITS_DIR / (super_category + '.json')}): " + ", ".join(hints))
    return {"matched": [c for c in official if c in present],
            "missing_from_data": [c for c in official if c not in present]}


def official_split_records(records: list[ImageRecord], super_category: str) -> dict[str, list[str]]:
    """{"seen": [...], "unseen": [...]}: official class names (official order) present in ``records``."""
    split = load_official_split(super_category)
    present = {r.label for r in records}
    return {k: [c for c in split[k] if c in present] for k in ("seen", "unseen")}


def split_counts(records: list[ImageRecord], super_category: str) -> dict[str, int]:
    """Number of seen/unseen classes present, and of test images in each (e.g. bird 120/80)."""
    classes = official_split_records(records, super_category)
    seen = set(classes["seen"])
    unseen = set(classes["unseen"])
    test = [r for r in records if r.partition == "test"]
    return {
        "seen": len(seen),
        "unseen": len(unseen),
        "seen_test_images": sum(r.label in seen for r in test),
        "unseen_test_images": sum(r.label in unseen for r in test),
    }


# --------------------------------------------------------------------------- label rules

def _capitalize_words(name: str) -> str:
    """'black-and-tan_coonhound' -> 'Black And Tan Coonhound'."""
    return " ".join(w.capitalize() for w in re.split(r"[_\-\s]+", name.strip()) if w)


def cub_label(folder: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black Footed Albatross'."""
    return _capitalize_words(folder.split(".", 1)[-1])


def dogs_label(folder: str) -> str:
    """'n02089078-black-and-tan_coonhound' -> 'Black And Tan Coonhound'."""
    return _capitalize_words(re.sub(r"^n\d+-", "", folder))


def pet_label(image_name: str) -> str:
    """'american_bulldog_12' (or the breed alone) -> 'American Bulldog'."""
    return _capitalize_words(re.sub(r"_\d+$", "", image_name))


_TWO_WORD_MAKES = ("AM General", "Aston Martin", "Land Rover")


def car_make(label: str) -> str:
    """Make of a Stanford Cars class: first word, or a known two-word make ('Aston Martin')."""
    for make in _TWO_WORD_MAKES:
        if label.startswith(make + " "):
            return make
    return label.split()[0] if label.split() else ""


# Explicit FGVC variant -> official name, for variants the rule of ``aircraft_label`` cannot
# yield. Every one of the 100 official names follows the rule, so the table is empty.
AIRCRAFT_LABEL_OVERRIDES: dict[str, str] = {}


def aircraft_label(manufacturer: str, variant: str) -> str:
    """Official aircraft name from FGVC manufacturer + variant.

    The manufacturer is prefixed only to bare model numbers, i.e. variants starting with a
    digit or with the manufacturer's initial and a digit ('707-320' -> 'Boeing 707-320',
    'A310' -> 'Airbus A310'); named variants stay as they are ('ATR-42', 'Boeing 717',
    'CRJ-200', 'DC-10', 'Cessna 172').
    """
    variant = variant.strip()
    if variant in AIRCRAFT_LABEL_OVERRIDES:
        return AIRCRAFT_LABEL_OVERRIDES[variant]
    manufacturer = manufacturer.strip()
    if variant.lower().startswith(manufacturer.lower()):
        return variant
    bare = variant[:1].isdigit() or (
        len(variant) > 1 and variant[0].lower() == manufacturer[:1].lower() and variant[1].isdigit())
    return f"{manufacturer} {variant}" if bare else variant


# The standard Oxford Flowers-102 names in label-index order (label 1 = 'pink primrose'),
# spelled as in the official split lists.
FLOWER_CLASS_NAMES: tuple[str, ...] = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle",
    "snapdragon", "colt's foot", "king protea", "spear thistle", "yellow iris",
    "globe flower", "purple coneflower", "peruvian lily", "balloon flower", "giant white arum lily",
    "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william",
    "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly",
    "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip", "lenten rose",
    "barbeton daisy", "daffodil", "sword lily", "poinsettia", "bolero deep blue",
    "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium",
    "bishop of llandaff", "gaura", "geranium", "orange dahlia", "pink and yellow dahlia",
    "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush", "californian poppy",
    "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy",
    "gazania", "azalea", "water lily", "rose", "thorn apple",
    "morning glory", "passion flower", "lotus", "toad lily", "anthurium",
    "frangipani", "clematis", "hibiscus", "columbine", "desert-rose",
    "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily",
    "hippeastrum", "bee balm", "air plant", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
)


# --------------------------------------------------------------------------- file helpers

def _abs(root: PathLike) -> Path:
    return Path(os.path.abspath(Path(root).expanduser()))


def _where(info: DatasetInfo) -> str:
    return f"download it from {info.url} and pass its folder"


def _candidate_subdirs(info: DatasetInfo) -> list[str]:
    """Standard sub-folders, then the official names, also under train/ and test/ (FOCI-Benchmark/data)."""
    return [*info.subdirs, *info.official_dirs,
            *(f"{split}/{d}" for split in ("train", "test") for d in info.official_dirs)]


def _locate(super_category: str, root: PathLike) -> Path:
    """The dataset folder under ``root`` holding the layout's marker file."""
    info = DATASET_INFO[super_category]
    root = _abs(root)
    for sub in _candidate_subdirs(info):
        base = root / sub if sub else root
        if (base / info.marker).is_file():
            return base
    first = root / info.subdirs[0] / info.marker if info.subdirs[0] else root / info.marker
    state = "" if root.is_dir() else " (the folder does not exist)"
    raise FileNotFoundError(f"{info.name} not found at {root}{state}: expected {first}; {_where(info)}")


def _require_file(base: Path, rel: str, info: DatasetInfo) -> Path:
    path = base / rel
    if not path.is_file():
        raise FileNotFoundError(f"{info.name} at {base} is incomplete: expected {path}; {_where(info)}")
    return path


def _require_dir(base: Path, rel: str, info: DatasetInfo) -> Path:
    path = base / rel
    if not path.is_dir():
        raise FileNotFoundError(f"{info.name} at {base} is incomplete: expected the image folder {path}; "
                                f"{_where(info)}")
    return path


def _iter_fields(path: Path, n_fields: int, usage: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a whitespace-separated index file; the last field keeps spaces.

    Blank lines and lines starting with '#' are skipped; a short line raises naming file and line.
    """
    for lineno, line in enumerate(read_text(path, "index file").split("\n"), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split(None, n_fields - 1)
        if len(fields) != n_fields:
            raise DataError(f"{path}:{lineno}: expected '{usage}', got {text!r}")
        yield lineno, fields


def _to_int(value: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: {what} must be an integer, got {value!r}") from None


def _read_int_table(path: Path, usage: str) -> dict[int, tuple[int, str]]:
    """CUB-style '<int id> <value>' file -> {id: (line number, value)}; duplicate ids raise."""
    table: dict[int, tuple[int, str]] = {}
    for lineno, (key, value) in _iter_fields(path, 2, usage):
        k = _to_int(key, path, lineno, "the id")
        if k in table:
            raise ValueError(f"{path}:{lineno}: duplicate id {k} (first on line {table[k][0]})")
        table[k] = (lineno, value)
    return table


def _read_str_table(path: Path, usage: str) -> dict[str, tuple[int, str]]:
    """'<name> <value with spaces>' file -> {name: (line number, value)}."""
    table: dict[str, tuple[int, str]] = {}
    for lineno, (key, value) in _iter_fields(path, 2, usage):
        if key in table:
            raise ValueError(f"{path}:{lineno}: duplicate image {key!r} (first on line {table[key][0]})")
        table[key] = (lineno, value.strip())
    return table


def _load_mat(path: Path) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises several types for a damaged file
        raise ValueError(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e})") from None


def _mat_var(mat: dict, key: str, path: Path) -> np.ndarray:
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: missing variable {key!r} (found {found})")
    return np.atleast_1d(mat[key])


def _mat_field(struct: np.ndarray, name: str, path: Path) -> np.ndarray:
    if struct.dtype.names is None or name not in struct.dtype.names:
        raise ValueError(f"{path}: annotations have no field {name!r} (fields: {struct.dtype.names})")
    return struct[name]


def _mat_int(value: object, path: Path, what: str) -> int:
    try:
        return int(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"{path}: {what} is not an integer: {value!r}") from None


# --------------------------------------------------------------------------- CUB-200-2011

def read_cub(root: PathLike) -> list[ImageRecord]:
    """CUB-200-2011 (root = the CUB_200_2011 folder or its parent)."""
    info = DATASET_INFO["bird"]
    base = _locate("bird", root)
    images = _read_int_table(_require_file(base, "images.txt", info), "<image id> <relative path>")
    labels_path = _require_file(base, "image_class_labels.txt", info)
    labels = _read_int_table(labels_path, "<image id> <class id>")
    split_path = _require_file(base, "train_test_split.txt", info)
    split = _read_int_table(split_path, "<image id> <is_training_image>")
    classes_path = _require_file(base, "classes.txt", info)
    classes = {k: cub_label(v) for k, (_, v) in _read_int_table(classes_path, "<class id> <folder>").items()}
    image_dir = _require_dir(base, "images", info)

    records = []
    for img_id, (_, rel) in images.items():
        for path, table in ((labels_path, labels), (split_path, split)):
            if img_id not in table:
                raise ValueError(f"{path}: no line for image id {img_id} (listed in {base / 'images.txt'})")
        lineno, class_text = labels[img_id]
        class_id = _to_int(class_text, labels_path, lineno, "the class id")
        if class_id not in classes:
            raise ValueError(f"{labels_path}:{lineno}: class id {class_id} is not in {base / 'classes.txt'}")
        lineno, flag = split[img_id]
        if flag not in ("0", "1"):
            raise ValueError(f"{split_path}:{lineno}: is_training_image must be 0 or 1, got {flag!r}")
        partition = "train" if flag == "1" else "test"
        label = classes[class_id]
        records.append(ImageRecord(
            image_id=f"bird/{partition}/{img_id}", path=str(image_dir / rel), super_category="bird",
            genus=label.split()[-1], label=label, partition=partition,
            meta={"dataset_id": img_id, "class_id": class_id, "file": rel}))
    return records


# --------------------------------------------------------------------------- Stanford Cars

def _car_annotations(path: Path, class_names: list[str], image_dir: Path,
                     partition: str) -> list[ImageRecord]:
    ann = _mat_var(_load_mat(path), "annotations", path)
    if "class" not in (ann.dtype.names or ()):
        raise ValueError(f"{path}: annotations have no 'class' field; the test labels are in "
                         f"cars_test_annos_withlabels.mat ({DATASET_INFO['car'].url})")
    fnames = _mat_field(ann, "fname", path)
    class_ids = _mat_field(ann, "class", path)
    boxes = [_mat_field(ann, f, path) for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")]
    records = []
    for i, fname in enumerate(fnames):
        fname = str(fname).strip()
        class_id = _mat_int(class_ids[i], path, f"annotation {i + 1} ({fname}) class")
        if not 1 <= class_id <= len(class_names):
            raise ValueError(f"{path}: annotation {i + 1} ({fname}) has class {class_id}, "
                             f"outside 1..{len(class_names)}")
        label = class_names[class_id - 1]
        records.append(ImageRecord(
            image_id=f"car/{partition}/{Path(fname).stem}", path=str(image_dir / fname),
            super_category="car", genus=car_make(label), label=label, partition=partition,
            meta={"class_id": class_id, "file": fname,
                  "bbox": [_mat_int(b[i], path, f"annotation {i + 1} bbox") for b in boxes]}))
    return records


def read_cars(root: PathLike) -> list[ImageRecord]:
    """Stanford Cars in the devkit layout (labels from devkit/cars_meta.mat)."""
    info = DATASET_INFO["car"]
    base = _locate("car", root)
    meta_path = base / info.marker
    class_names = [str(c).strip() for c in _mat_var(_load_mat(meta_path), "class_names", meta_path)]
    train_annos = _require_file(base, "devkit/cars_train_annos.mat", info)
    test_annos = next((p for p in (base / "cars_test_annos_withlabels.mat",
                                   base / "devkit/cars_test_annos_withlabels.mat") if p.is_file()), None)
    if test_annos is None:
        raise FileNotFoundError(f"{info.name} at {base} is incomplete: expected "
                                f"{base / 'cars_test_annos_withlabels.mat'} (or in devkit/); {_where(info)}")
    return (_car_annotations(train_annos, class_names, _require_dir(base, "cars_train", info), "train")
            + _car_annotations(test_annos, class_names, _require_dir(base, "cars_test", info), "test"))


# --------------------------------------------------------------------------- Stanford Dogs

def read_dogs(root: PathLike) -> list[ImageRecord]:
    """Stanford Dogs (Images/ + train_list.mat / test_list.mat)."""
    info = DATASET_INFO["dog"]
    base = _locate("dog", root)
    image_dir = _require_dir(base, "Images", info)
    records = []
    for partition in ("train", "test"):
        path = _require_file(base, f"{partition}_list.mat", info)
        mat = _load_mat(path)
        files = _mat_var(mat, "file_list", path)
        labels = _mat_var(mat, "labels", path)
        if len(files) != len(labels):
            raise ValueError(f"{path}: {len(files)} entries in file_list but {len(labels)} labels")
        for i, rel in enumerate(files):
            rel = str(rel).strip()
            if "/" not in rel:
                raise ValueError(f"{path}: file_list entry {i + 1} {rel!r} is not '<class folder>/<file>'")
            folder = rel.split("/", 1)[0]
            records.append(ImageRecord(
                image_id=f"dog/{partition}/{Path(rel).stem}", path=str(image_dir / rel),
                super_category="dog", genus="", label=dogs_label(folder), partition=partition,
                meta={"class_id": _mat_int(labels[i], path, f"label {i + 1}"), "file": rel}))
    return records


# --------------------------------------------------------------------------- Oxford Flowers-102

def read_flowers(root: PathLike) -> list[ImageRecord]:
    """Oxford Flowers-102 (trnid + valid = train, tstid = test)."""
    info = DATASET_INFO["flower"]
    base = _locate("flower", root)
    labels_path = base / info.marker
    labels = _mat_var(_load_mat(labels_path), "labels", labels_path).astype(int)
    setid_path = _require_file(base, "setid.mat", info)
    setid = _load_mat(setid_path)
    image_dir = _require_dir(base, "jpg", info)
    records = []
    for key, partition in (("trnid", "train"), ("valid", "train"), ("tstid", "test")):
        for img_id in _mat_var(setid, key, setid_path).astype(int):
            if not 1 <= img_id <= len(labels):
                raise ValueError(f"{setid_path}: {key} lists image {img_id}, but {labels_path} "
                                 f"has labels for images 1..{len(labels)}")
            class_id = int(labels[img_id - 1])
            if not 1 <= class_id <= len(FLOWER_CLASS_NAMES):
                raise ValueError(f"{labels_path}: image {img_id} has label {class_id}, "
                                 f"outside 1..{len(FLOWER_CLASS_NAMES)}")
            name = f"image_{img_id:05d}"
            records.append(ImageRecord(
                image_id=f"flower/{partition}/{name}", path=str(image_dir / f"{name}.jpg"),
                super_category="flower", genus="", label=FLOWER_CLASS_NAMES[class_id - 1],
                partition=partition, meta={"dataset_id": int(img_id), "class_id": class_id, "subset": key}))
    return records


# --------------------------------------------------------------------------- Oxford-IIIT Pet

_PET_SPECIES = {"1": "cat", "2": "dog"}


def read_pets(root: PathLike) -> list[ImageRecord]:
    """Oxford-IIIT Pet (annotations/trainval.txt = train, annotations/test.txt = test)."""
    info = DATASET_INFO["pet"]
    base = _locate("pet", root)
    image_dir = _require_dir(base, "images", info)
    records = []
    for fname, partition in (("trainval.txt", "train"), ("test.txt", "test")):
        path = _require_file(base, f"annotations/{fname}", info)
        usage = "<image> <class id> <species 1|2> <breed id>"
        for lineno, (name, class_id, species, breed_id) in _iter_fields(path, 4, usage):
            if species not in _PET_SPECIES:
                raise ValueError(f"{path}:{lineno}: species must be 1 (cat) or 2 (dog), got {species!r}")
            records.append(ImageRecord(
                image_id=f"pet/{partition}/{name}", path=str(image_dir / f"{name}.jpg"),
                super_category="pet", genus=_PET_SPECIES[species], label=pet_label(name),
                partition=partition,
                meta={"class_id": _to_int(class_id, path, lineno, "the class id"),
                      "breed_id": _to_int(breed_id.split()[0], path, lineno, "the breed id")}))
    return records


# --------------------------------------------------------------------------- FGVC-Aircraft

def read_aircraft(root: PathLike) -> list[ImageRecord]:
    """FGVC-Aircraft 2013b (trainval = train, test = test); genus = family."""
    info = DATASET_INFO["aircraft"]
    base = _locate("aircraft", root)
    variants_path = base / info.marker
    variants = {v for _, (v,) in _iter_fields(variants_path, 1, "<variant>")}
    image_dir = _require_dir(base, "images", info)
    records = []
    for subset, partition in (("trainval", "train"), ("test", "test")):
        variant_path = _require_file(base, f"images_variant_{subset}.txt", info)
        makers_path = _require_file(base, f"images_manufacturer_{subset}.txt", info)
        family_path = _require_file(base, f"images_family_{subset}.txt", info)
        makers = _read_str_table(makers_path, "<image> <manufacturer>")
        families = _read_str_table(family_path, "<image> <family>")
        for img, (lineno, variant) in _read_str_table(variant_path, "<image> <variant>").items():
            if variant not in variants:
                raise ValueError(f"{variant_path}:{lineno}: variant {variant!r} is not in {variants_path}")
            for path, table in ((makers_path, makers), (family_path, families)):
                if img not in table:
                    raise ValueError(f"{path}: no line for image {img} (listed in {variant_path}:{lineno})")
            manufacturer, family = makers[img][1], families[img][1]
            records.append(ImageRecord(
                image_id=f"aircraft/{partition}/{img}", path=str(image_dir / f"{img}.jpg"),
                super_category="aircraft", genus=family, label=aircraft_label(manufacturer, variant),
                partition=partition, meta={"variant": variant, "manufacturer": manufacturer}))
    return records


# --------------------------------------------------------------------------- dispatch

READERS: dict[str, Callable[[PathLike], list[ImageRecord]]] = {
    "aircraft": read_aircraft,
    "bird": read_cub,
    "car": read_cars,
    "dog": read_dogs,
    "flower": read_flowers,
    "pet": read_pets,
}


def read_dataset(super_category: str, root: PathLike) -> list[ImageRecord]:
    """All images (train and test) of the dataset of ``super_category`` found at ``root``."""
    _check_super_category(super_category)
    return READERS[super_category](root)


# --------------------------------------------------------------------------- official folder names

def _folder_names(info: DatasetInfo) -> list[str]:
    """Distinctive folder names of a dataset in every layout (standard, official eval, official Stage-1)."""
    names = [info.stage1_dir, *info.official_dirs, *(d for d in info.subdirs if d and d != "data")]
    return [n for n in names if n]


def super_category_from_path(path: PathLike) -> str | None:
    """The super-category of an image path in the standard, official-eval or official Stage-1 layout, else None.

    A path matches when it contains one of the dataset's folder names as whole path components, e.g.
    ``.../FOCI-Benchmark/data/test/stanford-cars/cars_test/00210.jpg`` -> "car",
    ``bird_200/images_train/016.Painted_Bunting/x.jpg`` -> "bird", ``.../CUB_200_2011/images/...`` -> "bird".
    (The official eval code guesses from substrings such as "birds"; this does not.)
    """
    parts = "/" + "/".join(p for p in str(path).replace("\\", "/").split("/") if p) + "/"
    for sc in SUPER_CATEGORIES:
        if any(f"/{name}/" in parts for name in _folder_names(DATASET_INFO[sc])):
            return sc
    return None


def stage1_dataset_path(image_path: PathLike, dataset_root: PathLike,
                        super_category: str | None = None) -> Path:
    """Where an image of the official Stage-1 file lies in a standard copy of its dataset.

    ``image_path`` is as in ``Fine-R1-Stage1-data.json`` (e.g. ``bird_200/images_train/016.Painted_Bunting/
    Painted_Bunting_0056_16599.jpg``; anything before the Stage-1 folder is ignored); ``dataset_root`` is the
    folder you would pass to the dataset's reader. Returns e.g. ``<root>/CUB_200_2011/images/016.Painted_Bunting/
    Painted_Bunting_0056_16599.jpg``. The file is not checked. Raises ValueError when the path is not under a
    Stage-1 folder (of ``super_category`` when given).
    """
    posix = "/".join(p for p in str(image_path).replace("\\", "/").split("/") if p)
    for sc in ([super_category] if super_category else SUPER_CATEGORIES):
        _check_super_category(sc)
        info = DATASET_INFO[sc]
        prefix = info.stage1_dir + "/"
        at = ("/" + posix).find("/" + prefix)
        if at >= 0:
            rest = posix[at + len(prefix):]
            return _locate(sc, dataset_root) / info.image_dir / rest
    folders = ", ".join(f"{DATASET_INFO[s].stage1_dir}/" for s in ([super_category] if super_category
                                                                     else SUPER_CATEGORIES))
    raise ValueError(f"{image_path} is not under an official Stage-1 image folder ({folders})")
