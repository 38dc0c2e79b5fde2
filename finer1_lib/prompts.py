"""Prompts and response parsing for Fine-R1 (pure functions, no torch).

Sources
-------
* Paper, Appendix B ("PROMPT DESIGN"): Table 5 (CoT teacher template) and the two evaluation
  prompts.  The appendix swaps the closed/open labels: the prompt that lists ``{Options}`` is the
  CLOSED-world one.  We use the wording of the official ``eval/evaluation.py``, which is what the
  reported numbers were produced with.
* Official SFT data (``Fine-R1-Stage1-data.json``): the R1-style system prompt and CoTs written as
  headed sections inside ``<think>`` ("Analysis of Visual Features", "Candidate Subcategories",
  "Comparison Process", "Final Prediction"), followed by ``<answer>NAME</answer>``.
* Official TAPO prompt (``examples/format_prompt/cls_thinking.jinja``): question + a fixed suffix.
* Paper Fig. 3b / §5: zero-shot CoT by appending "Let's think step by step."
"""
from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "SFT_SYSTEM_PROMPT", "CLOSED_WORLD_TEMPLATE", "OPEN_WORLD_TEMPLATE", "TAPO_SUFFIX",
    "COT_TEACHER_TEMPLATE", "STEP_BY_STEP_SUFFIX", "COT_TAGS",
    "closed_world_prompt", "open_world_prompt", "tapo_prompt", "cot_teacher_prompt", "step_by_step",
    "normalize_tag_whitespace", "is_well_formed", "extract_tag", "answer_span", "parse_response",
    "split_options", "parse_structured_cot", "format_answer",
]

# --------------------------------------------------------------------------------------------
# Prompt texts
# --------------------------------------------------------------------------------------------

#: R1-style system prompt of every sample of the official Stage-1 (CoT SFT) data.
SFT_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here "
    "</answer>"
)

#: Closed-world evaluation prompt (official eval/evaluation.py; labelled "Open-world" in Appendix B).
CLOSED_WORLD_TEMPLATE = (
    "Given the question: {question}, based on the options provided in {options}, "
    "output the thinking process in <think> </think> and final choice in <answer> </answer> tags. "
    "The response format should be: <think>...</think> <answer>choice</answer>."
)

#: Open-world evaluation prompt (official eval/evaluation.py; labelled "Closed-world" in Appendix B).
OPEN_WORLD_TEMPLATE = (
    "Given the question: {question}. This is a fine-grained question. "
    "Output reasoning in <think></think> and the final answer in <answer></answer>."
)

#: Suffix of the official TAPO (stage-2 RL) prompt, cls_thinking.jinja.
TAPO_SUFFIX = (
    "You first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within <answer> </answer> tags."
)

#: Paper Appendix B, Table 5: prompt template for FGVR CoT data construction (teacher MLLM).
COT_TEACHER_TEMPLATE = (
    "This is a picture of a {label} with the following visual features: {concepts}. Based on the "
    "information provided, please answer the following question. Question: {question}. Note that you "
    "MUST first analyze the visual features that help you provide at most four candidate subcategories "
    "of the same super-category, then pay attention to the differences between candidate subcategories "
    "and make a detailed comparison between them to find evidence that help you make a prediction. The "
    "visual analysis process, candidate subcategories, comparison process, and final predicted "
    "subcategory are enclosed with <analysis></analysis>, <options></options>, <comparison></comparison>, "
    "and <prediction></prediction> tags, respectively, i.e., <analysis>visual analysis process here"
    "</analysis><options>candidate subcategories here</options><comparison>comparison process here"
    "</comparison><prediction>predicted subcategory here</prediction>."
)

#: Zero-shot CoT trigger (Kojima et al., 2022), paper §5 / Fig. 3b.
STEP_BY_STEP_SUFFIX = "Let's think step by step."

#: The four tags of the structured CoT of Table 5.
COT_TAGS = ("analysis", "options", "comparison", "prediction")


