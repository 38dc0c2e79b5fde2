"""The one record type every data source produces (micro world and the six real datasets)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

# The paper's six datasets, in the column order of Tables 1, 2 and 6.
SUPER_CATEGORIES = ("aircraft", "bird", "car", "dog", "flower", "pet")

# The word used for the super-category c_hat in relative SS (Eq. 5) and in prompts.
# The official evaluation uses "object" for dogs, pets and birds; this project does not.
SUPER_CATEGORY_WORD = {
    "aircraft": "aircraft",
    "bird": "bird",
    "car": "car",
    "dog": "dog",
    "flower": "flower",
    "pet": "pet",
}

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
OFFICIAL_SPLITS_DIR = DATA_DIR / "official_splits"


@dataclass(frozen=True)
class ImageRecord:
    """One image of one sub-category.

    image_id:       unique, stable id (e.g. "bird/0123" or "micro/bird/Marovi_Talsek/test/7")
    path:           path of the image file
    super_category: one of SUPER_CATEGORIES
    genus:          the middle level of the taxonomy (genus, family, make, manufacturer);
                    "" when the dataset has none
    label:          the sub-category name as it must appear in answers, e.g. "Black Footed Albatross"
    partition:      where the image comes from: "train" / "test" for real datasets;
                    "pretrain" / "train" / "rl" / "test" pools for the micro world
    meta:           free-form extras (attributes, render parameters, dataset ids)
    """

    image_id: str
    path: str
    super_category: str
    genus: str
    label: str
    partition: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageRecord":
        missing = [k for k in ("image_id", "path", "super_category", "genus", "label", "partition") if k not in d]
        if missing:
            raise ValueError(f"image record is missing keys {missing}: {d}")
        return cls(**{k: d[k] for k in ("image_id", "path", "super_category", "genus", "label", "partition")},
                   meta=dict(d.get("meta", {})))
