import pytest

from finer1_lib.prompts import (
    CLOSED_WORLD_TEMPLATE, SFT_SYSTEM_PROMPT, TAPO_SUFFIX, answer_span, closed_world_prompt,
    cot_teacher_prompt, extract_tag, format_answer, is_well_formed, open_world_prompt,
    parse_response, parse_structured_cot, split_options, step_by_step, tapo_prompt,
)

Q = "What is the name of the bird in this image?"
OPTS = ["Laysan Albatross", "Black Footed Albatross", "Sooty Albatross", "Crested Auklet"]


# ---------------------------------------------------------------- prompts
def test_system_prompt_is_r1_style():
    assert SFT_SYSTEM_PROMPT.startswith("A conversation between User and Assistant.")
    assert SFT_SYSTEM_PROMPT.endswith("<think> reasoning process here </think><answer> answer here </answer>")


def test_closed_world_prompt_contains_list_repr():
    p = closed_world_prompt(Q, OPTS)
    assert repr(OPTS) in p
    assert "['Laysan Albatross', 'Black Footed Albatross'," in p
    assert p.startswith(f"Given the question: {Q}, based on the options provided in [")
    assert "final choice in <answer> </answer> tags" in p
    assert p == CLOSED_WORLD_TEMPLATE.format(question=Q, options=repr(OPTS))
    assert closed_world_prompt(Q, tuple(OPTS)) == p  # tuple rendered as a list


def test_open_world_and_tapo_prompts():
    assert open_world_prompt(Q) == (f"Given the question: {Q}. This is a fine-grained question. "
                                    "Output reasoning in <think></think> and the final answer in <answer></answer>.")
    t = tapo_prompt("  " + Q + "\n")
    assert t == Q + "\n\n" + TAPO_SUFFIX
    assert t.endswith("Then, provide your final answer enclosed within <answer> </answer> tags.")


def test_cot_teacher_prompt_table5():
    p = cot_teacher_prompt("Laysan Albatross", ["white head", "dark back", "pink bill"], Q)
    assert p.startswith("This is a picture of a Laysan Albatross with the following visual features: "
                        "white head, dark back, pink bill. Based on the information provided")
    assert f"Question: {Q}. Note that you MUST first analyze" in p
    assert "at most four candidate subcategories of the same super-category" in p
    for tag in ("analysis", "options", "comparison", "prediction"):
        assert f"<{tag}></{tag}>" in p
    assert p.endswith("<prediction>predicted subcategory here</prediction>.")
    assert "`" not in p


def test_step_by_step():
    assert step_by_step("Which bird?") == "Which bird? Let's think step by step."


@pytest.mark.parametrize("bad, name", [
    (lambda: closed_world_prompt("", OPTS), "question"),
    (lambda: closed_world_prompt("   ", OPTS), "question"),
    (lambda: closed_world_prompt(Q, ["Laysan Albatross"]), "options"),
    (lambda: closed_world_prompt(Q, ["Laysan Albatross", "laysan_albatross"]), "options"),
    (lambda: closed_world_prompt(Q, "Laysan Albatross, Sooty Albatross"), "options"),
    (lambda: closed_world_prompt(Q, ["Laysan Albatross", ""]), "options"),
    (lambda: open_world_prompt(""), "question"),
    (lambda: tapo_prompt(""), "question"),
    (lambda: cot_teacher_prompt("Laysan Albatross", [], Q), "concepts"),
    (lambda: cot_teacher_prompt("", ["white head"], Q), "label"),
    (lambda: cot_teacher_prompt("Laysan Albatross", ["white head"], ""), "question"),
])
def test_bad_inputs_raise(bad, name):
    with pytest.raises(ValueError, match=name):
        bad()


def test_format_answer_roundtrip():
    s = format_answer("white head", "Laysan Albatross")
    assert s == "<think>white head</think><answer>Laysan Albatross</answer>"
    assert parse_response(s) == {"think": "white head", "answer": "Laysan Albatross", "well_formed": True}


# ---------------------------------------------------------------- tags
@pytest.mark.parametrize("text, expected", [
    ("<answer>Laysan</answer>", "Laysan"),
    ("< Answer >  Laysan \n</ ANSWER >", "Laysan"),
    ("<answer>Sooty</answer> then <answer>Laysan</answer>", "Laysan"),   # last complete
    ("<answer>Sooty <answer>Laysan</answer>", "Laysan"),
    ("<answer></answer>", ""),
    ("no tags at all", None),
    ("Laysan</answer>", None),
    ("<answer>Laysan", None),                                            # unclosed
    ("<answer>Sooty</answer><answer>Laysan", None),                      # unclosed final tag
    ("", None),
])
def test_extract_tag(text, expected):
    assert extract_tag(text, "answer") == expected


