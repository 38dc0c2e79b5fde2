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


# ----------------------------------------------------------------------------------------- end to end


def _profile(steps=5):
    smoke = profiles.PROFILES["smoke"]
    return smoke.replace(name="smoke", tiny_size="tiny-3m",
                         pretrain=dict(smoke.pretrain, steps=steps, batch_size=3, warmup=1, checkpoint_every=2))


def _weights(folder):
    model, _ = load_model(folder)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _interrupt_at(monkeypatch, at_step):
    real = pt.pretrain_batch

    def batch(world, step, *args, **kwargs):
        if step == at_step:
            raise KeyboardInterrupt(f"simulated interruption before step {step}")
        return real(world, step, *args, **kwargs)

    monkeypatch.setattr(pt, "pretrain_batch", batch)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "a"
    final = pretrain(_profile(), out, steps=5, log_every=1, progress=False)
    return out, final


def test_pretrain_writes_model_log_and_manifest(uninterrupted):
    out, final = uninterrupted
    assert final == out / "model" and (final / "config.json").is_file()
    assert (out / "checkpoint" / "trainer_state.pt").is_file()
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 5
    log = read_log(out / "pretrain_log.csv")
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(float(r["loss"])) for r in log)
    assert set(log[0]) == {"step", "loss", "lr", "seconds"} | {f"loss_{t}" for t in TASKS}
    manifest = json.loads((out / "manifest.json").read_text())
    model, _ = _weights(final)
    assert manifest["steps"] == 5
    assert manifest["parameters"] == count_parameters(model)
    assert manifest["mixture"] == PRETRAIN_MIXTURE
    assert manifest["tiny_size"] == "tiny-3m" and manifest["batch_size"] == 3
    assert manifest["profile"] == "smoke" and manifest["naming_images"] == 2


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


def test_resume_after_interruption_at_a_checkpoint(uninterrupted, tmp_path, monkeypatch):
    a_out, a_final = uninterrupted
    b_out = tmp_path / "b"
    _interrupt_at(monkeypatch, 2)  # right after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        pretrain(_profile(), b_out, steps=5, log_every=1, progress=False)
    monkeypatch.undo()
    assert torch.load(b_out / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 2
    assert not (b_out / "model").exists() and not (b_out / "manifest.json").exists()

    final = pretrain(_profile(), b_out, steps=5, log_every=1, progress=False)  # resumes at step 2
    _assert_same_weights(_weights(a_final)[1], _weights(final)[1])
    a_log, b_log = read_log(a_out / "pretrain_log.csv"), read_log(b_out / "pretrain_log.csv")
    assert [int(r["step"]) for r in b_log] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in b_log] == [r["loss"] for r in a_log]
    assert [r["lr"] for r in b_log] == [r["lr"] for r in a_log]
    assert json.loads((b_out / "manifest.json").read_text())["steps"] == 5


def test_resume_after_interruption_between_checkpoints(uninterrupted, tmp_path, monkeypatch):
    _, a_final = uninterrupted
    c_out = tmp_path / "c"
    _interrupt_at(monkeypatch, 3)  # step 3 done, last checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        pretrain(_profile(), c_out, steps=5, log_every=1, progress=False)
    monkeypatch.undo()
    assert torch.load(c_out / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 2
    final = pretrain(_profile(), c_out, steps=5, log_every=1, progress=False)
    _assert_same_weights(_weights(a_final)[1], _weights(final)[1])
    steps = [int(r["step"]) for r in read_log(c_out / "pretrain_log.csv")]
    assert steps == [1, 2, 3, 4, 5]  # rows logged after the last checkpoint are dropped, then redone


def test_rerunning_a_finished_run_changes_nothing(uninterrupted):
    out, final = uninterrupted
    before = _weights(final)[1]
    n_rows = len(read_log(out / "pretrain_log.csv"))
    again = pretrain(_profile(), out, steps=5, log_every=1, progress=False)
    _assert_same_weights(before, _weights(again)[1])
    assert len(read_log(out / "pretrain_log.csv")) == n_rows


def test_pretrain_without_settings_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no pretraining settings"):
        pretrain(profiles.PROFILES["qwen2.5-vl-3b"], tmp_path, progress=False)
