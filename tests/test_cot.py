"""CoT construction (paper §4.2 (2), Table 5): teachers, quality filters, sharegpt files."""
import json
from dataclasses import replace

import pytest
import torch

from finer1_lib import profiles
from finer1_lib.benchmark import build_benchmark
from finer1_lib.concepts import choose_images
from finer1_lib.cot import (REJECT_REASONS, CotSample, HFTeacher, KnowledgeBaseTeacher, Teacher,
                            build_cot_dataset, check_teacher_output, cot_question, direct_answer_samples,
                            is_english, name_keys, names_match, read_sharegpt, to_sharegpt, write_sharegpt)
from finer1_lib.model import build_processor, build_tiny_model, build_tokenizer
from finer1_lib.io import DataError
from finer1_lib.prompts import SFT_SYSTEM_PROMPT, cot_teacher_prompt, is_well_formed
from finer1_lib.protocol import question_templates
from finer1_lib.world import World


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    profile = profiles.PROFILES["smoke"].replace(super_categories=("bird",), test_per_class=1, rl_per_class=1,
                                                 reference_per_class=2)
    return build_benchmark(profile, tmp_path_factory.mktemp("bench"), seed=0, progress=False)


@pytest.fixture(scope="module")
def recs(bench):
    return choose_images(bench)  # one few-shot image per seen class


def _true_concepts(world, recs):
    return {r.image_id: world.get(r.label).phrases() for r in recs}


def _cot(options, prediction, analysis="The bird has a red crest.", comparison="Only one matches."):
    return (f"<analysis>{analysis}</analysis><options>{', '.join(options)}</options>"
            f"<comparison>{comparison}</comparison><prediction>{prediction}</prediction>")


# ------------------------------------------------------------------------------------------------ filters
def test_is_english():
    assert is_english("The Laysan Albatross has a white head and a pink bill.")
    assert is_english("Bewick's Wren, Brewer’s Blackbird and a Trochilidé")  # a stray accent is fine
    assert not is_english("这只鸟有白色的头。")
    assert not is_english("The bird 有 a white head.")  # mixed language
    assert not is_english("Der Vogel hat einen weißen Kopf: ÄÖÜßéèêàâ çñ øå")
    assert not is_english("") and not is_english("1234 ...") and not is_english(None)


def test_check_teacher_output_reasons():
    gt = "Laysan Albatross"
    others = ["Sooty Albatross", "Black-footed Albatross", "Western Gull", "Herring Gull"]
    assert check_teacher_output(_cot([gt, *others[:2]], gt), gt)[0] is None
    assert check_teacher_output(_cot([gt, *others[:2]], "laysan albatross."), gt)[0] is None  # case, final period
    assert check_teacher_output(_cot([gt, others[0]], others[0]), gt)[0] == "wrong_prediction"
    assert check_teacher_output(_cot([gt, others[0]], "The Laysan Albatross"), gt)[0] == "wrong_prediction"
    assert check_teacher_output(_cot(others[:3], gt), gt)[0] == "gt_missing"
    assert check_teacher_output(_cot([gt, *others], gt), gt)[0] == "too_many_candidates"
    assert check_teacher_output(_cot([gt], gt, analysis="这只鸟有白色的头。"), gt)[0] == "not_english"
    assert check_teacher_output("It is a Laysan Albatross.", gt)[0] == "unparseable"
    assert check_teacher_output(_cot([gt], gt).replace("<comparison>", "<x>"), gt)[0] == "unparseable"
    reason, cot = check_teacher_output(_cot([gt, others[0]], gt), gt)
    assert cot["options"] == [gt, others[0]] and cot["prediction"] == gt


class ScriptedTeacher:
    """Returns scripted outputs per image, one per call; remembers the seeds it was given."""

    def __init__(self, scripts):
        self.scripts, self.calls, self.seeds = scripts, {}, {}

    def write(self, record, image, concepts, question, seed=0):
        assert image.size == (112, 112) and concepts and question in question_templates("bird")
        i = self.calls.get(record.image_id, 0)
        self.calls[record.image_id] = i + 1
        self.seeds.setdefault(record.image_id, []).append(seed)
        script = self.scripts[record.image_id]
        return script[min(i, len(script) - 1)]