def test_extract_tag_allow_unclosed():
    assert extract_tag("<think>x</think><answer> Laysan Alb", "answer", allow_unclosed=True) == "Laysan Alb"
    assert extract_tag("<answer>A</answer>", "answer", allow_unclosed=True) == "A"


def test_answer_span_is_official_greedy():
    assert answer_span("<answer>Sooty</answer> x <answer>Laysan</answer>") == "Sooty</answer> x <answer>Laysan"
    assert answer_span("<answer>Laysan") is None
    assert answer_span("< answer >Laysan</answer >") == "Laysan"


def test_parse_response_variants():
    r = parse_response("<think>\nwhite head\n</think>\n\n<answer>Laysan Albatross</answer>")
    assert r == {"think": "white head", "answer": "Laysan Albatross", "well_formed": True}
    r = parse_response("<think>white head</think> Laysan Albatross")
    assert r == {"think": "white head", "answer": None, "well_formed": False}
    r = parse_response("<think>cut here because max tok")
    assert r == {"think": None, "answer": None, "well_formed": False}
    assert parse_response("< think >a</ think > < answer >b</answer>")["well_formed"] is True
    assert parse_response("preamble <think>a</think><answer>b</answer>")["well_formed"] is False
    assert is_well_formed("<think>a</think><answer>b</answer> trailing") is False


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("text, expected", [
    ("Laysan Albatross, Black Footed Albatross, Sooty Albatross", ["Laysan Albatross", "Black Footed Albatross", "Sooty Albatross"]),
    ("Laysan Albatross; Sooty Albatross;", ["Laysan Albatross", "Sooty Albatross"]),
    ("Laysan Albatross\n\nSooty Albatross\n", ["Laysan Albatross", "Sooty Albatross"]),
    ("1. Laysan Albatross 2. Sooty Albatross 3. Crested Auklet", ["Laysan Albatross", "Sooty Albatross", "Crested Auklet"]),
    ("1) Laysan Albatross\n2) Sooty Albatross", ["Laysan Albatross", "Sooty Albatross"]),
    ("(a) Boeing 737-200 (b) Boeing 747-400", ["Boeing 737-200", "Boeing 747-400"]),
    ("a) Audi S5 Coupe 2012\nb) Audi A5 Coupe 2012", ["Audi S5 Coupe 2012", "Audi A5 Coupe 2012"]),
    ("- **Laysan Albatross**\n- Sooty Albatross", ["Laysan Albatross", "Sooty Albatross"]),
    ("Laysan Albatross, Sooty Albatross, and Crested Auklet.", ["Laysan Albatross", "Sooty Albatross", "Crested Auklet"]),
    ("['Laysan Albatross', 'Sooty Albatross']", ["Laysan Albatross", "Sooty Albatross"]),
    ("Canadair CL-600 (CRJ-100, CRJ-200), Saab 340", ["Canadair CL-600 (CRJ-100, CRJ-200)", "Saab 340"]),
    ("Laysan Albatross, laysan albatross, , ", ["Laysan Albatross"]),
    ("", []),
    (None, []),
])
def test_split_options(text, expected):
    assert split_options(text) == expected


# ---------------------------------------------------------------- structured CoT
TAG_COT = (
    "<analysis>The bird has a white head, dark upper wings and a pink bill.</analysis>\n"
    "<options>1. Laysan Albatross 2. Black Footed Albatross 3. Sooty Albatross 4. Crested Auklet</options>\n"
    "<comparison>The Black Footed Albatross is dark overall; the Laysan has a white head.</comparison>\n"
    "<prediction>Laysan Albatross</prediction>"
)

