"""Stage 1: CoT SFT (paper §4.2) and the direct-answer SFT baseline (Fig. 3a), with transformers' Trainer.

The Trainer gives checkpoints, resume, gradient accumulation and multi-GPU (accelerate / DeepSpeed) for free;
this module only prepares the examples (loss on the assistant's tokens only, see ``chat.py``) and the
arguments. Full fine-tuning for the tiny model; ``lora=dict(...)`` (and ``load_in_4bit`` at load time) for
real models. Paper settings (official code): lr 5e-6 cosine, warm-up, weight decay 0.1, 10 epochs, bf16.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from .chat import ChatExample, collate, encode_example
from .io import atomic_write_text, write_json
from .config import SFT_OPTIONAL, check_keys
from .model import clean_tmp, is_4bit_lora, save_model
from .profiles import SFT_BASE

__all__ = ["EncodedDataset", "examples_from_samples", "replay_examples", "train_sft", "SFT_DEFAULTS",
           "checkpoint_is_complete", "last_complete_checkpoint"]

#: The settings train_sft reads where ``cfg`` leaves them out: the profiles' base (``profiles.SFT_BASE``, the one
#: place they are set), plus the optional ones (max_steps, lora, gradient_checkpointing: off).
SFT_DEFAULTS = {**SFT_BASE, **SFT_OPTIONAL}


class EncodedDataset(Dataset):
    """Examples encoded once (token ids, labels, pixel values)."""

    def __init__(self, processor, examples: Sequence[ChatExample], max_length: int | None = None):
        if not examples:
            raise ValueError("no SFT examples: the training set is empty")
        self.items = [encode_example(processor, ex, max_length) for ex in examples]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def examples_from_samples(samples: Sequence[dict], load_image: Callable[[str], object]) -> list[ChatExample]:
    """ChatExamples from SFT samples ``{system, prompt, response, image_path}`` (see ``cot.read_sharegpt``)."""
    out = []
    for i, s in enumerate(samples):
        missing = [k for k in ("prompt", "response", "image_path") if not s.get(k)]
        if missing:
            raise ValueError(f"SFT sample {i} is missing {missing}")
        out.append(ChatExample(s["prompt"], s["response"], load_image(s["image_path"]), s.get("system")))
    return out


#: The replay mixture when the ``replay_tasks`` setting is unset: perception, knowledge and text reasoning.
REPLAY_TASKS = {"caption": 0.4, "knowledge": 0.4, "reasoning": 0.2}


def replay_examples(world, n: int, seed: int = 0, naming_images: int = 2,
                    tasks: dict | None = None) -> list[ChatExample]:
    """``n`` pretraining examples mixed into SFT to limit forgetting (a stated choice). ``tasks``: task -> weight
    over the pretraining tasks (``pretrain.TASKS``; default :data:`REPLAY_TASKS`)."""
    from .pretrain import TASKS, make_example

    tasks = dict(tasks or REPLAY_TASKS)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks or any(not isinstance(w, (int, float)) or w < 0 for w in tasks.values()) \
            or sum(tasks.values()) <= 0:
        raise ValueError(f"bad sft setting replay_tasks={tasks!r}: expected task -> weight >= 0 (not all 0) over "
                         f"{', '.join(TASKS)}" + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    rng = random.Random(f"replay-{seed}")
    tasks = rng.choices(list(tasks), weights=list(tasks.values()), k=n)
    return [make_example(world, t, rng, naming_images) for t in tasks]


class _LogLastStep(TrainerCallback):
    """Log the last step too (the Trainer logs every ``logging_steps``): the log then covers every step, and the
    run's mean loss is exact."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True


class _SecondsAtCheckpoints(TrainerCallback):
    """``out/sft_progress.json``: training seconds up to each checkpoint, so a resumed run's time is the whole
    run's."""

    def __init__(self, out: Path, before: float):
        self.out, self.before, self.t0 = out, before, time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        import json

        path = self.out / "sft_progress.json"
        try:
            seen = json.loads(path.read_text())
        except (OSError, ValueError):
            seen = {}
        seen[str(state.global_step)] = round(self.before + time.perf_counter() - self.t0, 1)
        write_json(path, seen)


