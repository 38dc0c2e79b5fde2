"""A contrastive image/text dual encoder: the micro world's CLIP baseline (paper Table 1, CLIP rows).

Table 1 compares MLLMs with contrastive CLIP models in the closed world: the image and each of the 4 candidate
names ("a photo of a <class>") are embedded, and the option whose text embedding has the highest cosine with
the image embedding is the answer. Here the CLIP model is a small dual encoder trained from scratch with the
symmetric InfoNCE loss and a learnable temperature, on the same knowledge budget as the base MLLM
(``finer1_lib.pretrain``): images from the ``pretrain`` pool only (disjoint from the train / rl / test pools).

Pairs of one training step (:func:`clip_batch`, a pure function of (seed, step)):

* ``caption``: a pretrain image with index >= ``naming_images`` <-> its attribute caption, in several
  phrasings ("This is a bird with a round body, ...", "a photo of a bird with <shuffled attributes>.");
* ``naming``: one of the ``naming_images`` fixed pretrain images (indices 0..naming_images-1) of a species <->
  "a photo of the <species name>, a <super word>." (all 96 species, seen and unseen, as for the MLLM);
* ``knowledge`` (text only): the MLLM reads the field guide; a dual encoder cannot learn from text without an
  image, so instead the text tower gets an extra text-text InfoNCE term between a name text and one of the
  species' field-guide descriptions with the name masked out ("This bird is a bird with ..."), weighted by
  ``ClipConfig.text_weight`` (default 0.5; 0 switches it off). This is a stated design choice: it is what lets
  a name's text embedding carry the species' attributes.

Every batch holds distinct species (sampled without replacement), so a batch has no false negatives and a
caption image is never paired with a name: image -> name supervision stays limited to the naming images.
"""
from __future__ import annotations

import csv
import io
import math
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .io import atomic_write_bytes, atomic_write_text
from .rationale import article, caption_text, corpus
from .records import SUPER_CATEGORIES, SUPER_CATEGORY_WORD
from .world import Species, World, join_phrases

__all__ = [
    "ClipConfig", "CLIP_PRESETS", "clip_config", "ClipModel", "ClipBatch", "DEFAULT_TEMPLATE", "NAMING_TEMPLATE",
    "tokenize", "build_vocab",
    "naming_text", "masked_descriptions", "clip_batch", "clip_loss", "train_clip", "load_clip", "save_clip",
    "images_to_tensor", "encode_images", "encode_texts", "choose_option", "closed_world_eval", "world_eval_rows",
    "world_image_loader", "read_clip_log",
]

#: The closed-world prompt of one option at evaluation (CLIP's "a photo of a <class>", with the super word).
DEFAULT_TEMPLATE = "a photo of a {name}, a {word}."
#: The text paired with the naming images in training.
NAMING_TEMPLATE = "a photo of the {name}, a {word}."
PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"
_CAPTION_POOL = 10**6  # caption images: pretrain-pool indices naming_images .. naming_images + 10**6 (fresh)
_LOG_COLUMNS = ("step", "loss", "loss_image_text", "loss_text_text", "temperature", "lr", "seconds")