HEADED_COT = """<think> **Analysis of Visual Features:**
The bird in the image is a large seabird with the following features:
1. Head: white head and neck.
2. Wings: long, narrow, dark grey-brown upper wings.
3. Bill: pinkish bill with a dark tip.

---

### Candidate Subcategories:
Based on these features, the bird belongs to the super-category of albatrosses. Here are four candidates:

1. **Laysan Albatross**: white head, dark back, pink bill.
   - Nests on the Hawaiian islands.
2. Black Footed Albatross
   - Mostly dark brown plumage.
3. Sooty Albatross (Phoebetria fusca)
4. Crested Auklet

**Comparison Process:**
 1. Laysan Albatross:
   - White head: matches the image.
 2. Black Footed Albatross:
   - Dark head: does not match.

**Final Prediction:** The bird is most likely a Laysan Albatross.

 Final Answer:
The analysis of candidate subcategories:
Laysan Albatross, Black Footed Albatross, Sooty Albatross, Crested Auklet
The prediction is: Laysan Albatross
</think>

<answer>Laysan Albatross</answer>"""


def test_parse_structured_cot_tags():
    r = parse_structured_cot(TAG_COT)
    assert r == {
        "analysis": "The bird has a white head, dark upper wings and a pink bill.",
        "options": ["Laysan Albatross", "Black Footed Albatross", "Sooty Albatross", "Crested Auklet"],
        "comparison": "The Black Footed Albatross is dark overall; the Laysan has a white head.",
        "prediction": "Laysan Albatross",
    }


def test_parse_structured_cot_tags_missing_and_unclosed():
    r = parse_structured_cot("<analysis>white head</analysis><options>Laysan Albatross, Sooty Albatross</options>"
                             "<comparison>cut off")
    assert r == {"analysis": "white head", "options": ["Laysan Albatross", "Sooty Albatross"],
                 "comparison": None, "prediction": None}


def test_parse_structured_cot_headed_official_form():
    r = parse_structured_cot(HEADED_COT)
    assert r["analysis"].startswith("The bird in the image is a large seabird")
    assert r["analysis"].endswith("3. Bill: pinkish bill with a dark tip.")
    assert "---" not in r["analysis"] and "Candidate" not in r["analysis"]
    assert r["options"] == ["Laysan Albatross", "Black Footed Albatross",
                            "Sooty Albatross (Phoebetria fusca)", "Crested Auklet"]
    assert r["comparison"].startswith("1. Laysan Albatross:")
    assert "Dark head: does not match." in r["comparison"] and "Final" not in r["comparison"]
    assert r["prediction"] == "Laysan Albatross"


def test_parse_structured_cot_headed_variants():
    # "Step N:" prefixes, headings without colons, no <answer>: prediction from "The prediction is:".
    text = ("<think>Intro line.\n\n Step 1: Analyze Visual Features\n- Coat: long, silky.\n\n"
            " Step 2: Candidate Subcategories\nThe candidates could include:\n- Lhasa Apso\n- Shih Tzu\n"
            "- Pekingese: flat face\n\n Step 3: Comparison Process\n- Lhasa Apso: long coat.\n\n"
            " Step 4: Final Prediction\nThe dog is a Lhasa Apso.\nThe prediction is: Lhasa Apso.\n</think>")
    r = parse_structured_cot(text)
    assert r["analysis"] == "Intro line.\n\n- Coat: long, silky."
    assert r["options"] == ["Lhasa Apso", "Shih Tzu", "Pekingese"]
    assert r["comparison"] == "- Lhasa Apso: long coat."
    assert r["prediction"] == "Lhasa Apso"


def test_parse_structured_cot_headed_comma_list_and_fallback():
    text = ("### Analysis of the Bird's Appearance\nWhite head.\n\n### Candidate Subcategories\n"
            "Laysan Albatross, Sooty Albatross\n\n### Final Prediction\nLaysan Albatross")
    r = parse_structured_cot(text)
    assert r == {"analysis": "White head.", "options": ["Laysan Albatross", "Sooty Albatross"],
                 "comparison": None, "prediction": "Laysan Albatross"}
    # candidates only in the "The analysis of candidate subcategories:" summary block
    text = ("Analysis of Visual Features:\nWhite head.\n\nFinal Answer:\nThe analysis of candidate subcategories: \n"
            "1. Laysan Albatross\n2. Sooty Albatross\n\n<answer>Laysan Albatross</answer>")
    assert parse_structured_cot(text)["options"] == ["Laysan Albatross", "Sooty Albatross"]


def test_parse_structured_cot_nothing():
    assert parse_structured_cot("just an answer") == {"analysis": None, "options": [], "comparison": None,
                                                      "prediction": None}


# ---------------------------------------------------------------- the official release's shapes
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_stage1 as s1  # noqa: E402


