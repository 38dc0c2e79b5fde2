"""Pretraining a tiny Qwen2.5-VL into the "general MLLM" Fine-R1 starts from, staged as real MLLMs are built.

Fine-R1's starting point (Qwen2.5-VL) perceives the visual attributes, has read about every species and answers
multiple choice well, yet cannot name what it sees (paper Table 1, zero-shot rows). Qwen2.5-VL itself is built
from a pretrained LLM and a contrastively pretrained vision encoder, joined by a projector (the merger) that is
aligned first and then tuned on instructions. The miniature follows the same four stages (``STAGES``), each
with its own steps, learning rates, log and checkpoint (``profile.pretrain["stages"]``):

* ``text``     the language model reads: field guide (name <-> attributes, genus, ALL species, seen and unseen)
               and text-only structured reasoning over it (paper Table 5 tags). No images; the tower is untouched.
               It runs first: the tower and the language model train disjoint parameters on disjoint data, and
               this order lets a change to the vision stage keep the (longest) text stage.
* ``vision``   the vision tower learns to see: SigLIP sigmoid loss between its image tokens and attribute
               captions, plus InfoNCE against the captions of each attribute's values (hard negatives), never
               species names (``finer1_lib.contrastive``). The LLM is untouched.
* ``align``    the merger (projector) learns to speak to the LLM: image -> caption / one attribute / super-category,
               vision tower frozen, language model at a low learning rate (``lr_scale``).
* ``instruct`` the instruction mixture: the tasks above, plus ``choice``: four-option multiple choice in the
               closed-world prompt format about attributes, genera and super-categories, never species, so the
               model practises answering from the options it is given, and ``coarse_choice``: the closed-world
               species question itself, but the three wrong options are of other genera (or other
               super-categories), so the genus is enough to answer. Fine-grained image -> species naming stays
               rare (``naming``: ``naming_images`` fixed images per species): it knows, but cannot deploy.

Tasks of the language stages (``TASKS``):

* ``caption``   image -> all attributes ("This is a bird with a round body, ...");
* ``attribute`` image -> one attribute ("Describe the crest of this bird." -> "It has a red crest.");
* ``super``     image -> super-category;
* ``knowledge`` text only: name -> field guide, field guide -> name, genus;
* ``naming``    image -> species name, only from ``naming_images`` fixed images per species (weak naming);
* ``reasoning`` text only: a field-guide description -> structured reasoning -> name;
* ``choice``    image -> one of four options (an attribute value, a genus or a super-category);
* ``coarse_choice`` image + an official species question -> one of four species, the only one of its genus
                (the others: other genera of the super-category, or other super-categories). Without it the
                model, which never saw a species offered as an option with an image, answered the closed-world
                question with an attribute ("<answer>straight</answer>"): 0 % of its answers were an option.
                Its rationale reads each option's genus first and then copies the one option of the image's genus:
                a rationale that only named the genus ("the X is the only G among the options") left 46 % of the
                test answers with one option of the true genus outside the four options (a species of that genus
                named from memory).

Images come from the ``pretrain`` pool, disjoint from the few-shot, RL and test pools. The batch of step ``s``
of a stage is a pure function of (seed, stage, s), so a resumed run sees exactly the data an uninterrupted run
would. Checkpoints are written to a new folder and swapped in by rename: a kill never loses the last one.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .chat import ChatExample, collate, encode_example
from .contrastive import (ContrastiveHeads, attribute_captions, attribute_nce_loss, caption_batch, image_tokens,
                          pixel_inputs, siglip_loss)
from .io import atomic_write_text, write_json
from .model import build_processor, build_tiny_model, build_tokenizer, count_parameters, load_model, save_model
from .profiles import Profile, get_profile
from .prompts import SFT_SYSTEM_PROMPT, closed_world_prompt, format_answer, open_world_prompt, tapo_prompt
from .rationale import (CAPTION_PROMPTS, KNOWLEDGE_PROMPTS, NAME_PROMPTS, REVERSE_PROMPTS, SUPER_PROMPTS, article,
                        attribute_questions, caption_text, corpus, similar_species, write_rationale)
from .protocol import question_templates
from .records import SUPER_CATEGORIES, SUPER_CATEGORY_WORD
from .world import SCHEMAS, World, join_phrases

__all__ = ["STAGES", "TASKS", "make_example", "pretrain_batch", "pretrain", "cosine_lr", "length_buckets",
           "read_log", "ship_model", "stage_key", "stage_keys", "parameter_groups", "pretrain_corpus"]

STAGES = ("text", "vision", "align", "instruct")
TASKS = ("caption", "attribute", "super", "knowledge", "naming", "reasoning", "choice", "coarse_choice", "cot_choice")
_FRESH = 10**6  # caption/attribute/super/choice images are drawn from pretrain-pool indices >= naming_images
GENUS_QUESTION = "Which genus does this {word} belong to?"
COARSE_CHOICE_WORDS = "Of the options, the is a an; so it is the."  # the coarse_choice rationale's own words


def pretrain_corpus(world: World) -> list[str]:
    """The tokenizer's corpus: every text of the world, plus the pretraining-only question forms."""
    return corpus(world) + [GENUS_QUESTION, "Which genus does the belong to?", COARSE_CHOICE_WORDS]