@dataclass(frozen=True)
class ClipConfig:
    """Model and training settings of the micro-world CLIP baseline (paper Table 1, CLIP rows).

    Image tower: ``len(channels)`` conv blocks (stride-2 conv + conv, BatchNorm, ReLU), global average pool,
    linear projection. Text tower: word embeddings + positions, ``text_layers`` pre-norm transformer layers,
    mean pool over real tokens, linear projection. Both end in ``embed_dim`` and are compared by cosine.
    """

    embed_dim: int = 128
    image_size: int = 112                        # images of another size are resized to this
    channels: tuple[int, ...] = (32, 64, 128, 256)
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_text_len: int = 48
    steps: int = 1000
    batch_size: int = 64                         # image-text pairs per step, distinct species
    text_batch_size: int = 64                    # name-description pairs per step, distinct species
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 20
    weight_decay: float = 0.05
    temperature: float = 0.07                    # initial; learnable (logit scale capped at 100 as in CLIP)
    naming_images: int = 2                       # = profile.pretrain["naming_images"]
    naming_share: float = 0.25                   # share of image-text pairs that are naming pairs
    text_weight: float = 0.5                     # weight of the text-text (name <-> description) term
    caption_images: int = _CAPTION_POOL          # distinct caption images per species (fresh by default)
    super_categories: tuple[str, ...] = SUPER_CATEGORIES
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "super_categories", tuple(self.super_categories))
        unknown = [s for s in self.super_categories if s not in SUPER_CATEGORIES]
        if unknown or not self.super_categories:
            raise ValueError(f"unknown super-categories {unknown} in ClipConfig; expected some of {SUPER_CATEGORIES}")
        for name in ("steps", "batch_size", "naming_images", "checkpoint_every", "caption_images", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClipConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.naming_share <= 1.0:
            raise ValueError(f"ClipConfig.naming_share must be in [0, 1], got {self.naming_share}")
        if self.text_weight < 0 or self.text_batch_size < (2 if self.text_weight > 0 else 0):
            raise ValueError(f"text_weight must be >= 0 and text_batch_size >= 2 when it is used, got "
                             f"text_weight={self.text_weight}, text_batch_size={self.text_batch_size}")
        if not 0 < self.temperature < 1:
            raise ValueError(f"ClipConfig.temperature must be in (0, 1), got {self.temperature}")

    @classmethod
    def from_dict(cls, d: dict) -> "ClipConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ClipConfig fields {unknown}")
        return cls(**d)


#: Proposed settings per project profile (overrides of the ClipConfig defaults, which are the "full" model).
#: Measured on the full world (96 species, 112 px), closed world with 4 options on the 480 test-pool images of
#: the cpu benchmark (5 per species; random same-super distractors / the benchmark's similar distractors):
#:   full  (1.54M params, 1000 steps): ~9 min on 1 idle thread (0.56 s/step);          99.2 % / 97.5 %
#:   cpu   (0.65M params,  400 steps): ~1.7 min on 2 threads, ~2 min on 1 (0.26-0.30 s/step); 94.8 % / 91.5 %
#:   smoke (20 steps, ~2 s): plumbing only, chance-level accuracy.
CLIP_PRESETS: dict[str, dict] = {
    "full": {},
    "cpu": dict(channels=(16, 32, 64, 128), steps=400, checkpoint_every=50),
    "smoke": dict(channels=(8, 16, 32, 64), embed_dim=64, text_width=64, batch_size=16, text_batch_size=16,
                  steps=20, warmup=5, checkpoint_every=10),
}


def clip_config(preset: str = "cpu", **overrides) -> ClipConfig:
    """The ClipConfig of a preset in :data:`CLIP_PRESETS`, with ``overrides``."""
    if preset not in CLIP_PRESETS:
        raise ValueError(f"unknown CLIP preset {preset!r}; choose one of {list(CLIP_PRESETS)}")
    return ClipConfig(**dict(CLIP_PRESETS[preset], **overrides))


# ------------------------------------------------------------------------------------------------- text
_TOKEN = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words (hyphenated words kept whole) and punctuation marks."""
    return _TOKEN.findall(text.lower())


def naming_text(species: Species, template: str = NAMING_TEMPLATE) -> str:
    return template.format(name=species.name, word=SUPER_CATEGORY_WORD[species.super_category])


def masked_descriptions(species: Species) -> list[str]:
    """The species' field-guide descriptions with its name replaced by "this <word>" (text-text targets)."""
    word = SUPER_CATEGORY_WORD[species.super_category]
    out = []
    for d in species.descriptions:
        d = d.replace(f"The {species.name}", f"This {word}").replace(f"the {species.name}", f"this {word}")
        d = d.replace(f"{species.name}:", f"This {word}:").replace(species.name, f"this {word}")
        out.append(d)
    return out


