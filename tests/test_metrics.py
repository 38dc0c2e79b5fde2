import numpy as np
import pytest

from finer1_lib.metrics import (
    SCORINGS, TI_DROP_LAST_WORDS, SemanticSimilarity, accuracy_reward, closed_world_correct, format_reward,
    get_text_encoder, hash_encoder, official_answer, open_world_prediction, relative_ss, reward, text_inclusion,
    text_inclusion_for,
)

GT = "Laysan Albatross"
GOOD = "<think>white head, dark back</think><answer>Laysan Albatross</answer>"


# ---------------------------------------------------------------- reward (§4.3, cls_thinking.py)
@pytest.mark.parametrize("text, fmt, acc, total", [
    (GOOD, 1.0, 1.0, 1.0),                                                         # well-formed, correct
    ("<think>\nwhite head\n</think>\n\n<answer>laysan albatross</answer>", 1.0, 1.0, 1.0),
    ("Sure! <think>white head</think><answer>Laysan Albatross</answer>", 0.0, 1.0, 0.9),  # malformed, correct
    ("<answer>Laysan Albatross</answer>", 0.0, 1.0, 0.9),                          # no think
    ("<think>white head</think><answer>Sooty Albatross</answer>", 1.0, 0.0, 0.1),  # well-formed, wrong
    ("Laysan Albatross", 0.0, 0.0, 0.0),                                           # garbage / untagged
    ("", 0.0, 0.0, 0.0),
    ("< think > white head </ think > < answer > Laysan Albatross </ answer >", 1.0, 1.0, 1.0),  # whitespace
    ("<think>x</think><answer>It is a Laysan Albatross.</answer>", 1.0, 1.0, 1.0),  # containment
    ("<think>x</think><answer></answer>", 1.0, 0.0, 0.1),                          # empty answer
    ("<think>Laysan Albatross</think><answer>Sooty</answer>", 1.0, 0.0, 0.1),     # name only in think
    ("<think>x</think><answer>Laysan Albatross", 0.0, 0.0, 0.0),                   # unclosed answer
    ("<think>x<answer>Laysan Albatross</answer>", 0.0, 1.0, 0.9),                  # unclosed think
    # repeated tags (official semantics): fullmatch still succeeds, accuracy reads the FIRST answer
    ("<think>x</think><answer>Sooty</answer><answer>Laysan Albatross</answer>", 1.0, 0.0, 0.1),
    ("<think>x</think><answer>Laysan Albatross</answer><answer>Sooty</answer>", 1.0, 1.0, 1.0),
    ("<think>x</think><answer>Laysan Albatross</answer> trailing", 0.0, 1.0, 0.9),
])
def test_reward_hand_values(text, fmt, acc, total):
    assert format_reward(text) == fmt
    assert accuracy_reward(text, GT) == acc
    assert reward(text, GT) == pytest.approx(total)


def test_reward_weights_and_empty_gt():
    assert reward(GOOD, GT, w_acc=0.5, w_fmt=0.5) == pytest.approx(1.0)
    assert reward("<answer>Laysan Albatross</answer>", GT, w_acc=0.7, w_fmt=0.3) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="ground_truth"):
        reward(GOOD, "")


# ---------------------------------------------------------------- closed world
@pytest.mark.parametrize("scoring", SCORINGS)
def test_closed_world_correct_common(scoring):
    assert closed_world_correct(GOOD, GT, scoring)
    assert closed_world_correct("<think>x</think><answer>(A) laysan_albatross</answer>", GT, scoring)
    assert closed_world_correct("<answer>laysan albatross</answer>", "Laysan_Albatross", scoring)
    assert not closed_world_correct("<think>Laysan Albatross vs Sooty Albatross</think><answer>Sooty Albatross</answer>",
                                    GT, scoring)
    assert not closed_world_correct("<think>Laysan Albatross vs Sooty Albatross</think> Laysan Albatross", GT, scoring)
    assert not closed_world_correct("Laysan Albatross", GT, scoring)
    assert not closed_world_correct("<answer>Laysan Albatross", GT, scoring)
    assert not closed_world_correct("<answer></answer>", GT, scoring)
    assert closed_world_correct("<answer>Sooty</answer> x <answer>Laysan Albatross</answer>", GT, scoring)  # greedy


def test_closed_world_default_is_official():
    assert closed_world_correct("< answer >Laysan Albatross</ answer >", GT) is False
    assert closed_world_correct("< answer >Laysan Albatross</ answer >", GT, "strict") is True
    with pytest.raises(ValueError, match="lenient"):
        closed_world_correct(GOOD, GT, "lenient")