def _check_text(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value.strip()


def _check_options(options) -> list[str]:
    if isinstance(options, str) or not isinstance(options, Sequence):
        raise ValueError(f"options must be a list of at least 2 distinct strings, got {options!r}")
    opts = []
    for o in options:
        if not isinstance(o, str) or not o.strip():
            raise ValueError(f"options must contain non-empty strings only, got {o!r} in {options!r}")
        opts.append(o.strip())
    keys = [o.lower().replace("_", " ") for o in opts]
    if len(opts) < 2 or len(set(keys)) != len(keys):
        raise ValueError(f"options must be at least 2 distinct strings, got {options!r}")
    return opts


def closed_world_prompt(question: str, options: Sequence[str]) -> str:
    """Closed-world (multiple-choice) prompt; options rendered as a Python list repr.

    Paper Appendix B (printed there under the "Open-world" label, swapped vs the code); wording
    of the official ``eval/evaluation.py``, where ``{Options}`` is ``str(list)`` of 4 names.
    Raises ValueError for an empty question or options that are not >= 2 distinct strings.
    """
    q = _check_text(question, "question")
    opts = _check_options(options)
    return CLOSED_WORLD_TEMPLATE.format(question=q, options=repr(opts))


def open_world_prompt(question: str) -> str:
    """Open-world (free-answer) prompt of the official eval (Appendix B, labelled "Closed-world")."""
    return OPEN_WORLD_TEMPLATE.format(question=_check_text(question, "question"))


def tapo_prompt(question: str) -> str:
    """Stage-2 (TAPO) training prompt: the question, a blank line, then ``TAPO_SUFFIX``.

    Same as the official ``cls_thinking.jinja`` (``{{ content | trim }}\\n\\n<suffix>``); no
    candidate names are given (official issue #5).
    """
    return f"{_check_text(question, 'question')}\n\n{TAPO_SUFFIX}"


def cot_teacher_prompt(label: str, concepts: Sequence[str], question: str) -> str:
    """Paper Appendix B, Table 5, verbatim: the prompt that asks the teacher MLLM for a structured CoT.

    ``concepts`` (the image's visual concepts) are joined with ", ".  A single string is accepted
    as one concept.  Raises ValueError for an empty label/question or an empty concepts list.
    """
    lab = _check_text(label, "label")
    q = _check_text(question, "question")
    if isinstance(concepts, str):
        concepts = [concepts]
    if not isinstance(concepts, Sequence) or len(concepts) == 0:
        raise ValueError(f"concepts must be a non-empty list of strings, got {concepts!r}")
    cs = [_check_text(c, "concepts item") for c in concepts]
    return COT_TEACHER_TEMPLATE.format(label=lab, concepts=", ".join(cs), question=q)


def step_by_step(prompt: str) -> str:
    """Zero-shot CoT variant of a prompt (paper §5 "Inference Strategies", Fig. 3b)."""
    return f"{_check_text(prompt, 'prompt')} {STEP_BY_STEP_SUFFIX}"


def format_answer(think: str, answer: str) -> str:
    """The target format of SFT/RL responses: ``<think>{think}</think><answer>{answer}</answer>``."""
    return f"<think>{think}</think><answer>{answer}</answer>"


# --------------------------------------------------------------------------------------------
# Tag parsing
# --------------------------------------------------------------------------------------------

_WS_AROUND_TAG_CHARS = re.compile(r"\s*(<|>|/)\s*")
_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def normalize_tag_whitespace(text: str) -> str:
    """Remove whitespace around ``<``, ``>`` and ``/`` (official cls_thinking.py; it also touches
    the content, e.g. "CRJ-100 / 200" -> "CRJ-100/200")."""
    return _WS_AROUND_TAG_CHARS.sub(r"\1", text)


def is_well_formed(text: str) -> bool:
    """Official format check: after ``normalize_tag_whitespace`` the whole text must fullmatch
    ``<think>.*?</think>\\s*<answer>.*?</answer>`` (DOTALL; tag names are case-sensitive)."""
    if not isinstance(text, str):
        return False
    return _FORMAT_RE.fullmatch(normalize_tag_whitespace(text)) is not None


def _open_re(tag: str) -> re.Pattern:
    return re.compile(rf"<\s*{re.escape(tag)}\s*>", re.IGNORECASE)


def _close_re(tag: str) -> re.Pattern:
    return re.compile(rf"<\s*/\s*{re.escape(tag)}\s*>", re.IGNORECASE)


def extract_tag(text: str | None, tag: str, allow_unclosed: bool = False) -> str | None:
    """Content (stripped) of the LAST complete ``<tag>...</tag>`` in ``text``.

    Tags tolerate whitespace and case (``< Answer >``, ``</ ANSWER>``).  Returns None when the tag
    is missing.  When the last opening tag is never closed (e.g. generation cut at max tokens) the
    result is None, or with ``allow_unclosed=True`` the stripped rest of the text after it.
    An empty element gives "".
    """
    if not text:
        return None
    opens = list(_open_re(tag).finditer(text))
    if not opens:
        return None
    last = opens[-1]
    close = _close_re(tag).search(text, last.end())
    if close is None:
        return text[last.end():].strip() if allow_unclosed else None
    return text[last.end():close.start()].strip()


def answer_span(text: str | None, tag: str = "answer") -> str | None:
    """Official eval extraction: the (stripped) span from the FIRST opening to the LAST closing tag.

    ``eval/evaluation.py`` uses ``re.search(r'<answer>(.*)</answer>', s, re.DOTALL)`` (greedy), so a
    response with repeated answer tags is judged on everything between them.  Tags here also
    tolerate whitespace and case.  None when there is no opening tag followed by a closing tag.
    """
    if not text:
        return None
    first = _open_re(tag).search(text)
    if first is None:
        return None
    closes = list(_close_re(tag).finditer(text, first.end()))
    if not closes:
        return None
    return text[first.end():closes[-1].start()].strip()


def parse_response(text: str) -> dict:
    """Split a model response into ``{"think", "answer", "well_formed"}``.

    think/answer: ``extract_tag`` (last complete element, None if missing or unclosed);
    well_formed: the official format check (``is_well_formed``).
    """
    text = text if isinstance(text, str) else ""
    return {
        "think": extract_tag(text, "think"),
        "answer": extract_tag(text, "answer"),
        "well_formed": is_well_formed(text),
    }


# --------------------------------------------------------------------------------------------
# Structured CoT parsing (Table 5 tags, or the official release's headed sections)
# --------------------------------------------------------------------------------------------

# Numbering markers that start a new option: "1." / "1)" / "(1)" / "(a)" anywhere after a
# separator, "a)" / "a." only at the start of a line.
_NUM_MARKER = re.compile(r"(?:^|(?<=[\s,;]))(?:\(\s*(?:\d{1,2}|[A-Za-z])\s*\)|\d{1,2}[.)])(?=\s)", re.M)
_LETTER_MARKER = re.compile(r"^\s*[A-Za-z][.)](?=\s)", re.M)
_BULLET = re.compile(r"^\s*[-*\u2022]\s+", re.M)


def _split_outside_parens(s: str, seps: str = ",;\n") -> list[str]:
    parts, buf, depth = [], [], 0
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}" and depth > 0:
            depth -= 1
        if ch in seps and (depth == 0 or ch == "\n"):
            parts.append("".join(buf))
            buf = []
            if ch == "\n":
                depth = 0
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return parts