def _caption_phrasings(species: Species, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return caption_text(species, rng)  # "This is / The image shows / It is a bird with ..." (schema order)
    word = SUPER_CATEGORY_WORD[species.super_category]
    ph = species.phrases()
    return f"a photo of {article(word)} {word} with {join_phrases(rng.sample(ph, len(ph)))}."


def build_vocab(world: World) -> list[str]:
    """Word-level vocabulary of the world's corpus plus the CLIP templates; sorted, specials first."""
    texts = list(corpus(world)) + [DEFAULT_TEMPLATE, NAMING_TEMPLATE, "This is The image shows It is a photo of"]
    for sp in world.species:
        texts += masked_descriptions(sp)
    words = sorted({t for text in texts for t in tokenize(text)})
    return [PAD, UNK, CLS] + words


# ------------------------------------------------------------------------------------------------ model
def _uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def images_to_tensor(images: Sequence[Image.Image] | torch.Tensor, image_size: int = 112) -> torch.Tensor:
    """PIL images (or a uint8 [B, 3, H, W] tensor) -> normalised float [B, 3, image_size, image_size]."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        images = list(images)
        if not images:
            raise ValueError("no images to encode")
        size = (image_size, image_size)
        x = torch.stack([_uint8(im if im.size == size else im.resize(size, Image.BILINEAR)) for im in images])
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.25


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ClipModel(nn.Module):
    """The dual encoder: ``embed_images`` (pixels) and ``embed_texts`` (strings) give unnormalised embeddings."""

    def __init__(self, cfg: ClipConfig, vocab: Sequence[str]):
        super().__init__()
        self.cfg, self.vocab = cfg, list(vocab)
        if self.vocab[:3] != [PAD, UNK, CLS]:
            raise ValueError(f"a CLIP vocabulary starts with {[PAD, UNK, CLS]}, got {self.vocab[:3]}")
        self.index = {w: i for i, w in enumerate(self.vocab)}
        layers, c = [], 3
        for width in cfg.channels:
            layers.append(_conv_block(c, width))
            c = width
        self.image_tower = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.image_proj = nn.Linear(c, cfg.embed_dim)
        self.token_embed = nn.Embedding(len(self.vocab), cfg.text_width, padding_idx=0)
        self.pos_embed = nn.Parameter(torch.randn(cfg.max_text_len, cfg.text_width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.text_width, cfg.text_heads, 2 * cfg.text_width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.text_tower = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(cfg.text_width)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        init = math.log(1.0 / cfg.temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init))      # image <-> text
        self.logit_scale_tt = nn.Parameter(torch.tensor(init))   # name text <-> description text

    def token_ids(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, L] ids (unknown words -> <unk>, truncated to max_text_len, padded with 0)."""
        rows = [[self.index.get(t, 1) for t in tokenize(text)][: self.cfg.max_text_len] or [1] for text in texts]
        ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.image_tower(pixels))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.token_ids(texts).to(self.pos_embed.device)
        mask = ids.ne(0)
        h = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]
        h = self.text_norm(self.text_tower(h, src_key_padding_mask=~mask))
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.text_proj(pooled)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        cap = math.log(100.0)
        return self.logit_scale.clamp(max=cap).exp(), self.logit_scale_tt.clamp(max=cap).exp()


def _info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``a`` matches row i of ``b``."""
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# ------------------------------------------------------------------------------------------------- data
@dataclass
class ClipBatch:
    """One step's pairs. Images are named by (species name, pretrain-pool index); render them to train."""

    image_keys: list[tuple[str, int]]
    texts: list[str]
    kinds: list[str]                       # "caption" or "naming", per image-text pair
    name_texts: list[str] = field(default_factory=list)
    description_texts: list[str] = field(default_factory=list)


def _species_pool(world: World, super_categories: Iterable[str]) -> list[Species]:
    return [s for sc in super_categories for s in world.species_of(sc)]


