"""Builders of tiny FAKE copies of the six FGVR datasets in their real on-disk layouts.

Each builder writes every official class (folder/file names spelled as in the real datasets),
one train and one test image per class (8x8 JPEGs), and the index / .mat files with the real
names and structures. It returns the folder to pass to the reader.
"""
from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

SPLITS_DIR = Path(__file__).resolve().parent.parent / "data" / "official_splits"


def official_classes(super_category: str) -> list[str]:
    data = json.loads((SPLITS_DIR / f"{super_category}.json").read_text(encoding="utf-8"))
    return list(data["seen"]) + list(data["unseen"])


@lru_cache(maxsize=1)
def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 40)).save(buf, format="JPEG")
    return buf.getvalue()


def write_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg_bytes())


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _cell(strings: list[str], column: bool = False) -> np.ndarray:
    """A MATLAB cell array of strings (1xN, or Nx1 when ``column``)."""
    arr = np.empty((len(strings), 1) if column else (1, len(strings)), dtype=object)
    arr.flat[:] = strings
    return arr


# --------------------------------------------------------------------------- CUB-200-2011

CUB_FOLDERS = """
Black_footed_Albatross Laysan_Albatross Sooty_Albatross Groove_billed_Ani Crested_Auklet Least_Auklet
Parakeet_Auklet Rhinoceros_Auklet Brewer_Blackbird Red_winged_Blackbird Rusty_Blackbird
Yellow_headed_Blackbird Bobolink Indigo_Bunting Lazuli_Bunting Painted_Bunting Cardinal Spotted_Catbird
Gray_Catbird Yellow_breasted_Chat Eastern_Towhee Chuck_will_Widow Brandt_Cormorant Red_faced_Cormorant
Pelagic_Cormorant Bronzed_Cowbird Shiny_Cowbird Brown_Creeper American_Crow Fish_Crow Black_billed_Cuckoo
Mangrove_Cuckoo Yellow_billed_Cuckoo Gray_crowned_Rosy_Finch Purple_Finch Northern_Flicker
Acadian_Flycatcher Great_Crested_Flycatcher Least_Flycatcher Olive_sided_Flycatcher
Scissor_tailed_Flycatcher Vermilion_Flycatcher Yellow_bellied_Flycatcher Frigatebird Northern_Fulmar
Gadwall American_Goldfinch European_Goldfinch Boat_tailed_Grackle Eared_Grebe Horned_Grebe
Pied_billed_Grebe Western_Grebe Blue_Grosbeak Evening_Grosbeak Pine_Grosbeak Rose_breasted_Grosbeak
Pigeon_Guillemot California_Gull Glaucous_winged_Gull Heermann_Gull Herring_Gull Ivory_Gull
Ring_billed_Gull Slaty_backed_Gull Western_Gull Anna_Hummingbird Ruby_throated_Hummingbird
Rufous_Hummingbird Green_Violetear Long_tailed_Jaeger Pomarine_Jaeger Blue_Jay Florida_Jay Green_Jay
Dark_eyed_Junco Tropical_Kingbird Gray_Kingbird Belted_Kingfisher Green_Kingfisher Pied_Kingfisher
Ringed_Kingfisher White_breasted_Kingfisher Red_legged_Kittiwake Horned_Lark Pacific_Loon Mallard
Western_Meadowlark Hooded_Merganser Red_breasted_Merganser Mockingbird Nighthawk Clark_Nutcracker
White_breasted_Nuthatch Baltimore_Oriole Hooded_Oriole Orchard_Oriole Scott_Oriole Ovenbird
Brown_Pelican White_Pelican Western_Wood_Pewee Sayornis American_Pipit Whip_poor_Will Horned_Puffin
Common_Raven White_necked_Raven American_Redstart Geococcyx Loggerhead_Shrike Great_Grey_Shrike
Baird_Sparrow Black_throated_Sparrow Brewer_Sparrow Chipping_Sparrow Clay_colored_Sparrow House_Sparrow
Field_Sparrow Fox_Sparrow Grasshopper_Sparrow Harris_Sparrow Henslow_Sparrow Le_Conte_Sparrow
Lincoln_Sparrow Nelson_Sharp_tailed_Sparrow Savannah_Sparrow Seaside_Sparrow Song_Sparrow Tree_Sparrow
Vesper_Sparrow White_crowned_Sparrow White_throated_Sparrow Cape_Glossy_Starling Bank_Swallow
Barn_Swallow Cliff_Swallow Tree_Swallow Scarlet_Tanager Summer_Tanager Artic_Tern Black_Tern
Caspian_Tern Common_Tern Elegant_Tern Forsters_Tern Least_Tern Green_tailed_Towhee Brown_Thrasher
Sage_Thrasher Black_capped_Vireo Blue_headed_Vireo Philadelphia_Vireo Red_eyed_Vireo Warbling_Vireo
White_eyed_Vireo Yellow_throated_Vireo Bay_breasted_Warbler Black_and_white_Warbler
Black_throated_Blue_Warbler Blue_winged_Warbler Canada_Warbler Cape_May_Warbler Cerulean_Warbler
Chestnut_sided_Warbler Golden_winged_Warbler Hooded_Warbler Kentucky_Warbler Magnolia_Warbler
Mourning_Warbler Myrtle_Warbler Nashville_Warbler Orange_crowned_Warbler Palm_Warbler Pine_Warbler
Prairie_Warbler Prothonotary_Warbler Swainson_Warbler Tennessee_Warbler Wilson_Warbler
Worm_eating_Warbler Yellow_Warbler Northern_Waterthrush Louisiana_Waterthrush Bohemian_Waxwing
Cedar_Waxwing American_Three_toed_Woodpecker Pileated_Woodpecker Red_bellied_Woodpecker
Red_cockaded_Woodpecker Red_headed_Woodpecker Downy_Woodpecker Bewick_Wren Cactus_Wren Carolina_Wren
House_Wren Marsh_Wren Rock_Wren Winter_Wren Common_Yellowthroat
""".split()


