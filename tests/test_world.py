"""The micro world (finer1_lib/world.py): taxonomy, field guide, renderer and image records."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finer1_lib.records import SUPER_CATEGORIES, ImageRecord
from finer1_lib.world import POOLS, SCHEMAS, World, attribute_difference


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=0)


def _genera_of(world: World, sc: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in world.species_of(sc):
        out.setdefault(s.genus, []).append(s)
    return out


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_taxonomy():
    a, b = World(seed=0), World(seed=0)
    assert [s.name for s in a.species] == [s.name for s in b.species]
    assert [s.attributes for s in a.species] == [s.attributes for s in b.species]
    assert [s.descriptions for s in a.species] == [s.descriptions for s in b.species]
    assert a.taxonomy() == b.taxonomy()


def test_different_seed_different_names():
    names0 = {s.name for s in World(seed=0).species}
    names1 = {s.name for s in World(seed=1).species}
    assert names0 != names1
    # not just a reordering: most names are new
    assert len(names0 & names1) < len(names0) // 2


def test_render_is_byte_identical_for_same_seed(world):
    other = World(seed=0)
    for sp in (world.species[0], world.species_of("flower")[3]):
        a = world.render(sp.name, "test", 5)
        b = other.render(sp.name, "test", 5)
        assert a.tobytes() == b.tobytes()
        assert np.array_equal(_px(a), _px(b))
        # and a second call on the same world as well (no hidden state)
        assert world.render(sp.name, "test", 5).tobytes() == a.tobytes()


def test_render_changes_with_pool_and_index(world):
    name = world.species_of("bird")[0].name
    base = _px(world.render(name, "test", 0))
    assert not np.array_equal(base, _px(world.render(name, "test", 1)))
    assert not np.array_equal(base, _px(world.render(name, "train", 0)))
    # another species of the same genus, same pool and index: different image too
    sib = world.species_of("bird")[1]
    assert sib.genus == world.species_of("bird")[0].genus
    assert not np.array_equal(base, _px(world.render(sib.name, "test", 0)))


def test_image_seed_is_pure_function_of_world_seed_species_pool_index(world):
    name = world.species[0].name
    assert world.image_seed(name, "test", 3) == World(seed=0).image_seed(name, "test", 3)
    assert world.image_seed(name, "test", 3) != world.image_seed(name, "test", 4)
    # the world seed is part of the image seed
    w1 = World(seed=1)
    assert w1.image_seed(w1.species[0].name, "test", 3) != world.image_seed(name, "test", 3)


# ----------------------------------------------------------------------------------------------- counts
def test_counts(world):
    assert set(SCHEMAS) == set(SUPER_CATEGORIES) and len(SUPER_CATEGORIES) == 6
    assert {s.super_category for s in world.species} == set(SUPER_CATEGORIES)
    for sc in SUPER_CATEGORIES:
        assert len(world.species_of(sc)) >= 12
        assert len(world.species_of(sc)) == 4 * world.n_genera  # 4 species per genus
        assert len(_genera_of(world, sc)) == world.n_genera
    assert len(world.species) >= 90
    assert len(world.species) == 96


@pytest.mark.parametrize("n_genera", [3, 6])
def test_counts_follow_n_genera(n_genera):
    w = World(seed=0, n_genera=n_genera)
    for sc in SUPER_CATEGORIES:
        assert len(w.species_of(sc)) == 4 * n_genera
    assert len(w.species) == 6 * 4 * n_genera
    assert len({s.name for s in w.species}) == len(w.species)


def test_names_unique_and_end_with_genus(world):
    names = [s.name for s in world.species]
    assert len(set(names)) == len(names)
    for s in world.species:
        epithet, genus_word = s.name.split(" ")
        assert genus_word == s.genus
        assert s.name.endswith(" " + s.genus)
        assert epithet and epithet[0].isupper() and epithet != s.genus
        assert s.slug == s.name.replace(" ", "_")


def test_genus_words_shared_by_siblings_only(world):
    genera = world.genera()
    assert len(genera) == 6 * world.n_genera
    for genus, members in genera.items():
        assert len(members) == 4
        assert {m.genus for m in members} == {genus}
        assert all(m.name.endswith(" " + genus) for m in members)
        # a genus lives in one super-category
        assert len({m.super_category for m in members}) == 1
    # genus words are unique across the whole world (no two genera share a word)
    words = [g for g in genera]
    assert len(words) == len(set(words))


# ------------------------------------------------------------------------------ low inter-class variance
def test_attributes_follow_schema(world):
    for s in world.species:
        schema = SCHEMAS[s.super_category]
        assert list(s.attributes) == [d.name for d in schema.dims]  # genus dims first
        for d in schema.dims:
            assert s.attributes[d.name] in d.values


def test_siblings_share_genus_attributes_and_differ_in_one_or_two(world):
    for sc in SUPER_CATEGORIES:
        schema = SCHEMAS[sc]
        genus_dims = {d.name for d in schema.genus_dims}
        species_dims = [d.name for d in schema.species_dims]
        for genus, members in _genera_of(world, sc).items():
            for a, b in itertools.combinations(members, 2):
                diff = attribute_difference(a, b)
                assert 1 <= len(diff) <= 2, (a.name, b.name, diff)
                assert not genus_dims & set(diff), (a.name, b.name, diff)
                assert attribute_difference(b, a) == diff
            # one species-level attribute is shared by the whole genus
            shared = [d for d in species_dims if len({m.attributes[d] for m in members}) == 1]
            assert len(shared) == 1, (genus, shared)
            # the four siblings have four distinct attribute sets
            assert len({tuple(m.attributes.values()) for m in members}) == 4


def test_species_of_different_genera_differ_in_a_genus_attribute(world):
    for sc in SUPER_CATEGORIES:
        genus_dims = {d.name for d in SCHEMAS[sc].genus_dims}
        for a, b in itertools.combinations(world.species_of(sc), 2):
            if a.genus != b.genus:
                assert genus_dims & set(attribute_difference(a, b)), (a.name, b.name)


def test_attribute_difference_values(world):
    s = world.species[0]
    assert attribute_difference(s, s) == []
    sib = [m for m in world.genera()[s.genus] if m.name != s.name][0]
    expected = [k for k in s.attributes if s.attributes[k] != sib.attributes[k]]
    assert attribute_difference(s, sib) == expected


# ----------------------------------------------------------------------------------------- field guide
def test_field_guide_descriptions_name_every_attribute(world):
    for s in world.species:
        assert len(s.descriptions) >= 3
        assert len(set(s.descriptions)) == len(s.descriptions)
        for text in s.descriptions:
            assert s.name in text
            for value in s.attributes.values():
                assert value in text, (s.name, value, text)
            for phrase in s.phrases():
                assert phrase in text, (s.name, phrase, text)


def test_phrases_and_caption(world):
    s = world.species_of("bird")[0]
    schema = SCHEMAS["bird"]
    assert s.phrases() == [d.phrase.format(s.attributes[d.name]) for d in schema.dims]
    cap = world.caption(s.name)
    assert cap.startswith("a bird with ")
    assert all(p in cap for p in s.phrases())
    assert world.caption(world.species_of("aircraft")[0].name).startswith("an aircraft with ")


# ---------------------------------------------------------------------------------------------- images
def test_render_rgb_default_size(world):
    img = world.render(world.species_of("dog")[0].name, "train", 0)
    assert img.mode == "RGB"
    assert img.size == (112, 112) == (world.image_size, world.image_size)


def test_render_non_default_size_and_not_constant():
    w = World(seed=0, image_size=64)
    for sc in SUPER_CATEGORIES:
        img = w.render(w.species_of(sc)[0].name, "test", 0)
        assert img.mode == "RGB"
        assert img.size == (64, 64)
        arr = _px(img)
        assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
        assert arr.std() > 5.0
        assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 50


@pytest.mark.parametrize("size", [31, 8, 0])
def test_too_small_image_size_raises(size):
    with pytest.raises(ValueError, match="image_size"):
        World(seed=0, image_size=size)


def test_smallest_image_size_allowed():
    w = World(seed=0, image_size=32)
    assert w.render(w.species[0].name, "test", 0).size == (32, 32)


@pytest.mark.parametrize("n", [0, 2, 7])
def test_bad_n_genera_raises(n):
    with pytest.raises(ValueError, match="n_genera"):
        World(seed=0, n_genera=n)


def test_unknown_species_raises_keyerror_naming_it(world):
    with pytest.raises(KeyError, match="Nonexistent Bird"):
        world.get("Nonexistent Bird")
    with pytest.raises(KeyError, match="Nonexistent Bird"):
        world.render("Nonexistent Bird", "test", 0)
    with pytest.raises(KeyError, match="Nonexistent Bird"):
        world.record("Nonexistent Bird", "test", 0)
    with pytest.raises(KeyError, match="Nonexistent Bird"):
        world.caption("Nonexistent Bird")


def test_unknown_super_category_raises(world):
    with pytest.raises(ValueError, match="boat"):
        world.species_of("boat")


def test_unknown_pool_raises(world):
    name = world.species[0].name
    with pytest.raises(ValueError, match="validation"):
        world.render(name, "validation", 0)
    with pytest.raises(ValueError, match="pool"):
        world.image_seed(name, "validation", 0)


def test_negative_index_raises(world):
    name = world.species[0].name
    with pytest.raises(ValueError, match="index"):
        world.render(name, "test", -1)
    with pytest.raises(ValueError, match="-1"):
        world.image_seed(name, "test", -1)


# ---------------------------------------------------------------------------------------------- records
def test_record_layout_and_fields(world):
    s = world.species_of("pet")[2]
    r = world.record(s.name, "test", 7)
    assert isinstance(r, ImageRecord)
    assert Path(r.path) == Path("images") / "test" / "pet" / s.slug / "0007.png"
    assert Path(r.path).parts == ("images", "test", "pet", s.slug, "0007.png")
    assert r.label == s.name
    assert r.genus == s.genus
    assert r.super_category == "pet"
    assert r.partition == "test"
    assert r.image_id == f"micro/pet/{s.slug}/test/7"
    assert r.meta == {"attributes": s.attributes, "world_seed": 0, "index": 7}
    # meta holds a copy: editing it does not change the species
    r.meta["attributes"]["fur"] = "changed"
    assert s.attributes["fur"] != "changed"


def test_record_with_root_and_index_formatting(world, tmp_path):
    s = world.species[0]
    r = world.record(s.name, "rl", 123, root=tmp_path)
    assert Path(r.path) == tmp_path / "images" / "rl" / s.super_category / s.slug / "0123.png"
    assert world.record(s.name, "rl", 12345).path.endswith("12345.png")


def test_record_ids_unique_across_pools_and_indices(world):
    names = [s.name for s in world.species[:10]]
    recs = [world.record(n, p, i) for n in names for p in POOLS for i in range(3)]
    assert len({r.image_id for r in recs}) == len(recs)
    assert len({r.path for r in recs}) == len(recs)


def test_record_round_trips_through_dict(world):
    r = world.record(world.species[5].name, "pretrain", 2)
    back = ImageRecord.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r and back.meta == r.meta


def test_taxonomy_is_json_and_lists_all_species(world):
    tax = world.taxonomy()
    text = json.dumps(tax)
    back = json.loads(text)
    assert back["seed"] == 0 and back["image_size"] == 112
    assert [s["name"] for s in back["species"]] == [s.name for s in world.species]
    assert len(back["species"]) == 96
    for entry, s in zip(back["species"], world.species):
        assert entry["genus"] == s.genus
        assert entry["super_category"] == s.super_category
        assert entry["attributes"] == s.attributes
        assert entry["descriptions"] == list(s.descriptions)
    assert set(back["schemas"]) == set(SUPER_CATEGORIES)
    assert back["schemas"]["bird"]["genus_dims"]["beak"] == list(
        next(d for d in SCHEMAS["bird"].genus_dims if d.name == "beak").values)


# ------------------------------------------------------------------------------------------------ pools
def test_pools_have_distinct_ids():
    assert set(POOLS) == {"pretrain", "train", "rl", "test", "reference", "val"}
    assert len(set(POOLS.values())) == len(POOLS)


def test_pools_are_disjoint_by_seed(world):
    for s in world.species[::7]:
        for i in range(5):
            seeds = [tuple(world.image_seed(s.name, p, i)) for p in POOLS]
            assert len(set(seeds)) == len(POOLS), (s.name, i)
    # all (species, pool, index) seeds distinct over a grid
    grid = {tuple(world.image_seed(s.name, p, i)) for s in world.species for p in POOLS for i in range(4)}
    assert len(grid) == len(world.species) * len(POOLS) * 4


def test_pools_render_different_images(world):
    name = world.species_of("car")[0].name
    imgs = [world.render(name, p, 0).tobytes() for p in POOLS]
    assert len(set(imgs)) == len(POOLS)