def clip_batch(world: World, step: int, cfg: ClipConfig) -> ClipBatch:
    """The pairs of training step ``step``: a pure function of (cfg.seed, step) and the world.

    Image-text pairs: ``cfg.batch_size`` distinct species; each is a naming pair with probability
    ``cfg.naming_share`` (a naming image <-> "a photo of the <name>, a <word>."), else a caption pair (a fresh
    pretrain image <-> one phrasing of its attribute caption). Text-text pairs (if ``cfg.text_weight``):
    ``cfg.text_batch_size`` distinct species, a name text <-> a masked field-guide description.
    """
    pool = _species_pool(world, cfg.super_categories)
    for what, n in (("batch_size", cfg.batch_size), ("text_batch_size", cfg.text_batch_size if cfg.text_weight else 0)):
        if n > len(pool):
            raise ValueError(f"ClipConfig.{what}={n} exceeds the {len(pool)} species of {list(cfg.super_categories)} "
                             f"(batches hold distinct species)")
    rng = random.Random(f"clip-{cfg.seed}-{step}")
    keys, texts, kinds = [], [], []
    for sp in rng.sample(pool, cfg.batch_size):
        if rng.random() < cfg.naming_share:
            keys.append((sp.name, rng.randrange(cfg.naming_images)))
            texts.append(naming_text(sp))
            kinds.append("naming")
        else:
            keys.append((sp.name, cfg.naming_images + rng.randrange(cfg.caption_images)))
            texts.append(_caption_phrasings(sp, rng))
            kinds.append("caption")
    batch = ClipBatch(keys, texts, kinds)
    if cfg.text_weight > 0:
        for sp in rng.sample(pool, cfg.text_batch_size):
            word = SUPER_CATEGORY_WORD[sp.super_category]
            batch.name_texts.append(rng.choice((naming_text(sp), f"the {sp.name}, {article(word)} {word}.",
                                                f"the {sp.name}")))
            batch.description_texts.append(rng.choice(masked_descriptions(sp)))
    return batch


def clip_loss(model: ClipModel, pixels: torch.Tensor, batch: ClipBatch, text_weight: float
              ) -> tuple[torch.Tensor, float, float]:
    """(total loss, image-text InfoNCE, text-text InfoNCE) of one batch; ``pixels`` are the batch's images."""
    scale, scale_tt = model.scales()
    loss_it = _info_nce(model.embed_images(pixels), model.embed_texts(batch.texts), scale)
    loss = loss_it
    loss_tt = torch.zeros(())
    if text_weight > 0 and batch.name_texts:
        loss_tt = _info_nce(model.embed_texts(batch.name_texts), model.embed_texts(batch.description_texts), scale_tt)
        loss = loss + text_weight * loss_tt
    return loss, loss_it.item(), loss_tt.item()