def build_cub(root: Path) -> Path:
    """CUB_200_2011/ under ``root``; returns ``root`` (the parent)."""
    base = root / "CUB_200_2011"
    classes, images, labels, split = [], [], [], []
    img_id = 0
    for class_id, name in enumerate(CUB_FOLDERS, 1):
        folder = f"{class_id:03d}.{name}"
        classes.append(f"{class_id} {folder}")
        for k, is_train in enumerate((1, 0)):
            img_id += 1
            rel = f"{folder}/{name}_{k + 1:04d}_{700000 + img_id}.jpg"
            images.append(f"{img_id} {rel}")
            labels.append(f"{img_id} {class_id}")
            split.append(f"{img_id} {is_train}")
            write_jpeg(base / "images" / rel)
    _write_lines(base / "classes.txt", classes)
    _write_lines(base / "images.txt", images)
    _write_lines(base / "image_class_labels.txt", labels)
    _write_lines(base / "train_test_split.txt", split)
    return root


# --------------------------------------------------------------------------- Stanford Cars

def _car_struct(rows: list[tuple[int, str]], with_class: bool = True) -> np.ndarray:
    names = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    arr = np.zeros((1, len(rows)), dtype=[(n, "O") for n in names])
    for i, (class_id, fname) in enumerate(rows):
        values = [np.uint8(1), np.uint8(1), np.uint8(7), np.uint8(7)]
        values += [np.uint8(class_id)] if with_class else []
        arr[0, i] = tuple(values + [fname])
    return arr


def build_cars(root: Path, test_annos_in_devkit: bool = False) -> Path:
    """Devkit layout; class names are the official names (the real cars_meta spelling)."""
    names = sorted(official_classes("car"))
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": _cell(names)})
    rows = {"train": [], "test": []}
    for class_id in range(1, len(names) + 1):
        for partition in ("train", "test"):
            fname = f"{len(rows[partition]) + 1:05d}.jpg"
            rows[partition].append((class_id, fname))
            write_jpeg(root / f"cars_{partition}" / fname)
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _car_struct(rows["train"])})
    savemat(root / "devkit" / "cars_test_annos.mat", {"annotations": _car_struct(rows["test"], False)})
    test_dir = root / "devkit" if test_annos_in_devkit else root
    savemat(test_dir / "cars_test_annos_withlabels.mat", {"annotations": _car_struct(rows["test"])})
    return root


