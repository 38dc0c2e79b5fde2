"""Structured rationales (Table 5 tags), similar-species candidates and the micro world's corpus."""
import random
import re

import pytest

from finer1_lib import rationale
from finer1_lib.model import build_tokenizer
from finer1_lib.pretrain import TASKS, make_example
from finer1_lib.prompts import is_well_formed, parse_response, parse_structured_cot
from finer1_lib.rationale import corpus, similar_species, write_rationale
from finer1_lib.records import SUPER_CATEGORIES
from finer1_lib.world import SCHEMAS, World


@pytest.fixture(scope="module")
def world():
    return World(0)


def _sentences(comparison: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", comparison.strip()) if s]


def _sentence_about(comparison: str, name: str) -> str:
    found = [s for s in _sentences(comparison) if re.search(rf"\b{re.escape(name)}\b", s)]
    assert len(found) == 1, (name, comparison)
    return found[0]


def _is_match_sentence(sentence: str, name: str) -> bool:
    for template in rationale._MATCH + rationale._MATCH_ONE:
        pattern = re.escape(template).replace(re.escape("{name}"), re.escape(name)).replace(
            re.escape("{features}"), ".+")
        if re.fullmatch(pattern, sentence):
            return True
    return False


def _cases(world):
    """(super_category, observed species, candidates, rng seed) over every super-category."""
    for sc in SUPER_CATEGORIES:
        for j, sp in enumerate(world.species_of(sc)[::3]):
            rng = random.Random(f"{sc}-{j}")
            cands = similar_species(world, dict(sp.attributes), sc, k=rng.choice([2, 3, 4, 6]), rng=rng)
            yield sc, sp, rng.sample(cands, len(cands)), j


# ----------------------------------------------------------------------------------------- write_rationale


def test_rationale_parses_into_the_four_fields(world):
    n = 0
    for sc, sp, cands, seed in _cases(world):
        text = write_rationale(sc, dict(sp.attributes), cands, sp.name, random.Random(seed))
        assert is_well_formed(text)
        resp = parse_response(text)
        assert resp["well_formed"] and resp["answer"] == sp.name
        cot = parse_structured_cot(text)
        assert set(cot) == {"analysis", "options", "comparison", "prediction"}
        assert cot["options"] == [c.name for c in cands]
        assert cot["prediction"] == sp.name
        assert cot["analysis"] and cot["comparison"]
        # the analysis states every observed attribute
        for d in SCHEMAS[sc].dims:
            assert d.say(sp.attributes[d.name]) in cot["analysis"]
        assert len(_sentences(cot["comparison"])) == len(cands)
        n += 1
    assert n >= 30


def test_answer_tag_is_the_given_answer_even_if_not_best(world):
    sp = world.species_of("car")[5]
    cands = similar_species(world, dict(sp.attributes), "car", k=4)
    other = cands[-1].name
    text = write_rationale("car", dict(sp.attributes), cands, other, random.Random(0))
    assert parse_response(text)["answer"] == other
    assert parse_structured_cot(text)["prediction"] == other


def test_comparison_names_mismatches_and_matches(world):
    mismatches = matches = 0
    for sc, sp, cands, seed in _cases(world):
        observed = dict(sp.attributes)
        cot = parse_structured_cot(write_rationale(sc, observed, cands, sp.name, random.Random(seed)))
        for c in cands:
            sentence = _sentence_about(cot["comparison"], c.name)
            diff = [d for d in SCHEMAS[sc].dims if c.attributes[d.name] != observed[d.name]]
            if diff:
                mismatches += 1
                assert not _is_match_sentence(sentence, c.name), sentence
                for d in diff:  # both the candidate's value and the observed one are named
                    assert d.say(c.attributes[d.name]) in sentence, (d.name, sentence)
                    assert d.say(observed[d.name]) in sentence, (d.name, sentence)
            else:
                matches += 1
                assert _is_match_sentence(sentence, c.name), sentence
    assert matches >= 30 and mismatches >= 30  # both kinds were exercised


def test_partial_observation_only_compares_observed_dims(world):
    sp = world.species_of("bird")[0]
    schema = SCHEMAS["bird"]
    keep = [schema.genus_dims[0].name, schema.species_dims[0].name]
    observed = {k: sp.attributes[k] for k in keep}
    cands = [s for s in world.species_of("bird") if s != sp][:5] + [sp]
    cot = parse_structured_cot(write_rationale("bird", observed, cands, sp.name, random.Random(1)))
    observed_phrases = [d.say(sp.attributes[d.name]) for d in schema.dims if d.name in keep]
    assert f"{observed_phrases[0]} and {observed_phrases[1]}." in cot["analysis"]  # only the observed ones
    for d in schema.dims:
        if d.name not in keep:
            assert d.say(sp.attributes[d.name]) not in cot["analysis"]
    for c in cands:
        sentence = _sentence_about(cot["comparison"], c.name)
        diff = [k for k in keep if c.attributes[k] != observed[k]]
        assert _is_match_sentence(sentence, c.name) == (not diff), sentence


def test_rationale_errors(world):
    sp = world.species_of("dog")[0]
    with pytest.raises(ValueError, match="no observed attributes"):
        write_rationale("dog", {}, [sp], sp.name, random.Random(0))
    with pytest.raises(ValueError, match="no observed attributes"):
        write_rationale("dog", {"not-a-dim": "x"}, [sp], sp.name, random.Random(0))
    with pytest.raises(ValueError, match="at least one candidate"):
        write_rationale("dog", dict(sp.attributes), [], sp.name, random.Random(0))


def test_rationale_is_deterministic_in_rng(world):
    sp = world.species_of("pet")[3]
    cands = similar_species(world, dict(sp.attributes), "pet", k=4)
    a = write_rationale("pet", dict(sp.attributes), cands, sp.name, random.Random(7))
    b = write_rationale("pet", dict(sp.attributes), cands, sp.name, random.Random(7))
    assert a == b


# ----------------------------------------------------------------------------------------- similar_species


def test_similar_species_ranks_the_species_itself_first(world):
    for sp in world.species:
        ranked = similar_species(world, dict(sp.attributes), sp.super_category, k=5, rng=random.Random(3))
        assert ranked[0] == sp
        assert len(ranked) == 5 and len(set(s.name for s in ranked)) == 5
        assert all(s.super_category == sp.super_category for s in ranked)
        shared = [sum(s.attributes[d] == v for d, v in sp.attributes.items()) for s in ranked]
        assert shared[0] == len(sp.attributes) > shared[1]
        assert shared == sorted(shared, reverse=True)


def test_similar_species_k_larger_than_pool(world):
    sp = world.species_of("flower")[0]
    everything = similar_species(world, dict(sp.attributes), "flower", k=1000)
    assert len(everything) == len(world.species_of("flower"))


# ----------------------------------------------------------------------------------------- corpus


def test_corpus_covers_pretraining_examples(world):
    """Every word of every pretraining task is in the tokenizer the pretraining builds (no [UNK])."""
    from finer1_lib.pretrain import pretrain_corpus

    tokenizer = build_tokenizer(pretrain_corpus(world))
    unk = tokenizer.unk_token_id
    rng = random.Random(0)
    n = 0
    for i in range(210):
        task = TASKS[i % len(TASKS)]
        ex = make_example(world, task, rng, naming_images=2)
        for text in (ex.prompt, ex.response, ex.system or ""):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            bad = [t for t, j in zip(tokenizer.convert_ids_to_tokens(ids), ids) if j == unk]
            assert not bad, (task, text)
            assert tokenizer.decode(ids) == text  # word-level tokenizer: exact round trip
        n += 1
    assert n == 210