def _clean_item(s: str) -> str:
    s = s.replace("**", "").replace("__", "").replace("`", "")
    s = s.strip().strip("'\"").strip()
    s = re.sub(r"^(?:and|or)\s+", "", s, flags=re.I)
    s = s.rstrip(".").strip().strip("'\"").strip()
    return re.sub(r"\s+", " ", s)


def _dedupe(items: list[str]) -> list[str]:
    seen, out = set(), []
    for it in items:
        k = it.lower()
        if it and k not in seen:
            seen.add(k)
            out.append(it)
    return out


def split_options(text: str | None) -> list[str]:
    """Split a candidate list into names.

    Separators: commas, semicolons, newlines (commas inside parentheses are kept), numbering
    ("1.", "2)", "(3)", "(a)", "b)" at line start) and bullets ("-", "*", "•" at line start).
    A Python list repr "['A', 'B']" works too.  Items are stripped of spaces, quotes, markdown and
    a leading "and"/"or"; empty items are dropped and duplicates (case-insensitive) removed.
    """
    if not text or not text.strip():
        return []
    s = text.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    s = _BULLET.sub("\n", s)
    s = _LETTER_MARKER.sub("\n", s)
    s = _NUM_MARKER.sub("\n", s)
    return _dedupe([_clean_item(p) for p in _split_outside_parens(s)])