# --------------------------------------------------------------------------- Stanford Dogs

DOG_FOLDERS = """
n02085620-Chihuahua n02085782-Japanese_spaniel n02085936-Maltese_dog n02086079-Pekinese n02086240-Shih-Tzu
n02086646-Blenheim_spaniel n02086910-papillon n02087046-toy_terrier n02087394-Rhodesian_ridgeback
n02088094-Afghan_hound n02088238-basset n02088364-beagle n02088466-bloodhound n02088632-bluetick
n02089078-black-and-tan_coonhound n02089867-Walker_hound n02089973-English_foxhound n02090379-redbone
n02090622-borzoi n02090721-Irish_wolfhound n02091032-Italian_greyhound n02091134-whippet
n02091244-Ibizan_hound n02091467-Norwegian_elkhound n02091635-otterhound n02091831-Saluki
n02092002-Scottish_deerhound n02092339-Weimaraner n02093256-Staffordshire_bullterrier
n02093428-American_Staffordshire_terrier n02093647-Bedlington_terrier n02093754-Border_terrier
n02093859-Kerry_blue_terrier n02093991-Irish_terrier n02094114-Norfolk_terrier n02094258-Norwich_terrier
n02094433-Yorkshire_terrier n02095314-wire-haired_fox_terrier n02095570-Lakeland_terrier
n02095889-Sealyham_terrier n02096051-Airedale n02096177-cairn n02096294-Australian_terrier
n02096437-Dandie_Dinmont n02096585-Boston_bull n02097047-miniature_schnauzer n02097130-giant_schnauzer
n02097209-standard_schnauzer n02097298-Scotch_terrier n02097474-Tibetan_terrier n02097658-silky_terrier
n02098105-soft-coated_wheaten_terrier n02098286-West_Highland_white_terrier n02098413-Lhasa
n02099267-flat-coated_retriever n02099429-curly-coated_retriever n02099601-golden_retriever
n02099712-Labrador_retriever n02099849-Chesapeake_Bay_retriever n02100236-German_short-haired_pointer
n02100583-vizsla n02100735-English_setter n02100877-Irish_setter n02101006-Gordon_setter
n02101388-Brittany_spaniel n02101556-clumber n02102040-English_springer n02102177-Welsh_springer_spaniel
n02102318-cocker_spaniel n02102480-Sussex_spaniel n02102973-Irish_water_spaniel n02104029-kuvasz
n02104365-schipperke n02105056-groenendael n02105162-malinois n02105251-briard n02105412-kelpie
n02105505-komondor n02105641-Old_English_sheepdog n02105855-Shetland_sheepdog n02106030-collie
n02106166-Border_collie n02106382-Bouvier_des_Flandres n02106550-Rottweiler n02106662-German_shepherd
n02107142-Doberman n02107312-miniature_pinscher n02107574-Greater_Swiss_Mountain_dog
n02107683-Bernese_mountain_dog n02107908-Appenzeller n02108000-EntleBucher n02108089-boxer
n02108422-bull_mastiff n02108551-Tibetan_mastiff n02108915-French_bulldog n02109047-Great_Dane
n02109525-Saint_Bernard n02109961-Eskimo_dog n02110063-malamute n02110185-Siberian_husky
n02110627-affenpinscher n02110806-basenji n02110958-pug n02111129-Leonberg n02111277-Newfoundland
n02111500-Great_Pyrenees n02111889-Samoyed n02112018-Pomeranian n02112137-chow n02112350-keeshond
n02112706-Brabancon_griffon n02113023-Pembroke n02113186-Cardigan n02113624-toy_poodle
n02113712-miniature_poodle n02113799-standard_poodle n02113978-Mexican_hairless n02115641-dingo
n02115913-dhole n02116738-African_hunting_dog
""".split()