def _choice_example(world: World, sp, rng: random.Random, image) -> ChatExample:
    """Four-option multiple choice about an attribute, the genus or the super-category (never the species)."""
    word = SUPER_CATEGORY_WORD[sp.super_category]
    r = rng.random()
    if r < 0.6:  # an attribute: the true value and up to three others of the same dimension
        dim = rng.choice(SCHEMAS[sp.super_category].dims)
        truth = dim.say(sp.attributes[dim.name])
        others = [dim.say(v) for v in dim.values if v != sp.attributes[dim.name]]
        options = rng.sample([truth] + rng.sample(others, min(3, len(others))), min(4, len(others) + 1))
        question, think = f"Describe the {dim.name} of this {word}.", f"The {word} has {truth}."
    elif r < 0.85:  # the genus: the super-category's genera (its genus attributes are what tell them apart)
        genera = sorted({s.genus for s in world.species_of(sp.super_category)})
        truth = sp.genus
        options = rng.sample([truth] + rng.sample([g for g in genera if g != truth], min(3, len(genera) - 1)),
                             min(4, len(genera)))
        genus_dims = SCHEMAS[sp.super_category].genus_dims
        feats = join_phrases([d.say(sp.attributes[d.name]) for d in genus_dims])
        question, think = GENUS_QUESTION.format(word=word), f"The {word} has {feats}, like every {truth} {word}."
    else:  # the super-category
        words = [SUPER_CATEGORY_WORD[s] for s in SUPER_CATEGORIES]
        truth = word
        options = rng.sample([truth] + rng.sample([w for w in words if w != truth], 3), 4)
        question, think = rng.choice(SUPER_PROMPTS), f"This is {article(word)} {word}."
    return ChatExample(closed_world_prompt(question, options), format_answer(think, truth), image)


def _coarse_options(world: World, sp, rng: random.Random, same_super: bool | None = None) -> list:
    """``sp`` and three species of three other genera, shuffled: options where perceiving the genus is enough to
    choose. The others share ``sp``'s super-category when ``same_super``, else not; None: half the time each."""
    if same_super is None:
        same_super = rng.random() < 0.5
    pool = [s for s in world.species if s.genus != sp.genus and (s.super_category == sp.super_category) == same_super]
    if len({s.genus for s in pool}) < 3:  # too few genera of this kind: any other genus
        pool = [s for s in world.species if s.genus != sp.genus]
    others, genera = [], set()
    for s in rng.sample(pool, len(pool)):  # three distractors of three different genera
        if s.genus not in genera:
            others.append(s)
            genera.add(s.genus)
        if len(others) == 3:
            break
    return rng.sample([sp] + others, 4)


def _coarse_choice_example(world: World, sp, rng: random.Random, image) -> ChatExample:
    """The closed-world prompt with an official species question and four species: the true one and three of
    other genera (``_coarse_options``), so perceiving the genus is enough. The rationale first reads the options
    (each one's genus, the last word of its name), then the image's genus, then copies the one option of that
    genus: the answer is taken from the options, not named from memory."""
    word = SUPER_CATEGORY_WORD[sp.super_category]
    shown = _coarse_options(world, sp, rng)
    feats = join_phrases([d.say(sp.attributes[d.name]) for d in SCHEMAS[sp.super_category].genus_dims])
    read = "; ".join(f"the {s.name} is {article(s.genus)} {s.genus}" for s in shown)
    think = (f"Of the options, {read}. This is {article(word)} {word} with {feats}, like every {sp.genus} {word}, "
             f"so it is the {sp.name}.")
    question = rng.choice(question_templates(sp.super_category))
    return ChatExample(closed_world_prompt(question, [s.name for s in shown]), format_answer(think, sp.name), image)