# --------------------------------------------------------------------------------------------- training
def _cosine_lr(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _world_info(world: World) -> dict:
    return {"seed": world.seed, "image_size": world.image_size, "n_genera": world.n_genera}


def _save_torch(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_torch(path: Path, what: str) -> dict:
    """A file written by :func:`_save_torch`, read with ``weights_only=True``: tensors, numbers, strings, lists
    and dicts only, so a tampered or foreign file can never run code while it is read. Any failure (a pickle
    with other objects, a truncated file) raises ValueError naming the file."""
    import pickle

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"refusing to load the {what} {path}: it holds objects other than tensors and plain "
                         f"values (weights_only=True), so it was not written by this library or was tampered "
                         f"with ({first[:200]})") from None
    except (RuntimeError, EOFError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read the {what} {path} (truncated or not a torch file?): "
                         f"{type(err).__name__}: {first[:200]}") from None
    if not isinstance(blob, dict):
        raise ValueError(f"the {what} {path} holds a {type(blob).__name__}, not the expected dict")
    return blob


def save_clip(model: ClipModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``clip.pt`` (state dict + vocab + config) atomically."""
    path = Path(path)
    _save_torch({"state_dict": model.state_dict(), "vocab": model.vocab, "cfg": asdict(model.cfg), **(extra or {})},
                path)
    return path


def load_clip(path: str | Path) -> ClipModel:
    """A CLIP model saved by :func:`train_clip` / :func:`save_clip` (a ``clip.pt`` file or its folder), in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / "clip.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no CLIP model at {path}; train one with finer1_lib.clip_baseline.train_clip")
    blob = _load_torch(path, "CLIP model")
    missing = [k for k in ("cfg", "vocab", "state_dict") if k not in blob]
    if missing:
        raise ValueError(f"the CLIP model {path} lacks {missing}; it was not written by save_clip")
    model = ClipModel(ClipConfig.from_dict(blob["cfg"]), blob["vocab"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def read_clip_log(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path)


def _check_same_run(saved: dict, cfg: ClipConfig, world: World, where: Path) -> None:
    saved_cfg = saved.get("cfg", {})
    diff = {k: (saved_cfg.get(k), v) for k, v in asdict(cfg).items() if saved_cfg.get(k) != v}
    if saved.get("world") != _world_info(world):
        diff["world"] = (saved.get("world"), _world_info(world))
    if diff:
        raise ValueError(f"{where} holds a CLIP run with other settings {diff} (saved, requested); "
                         f"use another out_dir or delete it")


def train_clip(world: World, cfg: ClipConfig | None = None, out_dir: str | Path | None = None,
               progress: bool = True, stop_at: int | None = None) -> tuple[ClipModel, pd.DataFrame]:
    """Train the micro-world CLIP baseline (paper Table 1, CLIP rows); returns (model in eval mode, per-step log).

    AdamW (no decay on biases, norms and temperatures), warmup + cosine learning rate, symmetric InfoNCE with a
    learnable temperature (+ ``text_weight`` x the text-text term). With ``out_dir``: ``checkpoint.pt`` every
    ``cfg.checkpoint_every`` steps (model, optimizer, step), ``clip_log.csv`` and, at the end, ``clip.pt``, all
    written atomically; rerunning with the same ``out_dir`` (and the same config and world) resumes and ends
    with the same weights as an uninterrupted run. ``stop_at``: stop after that step (checkpointed), as if
    interrupted; the model is returned in train mode then.
    """
    cfg = cfg or ClipConfig()
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoint.pt" if out else None
    log_path = out / "clip_log.csv" if out else None
    vocab = build_vocab(world)
    torch.manual_seed(cfg.seed)
    model = ClipModel(cfg, vocab)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n != "pos_embed"]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n != "pos_embed")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    start, elapsed, rows = 0, 0.0, []
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in out.glob(".*.tmp"):  # an atomic write cut by a kill (the real file is intact)
            leftover.unlink(missing_ok=True)
        if ckpt_path.is_file():
            state = _load_torch(ckpt_path, "CLIP checkpoint")
            _check_same_run(state, cfg, world, out)
            model.load_state_dict(state["state_dict"])
            opt.load_state_dict(state["optimizer"])
            start, elapsed = state["step"], state["elapsed"]
            if log_path.is_file():  # keep the rows up to the checkpoint (later ones are redone)
                rows = [r for r in csv.DictReader(open(log_path)) if int(r["step"]) <= start]
                rows = [{k: (int(v) if k == "step" else float(v)) for k, v in r.items()} for r in rows]

    def write_log():
        text = ",".join(_LOG_COLUMNS) + "\n" + "".join(
            ",".join(str(r[c]) if c == "step" else f"{r[c]:.6g}" for c in _LOG_COLUMNS) + "\n" for r in rows)
        atomic_write_text(log_path, text)

    def save_checkpoint(step: int):
        _save_torch({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "elapsed": elapsed, "cfg": asdict(cfg), "vocab": vocab, "world": _world_info(world)}, ckpt_path)
        write_log()

    naming_cache: dict[tuple[str, int], torch.Tensor] = {}

    def pixels_of(key: tuple[str, int]) -> torch.Tensor:
        if key in naming_cache:
            return naming_cache[key]
        x = _uint8(world.render(key[0], "pretrain", key[1]))
        if key[1] < cfg.naming_images:
            naming_cache[key] = x
        return x

    def prepare(step: int) -> tuple[ClipBatch, torch.Tensor]:
        batch = clip_batch(world, step, cfg)
        return batch, torch.stack([pixels_of(k) for k in batch.image_keys])

    end = cfg.steps if stop_at is None else max(start, min(cfg.steps, stop_at))
    model.train()
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="clip", disable=not progress)
    # the next step's batch is rendered in a background thread while this one trains (same data either way)
    pool = ThreadPoolExecutor(1)
    pending = pool.submit(prepare, start) if start < end else None
    t0 = time.perf_counter()
    try:
        for step in bar:
            lr = _cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            batch, raw = pending.result()
            pending = pool.submit(prepare, step + 1) if step + 1 < end else None
            pixels = images_to_tensor(raw, cfg.image_size)
            loss, loss_it, loss_tt = clip_loss(model, pixels, batch, cfg.text_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            now = time.perf_counter()
            elapsed, t0 = elapsed + now - t0, now
            rows.append({"step": step + 1, "loss": loss.item(), "loss_image_text": loss_it, "loss_text_text": loss_tt,
                         "temperature": 1.0 / model.scales()[0].item(), "lr": lr, "seconds": elapsed})
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if out and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 in (end, cfg.steps)):
                save_checkpoint(step + 1)
    finally:
        if pending is not None:
            pending.cancel()
        pool.shutdown(wait=True)
    log = pd.DataFrame(rows, columns=list(_LOG_COLUMNS))
    if end < cfg.steps:
        return model, log
    model.eval()
    if out:
        save_clip(model, out / "clip.pt", {"world": _world_info(world), "steps_done": cfg.steps,
                                            "train_seconds": round(elapsed, 1)})
    return model, log