def build_dogs(root: Path) -> Path:
    lists: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for class_id, folder in enumerate(DOG_FOLDERS, 1):
        wnid = folder.split("-", 1)[0]
        for k, partition in enumerate(("train", "test")):
            rel = f"{folder}/{wnid}_{1000 + k}.jpg"
            lists[partition].append((rel, class_id))
            write_jpeg(root / "Images" / rel)
    for partition, rows in lists.items():
        files = [r for r, _ in rows]
        savemat(root / f"{partition}_list.mat", {
            "file_list": _cell(files, column=True),
            "annotation_list": _cell([f[:-4] for f in files], column=True),
            "labels": np.array([c for _, c in rows], dtype=float).reshape(-1, 1)})
    return root


# --------------------------------------------------------------------------- Oxford Flowers-102

def build_flowers(root: Path, class_names: tuple[str, ...]) -> Path:
    """Image 2c-1 of class c is in trnid (even c: valid), image 2c in tstid; labels 1-based."""
    labels, sets = [], {"trnid": [], "valid": [], "tstid": []}
    for class_id in range(1, len(class_names) + 1):
        for key in ("valid" if class_id % 2 == 0 else "trnid", "tstid"):
            labels.append(class_id)
            sets[key].append(len(labels))
            write_jpeg(root / "jpg" / f"image_{len(labels):05d}.jpg")
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(root / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in sets.items()})
    return root


# --------------------------------------------------------------------------- Oxford-IIIT Pet

PET_CATS = ("Abyssinian", "Bengal", "Birman", "Bombay", "British Shorthair", "Egyptian Mau", "Maine Coon",
            "Persian", "Ragdoll", "Russian Blue", "Siamese", "Sphynx")


def pet_file_stem(label: str) -> str:
    """Real file spelling: cats 'British_Shorthair', dogs 'american_bulldog'."""
    stem = label.replace(" ", "_")
    return stem if label in PET_CATS else stem.lower()


def build_pets(root: Path) -> Path:
    breeds = sorted(official_classes("pet"), key=str.lower)
    per_species = {"1": 0, "2": 0}
    lines = {"trainval": [], "test": []}
    for class_id, label in enumerate(breeds, 1):
        species = "1" if label in PET_CATS else "2"
        per_species[species] += 1
        for k, subset in enumerate(("trainval", "test")):
            name = f"{pet_file_stem(label)}_{100 + k}"
            lines[subset].append(f"{name} {class_id} {species} {per_species[species]}")
            write_jpeg(root / "images" / f"{name}.jpg")
    header = ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids", "#SPECIES: 1:Cat 2:Dog",
              "#BREED ID: 1-25:Cat 1:12:Dog"]
    _write_lines(root / "annotations" / "list.txt", header + sorted(lines["trainval"] + lines["test"]))
    _write_lines(root / "annotations" / "trainval.txt", lines["trainval"])
    _write_lines(root / "annotations" / "test.txt", lines["test"])
    return root


# --------------------------------------------------------------------------- FGVC-Aircraft