def _cot_choice_example(world: World, sp, rng: random.Random, image) -> ChatExample:
    """The closed-world prompt (official species question, the ``_coarse_options``) answered in the structured
    reasoning of paper Table 5: the image's attributes, the **given options** as the candidates (in the prompt's
    order), each compared with its field-guide attributes, the matching one. The CoT SFT set writes the same
    format with candidates from memory (its prompts have no options); this task is where the base model meets
    that format with options in the prompt, so the format does not arrive without the skill of choosing.
    The options share the super-category (the comparison reads each option's attributes of that schema)."""
    shown = _coarse_options(world, sp, rng, same_super=True)
    response = write_rationale(sp.super_category, dict(sp.attributes), shown, sp.name, rng)
    question = rng.choice(question_templates(sp.super_category))
    return ChatExample(closed_world_prompt(question, [s.name for s in shown]), response, image)


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
    if task == "choice":
        return _choice_example(world, sp, rng, fresh())
    if task == "coarse_choice":
        return _coarse_choice_example(world, sp, rng, fresh())
    if task == "cot_choice":
        return _cot_choice_example(world, sp, rng, fresh())
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
                   naming_images: int = 2, stage: str = "instruct") -> list[tuple[str, ChatExample]]:
    """The (task, example) pairs of training step ``step`` of ``stage``: deterministic in (seed, stage, step)."""
    unknown = set(mixture) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks in the pretraining mixture: {sorted(unknown)}; expected {TASKS}")
    rng = random.Random(f"pretrain-{seed}-{stage}-{step}")
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


# ------------------------------------------------------------------------------------------------ stages
def parameter_groups(model) -> dict[str, list[torch.nn.Parameter]]:
    """The model's parameters in three groups: ``vision`` (the ViT), ``merger`` (projector), ``language``."""
    groups: dict[str, list] = {"vision": [], "merger": [], "language": []}
    for name, p in model.named_parameters():
        if ".visual." in f".{name}":
            groups["merger" if ".merger." in name else "vision"].append(p)
        else:
            groups["language"].append(p)
    return groups