_HEADING_NAMES = {
    "analysis": r"analysis\s+of\b[^\n:*#.]{0,60}|analy[sz]e\b[^\n:*#.]{0,60}|visual\s+(?:feature\s+)?analysis",
    "options": r"candidate\s+subcategories",
    "comparison": r"comparison\s+process",
    "prediction": r"final\s+prediction",
    "final_answer": r"final\s+answer",
}
_HEADING_RE = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*(?:step[ \t]*\d+[ \t]*[:.)-][ \t]*)?(?:\d+[.)][ \t]*)?"
    r"(?:\*\*|__)?[ \t]*(?P<name>" + "|".join(f"(?P<{k}>{v})" for k, v in _HEADING_NAMES.items()) + r")"
    r"[ \t]*(?:\*\*|__)?[ \t]*(?::[ \t]*(?:\*\*|__)?[ \t]*(?P<rest>[^\n]*?))?[ \t]*(?:\*\*|__)?[ \t]*$",
    re.IGNORECASE | re.M,
)
_RULE_LINE = re.compile(r"^[ \t]*(?:-{3,}|\*{3,}|_{3,})[ \t]*$", re.M)
_MARKER_LINE = re.compile(r"^([ \t]*)(?:[-*\u2022]|\(?\d{1,2}[.)]|\(?[A-Za-z]\))[ \t]+(\S.*?)[ \t]*$", re.M)
# The two sentences every record of the official release carries, headed or not.
_CANDIDATE_MARKER = re.compile(r"the analysis of candidate subcategories\s*:[ \t]*", re.IGNORECASE)
_PREDICTION_MARKER = re.compile(r"the prediction is\s*:", re.IGNORECASE)
_PREDICTION_LINE = re.compile(r"the prediction is\s*:\s*(.+)", re.IGNORECASE)
# One list item line: indentation, then a number ("1." "2)" "(3)"), a bullet or a letter ("a)" "(b)").
_ITEM = re.compile(r"^([ \t]*)(?:\(?(\d{1,2})[.)]|([-*\u2022])|\(?([A-Za-z])\))[ \t]+\S")
_PARENS = re.compile(r"\([^()]*\)")
_VERSUS = re.compile(r"\svs?\.?\s", re.IGNORECASE)
_NAME_SEP = re.compile(r"\s[-\u2013\u2014]\s")  # "Hyundai Santa Fe - Another SUV": a spaced dash ends the name


def _clean_section(s: str) -> str | None:
    s = _RULE_LINE.sub("", s).strip()
    return s or None


def _item_name(item: str) -> str:
    item = item.replace("**", "").replace("__", "")
    return _clean_item(_NAME_SEP.split(item.split(":", 1)[0], 1)[0])


def _list_items(section: str | None) -> list[str]:
    """Top-level bulleted/numbered items of a section (text after ':' or a spaced dash dropped), else
    split_options of its last paragraph."""
    if not section:
        return []
    marked = [(len(m.group(1).expandtabs(4)), m.group(2)) for m in _MARKER_LINE.finditer(section)]
    if marked:
        top = min(ind for ind, _ in marked)
        return _dedupe([_item_name(item) for ind, item in marked if ind <= top + 1])
    tail = section.strip().split("\n\n")[-1]
    if ":" in tail:
        tail = tail.rsplit(":", 1)[1]
    return split_options(tail)