# (variant, family, manufacturer) as in the real variants / families / manufacturers files.
AIRCRAFT_VARIANTS: tuple[tuple[str, str, str], ...] = (
    *((v, "Boeing 737", "Boeing") for v in ("737-200", "737-300", "737-400", "737-500", "737-600",
                                             "737-700", "737-800", "737-900")),
    *((v, "Boeing 747", "Boeing") for v in ("747-100", "747-200", "747-300", "747-400")),
    *((v, "Boeing 767", "Boeing") for v in ("767-200", "767-300", "767-400")),
    ("707-320", "Boeing 707", "Boeing"), ("727-200", "Boeing 727", "Boeing"),
    ("757-200", "Boeing 757", "Boeing"), ("757-300", "Boeing 757", "Boeing"),
    ("777-200", "Boeing 777", "Boeing"), ("777-300", "Boeing 777", "Boeing"),
    ("Boeing 717", "Boeing 717", "Boeing"),
    ("A300B4", "A300", "Airbus"), ("A310", "A310", "Airbus"),
    *((v, "A320", "Airbus") for v in ("A318", "A319", "A320", "A321")),
    ("A330-200", "A330", "Airbus"), ("A330-300", "A330", "Airbus"),
    *((v, "A340", "Airbus") for v in ("A340-200", "A340-300", "A340-500", "A340-600")),
    ("A380", "A380", "Airbus"),
    ("ATR-42", "ATR-42", "ATR"), ("ATR-72", "ATR-72", "ATR"), ("An-12", "An-12", "Antonov"),
    ("BAE 146-200", "BAE 146", "British Aerospace"), ("BAE 146-300", "BAE 146", "British Aerospace"),
    ("BAE-125", "BAE-125", "British Aerospace"), ("Hawk T1", "Hawk T1", "British Aerospace"),
    ("Beechcraft 1900", "Beechcraft 1900", "Beechcraft"), ("Model B200", "King Air", "Beechcraft"),
    ("C-130", "C-130", "Lockheed Corporation"), ("L-1011", "L-1011", "Lockheed Corporation"),
    ("F-16A/B", "F-16", "Lockheed Martin"),
    ("C-47", "C-47", "Douglas Aircraft Company"), ("DC-3", "DC-3", "Douglas Aircraft Company"),
    ("DC-6", "DC-6", "Douglas Aircraft Company"), ("DC-8", "DC-8", "Douglas Aircraft Company"),
    ("CRJ-200", "CRJ-200", "Canadair"), ("CRJ-700", "CRJ-700", "Canadair"), ("CRJ-900", "CRJ-700", "Canadair"),
    ("Challenger 600", "Challenger 600", "Canadair"), ("Global Express", "Global Express", "Bombardier Aerospace"),
    ("Cessna 172", "Cessna 172", "Cessna"), ("Cessna 208", "Cessna 208", "Cessna"),
    ("Cessna 525", "Cessna Citation", "Cessna"), ("Cessna 560", "Cessna Citation", "Cessna"),
    ("DC-10", "DC-10", "McDonnell Douglas"), ("DC-9-30", "DC-9", "McDonnell Douglas"),
    ("MD-11", "MD-11", "McDonnell Douglas"), ("MD-80", "MD-80", "McDonnell Douglas"),
    ("MD-87", "MD-80", "McDonnell Douglas"), ("MD-90", "MD-90", "McDonnell Douglas"),
    ("F/A-18", "F/A-18", "McDonnell Douglas"),
    ("DH-82", "DH-82", "de Havilland"), ("DHC-1", "DHC-1", "de Havilland"), ("DHC-6", "DHC-6", "de Havilland"),
    ("DHC-8-100", "DHC-8", "de Havilland"), ("DHC-8-300", "DHC-8", "de Havilland"),
    ("DR-400", "DR-400", "Robin"), ("Dornier 328", "Dornier 328", "Dornier"),
    ("E-170", "E-170", "Embraer"), ("E-190", "E-190", "Embraer"), ("E-195", "E-195", "Embraer"),
    ("EMB-120", "EMB-120", "Embraer"), ("ERJ 135", "Embraer ERJ 145", "Embraer"),
    ("ERJ 145", "Embraer ERJ 145", "Embraer"), ("Embraer Legacy 600", "Embraer Legacy 600", "Embraer"),
    ("Eurofighter Typhoon", "Eurofighter Typhoon", "Eurofighter"),
    ("Falcon 2000", "Falcon 2000", "Dassault Aviation"), ("Falcon 900", "Falcon 900", "Dassault Aviation"),
    ("Fokker 100", "Fokker 100", "Fokker"), ("Fokker 50", "Fokker 50", "Fokker"), ("Fokker 70", "Fokker 70", "Fokker"),
    ("Gulfstream IV", "Gulfstream", "Gulfstream Aerospace"), ("Gulfstream V", "Gulfstream", "Gulfstream Aerospace"),
    ("Il-76", "Il-76", "Ilyushin"), ("Metroliner", "Metroliner", "Fairchild"), ("PA-28", "PA-28", "Piper"),
    ("SR-20", "SR-20", "Cirrus Aircraft"), ("Saab 2000", "Saab 2000", "Saab"), ("Saab 340", "Saab 340", "Saab"),
    ("Spitfire", "Spitfire", "Supermarine"), ("Tornado", "Tornado", "Panavia"),
    ("Tu-134", "Tu-134", "Tupolev"), ("Tu-154", "Tu-154", "Tupolev"), ("Yak-42", "Yak-42", "Yakovlev"),
)


