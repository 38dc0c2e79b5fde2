"""Pretraining a tiny Qwen2.5-VL into the "general MLLM" Fine-R1 starts from.

Fine-R1's starting point (Qwen2.5-VL) perceives the visual attributes and has read about every species, yet
cannot name what it sees (paper Table 1, zero-shot rows). The mixture below builds that state on the micro
world (shares in ``profile.pretrain["mixture"]``):

* ``caption``   image -> all attributes ("This is a bird with a round body, ...");
* ``attribute`` image -> one attribute ("Describe the crest of this bird." -> "It has a red crest.");
* ``super``     image -> super-category;
* ``knowledge`` text only, ALL species, seen and unseen: name -> field guide, field guide -> name, genus;
* ``naming``    image -> species name, only from ``naming_images`` fixed images per species (weak naming);
* ``reasoning`` text only: a field-guide description -> structured reasoning (paper Table 5 tags) -> name.

Images come from the ``pretrain`` pool, disjoint from the few-shot, RL and test pools. The batch of step ``s``
is a pure function of (seed, s), so a resumed run sees exactly the data an uninterrupted run would.
"""
from __future__ import annotations

import csv
import os
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .chat import ChatExample, collate, encode_example
from .io import atomic_write_text, write_json
from .model import build_processor, build_tiny_model, build_tokenizer, count_parameters, load_model, save_model
from .profiles import Profile, get_profile
from .prompts import SFT_SYSTEM_PROMPT, closed_world_prompt, open_world_prompt, tapo_prompt
from .rationale import (CAPTION_PROMPTS, KNOWLEDGE_PROMPTS, NAME_PROMPTS, REVERSE_PROMPTS, SUPER_PROMPTS, article,
                        attribute_questions, caption_text, corpus, similar_species, write_rationale)
from .protocol import question_templates
from .records import SUPER_CATEGORY_WORD
from .world import World, join_phrases

__all__ = ["TASKS", "make_example", "pretrain_batch", "pretrain", "cosine_lr", "length_buckets", "read_log", "ship_model"]

TASKS = ("caption", "attribute", "super", "knowledge", "naming", "reasoning")
_FRESH = 10**6  # caption/attribute/super images are drawn from pretrain-pool indices >= naming_images


def make_example(world: World, task: str, rng: random.Random, naming_images: int = 2) -> ChatExample:
    """One pretraining example of ``task`` (see the module docstring)."""
    sp = rng.choice(world.species)
    word = SUPER_CATEGORY_WORD[sp.super_category]
    fresh = lambda: world.render(sp.name, "pretrain", naming_images + rng.randrange(_FRESH))  # noqa: E731
    if task == "caption":
        return ChatExample(rng.choice(CAPTION_PROMPTS).format(word=word), caption_text(sp, rng), fresh())
    if task == "attribute":
        q, a = rng.choice(attribute_questions(sp))
        return ChatExample(q, a, fresh())
    if task == "super":
        return ChatExample(rng.choice(SUPER_PROMPTS), f"This is {article(word)} {word}.", fresh())
    if task == "naming":
        img = world.render(sp.name, "pretrain", rng.randrange(naming_images))
        prompts = NAME_PROMPTS + tuple(question_templates(sp.super_category))  # incl. the official questions
        return ChatExample(rng.choice(prompts).format(word=word), f"This is the {sp.name}.", img)
    features = join_phrases(rng.sample(sp.phrases(), len(sp.phrases())))
    if task == "knowledge":
        r = rng.random()
        if r < 0.5:
            return ChatExample(rng.choice(KNOWLEDGE_PROMPTS).format(name=sp.name), rng.choice(sp.descriptions))
        if r < 0.9:
            return ChatExample(rng.choice(REVERSE_PROMPTS).format(word=word, features=features, A_word=f"{article(word).capitalize()} {word}"),
                               f"It is the {sp.name}.")
        return ChatExample(f"Which genus does the {sp.name} belong to?",
                           f"The {sp.name} belongs to the {sp.genus} genus.")
    if task == "reasoning":
        question = rng.choice(REVERSE_PROMPTS[::2]).format(word=word, features=features, A_word=f"{article(word).capitalize()} {word}")  # the question forms
        observed = dict(sp.attributes)
        r = rng.random()
        if r < 0.3:  # closed world: the options are the candidates
            others = [s for s in similar_species(world, observed, sp.super_category, k=6, rng=rng) if s != sp]
            candidates = rng.sample([sp] + rng.sample(others, 3), 4)
            prompt = closed_world_prompt(question, [s.name for s in candidates])
        else:
            candidates = similar_species(world, observed, sp.super_category, k=rng.choice([2, 3, 4]), rng=rng)
            candidates = rng.sample(candidates, len(candidates))
            prompt = open_world_prompt(question) if r < 0.8 else tapo_prompt(question)
        response = write_rationale(sp.super_category, observed, candidates, sp.name, rng)
        return ChatExample(prompt, response, None, SFT_SYSTEM_PROMPT if rng.random() < 0.25 else None)
    raise ValueError(f"unknown pretraining task {task!r}; expected one of {TASKS}")