def _item_kind(line: str) -> tuple[int, str, int | None] | None:
    """(indent, kind, number) of a list item line ("num" / "bullet" / "letter"), else None."""
    m = _ITEM.match(line)
    if m is None:
        return None
    kind = "num" if m.group(2) else "bullet" if m.group(3) else "letter"
    return len(m.group(1).expandtabs(4)), kind, int(m.group(2)) if m.group(2) else None


def _paragraphs(text: str, offset: int) -> list[tuple[int, int, list[str]]]:
    """(start, end, lines) of the blank-line separated paragraphs of ``text`` (positions + ``offset``)."""
    return [(offset + m.start(), offset + m.end(), m.group(0).rstrip("\n").split("\n"))
            for m in re.finditer(r"(?:[^\n]*\S[^\n]*(?:\n|$))+", text)]


def _candidate_list(body: str, start: int, end: int) -> tuple[list[str], int, int]:
    """The candidate list that follows "The analysis of candidate subcategories:" (``body[start:end]``).

    Accepted: a numbered / bulleted list (items may have descriptions after ':' and indented sub-points, and may be
    separated by blank lines), or one comma-separated line; up to two introduction paragraphs before it
    ("Based on ..., the candidates are:") are skipped. The list ends at the first paragraph that does not continue
    it (plain text, another item kind, a numbering restart, two blank lines, an "A vs. B" item). Returns (names, list start, list end).
    """
    paras = _paragraphs(body[start:end], start)
    for i, (p_start, p_end, lines) in enumerate(paras[:3]):
        first = next((j for j, line in enumerate(lines) if _item_kind(line)), None)
        if first is None:
            text = " ".join(line.strip() for line in lines)
            names = split_options(text)
            if (len(lines) == 1 and len(names) >= 2 and not text.rstrip().endswith(":")
                    and all(len(_PARENS.sub("", n).split()) <= 6 for n in names)):
                return names, p_start, p_end  # "A, B, C, D" (short names, not a sentence)
            continue  # an introduction paragraph
        indent, kind, number = _item_kind(lines[first])
        list_start = p_start + sum(len(line) + 1 for line in lines[:first])
        list_end, last = p_end, number
        for q_start, q_end, q_lines in paras[i + 1:]:
            head = _item_kind(q_lines[0])
            if head is None or head[1] != kind or head[0] > indent + 1:
                break
            if body.count("\n", list_end, q_start) >= 2 or _VERSUS.search(q_lines[0]):
                break  # two blank lines, or "A vs. B": the comparison follows
            if kind == "num" and last is not None and head[2] is not None and head[2] <= last:
                break  # numbering restarts: a new list (e.g. the comparison)
            last = head[2] if head[2] is not None else last
            list_end = q_end
        return _list_items(body[list_start:list_end]), list_start, list_end
    return [], start, start


def _think_body(text: str) -> str:
    body = extract_tag(text, "think", allow_unclosed=True)
    if body is not None:
        return body
    close = _close_re("think").search(text)
    if close is not None:  # the opening <think> was in the prompt (chat template)
        return text[:close.start()]
    return re.sub(r"<\s*answer\s*>.*?(?:<\s*/\s*answer\s*>|\Z)", "", text, flags=re.I | re.S)