def build_aircraft(root: Path) -> Path:
    """fgvc-aircraft-2013b/data/ under ``root``; returns ``root``."""
    data = root / "fgvc-aircraft-2013b" / "data"
    rows = {"trainval": [], "test": []}
    for i, (variant, family, maker) in enumerate(sorted(AIRCRAFT_VARIANTS)):
        for k, subset in enumerate(("trainval", "test")):
            img = f"{1000000 + 2 * i + k:07d}"
            rows[subset].append((img, variant, family, maker))
            write_jpeg(data / "images" / f"{img}.jpg")
    _write_lines(data / "variants.txt", sorted(v for v, _, _ in AIRCRAFT_VARIANTS))
    _write_lines(data / "families.txt", sorted({f for _, f, _ in AIRCRAFT_VARIANTS}))
    _write_lines(data / "manufacturers.txt", sorted({m for _, _, m in AIRCRAFT_VARIANTS}))
    for subset, items in rows.items():
        _write_lines(data / f"images_{subset}.txt", [img for img, *_ in items])
        _write_lines(data / f"images_variant_{subset}.txt", [f"{img} {v}" for img, v, _, _ in items])
        _write_lines(data / f"images_family_{subset}.txt", [f"{img} {f}" for img, _, f, _ in items])
        _write_lines(data / f"images_manufacturer_{subset}.txt", [f"{img} {m}" for img, _, _, m in items])
    return root


def build_all(root: Path, flower_names: tuple[str, ...]) -> dict[str, Path]:
    """All six fake datasets under ``root``; {super_category: folder to pass to the reader}."""
    builders = {
        "aircraft": build_aircraft, "bird": build_cub, "car": build_cars, "dog": build_dogs,
        "flower": lambda p: build_flowers(p, flower_names), "pet": build_pets,
    }
    out = {}
    for name, build in builders.items():
        folder = root / name
        folder.mkdir(parents=True)
        out[name] = build(folder)
    return out


# --------------------------------------------------------------------------- official folder names

#: Where the official eval files (FOCI-Benchmark layout) keep each dataset, under ``FOCI-Benchmark/data``.
OFFICIAL_EVAL_FOLDERS = {
    "bird": "train/bird_200", "car": "test/stanford-cars", "dog": "train/dogs_120",
    "flower": "test/flower102", "aircraft": "test/fgvc_aircraft", "pet": "test/oxford-pet",
}


def build_official_eval_tree(root: Path, flower_names: tuple[str, ...]) -> Path:
    """The six fake datasets under the official eval folder names (``<root>/FOCI-Benchmark/data/train/bird_200/
    images/...``, ``.../test/stanford-cars/cars_test/...``, ``.../test/fgvc_aircraft/data/images/...``);
    returns the ``FOCI-Benchmark/data`` folder."""
    data = root / "FOCI-Benchmark" / "data"
    staging = root / "staging"
    for sc, rel in OFFICIAL_EVAL_FOLDERS.items():
        target = data / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if sc == "bird":
            build_cub(staging / sc).joinpath("CUB_200_2011").rename(target)
        elif sc == "aircraft":
            target.mkdir()
            build_aircraft(staging / sc).joinpath("fgvc-aircraft-2013b", "data").rename(target / "data")
        else:
            target.mkdir()
            {"car": build_cars, "dog": build_dogs, "pet": build_pets,
             "flower": lambda p: build_flowers(p, flower_names)}[sc](target)
    return data