class BatchedScriptedTeacher(ScriptedTeacher):
    def __init__(self, scripts):
        super().__init__(scripts)
        self.batches = []

    def write_many(self, records, images, concepts, questions, seeds):
        self.batches.append(len(records))
        return [self.write(*a) for a in zip(records, images, concepts, questions, seeds)]


@pytest.mark.parametrize("teacher_cls", [ScriptedTeacher, BatchedScriptedTeacher])
def test_filters_and_retries_with_a_scripted_teacher(bench, recs, teacher_cls):
    r = recs[:6]
    gt = [x.label for x in r]
    wrong = [x.label for x in recs[6:10]]
    right = lambda i: _cot([gt[i], wrong[0], wrong[1]], gt[i])  # noqa: E731
    scripts = {
        r[0].image_id: [_cot([gt[0], wrong[0]], wrong[0]), right(0)],             # wrong prediction, then right
        r[1].image_id: [_cot(wrong[:3], gt[1]), right(1)],                         # ground truth missing
        r[2].image_id: [_cot([gt[2], *wrong[:4]], gt[2]), right(2)],               # 5 candidates
        r[3].image_id: [_cot([gt[3], wrong[0]], gt[3], analysis="这只鸟有红色的冠。"), right(3)],  # Chinese
        r[4].image_id: ["garbage garbage garbage", right(4)],                      # no tags
        r[5].image_id: [_cot([gt[5], wrong[0]], wrong[0])],                        # always wrong
    }
    teacher = teacher_cls(scripts)
    assert isinstance(teacher, Teacher)
    concepts = {x.image_id: ["a red crest"] for x in r}
    samples, stats = build_cot_dataset(teacher, bench, concepts, max_retries=2, seed=0, progress=False)
    assert [s.image_id for s in samples] == [x.image_id for x in r[:5]]
    assert all(s.attempts == 2 for s in samples)
    assert stats.images == 6 and stats.kept == 5 and stats.failed == [r[5].image_id]
    assert stats.attempts == 5 * 2 + 3 and stats.retries == 13 - 6
    assert stats.rejected == {"unparseable": 1, "not_english": 1, "wrong_prediction": 1 + 3, "gt_missing": 1,
                              "too_many_candidates": 1}
    assert set(stats.rejected) == set(REJECT_REASONS)
    assert [e["outcome"] for e in stats.log if e["image_id"] == r[5].image_id] == ["wrong_prediction"] * 3
    assert len(set(teacher.seeds[r[5].image_id])) == 3  # a new seed per attempt
    assert stats.table().loc["rejected: wrong_prediction", "count"] == 4
    assert json.dumps(stats.to_dict())
    if teacher_cls is BatchedScriptedTeacher:
        assert teacher.batches == [6, 6, 1]  # one batched call per round of attempts
    s = samples[0]
    assert s.label == gt[0] and s.image_path == r[0].path and s.concepts == ["a red crest"]
    assert s.question == cot_question(r[0], seed=0) and s.system == SFT_SYSTEM_PROMPT
    assert s.response == f"<think>{right(0)}</think><answer>{gt[0]}</answer>" and is_well_formed(s.response)
    assert s.cot["options"] == [gt[0], wrong[0], wrong[1]]


def test_build_cot_dataset_bad_inputs(bench, recs, world):
    teacher = KnowledgeBaseTeacher(world)
    concepts = _true_concepts(world, recs[:2])
    concepts[recs[1].image_id] = []
    with pytest.raises(ValueError, match=f"{recs[1].image_id}.*no concepts"):
        build_cot_dataset(teacher, bench, concepts, progress=False)
    samples, stats = build_cot_dataset(teacher, bench, concepts, skip_empty=True, progress=False)
    assert stats.no_concepts == [recs[1].image_id] and stats.images == 2 and len(samples) <= 1
    with pytest.raises(ValueError, match="not in the benchmark"):
        build_cot_dataset(teacher, bench, {"micro/bird/Nobody/train/0": ["a red crest"]}, progress=False)
    elsewhere = replace(bench, root=bench.root / "missing")
    with pytest.raises(FileNotFoundError, match="missing/images"):
        build_cot_dataset(teacher, elsewhere, _true_concepts(world, recs[:1]), progress=False)
    with pytest.raises(ValueError, match="max_retries"):
        build_cot_dataset(teacher, bench, concepts, max_retries=-1, progress=False)