def _history(log_history: list[dict]) -> pd.DataFrame:
    """The loss log of the whole run from the Trainer's state (restored from the checkpoint on a resume)."""
    rows = [{"step": e["step"], "epoch": round(e.get("epoch") or 0, 3), "loss": e["loss"],
             "lr": e.get("learning_rate"), "grad_norm": e.get("grad_norm")} for e in log_history if "loss" in e]
    frame = pd.DataFrame(rows, columns=["step", "epoch", "loss", "lr", "grad_norm"])
    return frame.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def _mean_loss(history: pd.DataFrame) -> float | None:
    """The mean training loss over every logged step: each logged loss is the mean over the steps since the
    previous log, so it is weighted by that count."""
    if not len(history):
        return None
    steps = history["step"].to_numpy()
    weights = steps - np.concatenate([[0], steps[:-1]])
    return float((history["loss"].to_numpy() * weights).sum() / weights.sum())


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def checkpoint_is_complete(path: str | Path) -> bool:
    """A Trainer checkpoint that was written to the end: ``trainer_state.json`` (the Trainer writes it last) is
    valid JSON for this step, and the weights and optimizer files are there and readable."""
    import json

    from safetensors import safe_open

    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if state.get("global_step") != _checkpoint_step(path) or not (path / "optimizer.pt").is_file():
        return False
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return False
    try:
        for w in weights:
            with safe_open(str(w), "pt") as f:
                f.keys()
    except Exception:  # noqa: BLE001 -- any failure to read the header: a half-written file
        return False
    return True


