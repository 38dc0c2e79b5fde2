"""Pretraining data (mixture, image pools), batching helpers, the LR schedule and resuming a run."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import json
import math
import random
from collections import Counter

import pytest
import torch

from finer1_lib import pretrain as pt
from finer1_lib import profiles
from finer1_lib.chat import ChatExample
from finer1_lib.model import count_parameters, load_model
from finer1_lib.pretrain import TASKS, cosine_lr, length_buckets, make_example, pretrain, pretrain_batch, read_log
from finer1_lib.profiles import PRETRAIN_MIXTURE
from finer1_lib.rationale import article
from finer1_lib.records import SUPER_CATEGORY_WORD
from finer1_lib.world import World


@pytest.fixture(scope="module")
def world():
    return World(0)


def _key(task, ex: ChatExample):
    return (task, ex.prompt, ex.response, ex.system, None if ex.image is None else ex.image.tobytes())


# ----------------------------------------------------------------------------------------- batches


def test_pretrain_batch_is_deterministic_in_seed_and_step(world):
    a = [_key(*p) for p in pretrain_batch(world, 7, 6, PRETRAIN_MIXTURE, seed=0)]
    b = [_key(*p) for p in pretrain_batch(world, 7, 6, PRETRAIN_MIXTURE, seed=0)]
    assert a == b and len(a) == 6
    assert a != [_key(*p) for p in pretrain_batch(world, 8, 6, PRETRAIN_MIXTURE, seed=0)]
    assert a != [_key(*p) for p in pretrain_batch(world, 7, 6, PRETRAIN_MIXTURE, seed=1)]
    assert all(t in TASKS and isinstance(ex, ChatExample) for t, ex in pretrain_batch(world, 0, 4, PRETRAIN_MIXTURE))


def test_pretrain_batch_rejects_unknown_tasks(world):
    with pytest.raises(ValueError, match=r"unknown tasks in the pretraining mixture: \['painting'\]"):
        pretrain_batch(world, 0, 2, dict(PRETRAIN_MIXTURE, painting=0.1))
    with pytest.raises(ValueError, match="unknown pretraining task 'painting'"):
        make_example(world, "painting", random.Random(0))


def test_task_shares_follow_the_mixture(world, monkeypatch):
    monkeypatch.setattr(pt, "make_example", lambda world, task, rng, naming_images=2: None)  # tasks only
    counts = Counter(t for step in range(100) for t, _ in pretrain_batch(world, step, 20, PRETRAIN_MIXTURE))
    total = sum(PRETRAIN_MIXTURE.values())
    assert sum(counts.values()) == 2000
    for task, weight in PRETRAIN_MIXTURE.items():
        assert abs(counts[task] / 2000 - weight / total) < 0.04, (task, counts)
    # a task with zero weight is never drawn; a one-task mixture draws only that task
    counts = Counter(t for step in range(20) for t, _ in pretrain_batch(
        world, step, 10, dict(PRETRAIN_MIXTURE, naming=0.0)))
    assert counts["naming"] == 0
    assert {t for t, _ in pretrain_batch(world, 0, 50, {"super": 1.0})} == {"super"}


def test_image_pools_of_naming_and_fresh_tasks(monkeypatch):
    world = World(0)
    calls = []
    render = world.render

    def spy(name, pool, index):
        calls.append((name, pool, index))
        return render(name, pool, index)

    monkeypatch.setattr(world, "render", spy)
    rng = random.Random(0)
    for _ in range(40):  # naming: only the first `naming_images` images of each species
        calls.clear()
        ex = make_example(world, "naming", rng, naming_images=2)
        assert len(calls) == 1
        name, pool, index = calls[0]
        assert pool == "pretrain" and 0 <= index < 2
        assert ex.response == f"This is the {name}."
        assert ex.image.tobytes() in {render(name, "pretrain", i).tobytes() for i in range(2)}
    for task in ("caption", "attribute", "super"):  # fresh images, never the naming ones
        for _ in range(15):
            calls.clear()
            ex = make_example(world, task, rng, naming_images=2)
            assert len(calls) == 1 and ex.image is not None
            assert calls[0][1] == "pretrain" and calls[0][2] >= 2
    for task in ("knowledge", "reasoning"):  # text only
        calls.clear()
        for _ in range(10):
            assert make_example(world, task, rng).image is None
        assert calls == []
    calls.clear()
    ex = make_example(world, "naming", random.Random(1), naming_images=1)
    assert calls[0][2] == 0


def test_examples_of_every_task_are_well_formed(world):
    from finer1_lib.prompts import parse_response

    rng = random.Random(3)
    for task in TASKS:
        for _ in range(5):
            ex = make_example(world, task, rng)
            assert ex.prompt.strip() and ex.response.strip()
            if task == "reasoning":
                resp = parse_response(ex.response)
                assert resp["well_formed"] and resp["answer"] in world.by_name


# ----------------------------------------------------------------------------------------- helpers


def test_length_buckets():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(200)] + [700, 900, 513]
    max_tokens = 512
    chunks = length_buckets(lengths, max_tokens)
    flat = [i for c in chunks for i in c]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert all(chunks)
    for c in chunks:
        longest = max(lengths[i] for i in c)
        assert len(c) * longest <= max_tokens or len(c) == 1
    for a, b in zip(chunks, chunks[1:]):  # buckets of similar length, in increasing order
        assert max(lengths[i] for i in a) <= min(lengths[i] for i in b)
    assert [len(c) for c in chunks if max(lengths[i] for i in c) > max_tokens] == [1, 1, 1]
    assert length_buckets([10] * 8, 40) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert length_buckets([3], 1) == [[0]]


def test_cosine_lr():
    lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 110
    assert cosine_lr(0, total, lr, min_lr, warmup) == pytest.approx(lr / warmup)
    assert cosine_lr(4, total, lr, min_lr, warmup) == pytest.approx(lr * 5 / warmup)
    assert cosine_lr(warmup - 1, total, lr, min_lr, warmup) == pytest.approx(lr)
    assert cosine_lr(warmup, total, lr, min_lr, warmup) == pytest.approx(lr)
    assert cosine_lr(60, total, lr, min_lr, warmup) == pytest.approx((lr + min_lr) / 2)
    assert cosine_lr(total, total, lr, min_lr, warmup) == pytest.approx(min_lr)
    assert cosine_lr(total + 50, total, lr, min_lr, warmup) == pytest.approx(min_lr)
    values = [cosine_lr(s, total, lr, min_lr, warmup) for s in range(total + 1)]
    assert all(a <= b for a, b in zip(values[:warmup], values[1:warmup]))
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))
    assert all(min_lr - 1e-12 <= v <= lr + 1e-12 for v in values)
    assert cosine_lr(0, 5, lr, min_lr, 0) == pytest.approx(lr)  # no warmup
    assert not math.isnan(cosine_lr(3, 3, lr, min_lr, 3))


# ----------------------------------------------------------------------------------------- choice task


def test_choice_task_offers_four_options_never_species(world):
    from finer1_lib.prompts import parse_response

    rng = random.Random(5)
    names = set(world.by_name)
    for _ in range(60):
        ex = make_example(world, "choice", rng)
        assert ex.image is not None and ex.prompt.startswith("Given the question: ")
        options = eval(ex.prompt.split("based on the options provided in ")[1].split(", output the thinking")[0])
        answer = parse_response(ex.response)["answer"]
        assert 2 <= len(options) <= 4 and len(set(options)) == len(options)
        assert answer in options
        assert not names & set(options), options  # species naming stays rare: never offered as a choice


def test_choice_answers_are_spread_over_positions(world):
    rng = random.Random(6)
    positions = Counter()
    for _ in range(300):
        ex = make_example(world, "choice", rng)
        options = eval(ex.prompt.split("based on the options provided in ")[1].split(", output the thinking")[0])
        positions[options.index(ex.response.split("<answer>")[1].split("</answer>")[0])] += 1
    assert min(positions[k] for k in range(4)) > 40, positions


# ----------------------------------------------------------------------------------------- stages


def test_parameter_groups_cover_the_model_once():
    from finer1_lib.model import build_processor, build_tiny_model, build_tokenizer
    from finer1_lib.pretrain import parameter_groups, pretrain_corpus

    tok = build_tokenizer(pretrain_corpus(World(0)))
    model = build_tiny_model(tok, "tiny-3m")
    groups = parameter_groups(model)
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups["merger"] and groups["vision"] and groups["language"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("merger" in names[id(p)] for p in groups["merger"])
    assert all("visual" in names[id(p)] and "merger" not in names[id(p)] for p in groups["vision"])
    assert all("visual" not in names[id(p)] for p in groups["language"])
    assert build_processor(tok).tokenizer.unk_token_id not in tok("Which genus does this bird belong to?")["input_ids"]


def _profile(steps=4):
    smoke = profiles.PROFILES["smoke"]
    stages = {k: dict(v, steps=steps, batch_size=3, warmup=1) for k, v in smoke.pretrain["stages"].items()}
    return smoke.replace(name="smoke", tiny_size="tiny-3m",
                         pretrain=dict(smoke.pretrain, stages=stages, checkpoint_every=2))


def _weights(folder):
    model, _ = load_model(folder)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _interrupt_at(monkeypatch, at_stage, at_step):
    real = pt.pretrain_batch

    def batch(world, step, *args, **kwargs):
        if step == at_step and args[-1] == at_stage:
            raise KeyboardInterrupt(f"simulated interruption before step {step} of {at_stage}")
        return real(world, step, *args, **kwargs)

    monkeypatch.setattr(pt, "pretrain_batch", batch)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "a"
    final = pretrain(_profile(), out, log_every=1, progress=False)
    return out, final


def test_pretrain_writes_every_stage_model_log_and_manifest(uninterrupted):
    out, final = uninterrupted
    assert final == out / "model" and (final / "config.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stages"]) == list(pt.STAGES)
    for stage in pt.STAGES:
        state = torch.load(out / stage / "checkpoint" / "trainer_state.pt", weights_only=True)
        assert state["step"] == 4
        log = read_log(out / stage / "log.csv")
        assert [int(r["step"]) for r in log] == [1, 2, 3, 4]
        assert all(math.isfinite(float(r["loss"])) for r in log)
        assert (out / stage / "model" / "config.json").is_file()
        assert json.loads((out / stage / "done.json").read_text())["steps"] == 4
    assert set(read_log(out / "instruct" / "log.csv")[0]) == {"step", "loss", "lr", "seconds"} | {
        f"loss_{t}" for t in PRETRAIN_MIXTURE}
    assert {"loss_siglip", "loss_attribute", "t", "b"} <= set(read_log(out / "vision" / "log.csv")[0])
    model, _ = _weights(final)
    assert manifest["steps"] == 16 and manifest["parameters"] == count_parameters(model)
    assert manifest["stages"]["instruct"]["mixture"] == PRETRAIN_MIXTURE
    assert manifest["tiny_size"] == "tiny-3m" and manifest["profile"] == "smoke" and manifest["naming_images"] == 2
    assert {s: v["key"] for s, v in manifest["stages"].items()} == pt.stage_keys(_profile())


def test_each_stage_trains_only_its_groups(uninterrupted):
    """text -> vision -> align -> instruct: each stage changes only the parameter groups it trains."""
    from finer1_lib.model import build_tiny_model, build_tokenizer

    out, _ = uninterrupted
    profile = _profile()
    init = build_tiny_model(build_tokenizer(pt.pretrain_corpus(World(profile.world_seed))), profile.tiny_size,
                            seed=profile.pretrain["seed"])
    weights = {"init": {k: v.detach().clone() for k, v in init.state_dict().items()}}
    weights.update({s: _weights(out / s / "model")[1] for s in pt.STAGES})
    assert list(pt.STAGES) == ["text", "vision", "align", "instruct"]
    vis = lambda k: "visual" in k and "merger" not in k  # noqa: E731
    mer = lambda k: "merger" in k  # noqa: E731
    lang = lambda k: "visual" not in k  # noqa: E731
    def changed(a, b, which):
        return any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a] if which(k))
    assert not changed("init", "text", vis) and not changed("init", "text", mer) and changed("init", "text", lang)
    assert changed("text", "vision", vis) and changed("text", "vision", mer) and not changed("text", "vision", lang)
    assert not changed("vision", "align", vis) and changed("vision", "align", mer) and changed("vision", "align", lang)
    assert not changed("align", "instruct", vis) and changed("align", "instruct", mer)


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


def test_resume_after_interruption_at_a_checkpoint(uninterrupted, tmp_path, monkeypatch):
    a_out, a_final = uninterrupted
    b_out = tmp_path / "b"
    _interrupt_at(monkeypatch, "align", 2)  # right after align's step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        pretrain(_profile(), b_out, log_every=1, progress=False)
    monkeypatch.undo()
    assert torch.load(b_out / "align" / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert (b_out / "text" / "done.json").is_file() and not (b_out / "align" / "done.json").exists()
    assert not (b_out / "model").exists() and not (b_out / "manifest.json").exists()

    final = pretrain(_profile(), b_out, log_every=1, progress=False)  # resumes align at step 2
    _assert_same_weights(_weights(a_final)[1], _weights(final)[1])
    a_log, b_log = read_log(a_out / "align" / "log.csv"), read_log(b_out / "align" / "log.csv")
    assert [int(r["step"]) for r in b_log] == [1, 2, 3, 4]
    assert [r["lr"] for r in b_log] == [r["lr"] for r in a_log]
    for ra, rb in zip(a_log, b_log):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), abs=1e-4)


def test_resume_after_interruption_between_checkpoints(uninterrupted, tmp_path, monkeypatch):
    _, a_final = uninterrupted
    c_out = tmp_path / "c"
    _interrupt_at(monkeypatch, "instruct", 3)  # step 3 done, last checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        pretrain(_profile(), c_out, log_every=1, progress=False)
    monkeypatch.undo()
    assert torch.load(c_out / "instruct" / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    final = pretrain(_profile(), c_out, log_every=1, progress=False)
    _assert_same_weights(_weights(a_final)[1], _weights(final)[1])
    steps = [int(r["step"]) for r in read_log(c_out / "instruct" / "log.csv")]
    assert steps == [1, 2, 3, 4]  # rows logged after the last checkpoint are dropped, then redone


def test_a_half_written_checkpoint_is_skipped(uninterrupted, tmp_path, monkeypatch):
    """A kill while the next checkpoint is written leaves the previous one intact; the rerun resumes from it."""
    import shutil

    _, a_final = uninterrupted
    d_out = tmp_path / "d"
    real = pt._save_checkpoint

    def dying(folder, model, processor, state, extra=None):
        if folder.name == "text" and state["step"] == 4:  # cut while writing the step-4 checkpoint
            shutil.copytree(folder / "checkpoint", folder / ".checkpoint.new")
            (folder / ".checkpoint.new" / "trainer_state.pt").unlink()
            raise KeyboardInterrupt("killed mid-write")
        return real(folder, model, processor, state, extra)

    monkeypatch.setattr(pt, "_save_checkpoint", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_profile(), d_out, log_every=1, progress=False)
    monkeypatch.undo()
    assert torch.load(d_out / "text" / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    final = pretrain(_profile(), d_out, log_every=1, progress=False)
    assert not (d_out / "text" / ".checkpoint.new").exists()
    _assert_same_weights(_weights(a_final)[1], _weights(final)[1])


def test_rerunning_a_finished_run_changes_nothing(uninterrupted):
    out, final = uninterrupted
    before = _weights(final)[1]
    n_rows = len(read_log(out / "instruct" / "log.csv"))
    again = pretrain(_profile(), out, log_every=1, progress=False)
    _assert_same_weights(before, _weights(again)[1])
    assert len(read_log(out / "instruct" / "log.csv")) == n_rows


def test_a_changed_stage_setting_reruns_that_stage_and_the_later_ones(uninterrupted, tmp_path):
    import shutil

    out, _ = uninterrupted
    e_out = tmp_path / "e"
    shutil.copytree(out, e_out)
    profile = _profile()
    stages = dict(profile.pretrain["stages"])
    stages["align"] = dict(stages["align"], lr=stages["align"]["lr"] / 2)
    changed = profile.replace(pretrain=dict(profile.pretrain, stages=stages))
    before = {s: (e_out / s / "done.json").read_text() for s in pt.STAGES}
    pretrain(changed, e_out, log_every=1, progress=False)
    after = {s: (e_out / s / "done.json").read_text() for s in pt.STAGES}
    assert before["vision"] == after["vision"] and before["text"] == after["text"]
    assert before["align"] != after["align"] and before["instruct"] != after["instruct"]
    assert json.loads(after["align"])["lr"] == stages["align"]["lr"]
    old_keys, new_keys = pt.stage_keys(profile), pt.stage_keys(changed)
    assert [old_keys[s] == new_keys[s] for s in pt.STAGES] == [True, True, False, False]
    assert {s: json.loads(after[s])["key"] for s in pt.STAGES} == new_keys


@pytest.mark.parametrize("steps", [0, -5, 2.5, True])
def test_bad_step_counts_are_errors(tmp_path, steps):
    with pytest.raises(ValueError, match="--steps must be a positive integer"):
        pretrain(_profile(), tmp_path, steps=steps, progress=False)
    assert not any(tmp_path.iterdir())


def test_a_tampered_training_state_is_refused(uninterrupted, tmp_path):
    import pickle
    import shutil

    out, _ = uninterrupted
    f_out = tmp_path / "f"
    shutil.copytree(out, f_out)
    for stage in ("text", "align", "instruct"):
        shutil.rmtree(f_out / stage / "model")
        (f_out / stage / "done.json").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (f_out / "text" / "checkpoint" / "trainer_state.pt").write_bytes(pickle.dumps({"step": Evil()}))
    with pytest.raises(ValueError, match="cannot read the training state .*trainer_state.pt"):
        pretrain(_profile(), f_out, log_every=1, progress=False)
    assert not (tmp_path / "pwned").exists()


def test_pretrain_without_settings_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no pretraining settings"):
        pretrain(profiles.PROFILES["qwen2.5-vl-3b"], tmp_path, progress=False)


def _species_choice(world, ex):
    """A species-choice example's (options, answer, true species, rationale), after the checks both species-choice
    tasks share: an image, four options of four genera (only the truth is of its genus), the answer among them."""
    from finer1_lib.prompts import parse_response

    options = eval(ex.prompt.split("based on the options provided in ")[1].split(", output the thinking")[0])
    parsed = parse_response(ex.response)
    answer = parsed["answer"]
    assert ex.image is not None and len(options) == 4 and answer in options
    assert len({world.get(o).genus for o in options}) == 4
    return options, answer, world.get(answer), parsed["think"]


def test_coarse_choice_offers_the_true_species_as_the_only_one_of_its_genus(world):
    """coarse_choice: the official species question with four species of four genera; the answer is the true
    species (the genus is enough), so the model learns to answer from species options without fine naming."""
    from finer1_lib.protocol import question_templates

    rng = random.Random(7)
    same_super = 0
    for _ in range(80):
        ex = make_example(world, "coarse_choice", rng)
        options, answer, truth, think = _species_choice(world, ex)
        read = think.split(". This is")[0]  # the rationale reads every option and its genus before the image
        assert all(f"the {o} is {article(world.get(o).genus)} {world.get(o).genus}" in read
                   for o in options), think
        assert think.endswith(f"like every {truth.genus} {SUPER_CATEGORY_WORD[truth.super_category]}, "
                              f"so it is the {answer}.")
        question = ex.prompt.removeprefix("Given the question: ").split(", based on the options")[0]
        assert question in question_templates(truth.super_category)
        same_super += all(world.get(o).super_category == truth.super_category for o in options)
    assert 20 < same_super < 60  # about half: distractors of the same super-category, else of others


def test_cot_choice_writes_table5_with_the_given_options_as_candidates(world):
    """cot_choice: the closed-world prompt with four species of four genera of one super-category, answered in
    Table 5's structure whose <options> are the prompt's options in the prompt's order, whose analysis is the
    image's species' attributes, and whose prediction and answer are the true species."""
    import re

    rng = random.Random(3)
    for _ in range(40):
        ex = make_example(world, "cot_choice", rng)
        options, answer, truth, think = _species_choice(world, ex)
        assert {world.get(o).super_category for o in options} == {truth.super_category}
        assert re.search(r"<analysis>.*</analysis><options>.*</options><comparison>.*</comparison>"
                         r"<prediction>.*</prediction>", think, re.S)
        assert think.split("<options>")[1].split("</options>")[0] == ", ".join(options)
        assert think.split("<prediction>")[1].split("</prediction>")[0] == answer
        analysis = think.split("<analysis>")[1].split("</analysis>")[0]
        assert all(phrase in analysis for phrase in truth.phrases())