# ---------------------------------------------------------------------------------------- the KB teacher
def test_knowledge_base_teacher_clean(bench, recs, world):
    teacher = KnowledgeBaseTeacher(world, seed=0, p_wrong=0, p_drop_gt=0, p_extra_candidates=0)
    samples, stats = build_cot_dataset(teacher, bench, _true_concepts(world, recs), progress=False)
    assert stats.kept == len(recs) and stats.attempts == len(recs) and not stats.failed
    unseen = set(bench.unseen_labels())
    for s in samples:
        assert s.label in s.cot["options"] and 2 <= len(s.cot["options"]) <= 4
        assert s.cot["prediction"] == s.label and s.response.endswith(f"<answer>{s.label}</answer>")
        assert all(p in s.cot["analysis"] for p in world.get(s.label).phrases())
        assert s.teacher_output.startswith("<analysis>") and "<think>" not in s.teacher_output
    # candidates are the most similar species, seen or unseen alike (lesson 6)
    assert any(o in unseen for s in samples for o in s.cot["options"])
    # partial concepts still give valid rationales (the teacher knows the label)
    partial = {r.image_id: world.get(r.label).phrases()[2:4] for r in recs}
    samples, stats = build_cot_dataset(teacher, bench, partial, progress=False)
    assert stats.kept == len(recs) and all(s.label in s.cot["options"] for s in samples)
    # deterministic per (teacher seed, image, attempt seed)
    r = recs[0]
    out = teacher.write(r, None, world.get(r.label).phrases(), "q", seed=3)
    assert out == teacher.write(r, None, world.get(r.label).phrases(), "q", seed=3)


@pytest.mark.parametrize("knob, reason", [("p_wrong", "wrong_prediction"), ("p_drop_gt", "gt_missing"),
                                          ("p_extra_candidates", "too_many_candidates")])
def test_knowledge_base_teacher_mistakes_are_rejected(bench, recs, world, knob, reason):
    probs = {"p_wrong": 0, "p_drop_gt": 0, "p_extra_candidates": 0, knob: 1.0}
    teacher = KnowledgeBaseTeacher(world, **probs)
    samples, stats = build_cot_dataset(teacher, bench, _true_concepts(world, recs[:3]), max_retries=1,
                                       progress=False)
    assert samples == [] and len(stats.failed) == 3 and stats.rejected[reason] == 6 == stats.attempts
    if knob == "p_wrong":  # a coherent wrong rationale: it predicts one of its own candidates
        out = stats.log[0]["output"]
        reason_, cot = check_teacher_output(out, stats.log[0]["label"])
        assert cot["prediction"] in cot["options"] and cot["prediction"] != stats.log[0]["label"]


def test_knowledge_base_teacher_defaults_need_retries(bench, recs, world):
    samples, stats = build_cot_dataset(KnowledgeBaseTeacher(world, seed=1), bench, _true_concepts(world, recs),
                                       max_retries=5, progress=False)
    assert stats.kept == len(samples) and stats.retries > 0  # the seeded mistakes were resampled
    assert stats.kept + len(stats.failed) == len(recs)
    assert all(check_teacher_output(s.teacher_output, s.label)[0] is None for s in samples)
    with pytest.raises(ValueError, match="p_wrong"):
        KnowledgeBaseTeacher(world, p_wrong=1.5)


def test_knowledge_base_teacher_without_known_concepts(recs, world):
    out = KnowledgeBaseTeacher(world).write(recs[0], None, ["a sparkly hat"], "q")
    assert check_teacher_output(out, recs[0].label)[0] == "unparseable"


# ------------------------------------------------------------------------------------------- HF teacher
def test_hf_teacher_with_a_random_model(bench, recs, world):
    torch.set_num_threads(1)
    prompt = cot_teacher_prompt(recs[0].label, ["a red crest"], "What kind of bird is this?")
    tokenizer = build_tokenizer([prompt, "<analysis></analysis><options></options>"])
    model = build_tiny_model(tokenizer, "tiny-3m", seed=0)
    teacher = HFTeacher(model, build_processor(tokenizer), max_new_tokens=6, temperature=1.0)
    outs = teacher.write_many(recs[:2], [bench.image(r) for r in recs[:2]], [["a red crest"]] * 2, ["q?"] * 2, [0, 0])
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    samples, stats = build_cot_dataset(teacher, bench, _true_concepts(world, recs[:2]), max_retries=0,
                                       progress=False)
    assert samples == [] and stats.rejected["unparseable"] == 2 and len(stats.failed) == 2  # garbage is rejected


