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
    # the summary covers the whole run, not only the part after the resume
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-3) and b["train_loss"] > 0
    assert b["final_logged_loss"] == pytest.approx(a["final_logged_loss"], abs=1e-3)


def _interrupted_at(processor, out, step, monkeypatch):
    orig = sft.Trainer

    class Interrupted(orig):
        def __init__(self, *args, callbacks=None, **kw):
            super().__init__(*args, callbacks=[*(callbacks or []), StopAt(step)], **kw)

    with monkeypatch.context() as m:
        m.setattr(sft, "Trainer", Interrupted)
        sft.train_sft(build_tiny_model(processor.tokenizer, "tiny-3m", seed=0), processor, _examples(), out, CFG,
                      progress=False)


def test_a_kill_after_the_last_checkpoint_keeps_the_whole_log_and_loss(processor, tmp_path):
    """Killed after checkpoint-4 was written, before the model, sft_log.csv and sft.json: the rerun trains 0
    steps and still reports the whole run (it used to write an empty log, train_loss 0.0, final loss null)."""
    torch.set_num_threads(1)
    out = tmp_path / "run"
    a = sft.train_sft(build_tiny_model(processor.tokenizer, "tiny-3m", seed=0), processor, _examples(), out, CFG,
                      progress=False)
    for name in ("sft.json", "sft_log.csv"):
        (out / name).unlink()
    import shutil

    shutil.rmtree(out / "model")
    b = sft.train_sft(build_tiny_model(processor.tokenizer, "tiny-3m", seed=0), processor, _examples(), out, CFG,
                      progress=False)
    assert b["resumed_from"].endswith("checkpoint-4") and b["steps"] == 4
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4) and b["train_loss"] > 0
    assert b["final_logged_loss"] == pytest.approx(a["final_logged_loss"], abs=1e-4)
    assert [int(r.split(",")[0]) for r in (out / "sft_log.csv").read_text().splitlines()[1:]] == [1, 2, 3, 4]
    assert b["seconds"] >= a["seconds"] - 0.2  # the time before the kill counts


def test_a_half_written_checkpoint_is_skipped_and_leftovers_cleaned(processor, tmp_path, monkeypatch):
    """A kill while the Trainer wrote checkpoint-3: the rerun resumes from checkpoint-2 (it used to fail on every
    rerun); .tmp leftovers of interrupted atomic writes are removed."""
    torch.set_num_threads(1)
    ref = sft.train_sft(build_tiny_model(processor.tokenizer, "tiny-3m", seed=0), processor, _examples(),
                        tmp_path / "ref", CFG, progress=False)
    out = tmp_path / "run"
    _interrupted_at(processor, out, 2, monkeypatch)
    import shutil

    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")  # a checkpoint cut mid-write:
    (out / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3, "log_hi')
    data = (out / "checkpoint-3" / "model.safetensors").read_bytes()
    (out / "checkpoint-3" / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert not sft.checkpoint_is_complete(out / "checkpoint-3") and sft.checkpoint_is_complete(out / "checkpoint-2")
    (out / ".sft.json.x1y2.tmp").write_text("{")
    (out / ".model.abcd.tmp").mkdir()
    with pytest.warns(UserWarning, match="checkpoint-3 is incomplete"):
        b = sft.train_sft(build_tiny_model(processor.tokenizer, "tiny-3m", seed=0), processor, _examples(), out, CFG,
                          progress=False)
    assert b["resumed_from"].endswith("checkpoint-2") and b["steps"] == 4
    assert b["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-3)
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))


def test_resuming_with_other_settings_is_refused(processor, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    _interrupted_at(processor, out, 2, monkeypatch)
    with pytest.raises(ValueError, match=r"other settings \{'lr': \(0\.001, 0\.002\)\}"):
        sft.train_sft(build_tiny_model(processor.tokenizer, "tiny-3m", seed=0), processor, _examples(), out,
                      dict(CFG, lr=2e-3), progress=False)


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
    # the default mixture is REPLAY_TASKS: passing it explicitly draws the same examples
    c = sft.replay_examples(WORLD, 6, seed=1, tasks=sft.REPLAY_TASKS)
    assert [(x.prompt, x.response) for x in a] == [(x.prompt, x.response) for x in c]


def test_replay_tasks_choose_the_mixture_and_bad_ones_are_named():
    only_choice = sft.replay_examples(WORLD, 8, seed=0, tasks={"choice": 1.0})
    assert all(x.image is not None and "options" in x.prompt.lower() for x in only_choice)
    only_text = sft.replay_examples(WORLD, 8, seed=0, tasks={"knowledge": 1.0, "reasoning": 1.0})
    assert all(x.image is None for x in only_text)
    for bad in ({"spelling": 1.0}, {"choice": -1.0}, {"choice": 0.0}):
        with pytest.raises(ValueError, match="replay_tasks"):
            sft.replay_examples(WORLD, 2, seed=0, tasks=bad)


def test_save_false_writes_no_model_and_qlora_saves_its_adapter(processor, tmp_path):
    """A 4-bit base cannot be merged: QLoRA SFT keeps its adapter (out/adapter), loadable with peft."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    from peft import PeftModel

    from finer1_lib.model import save_model

    folder = save_model(build_tiny_model(processor.tokenizer, "tiny-3m", seed=0), processor, tmp_path / "base")
    cfg = dict(CFG, epochs=1, gradient_checkpointing=True)
    model, _ = load_model(folder)
    s = sft.train_sft(model, processor, _examples(4), tmp_path / "plain", cfg, progress=False, save=False)
    assert s["steps"] == 1 and not (tmp_path / "plain" / "model").exists()

    model, _ = load_model(folder, load_in_4bit=True, lora=dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    sft.train_sft(model, processor, _examples(8), tmp_path / "qlora", cfg, progress=False)  # step 1: lr 0 (warm-up)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # grads flow
    assert (tmp_path / "qlora" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "qlora" / "model").exists()
    base, _ = load_model(folder, load_in_4bit=True)
    assert isinstance(PeftModel.from_pretrained(base, tmp_path / "qlora" / "adapter"), PeftModel)


def test_full_fine_tuning_loads_fp32_master_weights_on_bf16_profiles():
    """Why (pipeline.training_dtype): AdamW on bf16 weights rounds a 5e-6 step on a 0.02 weight away."""
    from finer1_lib.pipeline import tapo_config, training_dtype
    from finer1_lib.profiles import PROFILES

    moved = {}
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.nn.Parameter(torch.full((4,), 0.02, dtype=dtype))
        w.grad = torch.ones_like(w)
        torch.optim.AdamW([w], lr=5e-6, weight_decay=0.0).step()  # Adam's first step moves each weight by lr
        moved[dtype] = (torch.full((4,), 0.02, dtype=dtype) - w.detach()).double().abs().max().item()
    assert moved[torch.bfloat16] == 0.0 and moved[torch.float32] == pytest.approx(5e-6, rel=1e-2)
    real = PROFILES["qwen2.5-vl-3b"]
    assert training_dtype(real) == "float32" and training_dtype(real, lora=True) == "bfloat16"
    assert training_dtype(PROFILES["cpu"]) is None
    assert real.sft["bf16"] and tapo_config(real, n_triplets=10).bf16_autocast
    assert not tapo_config(PROFILES["cpu"]).bf16_autocast