def stage_key(cfg: dict, parent: str = "") -> str:
    """A short hash of a stage's settings and of the stage it starts from: a changed setting is a new run."""
    cfg = {k: v for k, v in cfg.items() if k != "checkpoint_every"}  # when to save does not change the result
    blob = json.dumps({"cfg": cfg, "parent": parent}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stage_settings(cfg: dict, name: str, steps: int | None) -> dict:
    common = {k: cfg[k] for k in ("seed", "naming_images", "weight_decay", "checkpoint_every",
                                  "max_tokens_per_chunk") if k in cfg}
    stage = dict(common, **cfg["stages"][name])
    if steps is not None:
        stage["steps"] = steps
    for key in ("steps", "batch_size"):
        if not isinstance(stage.get(key), int) or stage[key] < 1:
            raise ValueError(f"pretraining stage {name!r}: {key} must be a positive integer, got {stage.get(key)!r}")
    return stage


def stage_keys(profile: Profile | str | None = None, steps: int | None = None) -> dict[str, str]:
    """Each stage's key for ``profile`` (stage name -> :func:`stage_key`), chained: a stage's key covers its own
    settings and every stage before it, starting from the model size and the world. ``pretrain`` skips a stage
    whose ``done.json`` holds this key; a shipped manifest must hold these keys."""
    profile = get_profile(profile)
    cfg = dict(profile.pretrain)
    if not cfg:
        raise ValueError(f"profile {profile.name!r} has no pretraining settings (real models come pretrained)")
    parent, keys = f"{profile.tiny_size}/world{profile.world_seed}/{profile.image_size}/{profile.n_genera}", {}
    for name in STAGES:
        parent = keys[name] = stage_key(_stage_settings(cfg, name, steps), parent)
    return keys


def _complete(ckpt: Path) -> bool:
    return (ckpt / "trainer_state.pt").is_file() and (ckpt / "config.json").is_file()


def _save_checkpoint(folder: Path, model, processor, state: dict, extra: dict | None = None) -> None:
    """Write the checkpoint to a new folder, then swap it in: the previous one survives any interruption."""
    ckpt, new, old = folder / "checkpoint", folder / ".checkpoint.new", folder / ".checkpoint.old"
    shutil.rmtree(new, ignore_errors=True)
    save_model(model, processor, new)
    torch.save(state, new / "trainer_state.pt.tmp")
    for name, obj in (extra or {}).items():
        torch.save(obj, new / name)
    os.replace(new / "trainer_state.pt.tmp", new / "trainer_state.pt")
    if ckpt.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt, old)
    os.replace(new, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def _find_checkpoint(folder: Path) -> Path | None:
    """The last complete checkpoint (a half-written one is skipped and removed)."""
    shutil.rmtree(folder / ".checkpoint.new", ignore_errors=True)
    for ckpt in (folder / "checkpoint", folder / ".checkpoint.old"):
        if _complete(ckpt):
            return ckpt
    return None


def _load_state(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a tampered or foreign file: never unpickle arbitrary objects
        raise ValueError(f"cannot read the training state {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _trim_log(log_path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint (they will be redone)."""
    if log_path.is_file():
        lines = log_path.read_text().splitlines(keepends=True)
        atomic_write_text(log_path, "".join([lines[0]] + [ln for ln in lines[1:] if int(ln.split(",")[0]) <= step]))


def _run_lm_stage(name: str, s: dict, folder: Path, model, processor, world: World, log_every: int,
                  progress: bool) -> float:
    """Next-token training on a task mixture; only the groups in ``s["train"]`` learn, each at lr * its scale."""
    log_path, ckpt_dir = folder / "log.csv", folder
    groups = parameter_groups(model)
    for g, params in groups.items():
        for p in params:
            p.requires_grad_(g in s["train"])
    opt = torch.optim.AdamW([{"params": groups[g], "lr_scale": float(scale)} for g, scale in s["train"].items()],
                            lr=s["lr"], betas=(0.9, 0.95), weight_decay=s["weight_decay"])
    tasks = list(s["mixture"])
    ckpt = _find_checkpoint(ckpt_dir)
    if ckpt is not None:
        state = _load_state(ckpt / "trainer_state.pt")
        model.load_state_dict(load_model(ckpt)[0].state_dict())
        opt.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["elapsed"]
        _trim_log(log_path, start)
    else:
        start, elapsed = 0, 0.0
        atomic_write_text(log_path, "step,loss,lr,seconds," + ",".join(f"loss_{t}" for t in tasks) + "\n")
    model.train()
    pad = processor.tokenizer.pad_token_id
    trainable = [p for g in s["train"] for p in groups[g]]
    window: dict[str, list[float]] = {t: [0.0, 0.0] for t in tasks}
    bar = tqdm(range(start, s["steps"]), initial=start, total=s["steps"], desc=f"pretrain {name}",
               disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        lr = cosine_lr(step, s["steps"], s["lr"], s["min_lr"], s["warmup"])
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        pairs = pretrain_batch(world, step, s["batch_size"], s["mixture"], s["seed"], s["naming_images"], name)
        encoded = [encode_example(processor, ex) for _, ex in pairs]
        chunks = length_buckets([len(e["input_ids"]) for e in encoded], s.get("max_tokens_per_chunk", 2048))
        n_tokens = sum(int(e["labels"].ne(-100).sum()) for e in encoded)  # response tokens in the batch
        opt.zero_grad(set_to_none=True)
        loss_sum, count = torch.zeros(len(pairs)), torch.zeros(len(pairs))
        for idx in chunks:  # same loss and gradient as one padded batch, far fewer padded positions
            batch = collate([encoded[i] for i in idx], pad)
            labels = batch.pop("labels")
            sums, counts = _loss_by_row(model(**batch, use_cache=False).logits, labels)
            (sums.sum() / n_tokens).backward()
            loss_sum[idx], count[idx] = sums.detach(), counts.float()
        loss = loss_sum.sum() / count.sum()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        for (task, _), v, c in zip(pairs, loss_sum.tolist(), count.tolist()):
            window[task][0] += v
            window[task][1] += c
        if (step + 1) % log_every == 0 or step + 1 == s["steps"]:
            now = time.perf_counter()
            elapsed, t0 = elapsed + now - t0, now
            per_task = [f"{w[0] / w[1]:.4f}" if w[1] else "" for w in window.values()]
            with open(log_path, "a") as f:
                f.write(f"{step + 1},{loss.item():.4f},{lr:.6g},{elapsed:.1f}," + ",".join(per_task) + "\n")
            window = {t: [0.0, 0.0] for t in tasks}
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % s["checkpoint_every"] == 0 or step + 1 == s["steps"]:
            _save_checkpoint(ckpt_dir, model, processor, {"step": step + 1, "elapsed": elapsed,
                                                          "optimizer": opt.state_dict()})
    for p in model.parameters():
        p.requires_grad_(True)
    return elapsed


def _run_vision_stage(s: dict, folder: Path, model, processor, world: World, log_every: int,
                      progress: bool) -> float:
    """Stage (a): SigLIP between the tower's merged image tokens and attribute captions (contrastive.py)."""
    log_path = folder / "log.csv"
    groups = parameter_groups(model)
    for p in groups["language"]:
        p.requires_grad_(False)
    tower = groups["vision"] + groups["merger"]
    tok = processor.tokenizer
    torch.manual_seed(s["seed"])
    grid = pixel_inputs(processor, [world.render(world.species[0].name, "pretrain", 0)])["image_grid_thw"]
    n_tokens = int(grid.prod()) // model.config.vision_config.spatial_merge_size ** 2
    heads = ContrastiveHeads(model.config.text_config.hidden_size, len(tok), tok.pad_token_id,
                             n_tokens=n_tokens, **s.get("heads", {}))
    opt = torch.optim.AdamW([{"params": tower}, {"params": list(heads.parameters())}], lr=s["lr"],
                            betas=(0.9, 0.95), weight_decay=s["weight_decay"])
    ckpt = _find_checkpoint(folder)
    if ckpt is not None:
        state = _load_state(ckpt / "trainer_state.pt")
        model.load_state_dict(load_model(ckpt)[0].state_dict())
        heads.load_state_dict(_load_state(ckpt / "heads.pt"))
        opt.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["elapsed"]
        _trim_log(log_path, start)
    else:
        start, elapsed = 0, 0.0
        atomic_write_text(log_path, "step,loss,loss_siglip,loss_attribute,lr,seconds,t,b,pos_cos,neg_cos\n")
    model.train()
    heads.train()
    attr_texts, by_dim, index = attribute_captions(world.species)
    attr_ids = tok(attr_texts, padding=True, add_special_tokens=False, return_tensors="pt")["input_ids"]
    w_attr = s.get("attribute_weight", 1.0)
    bar = tqdm(range(start, s["steps"]), initial=start, total=s["steps"], desc="pretrain vision",
               disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        lr = cosine_lr(step, s["steps"], s["lr"], s["min_lr"], s["warmup"])
        for group in opt.param_groups:
            group["lr"] = lr
        b = caption_batch(world, step, s["batch_size"], s["seed"], s["naming_images"], s.get("p_full", 0.4))
        images = [world.render(sp.name, "pretrain", i) for sp, i in zip(b.species, b.indices)]
        ids = tok(b.texts, padding=True, add_special_tokens=False, return_tensors="pt")["input_ids"]
        img = heads.embed_images(image_tokens(model, **pixel_inputs(processor, images)))
        txt = heads.embed_texts(ids)
        loss_sig = siglip_loss(img, txt, b.targets, heads.log_t, heads.b)
        loss_attr = attribute_nce_loss(img, heads.embed_texts(attr_ids), b.species, by_dim, index, heads.log_t)
        loss = loss_sig + w_attr * loss_attr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower + list(heads.parameters()), 1.0)
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == s["steps"]:
            now = time.perf_counter()
            elapsed, t0 = elapsed + now - t0, now
            with torch.no_grad():
                cos = img @ txt.T
                pos = (cos * b.targets).sum() / b.targets.sum()
                neg = (cos * (1 - b.targets)).sum() / (1 - b.targets).sum().clamp(min=1)
            with open(log_path, "a") as f:
                f.write(f"{step + 1},{loss.item():.4f},{loss_sig.item():.4f},{loss_attr.item():.4f},{lr:.6g},"
                        f"{elapsed:.1f},{heads.log_t.exp().item():.3f},"
                        f"{heads.b.item():.3f},{pos.item():.4f},{neg.item():.4f}\n")
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % s["checkpoint_every"] == 0 or step + 1 == s["steps"]:
            _save_checkpoint(folder, model, processor, {"step": step + 1, "elapsed": elapsed,
                                                        "optimizer": opt.state_dict()},
                             extra={"heads.pt": heads.state_dict()})
    for p in model.parameters():
        p.requires_grad_(True)
    return elapsed


def pretrain(profile: Profile | str | None = None, out: str | Path | None = None, *, steps: int | None = None,
             stages: tuple[str, ...] | None = None, log_every: int = 10, progress: bool = True) -> Path:
    """Pretrain (or resume) the tiny base model through ``STAGES``; returns the folder of the final model.

    ``out/<stage>/`` holds each stage's ``log.csv``, its latest ``checkpoint`` (rerunning the same command
    resumes from it) and, once done, its ``model`` and ``done.json``. A stage whose settings (or whose parent
    stage) changed starts over. ``out/model`` is the final model, ``out/manifest.json`` what was done and how
    long it took. ``steps`` overrides every stage's step count (tests, quick looks); ``stages`` runs a prefix.
    """
    profile = get_profile(profile)
    cfg = dict(profile.pretrain)
    if not cfg:
        raise ValueError(f"profile {profile.name!r} has no pretraining settings (real models come pretrained)")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"--steps must be a positive integer, got {steps!r}")
    run = [st for st in STAGES if st in (stages or STAGES)]
    unknown = set(stages or ()) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown pretraining stages {sorted(unknown)}; expected some of {STAGES}")
    out = Path(out) if out else profile.run_dir() / "pretrain"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    world = World(profile.world_seed, profile.image_size, profile.n_genera)
    torch.manual_seed(cfg["seed"])

    keys, summary = stage_keys(profile, steps), {}
    model = processor = None
    for name in run:
        s = _stage_settings(cfg, name, steps)
        key = keys[name]
        folder = out / name
        done = folder / "done.json"
        if done.is_file() and json.loads(done.read_text()).get("key") == key and (folder / "model").is_dir():
            summary[name] = json.loads(done.read_text())
            model = None
            continue
        if folder.exists():
            marker = folder / "key.txt"
            if not marker.is_file() or marker.read_text().strip() != key:  # another setting: start over
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "key.txt", key + "\n")
        prev = out / run[run.index(name) - 1] / "model" if run.index(name) else None
        if prev is not None and prev.is_dir():
            model, processor = load_model(prev)
        elif name == STAGES[0] or prev is None:
            if name != STAGES[0] and stages is None:
                raise FileNotFoundError(f"stage {name!r} needs the model of the stage before it in {out}")
            tokenizer = build_tokenizer(pretrain_corpus(world))
            processor = build_processor(tokenizer)
            model = build_tiny_model(tokenizer, profile.tiny_size, seed=cfg["seed"])
        if name == "vision":
            seconds = _run_vision_stage(s, folder, model, processor, world, log_every, progress)
        else:
            seconds = _run_lm_stage(name, s, folder, model, processor, world, log_every, progress)
        model.eval()
        save_model(model, processor, folder / "model")
        summary[name] = {"key": key, "steps": s["steps"], "batch_size": s["batch_size"], "lr": s["lr"],
                         "train": s.get("train", {"vision": 1.0, "merger": 1.0}),
                         "mixture": s.get("mixture"), "train_seconds": round(seconds, 1)}
        write_json(done, summary[name])
    last = out / run[-1] / "model"
    if model is None:
        model, processor = load_model(last)
    final = save_model(model, processor, out / "model")
    write_json(out / "manifest.json", {
        "what": "tiny Qwen2.5-VL pretrained on the micro world in stages (finer1_lib.pretrain)",
        "profile": profile.name, "world_seed": profile.world_seed, "image_size": profile.image_size,
        "tiny_size": profile.tiny_size, "parameters": count_parameters(model), "stages": summary,
        "steps": sum(v["steps"] for v in summary.values()), "naming_images": cfg["naming_images"],
        "seed": cfg["seed"], "train_seconds": round(sum(v["train_seconds"] for v in summary.values()), 1),
        "torch_threads": torch.get_num_threads(),
        "command": f"python -m finer1_lib pretrain --profile {profile.name}",
    })
    return final


def read_log(path: str | Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def ship_model(out: str | Path, dest: str | Path | None = None, metrics: dict | None = None) -> Path:
    """Copy a finished pretraining run (model, manifest, stage logs) to ``dest`` (default data/base_model), atomically."""
    import tempfile

    from .profiles import BASE_MODEL_DIR

    out, dest = Path(out), Path(dest or BASE_MODEL_DIR)
    for need in ("model/config.json", "manifest.json"):
        if not (out / need).is_file():
            raise FileNotFoundError(f"{out / need} not found: finish `python -m finer1_lib pretrain` first")
    manifest = json.loads((out / "manifest.json").read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for f in (out / "model").iterdir():
            shutil.copy2(f, tmp / f.name)
        for name in manifest.get("stages", {}):
            shutil.copy2(out / name / "log.csv", tmp / f"pretrain_log_{name}.csv")
        if (out / "zero-shot").is_dir():  # its zero-shot answers on the benchmarks (pipeline.shipping_metrics)
            shutil.copytree(out / "zero-shot", tmp / "zero-shot")
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