# ------------------------------------------------------------------------------------------------ sharegpt
def _kb_samples(bench, recs, world, n=3):
    teacher = KnowledgeBaseTeacher(world, p_wrong=0, p_drop_gt=0, p_extra_candidates=0)
    return build_cot_dataset(teacher, bench, _true_concepts(world, recs[:n]), progress=False)[0]


@pytest.mark.parametrize("name", ["sft.jsonl", "sft.json"])
def test_sharegpt_round_trip(tmp_path, bench, recs, world, name):
    samples = _kb_samples(bench, recs, world)
    path = write_sharegpt(tmp_path / name, samples)
    raw = path.read_text()
    assert raw.startswith("[") == name.endswith(".json")
    first = json.loads(raw)[0] if name.endswith(".json") else json.loads(raw.splitlines()[0])
    assert first == to_sharegpt(samples[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][1]["content"] == "<image>" + samples[0].question and first["images"] == [recs[0].path]
    rows = read_sharegpt(path, check_images=False)
    assert len(rows) == len(samples)
    for s, row in zip(samples, rows):
        assert row["system"] == s.system and row["prompt"] == s.question and row["response"] == s.response
        assert row["image_path"] == s.image_path and row["label"] == s.label == row["answer"]
        assert {k: row[k] for k in ("analysis", "options", "comparison", "prediction")} == s.cot
    rooted = read_sharegpt(path, image_root=bench.root)
    assert rooted[0]["image_path"] == str(bench.root / samples[0].image_path)


OFFICIAL = [
    {"messages": [
        {"role": "system", "content": SFT_SYSTEM_PROMPT},
        {"role": "user", "content": "<image>What is the birds name in this image?"},
        {"role": "assistant", "content": (
            "<think>Analysis of Visual Features: The bird has a white head and neck, dark grey upper wings and a "
            "pale pink bill with a dark tip.\n\nCandidate Subcategories:\n1. Laysan Albatross\n"
            "2. Black-footed Albatross\n3. Sooty Albatross\n4. Western Gull\n\nComparison Process: The "
            "Black-footed Albatross is dark brown all over. The Sooty Albatross has a dark head. The Western Gull "
            "has a yellow bill. The Laysan Albatross matches the white head and dark back.\n\nFinal Prediction: "
            "The prediction is: Laysan Albatross</think>\n\n<answer>Laysan Albatross</answer>")}],
     "images": ["/data/CUB_200_2011/images/001.Black_footed_Albatross/x.jpg"]},
    {"messages": [
        {"role": "system", "content": SFT_SYSTEM_PROMPT},
        {"role": "user", "content": "<image>What is the dogs name in this image?"},
        {"role": "assistant", "content": (
            "<think>**Analysis of Visual Features:**\n- Coat: long, silky and white.\n- Ears: floppy.\n\n"
            "**Candidate Subcategories:**\n- Maltese Dog\n- Shih-Tzu\n- Lhasa\n\n**Comparison Process:**\n"
            "- Shih-Tzu: usually two-coloured.\n- Lhasa: darker coat.\n\n**Final Prediction:**\n"
            "The prediction is: Maltese Dog</think>\n\n<answer>Maltese Dog</answer>")}],
     "images": ["images/n02085936-Maltese_dog/y.jpg"]},
]


def test_read_official_stage1_layout(tmp_path):
    path = tmp_path / "Fine-R1-Stage1-data.json"
    path.write_text(json.dumps(OFFICIAL, indent=2))
    a, b = read_sharegpt(path, image_root=tmp_path, check_images=False)
    assert a["prompt"] == "What is the birds name in this image?" and a["system"] == SFT_SYSTEM_PROMPT
    assert a["options"] == ["Laysan Albatross", "Black-footed Albatross", "Sooty Albatross", "Western Gull"]
    assert a["prediction"] == a["answer"] == "Laysan Albatross" and a["label"] is None
    assert a["analysis"].startswith("The bird has a white head") and "Western Gull" in a["comparison"]
    assert a["image_path"] == OFFICIAL[0]["images"][0]  # absolute: kept
    assert b["options"] == ["Maltese Dog", "Shih-Tzu", "Lhasa"] and b["answer"] == "Maltese Dog"
    assert b["image_path"] == str(tmp_path / "images/n02085936-Maltese_dog/y.jpg")  # relative: under the root


def _bad(tmp_path, rows, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def test_read_sharegpt_bad_inputs(tmp_path):
    good = OFFICIAL[0]
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_sharegpt(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"messages": [}\n]')
    with pytest.raises(ValueError, match="broken.json:2"):
        read_sharegpt(broken, check_images=False)
    lines = tmp_path / "broken.jsonl"
    lines.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        read_sharegpt(lines, check_images=False)
    with pytest.raises(ValueError, match="record 1: missing or empty 'messages'"):
        read_sharegpt(_bad(tmp_path, [good, {"images": ["a.jpg"]}]), check_images=False)
    with pytest.raises(ValueError, match="record 0: missing or empty 'images'"):
        read_sharegpt(_bad(tmp_path, [{"messages": good["messages"]}]), check_images=False)
    swapped = dict(good, messages=[good["messages"][0], good["messages"][2], good["messages"][1]])
    with pytest.raises(ValueError, match="record 2: roles must be"):
        read_sharegpt(_bad(tmp_path, [good, good, swapped]), check_images=False)
    no_image = dict(good, messages=[good["messages"][0], {"role": "user", "content": "Name?"}, good["messages"][2]])
    with pytest.raises(ValueError, match="record 0: the user turn has 0 <image>"):
        read_sharegpt(_bad(tmp_path, [no_image]), check_images=False)
    with pytest.raises(ValueError, match="record 0: expected a JSON object"):
        read_sharegpt(_bad(tmp_path, [["not", "a", "record"]]), check_images=False)


def test_direct_answer_samples(tmp_path, bench, recs, world):
    samples = _kb_samples(bench, recs, world, n=2)
    direct = direct_answer_samples(samples)
    assert [d.response for d in direct] == [f"<answer>{s.label}</answer>" for s in samples]
    assert [(d.image_path, d.question, d.system) for d in direct] == [(s.image_path, s.question, s.system)
                                                                    for s in samples]
    assert samples[0].response.startswith("<think>")  # originals untouched
    rows = read_sharegpt(write_sharegpt(tmp_path / "direct.jsonl", direct), image_root=bench.root)
    assert [r["answer"] for r in rows] == [s.label for s in samples] and rows[0]["options"] == []
    assert direct_answer_samples(samples, system="Answer briefly.")[0].system == "Answer briefly."
    assert isinstance(direct[0], CotSample)


# ------------------------------------------------------------------------------------ official Stage-1 data
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_datasets as fx  # noqa: E402
import fixtures_stage1 as s1  # noqa: E402


def _write_stage1(tmp_path, records=None, images=True):
    """The fixture records as an official-style JSON array, with their images under ``tmp_path/images``."""
    records = s1.RECORDS if records is None else records
    path = tmp_path / "Fine-R1-Stage1-data.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False))
    if images:
        for rec in records:
            fx.write_jpeg(tmp_path / "images" / rec["images"][0])
    return path


def test_every_official_shape_parses_into_four_sections(tmp_path):
    rows = read_sharegpt(_write_stage1(tmp_path), image_root=tmp_path / "images")
    assert len(rows) == len(s1.CASES)
    for row, (name, rec, want) in zip(rows, s1.CASES):
        assert row["analysis"] and row["options"] and row["comparison"] and row["prediction"], name
        assert row["options"] == want["options"], name
        assert row["analysis"].startswith(want["analysis"]), name
        assert want["comparison"] in row["comparison"] and want["not_in_comparison"] not in row["comparison"], name
        assert row["prediction"] == row["answer"] == want["prediction"], name
        assert row["super_category"] == want["super_category"], name
        assert row["image_path"] == str(tmp_path / "images" / rec["images"][0])
        assert row["system"] == SFT_SYSTEM_PROMPT and not row["prompt"].startswith("<image>")


@pytest.mark.parametrize("case", [c[0] for c in s1.CASES])
def test_official_shapes_pass_the_filter(case):
    """Each shape passes check_teacher_output against its label: parseable, and the ground truth is among the
    candidates even when they carry a Latin name or a year in parentheses."""
    _, rec, want = next(c for c in s1.CASES if c[0] == case)
    output = rec["messages"][2]["content"]
    reason, cot = check_teacher_output(output.replace(f"<answer>{want['prediction']}<", f"<answer>{want['label']}<"),
                                       want["label"])
    assert reason is None, (case, reason, cot)


@pytest.mark.parametrize("candidate, label", [
    ("Laysan Albatross (Phoebastria immutabilis)", "Laysan Albatross"),
    ("Audi S4 Sedan (2012)", "Audi S4 Sedan 2012"),
    ("Chevrolet Malibu Sedan (2007)", "chevrolet_malibu_sedan_2007"),
    ("Tu-154 (Tupolev Tu-154)", "Tu-154"),
    ("Painted Bunting", "Painted Bunting (Passerina ciris)"),
])
def test_parenthesised_extras_match(candidate, label):
    assert names_match(candidate, label) and names_match(label, candidate)
    gt = label
    others = ["Sooty Albatross", "Western Gull"]
    assert check_teacher_output(_cot([candidate, *others], gt), gt)[0] is None
    assert check_teacher_output(_cot([candidate, *others], candidate), gt)[0] is None  # the prediction too


def test_parenthesised_extras_do_not_match_other_names():
    assert not names_match("Audi S4 Sedan (2007)", "Audi S4 Sedan 2012")
    assert not names_match("Sooty Albatross (Phoebetria fusca)", "Laysan Albatross")
    assert name_keys("Audi S4 Sedan (2012)") == {"audi s4 sedan (2012)", "audi s4 sedan", "audi s4 sedan 2012"}
    assert check_teacher_output(_cot(["Audi S4 Sedan (2007)", "Audi S5 Coupe"], "Audi S4 Sedan 2012"),
                                "Audi S4 Sedan 2012")[0] == "gt_missing"


def test_missing_image_names_record_and_path(tmp_path):
    path = _write_stage1(tmp_path, images=False)
    with pytest.raises(DataError, match=r"Fine-R1-Stage1-data\.json: record 0: image not found: .*1838247\.jpg "
                                        r"\(check image_root, or dataset_roots=\{'aircraft'") as e:
        read_sharegpt(path, image_root=tmp_path / "images")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"record 0: image not found: fgvc-aircraft-2013b-train/images/1838247\.jpg "
                                        r"\(pass image_root="):
        read_sharegpt(path)
    assert len(read_sharegpt(path, check_images=False)) == len(s1.CASES)
    fx.write_jpeg(tmp_path / "images" / s1.RECORDS[0]["images"][0])
    with pytest.raises(DataError, match=r"record 1: image not found: .*0758130\.jpg"):
        read_sharegpt(path, image_root=tmp_path / "images")


def test_stage1_images_from_a_standard_dataset_copy(tmp_path):
    """With dataset_roots, a Stage-1 image that is not under image_root is taken from a standard copy of its
    dataset (bird_200/images_train/<class>/<file> -> CUB_200_2011/images/<class>/<file>)."""
    from finer1_lib.datasets import read_cub

    cub_root = fx.build_cub(tmp_path / "cub")
    bird = next(r for r in read_cub(cub_root) if r.partition == "train")
    rel = Path(bird.path).relative_to(cub_root / "CUB_200_2011" / "images").as_posix()
    rec = s1.record("What is the proper name of this bird?", s1.LATIN, "Painted Bunting",
                    f"bird_200/images_train/{rel}")
    path = _write_stage1(tmp_path, [rec], images=False)
    (row,) = read_sharegpt(path, image_root=tmp_path / "nowhere", dataset_roots={"bird": cub_root})
    assert row["image_path"] == bird.path and row["super_category"] == "bird"
    with pytest.raises(DataError, match="image not found"):
        read_sharegpt(path, image_root=tmp_path / "nowhere", dataset_roots={"car": cub_root})


def test_sharegpt_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "sft.json"
    path.write_bytes(json.dumps(s1.RECORDS[:1]).encode().replace(b"fighter", b"fight\xe9r", 1))
    with pytest.raises(DataError, match=r"sft\.json:\d+: sharegpt file is not UTF-8 text"):
        read_sharegpt(path, check_images=False)
    lines = tmp_path / "sft.jsonl"
    lines.write_bytes(b"\n".join(json.dumps(r).encode() for r in s1.RECORDS[1:3]).replace(b"ATR", b"\xc0TR", 1))
    with pytest.raises(DataError, match=r"sft\.jsonl:2: sharegpt file is not UTF-8 text"):
        read_sharegpt(lines, check_images=False)