def pretrain_batch(world: World, step: int, batch_size: int, mixture: dict, seed: int = 0,
                   naming_images: int = 2) -> list[tuple[str, ChatExample]]:
    """The (task, example) pairs of training step ``step``: deterministic in (seed, step)."""
    unknown = set(mixture) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks in the pretraining mixture: {sorted(unknown)}; expected {TASKS}")
    rng = random.Random(f"pretrain-{seed}-{step}")
    tasks = rng.choices(list(mixture), weights=list(mixture.values()), k=batch_size)
    return [(t, make_example(world, t, rng, naming_images)) for t in tasks]


def length_buckets(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length so that each chunk's padded size (n * longest) stays <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = [[]]
    for i in order:
        if chunks[-1] and (len(chunks[-1]) + 1) * lengths[i] > max_tokens:
            chunks.append([])
        chunks[-1].append(i)
    return [c for c in chunks if c]


def cosine_lr(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _loss_by_row(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy and token count per row (labels shifted as in causal LM training)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    mask = labels.ne(-100)
    return (ce * mask).sum(1), mask.sum(1)


def pretrain(profile: Profile | str | None = None, out: str | Path | None = None, *, steps: int | None = None,
             log_every: int = 10, progress: bool = True) -> Path:
    """Pretrain (or resume) the tiny base model; returns the folder of the final model.

    ``out/checkpoint`` holds the latest checkpoint (model, processor, optimizer, step): rerunning the same
    command resumes from it. ``out/model`` is the final model, ``out/pretrain_log.csv`` the per-step log,
    ``out/manifest.json`` what was done and how long it took.
    """
    profile = get_profile(profile)
    cfg = dict(profile.pretrain)
    if not cfg:
        raise ValueError(f"profile {profile.name!r} has no pretraining settings (real models come pretrained)")
    total = steps or cfg["steps"]
    out = Path(out) if out else profile.run_dir() / "pretrain"
    out.mkdir(parents=True, exist_ok=True)
    ckpt, log_path = out / "checkpoint", out / "pretrain_log.csv"
    world = World(profile.world_seed, profile.image_size, profile.n_genera)
    torch.manual_seed(cfg["seed"])

    if (ckpt / "trainer_state.pt").is_file():
        model, processor = load_model(ckpt)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        start, elapsed = state["step"], state["elapsed"]
        if log_path.is_file():  # drop log rows written after the checkpoint (they will be redone)
            lines = log_path.read_text().splitlines(keepends=True)
            atomic_write_text(log_path, "".join([lines[0]] + [ln for ln in lines[1:] if int(ln.split(",")[0]) <= start]))
    else:
        tokenizer = build_tokenizer(corpus(world))
        processor = build_processor(tokenizer)
        model = build_tiny_model(tokenizer, profile.tiny_size, seed=cfg["seed"])
        state, start, elapsed = None, 0, 0.0
        atomic_write_text(log_path, "step,loss,lr,seconds," + ",".join(f"loss_{t}" for t in TASKS) + "\n")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg["weight_decay"])
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    pad = processor.tokenizer.pad_token_id

    def save_checkpoint(step: int):
        save_model(model, processor, ckpt)
        torch.save({"step": step, "elapsed": elapsed, "optimizer": opt.state_dict()}, ckpt / "tmp_state.pt")
        (ckpt / "tmp_state.pt").replace(ckpt / "trainer_state.pt")

    window: dict[str, list[float]] = {t: [0.0, 0.0] for t in TASKS}
    bar = tqdm(range(start, total), initial=start, total=total, desc="pretrain", disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        lr = cosine_lr(step, total, cfg["lr"], cfg["min_lr"], cfg["warmup"])
        for group in opt.param_groups:
            group["lr"] = lr
        pairs = pretrain_batch(world, step, cfg["batch_size"], cfg["mixture"], cfg["seed"], cfg["naming_images"])
        encoded = [encode_example(processor, ex) for _, ex in pairs]
        chunks = length_buckets([len(e["input_ids"]) for e in encoded], cfg.get("max_tokens_per_chunk", 2048))
        n_tokens = sum(int(e["labels"].ne(-100).sum()) for e in encoded)  # response tokens in the batch
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(len(pairs))
        count = torch.zeros(len(pairs))
        for idx in chunks:  # same loss and gradient as one padded batch, far fewer padded positions
            batch = collate([encoded[i] for i in idx], pad)
            labels = batch.pop("labels")
            s, c = _loss_by_row(model(**batch, use_cache=False).logits, labels)
            (s.sum() / n_tokens).backward()
            loss_sum[idx], count[idx] = s.detach(), c.float()
        loss = loss_sum.sum() / count.sum()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for (task, _), s, c in zip(pairs, loss_sum.tolist(), count.tolist()):
            window[task][0] += s
            window[task][1] += c
        if (step + 1) % log_every == 0 or step + 1 == total:
            now = time.perf_counter()
            elapsed += now - t0
            t0 = now
            per_task = [f"{w[0] / w[1]:.4f}" if w[1] else "" for w in window.values()]
            with open(log_path, "a") as f:
                f.write(f"{step + 1},{loss.item():.4f},{lr:.6g},{elapsed:.1f}," + ",".join(per_task) + "\n")
            window = {t: [0.0, 0.0] for t in TASKS}
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg["checkpoint_every"] == 0 or step + 1 == total:
            save_checkpoint(step + 1)
    model.eval()
    final = save_model(model, processor, out / "model")
    write_json(out / "manifest.json", {
        "what": "tiny Qwen2.5-VL pretrained on the micro world (finer1_lib.pretrain)",
        "profile": profile.name, "world_seed": profile.world_seed, "image_size": profile.image_size,
        "tiny_size": profile.tiny_size, "parameters": count_parameters(model), "steps": total,
        "batch_size": cfg["batch_size"], "lr": cfg["lr"], "min_lr": cfg["min_lr"], "warmup": cfg["warmup"],
        "mixture": cfg["mixture"], "naming_images": cfg["naming_images"], "seed": cfg["seed"],
        "train_seconds": round(elapsed, 1), "torch_threads": torch.get_num_threads(),
        "command": f"python -m finer1_lib pretrain --profile {profile.name}",
    })
    return final


def read_log(path: str | Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def ship_model(out: str | Path, dest: str | Path | None = None, metrics: dict | None = None) -> Path:
    """Copy a finished pretraining run (model, manifest, log) to ``dest`` (default data/base_model), atomically."""
    import shutil
    import tempfile

    from .profiles import BASE_MODEL_DIR

    out, dest = Path(out), Path(dest or BASE_MODEL_DIR)
    for need in ("model/config.json", "manifest.json", "pretrain_log.csv"):
        if not (out / need).is_file():
            raise FileNotFoundError(f"{out / need} not found: finish `python -m finer1_lib pretrain` first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for f in (out / "model").iterdir():
            shutil.copy2(f, tmp / f.name)
        shutil.copy2(out / "pretrain_log.csv", tmp / "pretrain_log.csv")
        manifest = json.loads((out / "manifest.json").read_text())
        if metrics:
            manifest["metrics"] = metrics
        manifest["command"] = f"python -m finer1_lib pretrain --profile {manifest['profile']} --ship"
        write_json(tmp / "manifest.json", manifest)
        os.chmod(tmp, 0o755)
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