@pytest.mark.parametrize("case", [c[0] for c in s1.CASES])
def test_parse_structured_cot_official_shapes(case):
    """Headed, heading-less (only "The analysis of candidate subcategories:" and "The prediction is:"), analysis
    heading only, comma / numbered / bulleted lists, parenthesised extras: all give the four sections."""
    _, rec, want = next(c for c in s1.CASES if c[0] == case)
    r = parse_structured_cot(rec["messages"][2]["content"])
    assert r["options"] == want["options"]
    assert r["analysis"].startswith(want["analysis"]) and "candidate subcategories:" not in r["analysis"]
    assert want["comparison"] in r["comparison"] and want["not_in_comparison"] not in r["comparison"]
    assert r["prediction"] == want["prediction"]


def test_parse_structured_cot_headingless_without_answer_tag():
    text = s1.HEADINGLESS_COMMAS  # no <think>, no <answer>: the prediction sentence gives the prediction
    r = parse_structured_cot(text)
    assert r["options"] == ["Scottish Deerhound", "Irish Wolfhound", "Great Dane", "Greyhound"]
    assert r["prediction"] == "Scottish Deerhound" and r["analysis"].startswith("The dog has")


def test_parse_structured_cot_candidate_list_ends_where_the_comparison_starts():
    text = ("<think>White head.\n\nThe analysis of candidate subcategories: \n1. Laysan Albatross\n"
            "2. Sooty Albatross\n\n1. Laysan Albatross: white head, matches.\n2. Sooty Albatross: dark head.\n\n"
            "The prediction is: Laysan Albatross</think><answer>Laysan Albatross</answer>")
    r = parse_structured_cot(text)
    assert r["options"] == ["Laysan Albatross", "Sooty Albatross"]            # numbering restarts: comparison
    assert r["comparison"].startswith("1. Laysan Albatross: white head")
    # a bare list and nothing else: the candidates' descriptions are the comparison
    text = ("<think>White head.\n\nThe analysis of candidate subcategories: \n- Laysan Albatross: white head.\n"
            "- Sooty Albatross: dark head.\nThe prediction is: Laysan Albatross</think><answer>Laysan Albatross</answer>")
    r = parse_structured_cot(text)
    assert r["options"] == ["Laysan Albatross", "Sooty Albatross"]
    assert r["comparison"] == "- Laysan Albatross: white head.\n- Sooty Albatross: dark head."


def test_parse_structured_cot_intro_sentence_with_a_comma_is_not_a_list():
    text = ("<think>White head.\n\nThe analysis of candidate subcategories: \nBased on the visual features, the "
            "following candidate subcategories could be considered.\n\n1. Laysan Albatross\n2. Sooty Albatross\n\n"
            "The Laysan has a white head.\nThe prediction is: Laysan Albatross</think><answer>Laysan Albatross</answer>")
    r = parse_structured_cot(text)
    assert r["options"] == ["Laysan Albatross", "Sooty Albatross"]
    assert r["comparison"] == "The Laysan has a white head."


def test_parse_structured_cot_candidate_sentence_wins_inside_the_candidate_section():
    # the section first lists broader groups, then the candidate sentence gives the four names
    text = ("<think> Analysis of Visual Features:\nA small single-engine airplane.\n\n Candidate Subcategories:\n"
            "The relevant subcategories are:\n- Cirrus SR-20\n- Cirrus SR-22\n- Other Cirrus models (e.g., SR-20T)\n\n"
            "However, we focus on the closest.\n\nThe analysis of candidate subcategories: \n1. Cirrus SR-20\n"
            "2. Cirrus SR-22\n3. Cirrus SR-20T\n4. Cirrus Vision SF50\n\n\n---\n\n Comparison Process:\n"
            " 1. Cirrus SR-20 vs. Cirrus SR-22:\n- The SR-20 is smaller.\n\n Final Prediction:\nThe SR-20.\n\n"
            "The prediction is: Cirrus SR-20</think>\n\n<answer>SR-20</answer>")
    r = parse_structured_cot(text)
    assert r["options"] == ["Cirrus SR-20", "Cirrus SR-22", "Cirrus SR-20T", "Cirrus Vision SF50"]
    assert r["comparison"] == "1. Cirrus SR-20 vs. Cirrus SR-22:\n- The SR-20 is smaller." and r["prediction"] == "SR-20"
