"""The micro world's language: captions, field-guide questions and structured rationales.

One writer for the structured reasoning of paper Table 5 (<analysis>, <options>, <comparison>,
<prediction>) serves two places, so they speak the same language:

* pretraining's text-only reasoning over the field guide (what a real MLLM has read plenty of), and
* the knowledge-base teacher that stands in for Qwen2.5-VL-32B when building the CoT SFT set (paper §4.2).

Candidates are the species most similar to what is observed, seen or unseen alike, and the comparison recalls
each candidate's field-guide attributes; that is what lets reasoning transfer to unseen species.
"""
from __future__ import annotations

import random
from typing import Sequence

from .prompts import format_answer
from .records import SUPER_CATEGORY_WORD
from .world import SCHEMAS, Species, World, join_phrases

__all__ = [
    "article", "caption_text", "attribute_questions", "CAPTION_PROMPTS", "NAME_PROMPTS", "SUPER_PROMPTS",
    "KNOWLEDGE_PROMPTS", "similar_species", "write_rationale", "corpus",
]

CAPTION_PROMPTS = (
    "Describe this {word}.",
    "What does this {word} look like?",
    "Describe the {word} in the image.",
    "List the visual features of this {word}.",
    "What features does this {word} have?",
)
SUPER_PROMPTS = (
    "What is in this image?",
    "What kind of object is shown here?",
    "Which category does this image belong to?",
)
NAME_PROMPTS = (
    "What is the name of this {word}?",
    "Which species is this {word}?",
)
KNOWLEDGE_PROMPTS = (  # name -> description
    "Describe the {name}.",
    "What does the {name} look like?",
    "Tell me about the {name}.",
)
REVERSE_PROMPTS = (  # description -> name
    "Which {word} has {features}?",
    "Name the {word} with {features}.",
    "{A_word} has {features}. What is it called?",
)
_ANALYSIS = (
    "The {word} has {features}.",
    "I see a {word} with {features}.",
    "This {word} shows {features}.",
)
_MATCH = (
    "The {name} has {features}, which all match.",
    "Everything matches the {name}: {features}.",
    "The {name} has {features}, as observed.",
)
_MATCH_ONE = (
    "The {name} has {features}, which matches.",
    "The {name} has {features}, as observed.",
)
_MISMATCH = (
    "The {name} has {theirs} rather than {ours}.",
    "The {name} would show {theirs}, but this {word} has {ours}.",
    "The {name} has {theirs}, which does not match {ours}.",
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_text(species: Species, rng: random.Random | None = None) -> str:
    """An image's attribute caption: "This is a bird with a round body, ... and a white breast"."""
    word = SUPER_CATEGORY_WORD[species.super_category]
    lead = rng.choice(("This is", "The image shows", "It is")) if rng else "This is"
    return f"{lead} {article(word)} {word} with {join_phrases(species.phrases())}."


def attribute_questions(species: Species) -> list[tuple[str, str]]:
    """(question, answer) about one attribute each, e.g. ("Describe the crest of this bird.", "It has a red crest.")."""
    word = SUPER_CATEGORY_WORD[species.super_category]
    return [(f"Describe the {d.name} of this {word}.", f"It has {d.say(species.attributes[d.name])}.")
            for d in SCHEMAS[species.super_category].dims]


def similar_species(world: World, observed: dict[str, str], super_category: str, k: int = 4,
                    rng: random.Random | None = None) -> list[Species]:
    """The ``k`` species of ``super_category`` sharing most attribute values with ``observed`` (ties random)."""
    rng = rng or random.Random(0)
    pool = world.species_of(super_category)
    keyed = [(-sum(s.attributes.get(d) == v for d, v in observed.items()), rng.random(), s) for s in pool]
    return [s for *_, s in sorted(keyed, key=lambda t: (t[0], t[1]))[:k]]


def write_rationale(super_category: str, observed: dict[str, str], candidates: Sequence[Species], answer: str,
                    rng: random.Random) -> str:
    """A structured CoT (Table 5 tags inside <think>) followed by <answer>; ``observed`` maps dim -> value.

    Analysis: the observed attributes. Options: candidate names. Comparison: for each candidate, its
    field-guide attributes against the observed ones (mismatches named, else a full match). Prediction and
    answer: ``answer`` (the caller decides; the KB teacher passes the best-matching candidate).
    """
    word = SUPER_CATEGORY_WORD[super_category]
    dims = [d for d in SCHEMAS[super_category].dims if d.name in observed]
    if not dims:
        raise ValueError(f"no observed attributes to reason about for a {word}")
    if not candidates:
        raise ValueError("a rationale needs at least one candidate")
    features = join_phrases([d.say(observed[d.name]) for d in dims])
    analysis = rng.choice(_ANALYSIS).format(word=word, features=features)
    comparisons = []
    for sp in candidates:
        diff = [d for d in dims if sp.attributes[d.name] != observed[d.name]]
        if diff:
            comparisons.append(rng.choice(_MISMATCH).format(
                name=sp.name, word=word, theirs=join_phrases([d.say(sp.attributes[d.name]) for d in diff]),
                ours=join_phrases([d.say(observed[d.name]) for d in diff])))
        else:
            species_dims = [d for d in SCHEMAS[super_category].species_dims if d in dims] or dims
            templates = _MATCH if len(species_dims) > 1 else _MATCH_ONE
            comparisons.append(rng.choice(templates).format(
                name=sp.name, features=join_phrases([d.say(sp.attributes[d.name]) for d in species_dims])))
    think = (f"<analysis>{analysis}</analysis><options>{', '.join(s.name for s in candidates)}</options>"
             f"<comparison>{' '.join(comparisons)}</comparison><prediction>{answer}</prediction>")
    return format_answer(think, answer)


def corpus(world: World) -> list[str]:
    """Every text the micro-world model reads or writes (the tokenizer's vocabulary is built from it)."""
    from .prompts import (CLOSED_WORLD_TEMPLATE, COT_TEACHER_TEMPLATE, OPEN_WORLD_TEMPLATE, SFT_SYSTEM_PROMPT,
                          STEP_BY_STEP_SUFFIX, TAPO_SUFFIX)
    from .protocol import question_templates

    texts = [SFT_SYSTEM_PROMPT, CLOSED_WORLD_TEMPLATE, OPEN_WORLD_TEMPLATE, TAPO_SUFFIX, COT_TEACHER_TEMPLATE,
             STEP_BY_STEP_SUFFIX, "I do not know. Yes No True False", "the genus belongs",
             "Is the species", "<think></think><answer></answer>"]
    texts += ["An A"] + [t for group in (CAPTION_PROMPTS, SUPER_PROMPTS, NAME_PROMPTS, KNOWLEDGE_PROMPTS, REVERSE_PROMPTS,
                              _ANALYSIS, _MATCH, _MATCH_ONE, _MISMATCH) for t in group]
    for sc, schema in SCHEMAS.items():
        texts += question_templates(sc)
        word = SUPER_CATEGORY_WORD[sc]
        texts.append(f"{word} {word}s {article(word)}")
        for d in schema.dims:
            texts += [d.name] + [d.say(v) for v in d.values]
    for sp in world.species:
        texts += list(sp.descriptions) + [sp.name, f"The {sp.name} belongs to the {sp.genus} genus."]
        texts += [q + " " + a for q, a in attribute_questions(sp)]
    return texts