def _parse_headed(text: str) -> dict:
    """Sections of the official release: headings where there are some, else (or where one is missing) the two
    sentences every record carries, "The analysis of candidate subcategories:" and "The prediction is:"."""
    body = _think_body(text)
    # (start, content start, kind) of every section boundary
    bounds = [(m.start(), m.end(), next(k for k in _HEADING_NAMES if m.group(k) is not None), m.group("rest") or "")
              for m in _HEADING_RE.finditer(body)]
    kinds = {b[2] for b in bounds}
    cand = _CANDIDATE_MARKER.search(body)
    from_marker = cand is not None and "options" not in kinds
    if from_marker:  # the candidate sentence opens the options section
        bounds.append((cand.start(), cand.end(), "options", ""))
    after = cand.end() if cand is not None else 0
    pred = _PREDICTION_MARKER.search(body, after)
    if pred is not None and not any(k == "prediction" and s < pred.start() for s, _, k, _ in bounds):
        bounds.append((pred.start(), pred.start(), "prediction", ""))  # ends the comparison
    bounds.sort()
    if not bounds:
        return {"analysis": None, "options": [], "comparison": None, "prediction": None}

    sections: dict[str, list[str]] = {}
    comparison_extra, options, described = [], [], None
    for i, (s, c, kind, rest) in enumerate(bounds):
        end = bounds[i + 1][0] if i + 1 < len(bounds) else len(body)
        if from_marker and s == cand.start() and kind == "options":
            options, l_start, l_end = _candidate_list(body, c, end)
            described = body[l_start:l_end]
            comparison_extra.append(body[l_end:end])
            continue
        content = (rest + "\n" + body[c:end]).strip("\n")
        sections.setdefault(kind, []).append(content)

    def joined(kind, extra=()):
        parts = [_clean_section(x) for x in [*extra, *sections.get(kind, [])]]
        return _clean_section("\n\n".join(x for x in parts if x))

    analysis = joined("analysis", [body[:bounds[0][0]]])
    if not options and sections.get("options"):
        section = joined("options") or ""
        inner = _CANDIDATE_MARKER.search(section)  # the candidate sentence's list is the canonical one
        if inner is not None:
            options = _candidate_list(section, inner.end(), len(section))[0]
        options = options or _list_items(section)
    if not options and cand is not None:
        options, l_start, l_end = _candidate_list(body, cand.end(), len(body))
    comparison = joined("comparison", comparison_extra)
    if comparison is None and described and any(":" in line for line in described.split("\n")):
        comparison = _clean_section(described)  # candidates described one against the others, nothing else
    prediction = extract_tag(text, "answer")
    if not prediction:
        lines = _PREDICTION_LINE.findall(body)
        prediction = _clean_item(lines[-1]) if lines else joined("prediction")
    return {"analysis": analysis, "options": options, "comparison": comparison, "prediction": prediction or None}


def parse_structured_cot(text: str) -> dict:
    """Parse a structured CoT into ``{"analysis", "options", "comparison", "prediction"}``.

    Two forms are accepted:

    * Table 5 tags (paper Appendix B): ``<analysis>``, ``<options>``, ``<comparison>``,
      ``<prediction>``; each field is ``extract_tag`` of its tag (None when missing), options are
      ``split_options`` of the ``<options>`` content.
    * The official Stage-1 release (``Fine-R1-Stage1-data.json``, 404 records). Most CoTs have headed sections
      inside ``<think>`` ("Analysis of Visual Features", "Candidate Subcategories", "Comparison Process", "Final
      Prediction"; optionally with ``**``/``###``, a "Step N:" prefix and a colon); some have none, or only an
      analysis heading, but every record carries the sentences "The analysis of candidate subcategories:" and
      "The prediction is:", which then delimit the sections. Analysis = the text before the candidates (any
      preamble included). Options = the list after "The analysis of candidate subcategories:" (numbered,
      bulleted or comma-separated, after an optional introduction; it ends where the comparison starts) when
      the candidates section holds that sentence or there is no such section, else the top-level bullet/numbered
      items of the candidates section; a description after ':' or a spaced dash is dropped, parenthesised
      extras are kept. Comparison = the comparison section, or the text between the candidate list and "The
      prediction is:" (when there is nothing else, the candidates' own descriptions). Prediction = the
      ``<answer>`` content, else the last "The prediction is: X" line, else the Final Prediction section. A
      "Final Answer" summary section is ignored.

    Missing fields are None (options: []).
    """
    text = text if isinstance(text, str) else ""
    tagged = {k: extract_tag(text, k) for k in COT_TAGS}
    if any(v is not None for v in tagged.values()):
        return {"analysis": tagged["analysis"], "options": split_options(tagged["options"]),
                "comparison": tagged["comparison"], "prediction": tagged["prediction"]}
    return _parse_headed(text)
