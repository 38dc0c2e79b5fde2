"""SFT with the Trainer: assistant-only loss, resume equals an uninterrupted run, sample validation."""
import random

import pytest
import torch
from transformers import TrainerCallback

import finer1_lib.sft as sft
from finer1_lib.model import build_processor, build_tiny_model, build_tokenizer, load_model
from finer1_lib.pretrain import make_example
from finer1_lib.rationale import corpus
from finer1_lib.world import World

WORLD = World(0)


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_tokenizer(corpus(WORLD)))


def _examples(n=8):
    rng = random.Random(0)
    return [make_example(WORLD, t, rng) for t in ["caption", "reasoning", "naming", "attribute"] * (n // 4)]


CFG = dict(epochs=2, batch_size=4, save_every_epochs=1, logging_steps=1, lr=1e-3)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def test_resume_matches_uninterrupted_run(processor, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    full = build_tiny_model(processor.tokenizer, "tiny-3m", seed=0)
    a = sft.train_sft(full, processor, _examples(), tmp_path / "a", CFG, progress=False)
    assert a["steps"] == 4 and a["resumed_from"] is None

    # interrupted after step 2 (lr > 0 by then: warm-up is 1 step), then the same call resumes from checkpoint-2
    orig = sft.Trainer

    class Interrupted(orig):
        def __init__(self, *args, callbacks=None, **kw):
            super().__init__(*args, callbacks=[*(callbacks or []), StopAt(2)], **kw)

    monkeypatch.setattr(sft, "Trainer", Interrupted)
    sft.train_sft(build_tiny_model(processor.tokenizer, "tiny-3m", seed=0), processor, _examples(),
                  tmp_path / "b", CFG, progress=False)
    monkeypatch.setattr(sft, "Trainer", orig)
    assert (tmp_path / "b" / "checkpoint-2").is_dir()
    assert not (tmp_path / "b" / "checkpoint-4").exists()
    b = sft.train_sft(build_tiny_model(processor.tokenizer, "tiny-3m", seed=0), processor, _examples(),
                      tmp_path / "b", CFG, progress=False)
    assert b["resumed_from"].endswith("checkpoint-2") and b["steps"] == 4
    ma, _ = load_model(tmp_path / "a" / "model")
    mb, _ = load_model(tmp_path / "b" / "model")
    m0 = build_tiny_model(processor.tokenizer, "tiny-3m", seed=0)
    for (na, pa), (nb, pb), (_, p0) in zip(ma.state_dict().items(), mb.state_dict().items(), m0.state_dict().items()):
        assert na == nb and torch.allclose(pa, pb, atol=1e-5), na
    assert not torch.allclose(ma.state_dict()["lm_head.weight"], m0.state_dict()["lm_head.weight"])  # it trained
    log = (tmp_path / "b" / "sft_log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == [1, 2, 3, 4]  # the interrupted part's log is kept


def test_training_lowers_the_loss_on_assistant_tokens(processor, tmp_path):
    torch.set_num_threads(1)
    model = build_tiny_model(processor.tokenizer, "tiny-3m", seed=0)
    s = sft.train_sft(model, processor, _examples(4), tmp_path, dict(CFG, epochs=6, lr=3e-3), progress=False)
    assert s["final_logged_loss"] < 0.8 * 6.8  # from ~ln(vocab) at init


def test_bad_samples_are_named():
    with pytest.raises(ValueError, match="SFT sample 1 is missing \\['response'\\]"):
        sft.examples_from_samples([{"prompt": "p", "response": "r", "image_path": "x"},
                                   {"prompt": "p", "response": "", "image_path": "x"}], lambda p: None)
    with pytest.raises(ValueError, match="training set is empty"):
        sft.EncodedDataset(None, [])


def test_replay_examples_are_deterministic():
    a = sft.replay_examples(WORLD, 6, seed=1)
    b = sft.replay_examples(WORLD, 6, seed=1)
    assert [(x.prompt, x.response) for x in a] == [(x.prompt, x.response) for x in b]
