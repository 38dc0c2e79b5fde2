"""Concept extraction and the information-bottleneck-style filter (paper §4.2 (1))."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from finer1_lib import profiles
from finer1_lib.benchmark import build_benchmark
from finer1_lib.concepts import (ConceptResult, choose_images, concept_prompts, concept_table, concepts_by_image,
                                 extract_concepts, extract_concepts_for, filter_concepts, load_concepts,
                                 micro_vocabulary, pool_concepts, save_concepts, split_phrases)
from finer1_lib.model import build_processor, build_tiny_model, build_tokenizer
from finer1_lib.protocol import Similarity
from finer1_lib.records import ImageRecord


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    profile = profiles.PROFILES["smoke"].replace(super_categories=("bird",), test_per_class=1, rl_per_class=1,
                                                 reference_per_class=2)
    return build_benchmark(profile, tmp_path_factory.mktemp("bench"), seed=0, progress=False)


def _rec(label, i=0, sc="bird"):
    return ImageRecord(f"test/{label}/{i}", f"images/{label}_{i}.png", sc, "Genus", label, "train")


def _result(label, counts, n=10, i=0, sc="bird"):
    return ConceptResult(_rec(label, i, sc), [], ["caption"] * n, dict(counts))


# ------------------------------------------------------------------------------------------------ parsing
def test_extract_concepts_from_a_caption():
    vocab = micro_vocabulary("bird")
    assert len(vocab) == 20 and "a red crest" in vocab and "striped wings" in vocab
    text = "This is a bird with a round body, a short beak, a Red crest, striped wings and a white breast."
    assert extract_concepts(text, vocab) == ["a round body", "a short beak", "a red crest", "striped wings",
                                             "a white breast"]
    assert extract_concepts("It has a red crest. It has a red crest.", vocab) == ["a red crest"]
    assert extract_concepts("garbage redcrest tokens", ["red crest"]) == []  # whole words only
    # the longest phrase wins; a shorter one inside it is not counted again
    assert extract_concepts("a dark red crest", ["red crest", "dark red crest"]) == ["dark red crest"]
    assert extract_concepts("", vocab) == []
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        extract_concepts(text, [])


def test_split_phrases():
    assert split_phrases("This is a bird with a round body, a short beak and a red crest.") == [
        "a round body", "a short beak", "a red crest"]
    assert split_phrases("It has a red crest.") == ["a red crest"]
    assert split_phrases("The bird has a white head, dark upper wings and a pink bill. It stands on sand.") == [
        "a white head", "dark upper wings", "a pink bill"]
    assert split_phrases("A photo of a bird.") == []
    assert split_phrases("It has a very long tail that curls over many things in it, blue.",
                         max_words=3) == ["blue"]


def test_concept_prompts_emphasise_every_attribute():
    prompts = concept_prompts("bird")
    assert prompts[:5] == [f"Describe the {d} of this bird." for d in ("body", "beak", "crest", "wings", "breast")]
    assert "Describe this bird." in prompts and len(prompts) == 10
    assert concept_prompts("bird", dims=["bill"])[0] == "Describe the bill of this bird."


def test_pool_concepts_counts_and_bad_inputs():
    vocab = micro_vocabulary("bird")
    caps = ["It has a red crest.", "A bird with a red crest and a round body.", "zzz", ""]
    r = pool_concepts(_rec("A"), caps, vocab, prompts=["p"] * 4)
    assert r.counts == {"a red crest": 2, "a round body": 1}
    assert list(r.counts) == ["a red crest", "a round body"]  # most frequent first
    assert not r.filtered and r.kept == [] and len(r.captions) == 4
    assert pool_concepts(_rec("A"), ["with a pink bill"], None).counts == {"a pink bill": 1}  # fallback splitter
    with pytest.raises(ValueError, match="test/A/0.*no captions"):
        pool_concepts(_rec("A"), [], vocab)
    with pytest.raises(ValueError, match="test/A/0.*empty concept vocabulary"):
        pool_concepts(_rec("A"), caps, [])


# ---------------------------------------------------------------------------------------------- IB filter
def _two_classes():
    a = _result("A", {"a round body": 10, "a red crest": 8, "striped wings": 7, "a blue crest": 2})
    b = _result("B", {"a round body": 10, "a yellow crest": 9, "striped wings": 4, "a red crest": 1})
    return [a, b]


def test_filter_drops_generic_keeps_discriminative():
    a, b = filter_concepts(_two_classes(), beta=0.1, min_support=0.5)
    assert a.filtered and a.neighbours == ["B"] and b.neighbours == ["A"]
    assert a.kept == ["a red crest", "striped wings"]  # ordered by score
    why = {d["concept"]: d["reason"] for d in a.dropped}
    assert why == {"a round body": "not_discriminative", "a blue crest": "unsupported"}
    s = a.scores["a red crest"]
    assert s["p_c"] == 0.8 and s["p_n"] == 0.1
    assert s["score"] == pytest.approx(0.8 * np.log(0.801 / 0.101), abs=1e-5)
    assert a.scores["a round body"]["score"] == pytest.approx(0.0)
    assert b.kept == ["a yellow crest"]
    assert {d["concept"]: d["reason"] for d in b.dropped} == {
        "a round body": "not_discriminative", "striped wings": "unsupported", "a red crest": "unsupported"}
    assert concepts_by_image([a, b]) == {"test/A/0": a.kept, "test/B/0": b.kept}
    table = concept_table([a, b])
    assert table["kept"].tolist() == [2, 1] and table["dropped unsupported"].tolist() == [1, 2]


def test_beta_changes_the_kept_set_monotonically():
    results = _two_classes()
    kept = [set(filter_concepts(results, beta=beta)[0].kept) for beta in (-1.0, 0.0, 0.1, 0.5, 1.0, 2.0, 5.0)]
    assert all(later <= earlier for earlier, later in zip(kept, kept[1:]))
    assert kept[0] == {"a round body", "a red crest", "striped wings"} and kept[-1] == set()
    assert kept[3] == {"a red crest"}
    # min_support is the other knob: a lower one lets the rarely seen concept through
    assert "a blue crest" in filter_concepts(results, beta=0.1, min_support=0.1)[0].kept
    assert results[0].kept == [] and not results[0].filtered  # inputs untouched


def test_neighbours_come_from_the_similarity():
    results = _two_classes() + [_result("C", {"a red crest": 10, "a round body": 10})]
    sim = Similarity(["A", "B", "C"], np.array([[1, .9, .1], [.9, 1, .2], [.1, .2, 1]]), dict.fromkeys("ABC", "bird"))
    a = filter_concepts(results, sim, neighbours=1)[0]
    assert a.neighbours == ["B"] and a.scores["a red crest"]["p_n"] == 0.1
    a = filter_concepts(results, sim, neighbours=2)[0]
    assert a.neighbours == ["B", "C"] and a.scores["a red crest"]["p_n"] == pytest.approx(0.55)
    # a class with no neighbour: p(k|N(c)) = 0, so every supported concept is discriminative
    alone = filter_concepts([_result("A", {"a round body": 10})], neighbours=3)[0]
    assert alone.neighbours == [] and alone.kept == ["a round body"]
    # other super-categories are never neighbours
    mixed = filter_concepts([_result("A", {"a round body": 10}), _result("Z", {"a round body": 10}, sc="dog")])
    assert mixed[0].neighbours == [] and mixed[0].kept == ["a round body"]
    with pytest.raises(ValueError, match="never filtered"):
        concepts_by_image(results)


def test_class_rates_pool_all_images_of_a_class():
    a0 = _result("A", {"a red crest": 10}, i=0)
    a1 = _result("A", {"a red crest": 0, "a blue crest": 10}, i=1)
    b = _result("B", {})
    r0, r1, _ = filter_concepts([a0, a1, b])
    assert r0.scores["a red crest"]["p_c"] == 0.5 and r1.scores["a blue crest"]["p_c"] == 0.5


def test_save_load_round_trip(tmp_path):
    results = filter_concepts(_two_classes())
    path = save_concepts(tmp_path / "concepts.jsonl", results)
    back = load_concepts(path)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in results]
    (tmp_path / "bad.jsonl").write_text('{"record": {}}\n')
    with pytest.raises(ValueError, match="bad.jsonl: record 1"):
        load_concepts(tmp_path / "bad.jsonl")


# -------------------------------------------------------------------------------------- with a real model
@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tokenizer = build_tokenizer(concept_prompts("bird") + micro_vocabulary("bird") + ["It has This is with and"])
    processor = build_processor(tokenizer)
    return build_tiny_model(tokenizer, "tiny-3m", seed=0), processor


def test_choose_images_one_per_seen_class(bench):
    recs = choose_images(bench)
    assert sorted(r.label for r in recs) == bench.seen_labels()
    assert recs == choose_images(bench) and len(choose_images(bench, per_class=2)) == 2 * len(recs)
    with pytest.raises(ValueError, match="per_class"):
        choose_images(bench, per_class=0)


def test_extract_concepts_for_a_random_model(bench, tiny):
    model, processor = tiny
    recs = choose_images(bench)[:2]
    results = extract_concepts_for(model, processor, bench, recs, samples_per_prompt=1, max_new_tokens=6,
                                   progress=False)
    assert [r.record for r in results] == recs
    for r in results:
        assert len(r.captions) == len(r.prompts) == 10 and r.prompts == concept_prompts("bird")
        assert all(isinstance(c, str) for c in r.captions)
        assert set(r.counts) <= set(micro_vocabulary("bird"))
    filtered = filter_concepts(results, bench.similarity)
    table = concept_table(filtered)
    assert len(table) == 2  # garbage captions: no concepts, reported rather than crashing
    for r, (_, row) in zip(filtered, table.iterrows()):
        assert row["captions"] == 10 and row["concepts found"] == len(r.counts)
        if not r.counts:
            assert r.kept == [] and r.dropped == [] and row["kept concepts"] == "(no concept found)"
    again = extract_concepts_for(model, processor, bench, recs, samples_per_prompt=1, max_new_tokens=6,
                                 progress=False)
    assert [r.captions for r in again] == [r.captions for r in results]  # seeded


def test_extract_concepts_for_bad_inputs(bench):
    rec = choose_images(bench)[0]
    with pytest.raises(ValueError, match=f"{rec.image_id}.*no concept phrases"):
        extract_concepts_for(None, None, bench, [rec], vocabulary_fn=lambda sc: [])
    with pytest.raises(ValueError, match="samples_per_prompt"):
        extract_concepts_for(None, None, bench, [rec], samples_per_prompt=0)
    missing = replace(rec, path="images/nowhere/0000.png")
    with pytest.raises(FileNotFoundError, match="nowhere/0000.png"):
        extract_concepts_for(None, None, bench, [missing])
