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

import pandas as pd
import torch
from torch.utils.data import Dataset
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .chat import ChatExample, collate, encode_example
from .io import write_json
from .model import is_4bit_lora, save_model

__all__ = ["EncodedDataset", "examples_from_samples", "replay_examples", "train_sft", "SFT_DEFAULTS"]

#: CPU-sized defaults; profiles override them (``profile.sft``).
SFT_DEFAULTS = dict(epochs=15, batch_size=8, grad_accum=1, lr=3e-4, warmup_frac=0.05, weight_decay=0.1,
                    lr_scheduler="cosine", max_grad_norm=1.0, bf16=False, save_every_epochs=5, seed=0,
                    replay=0.0, logging_steps=5)


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


def replay_examples(world, n: int, seed: int = 0, naming_images: int = 2) -> list[ChatExample]:
    """``n`` pretraining examples (perception + knowledge) mixed into SFT to limit forgetting (a stated choice)."""
    from .pretrain import make_example

    rng = random.Random(f"replay-{seed}")
    tasks = rng.choices(["caption", "knowledge", "reasoning"], weights=[0.4, 0.4, 0.2], k=n)
    return [make_example(world, t, rng, naming_images) for t in tasks]


class _LogCallback(TrainerCallback):
    def __init__(self):
        self.rows = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append({"step": state.global_step, "epoch": round(state.epoch or 0, 3), "loss": logs["loss"],
                              "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm")})


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
    cfg = {**SFT_DEFAULTS, **(cfg or {})}
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
    log = _LogCallback()
    pad = processor.tokenizer.pad_token_id
    model.train()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=lambda f: collate(f, pad),
                      callbacks=[log])
    if not progress:
        trainer.remove_callback(PrinterCallback)  # no per-step dicts on stdout
    last = get_last_checkpoint(str(out)) if resume and out.is_dir() else None
    if last:
        _load_weights(trainer.model, last)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - t0
    model.eval()
    if save and is_4bit_lora(trainer.model):
        trainer.model.save_pretrained(out / "adapter")  # QLoRA: a 4-bit base cannot be merged losslessly
        processor.save_pretrained(out / "adapter")
    elif save:
        save_model(trainer.model, processor, out / "model")
    history = pd.DataFrame(log.rows)
    if last and (out / "sft_log.csv").is_file():  # keep the log of the interrupted part
        history = pd.concat([pd.read_csv(out / "sft_log.csv"), history]).drop_duplicates("step", keep="last")
    history.to_csv(out / "sft_log.csv", index=False)
    summary = {"examples": len(dataset), "steps": trainer.state.global_step, "epochs": cfg["epochs"],
               "seconds": round(seconds, 1), "train_loss": round(result.training_loss, 4),
               "final_logged_loss": float(history["loss"].iloc[-1]) if len(history) else None,
               "resumed_from": last, "max_steps": max_steps, "cfg": cfg}
    write_json(out / "sft.json", summary)
    return summary