# ----------------------------------------------------------------------------------------------- encode
@torch.no_grad()
def _encode(model: nn.Module, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return F.normalize(fn().float(), dim=-1)
    finally:
        model.train(was)


def _image_size(model) -> int:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "image_size", 112)


def encode_images(model: nn.Module, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised image embeddings [B, D] (eval mode, no gradients)."""
    x = images_to_tensor(images, _image_size(model))
    return torch.cat([_encode(model, lambda c=c: model.embed_images(c)) for c in x.split(batch_size)])


def encode_texts(model: nn.Module, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings [B, D] (eval mode, no gradients)."""
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to encode")
    return torch.cat([_encode(model, lambda c=texts[i: i + batch_size]: model.embed_texts(c))
                      for i in range(0, len(texts), batch_size)])


# ------------------------------------------------------------------------------------------ closed world
def _super_word(super_category: str) -> str:
    if super_category in SUPER_CATEGORY_WORD:
        return SUPER_CATEGORY_WORD[super_category]
    if super_category in SUPER_CATEGORY_WORD.values():
        return super_category
    raise ValueError(f"unknown super-category {super_category!r}; expected one of {SUPER_CATEGORIES}")


def _option_texts(options: Sequence[str], super_category: str, template: str, where: str = "") -> list[str]:
    if isinstance(options, str) or not list(options):
        raise ValueError(f"{where}no options to choose from (options={options!r}); expected a list of names")
    word = _super_word(super_category)
    if "{name}" not in template:
        raise ValueError(f"the option template must contain '{{name}}', got {template!r}")
    return [template.format(name=o, word=word) for o in options]


_TIE = 1e-6  # cosines this close count as a tie (float32 rounding of equal directions)


def _first_argmax(values: Sequence[float]) -> int:
    """The first index whose value is within ``_TIE`` of the maximum."""
    best = max(values)
    return next(i for i, v in enumerate(values) if v >= best - _TIE)


def choose_option(model: nn.Module, image: Image.Image, options: Sequence[str], super_word: str,
                  template: str = DEFAULT_TEMPLATE) -> int:
    """Closed world as CLIP does it (paper Table 1, CLIP rows): the index of the option whose text
    ``template.format(name=option, word=super_word)`` has the highest cosine with the image (ties within 1e-6:
    the first)."""
    texts = _option_texts(options, super_word, template)
    sims = (encode_texts(model, texts) @ encode_images(model, [image])[0]).tolist()
    return _first_argmax(sims)


_ROW_KEYS = ("image_path", "options", "ground_truth", "super_category", "split")


def closed_world_eval(model: nn.Module, rows: Sequence[dict], image_loader: Callable[[str], Image.Image],
                      template: str = DEFAULT_TEMPLATE, batch_size: int = 64, progress: bool = False) -> pd.DataFrame:
    """Closed-world accuracy rows for ``finer1_lib.evaluate.summarize`` (paper Table 1, CLIP rows).

    ``rows``: eval records in the official shape (``bench.eval_rows``); ``image_loader``: path -> PIL image
    (``bench.image``). The ground truth need not be among the options (then the row is simply wrong).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no evaluation records to run")
    option_texts = []
    for i, r in enumerate(rows):
        missing = [k for k in _ROW_KEYS if k not in r]
        if missing:
            raise ValueError(f"eval record {i} is missing {missing} (has {sorted(r)})")
        option_texts.append(_option_texts(r["options"], r["super_category"], template,
                                          f"eval record {i} ({r['image_path']}): "))
    unique = sorted({t for ts in option_texts for t in ts})
    text_emb = encode_texts(model, unique)
    where = {t: i for i, t in enumerate(unique)}
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="clip eval", disable=not progress):
        chunk = rows[start: start + batch_size]
        img_emb = encode_images(model, [image_loader(r["image_path"]) for r in chunk], batch_size)
        for j, r in enumerate(chunk):
            texts = option_texts[start + j]
            sims = (text_emb[[where[t] for t in texts]] @ img_emb[j]).tolist()
            pred = list(r["options"])[_first_argmax(sims)]
            out.append({"image_id": r.get("image_id", r["image_path"]), "image_path": r["image_path"],
                        "super_category": r["super_category"], "split": r["split"], "mode": "closed",
                        "ground_truth": r["ground_truth"], "prediction": pred, "score": max(sims),
                        "correct": pred == r["ground_truth"]})
    return pd.DataFrame(out)


def world_eval_rows(world: World, pool: str = "test", indices: Iterable[int] = range(5), seed: int = 0,
                    super_categories: Iterable[str] = SUPER_CATEGORIES, split_of: dict | None = None,
                    k: int = 4) -> list[dict]:
    """Closed-world records straight from the world (no benchmark on disk): for every species and index, the
    truth + ``k - 1`` random other species of its super-category (seeded), shuffled. ``image_path`` is
    ``"<pool>/<species name>/<index>"`` (read it with :func:`world_image_loader`); ``split`` from ``split_of``
    (name -> "seen"/"unseen"), else "all"."""
    indices = list(indices)
    rows = []
    for sc in super_categories:
        species = world.species_of(sc)
        for sp in species:
            for i in indices:
                rng = random.Random(f"clip-eval-{seed}-{pool}-{sp.name}-{i}")
                others = rng.sample([s.name for s in species if s.name != sp.name], k - 1)
                options = rng.sample([sp.name] + others, k)
                rows.append({"image_path": f"{pool}/{sp.name}/{i}",
                             "question": f"Which {SUPER_CATEGORY_WORD[sc]} is this?",
                             "options": options, "ground_truth": sp.name, "super_category": sc,
                             "split": (split_of or {}).get(sp.name, "all"), "image_id": f"{pool}/{sp.slug}/{i}"})
    return rows


def world_image_loader(world: World) -> Callable[[str], Image.Image]:
    """The image of a ``world_eval_rows`` path "<pool>/<species name>/<index>", rendered on demand."""
    def load(path: str) -> Image.Image:
        pool, name, index = path.split("/")
        return world.render(name, pool, int(index))
    return load