def test_official_answer_is_eval_extract_answer():
    assert official_answer("<think>x</think><answer> Laysan </answer>") == "Laysan"
    assert official_answer("<answer>Sooty</answer> x <answer>Laysan</answer>") == "Sooty</answer> x <answer>Laysan"
    assert official_answer("<answer></answer>") == ""
    assert official_answer("< answer >Laysan</answer>") is None and official_answer("<ANSWER>Laysan</ANSWER>") is None
    assert official_answer(None) is None


# The edge cases where the official eval code and the strict rules part ways:
# (output, ground truth, super-category, closed official, closed strict, TI official, TI strict)
EDGE_CASES = {
    "empty answer falls back to the whole output (open world)":
        ("<think>white head: a Laysan Albatross</think><answer></answer>", GT, "bird", False, False, True, False),
    "underscores in the prediction are not spaces (open world)":
        ("<think>x</think><answer>laysan_albatross</answer>", GT, "bird", True, True, False, True),
    "tag case: <Answer> is no tag":
        ("<think>Laysan Albatross?</think><Answer>Sooty Albatross</Answer>", GT, "bird", False, False, True, False),
    "tag case, right answer":
        ("<Answer>Laysan Albatross</Answer>", GT, "bird", False, True, True, True),
    "spaces inside tags: < answer > is no tag":
        ("<think>Laysan Albatross or Sooty Albatross</think>< answer >Sooty Albatross</ answer >", GT, "bird",
         False, False, True, False),
    "spaces inside tags, right answer":
        ("< answer >Laysan Albatross</ answer >", GT, "bird", False, True, True, True),
    "whitespace runs are not collapsed":
        ("<answer>Laysan   Albatross</answer>", GT, "bird", False, True, False, True),
    "cars: year and body dropped, case kept apart":
        ("<answer>AUDI S5 coupe</answer>", "Audi S5 Coupe 2012", "car", False, False, True, True),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_scoring_edge_cases_official_vs_strict(case):
    text, gt, sc, closed_off, closed_strict, ti_off, ti_strict = EDGE_CASES[case]
    assert closed_world_correct(text, gt) is closed_off            # default = official
    assert closed_world_correct(text, gt, "official") is closed_off
    assert closed_world_correct(text, gt, "strict") is closed_strict
    assert text_inclusion_for(sc, text, gt) is ti_off
    assert text_inclusion_for(sc, text, gt, "official") is ti_off
    assert text_inclusion_for(sc, text, gt, "strict") is ti_strict


def test_open_world_prediction():
    for scoring in SCORINGS:
        assert open_world_prediction(GOOD, scoring) == "Laysan Albatross"
        assert open_world_prediction("  It is a Laysan Albatross.\n", scoring) == "It is a Laysan Albatross."
        assert open_world_prediction("<think>x</think><answer>Laysan", scoring) == "<think>x</think><answer>Laysan"
        assert open_world_prediction(None, scoring) == ""
    empty = "<think>a Laysan Albatross</think><answer> </answer>"
    assert open_world_prediction(empty) == empty                    # official: the whole output
    assert open_world_prediction(empty, "strict") == ""
    assert open_world_prediction("< answer >Laysan</answer >") == "< answer >Laysan</answer >"
    assert open_world_prediction("< answer >Laysan</answer >", "strict") == "Laysan"


# ---------------------------------------------------------------- text inclusion
@pytest.mark.parametrize("scoring", SCORINGS)
def test_text_inclusion(scoring):
    assert text_inclusion(GOOD, GT, scoring=scoring)
    assert text_inclusion("It is a laysan albatross", "Laysan_Albatross", scoring=scoring)  # untagged: whole output
    assert not text_inclusion("<think>Laysan Albatross</think><answer>Albatross</answer>", GT, scoring=scoring)
    assert not text_inclusion("<answer>Laysan</answer>", GT, scoring=scoring)


@pytest.mark.parametrize("scoring", SCORINGS)
def test_text_inclusion_cars_drop_year_and_body(scoring):
    assert TI_DROP_LAST_WORDS == {"car": 2}
    out = "<think>x</think><answer>Audi S5</answer>"
    assert text_inclusion_for("car", out, "Audi S5 Coupe 2012", scoring)
    assert not text_inclusion(out, "Audi S5 Coupe 2012", scoring=scoring)
    assert text_inclusion(out, "Audi S5 Coupe 2012", drop_last_words=2, scoring=scoring)
    assert not text_inclusion_for("car", "<answer>Audi A5</answer>", "Audi S5 Coupe 2012", scoring)
    assert not text_inclusion_for("bird", "<answer>Laysan</answer>", "Laysan Albatross Bird 2012", scoring)
    # too short to drop: whole gt used instead of matching everything
    assert not text_inclusion_for("car", "<answer>Audi</answer>", "Tesla Model", scoring)
    with pytest.raises(ValueError, match="plane"):
        text_inclusion_for("plane", out, "Audi S5 Coupe 2012", scoring)


# ---------------------------------------------------------------- relative SS (Eq. 5)
def test_relative_ss_hand_values():
    assert relative_ss(0.8, 0.6) == pytest.approx(0.5)
    assert relative_ss(0.5, 0.6) == 0.0
    assert relative_ss(1.0, 0.6) == pytest.approx(1.0)
    assert relative_ss(0.6, 0.6) == 0.0
    assert relative_ss(0.9, 0.0) == pytest.approx(0.9)
    assert relative_ss(0.3, 1.0) == 0.0       # guard s0 == 1
    assert relative_ss(1.0, 1.0) == 1.0
    assert isinstance(relative_ss(0.8, 0.6), float)
    np.testing.assert_allclose(relative_ss(np.array([0.8, 0.5, 1.0]), np.array([0.6, 0.6, 1.0])), [0.5, 0.0, 1.0])


class FakeEncoder:
    """Hand-chosen unit vectors; records every string it is asked to encode."""

    VECS = {"Beagle": [1.0, 0.0], "Basset Hound": [0.8, 0.6], "dog": [0.6, 0.8], "Pug": [0.0, 1.0]}

    def __init__(self):
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return np.array([self.VECS[t] for t in texts])


def test_semantic_similarity_fake_encoder_by_hand():
    enc = FakeEncoder()
    ss = SemanticSimilarity(enc)
    # s = Sim(Basset, Beagle) = 0.8, s0 = Sim(dog, Beagle) = 0.6 -> (0.8-0.6)/(1-0.6) = 0.5
    # Pug: s = 0 < s0 -> 0; exact match -> 1
    out = ss.score(["Basset Hound", "Pug", "Beagle"], ["Beagle"] * 3, ["dog", "dog", "dog"])
    np.testing.assert_allclose(out, [0.5, 0.0, 1.0])
    assert len(enc.calls) == 1                      # one batched encode
    assert "dog" in enc.calls[0] and "object" not in enc.calls[0]
    assert len(enc.calls[0]) == len(set(enc.calls[0]))  # deduplicated
    np.testing.assert_allclose(ss.similarity(["Basset Hound"], ["dog"]), [0.96])
    np.testing.assert_allclose(ss.score(["Basset Hound"], ["Beagle"], "dog"), [0.5])


def test_semantic_similarity_errors():
    ss = SemanticSimilarity(FakeEncoder())
    with pytest.raises(ValueError, match="object"):
        ss.score(["Pug"], ["Beagle"], ["object"])
    with pytest.raises(ValueError, match="length"):
        ss.score(["Pug", "Pug"], ["Beagle"], ["dog"])
    assert ss.score([], [], []).shape == (0,)


def test_semantic_similarity_hash_encoder():
    enc = get_text_encoder("hash")
    e = enc(["Black Footed Albatross", "black  footed albatross", "Pug"])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0)
    assert e[0] @ e[1] == pytest.approx(1.0)          # case/whitespace insensitive
    np.testing.assert_array_equal(hash_encoder()(["Pug"]), hash_encoder()(["Pug"]))  # deterministic
    ss = SemanticSimilarity(enc)
    out = ss.score(["Black Footed Albatross", "bird", "Black Albatross", "Pug"],
                   ["Black Footed Albatross"] * 4, "bird")
    assert out[0] == pytest.approx(1.0)
    assert out[1] == 0.0
    assert 0.0 < out[2] < 1.0
    assert out[3] < out[2]


def test_get_text_encoder_unknown():
    with pytest.raises(ValueError, match="clip"):
        get_text_encoder("clip")


def test_semantic_similarity_minilm():
    ss = SemanticSimilarity(get_text_encoder("minilm"))
    gt = "Black Footed Albatross"
    assert ss.similarity([gt], [gt])[0] == pytest.approx(1.0, abs=1e-5)
    out = ss.score([gt, "bird", "Laysan Albatross"], [gt] * 3, ["bird"] * 3)
    assert out[0] == pytest.approx(1.0, abs=1e-5)
    assert out[1] == 0.0
    assert 0.0 < out[2] < 1.0