def last_complete_checkpoint(out: str | Path, repair: bool = True) -> str | None:
    """The newest complete ``checkpoint-N`` in ``out``; with ``repair``, half-written ones (a kill while the
    Trainer wrote them) are removed, so they are redone from the previous complete one."""
    import re
    import shutil
    import warnings

    out = Path(out)
    if not out.is_dir():
        return None
    ckpts = sorted((p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)),
                   key=_checkpoint_step, reverse=True)
    for ckpt in ckpts:
        if checkpoint_is_complete(ckpt):
            return str(ckpt)
        if repair:
            warnings.warn(f"{ckpt} is incomplete (interrupted while it was written): removed, resuming from an "
                          f"earlier checkpoint")
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def _load_weights(model, checkpoint: str) -> None:
    """Load a checkpoint's full weights into ``model`` before resuming.

    The Trainer's own reload reads the safetensors file without the key renaming that ``from_pretrained``
    applies to Qwen2.5-VL (checkpoints use the hub layout ``model.layers.*``, ``visual.*``), so on its own it
    silently loads nothing. peft adapters are reloaded by the Trainer itself.
    """
    if hasattr(model, "peft_config"):
        return
    dtype = next(model.parameters()).dtype
    loaded = type(model).from_pretrained(checkpoint, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:  # lm_head is tied to the embeddings
        raise RuntimeError(f"checkpoint {checkpoint} does not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")


def train_sft(model, processor, examples: Sequence[ChatExample], out: str | Path, cfg: dict | None = None, *,
              resume: bool = True, progress: bool = True, max_steps: int | None = None, save: bool = True) -> dict:
    """Fine-tune ``model`` on ``examples``; checkpoints in ``out/checkpoint-*``, final model in ``out/model``.

    Rerunning with the same ``out`` resumes from the last checkpoint (optimizer, scheduler, RNG and data order
    restored by the Trainer). Returns a summary (steps, seconds, final loss) also written to ``out/sft.json``;
    the loss log goes to ``out/sft_log.csv``. A QLoRA model (4-bit base) saves its adapter in ``out/adapter``;
    ``save=False`` skips the final save (benchmarks).
    """
    cfg = dict(cfg or {})
    if max_steps is None:
        max_steps = cfg.get("max_steps")
    cfg.pop("max_steps", None)  # a keyword of its own (kept in the summary and the settings)
    check_keys("sft", cfg, "train_sft cfg")  # a misspelled key is an error naming it
    cfg = {**SFT_DEFAULTS, **cfg}
    cfg.pop("max_steps", None)
    cfg.pop("direct_lr", None)  # resolved by pipeline.sft_config: this run trains at cfg["lr"]
    if max_steps is not None and (not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
    out = Path(out)
    dataset = EncodedDataset(processor, examples)
    steps_per_epoch = math.ceil(len(dataset) / (cfg["batch_size"] * cfg["grad_accum"]))
    total = max_steps or steps_per_epoch * cfg["epochs"]
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=cfg["epochs"],
        max_steps=max_steps or -1,
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"],
        learning_rate=cfg["lr"],
        lr_scheduler_type=cfg["lr_scheduler"],
        warmup_steps=max(1, round(cfg["warmup_frac"] * total)),
        weight_decay=cfg["weight_decay"],
        max_grad_norm=cfg["max_grad_norm"],
        bf16=cfg["bf16"],
        logging_steps=cfg["logging_steps"],
        save_strategy="steps",
        save_steps=max(1, steps_per_epoch * cfg["save_every_epochs"]),
        save_total_limit=2,
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
        gradient_checkpointing=cfg.get("gradient_checkpointing", False),  # real sizes on small GPUs
        use_cpu=not torch.cuda.is_available(),
    )
    pad = processor.tokenizer.pad_token_id
    model.train()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=lambda f: collate(f, pad),
                      callbacks=[_LogLastStep()])
    if not progress:
        trainer.remove_callback(PrinterCallback)  # no per-step dicts on stdout
    clean_tmp(out)  # temp files of an interrupted atomic write
    settings = {"cfg": cfg, "max_steps": max_steps, "examples": len(dataset)}
    last = last_complete_checkpoint(out) if resume else None
    if last:
        _check_same_run(out, settings)
        _load_weights(trainer.model, last)
    write_json(out / "sft_settings.json", settings)
    seconds_before = _previous_seconds(out, last) if last else 0.0
    trainer.add_callback(_SecondsAtCheckpoints(out, seconds_before))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - t0
    model.eval()
    if save and is_4bit_lora(trainer.model):
        trainer.model.save_pretrained(out / "adapter")  # QLoRA: a 4-bit base cannot be merged losslessly
        processor.save_pretrained(out / "adapter")
    elif save:
        save_model(trainer.model, processor, out / "model")
    # the log and the loss cover the whole run, the part before a resume included (kept in the checkpoint)
    history = _history(trainer.state.log_history)
    atomic_write_text(out / "sft_log.csv", history.to_csv(index=False))
    mean_loss = _mean_loss(history)
    summary = {"examples": len(dataset), "steps": trainer.state.global_step, "epochs": cfg["epochs"],
               "seconds": round(seconds_before + seconds, 1), "seconds_this_session": round(seconds, 1),
               "train_loss": round(mean_loss, 4) if mean_loss is not None else None,
               "final_logged_loss": float(history["loss"].iloc[-1]) if len(history) else None,
               "resumed_from": last, "max_steps": max_steps, "cfg": cfg}
    write_json(out / "sft.json", summary)
    return summary


def _previous_seconds(out: Path, checkpoint: str) -> float:
    """Training seconds up to ``checkpoint`` (``sft_progress.json``; 0 when unknown)."""
    import json

    try:
        return float(json.loads((out / "sft_progress.json").read_text()).get(str(_checkpoint_step(Path(checkpoint))), 0.0))
    except (OSError, ValueError, TypeError):
        return 0.0


def _check_same_run(out: Path, settings: dict) -> None:
    """Refuse to resume a checkpoint written with other settings (the run would mix them)."""
    import json

    path = out / "sft_settings.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # a folder from before sft_settings.json existed: nothing to compare
    now = json.loads(json.dumps(settings))
    diff = {k: (saved.get("cfg", {}).get(k), v) for k, v in now["cfg"].items() if saved.get("cfg", {}).get(k) != v}
    for k in ("max_steps", "examples"):
        if saved.get(k) != now[k]:
            diff[k] = (saved.get(k), now[k])
    if diff:
        raise ValueError(f"{out} holds an SFT run with other settings {diff} (saved, requested): resuming it would "
                         f"mix them; use another folder or start over (fresh=True)")
