"""Stage 2: Triplet Augmented Policy Optimization (TAPO, paper §4.3, Eq. 1-4), built on DAPO.

One training step, read next to the paper:

1. **Rollouts (Eq. 1).** For each triplet (x, x_pos, x_neg) and its question q: ``n1`` responses sampled from
   (x, q) and ``n2`` from (x_pos, q), pooled into ONE group of n1 + n2; reward 0.9 accuracy + 0.1 format.
2. **Dynamic sampling (DAPO; the condition under Eq. 4).** A group whose mean accuracy is not in
   (0.01, 0.99), i.e. all right or all wrong, carries no signal and is dropped; new triplets are drawn
   until ``prompts_per_step`` groups are kept or ``max_retries`` extra rounds were spent.
3. **Advantages.** (r - mean) / (std + 1e-6) inside the group (``group_advantages``).
4. **Loss (Eq. 4, token-level mean).** Clipped surrogate (eps_low / eps_high, dual clip), minus
   gamma * KL[pi(o|q,x*) || pi(o|q,x_neg)] (Eq. 2-3, maximised), plus eta1 / eta2 times the entropy
   estimates -log pi under x* and under x_neg (``tapo_loss``).

Where the paper and the official code (PKU-ICST-MIPL/FineR1_ICLR2026, EasyR1/PAPO based) differ, a switch
picks:

* ``positive_update_image``: the paper conditions the update on the anchor only ("anchor", default); the
  official code scores positive rollouts (old log-probs and update) under the positive image ("positive").
* ``entropy_neg_grad``: whether gradients flow through the log-probs under x_neg. **Default False, the
  official behaviour** (whose numbers the paper reports): they are computed once per rollout batch under
  no_grad, so the eta2 term is a no-op for learning (PAPO issue #20) and the KL pushes pi(.|q, x*) away from a
  fixed pi(.|q, x_neg). True is the literal Eq. 4 (variant ``"tapo-eq4"``): the x_neg log-probs are
  recomputed with gradients every update. That reading works against the method: with log g = log pi_neg -
  log pi the loss holds -gamma (e^{log g} - log g - 1) + eta2 (-log pi_neg) per token (over N tokens), so

      d loss / d log pi(o|q,x_neg) = -[gamma (e^{log g} - 1) + eta2] / N <= (gamma - eta2) / N < 0

  on every token (e^{log g} > 0 and gamma = 0.01 < eta2 = 0.03): every update *raises* the likelihood of
  every rollout, right or wrong, under the negative image, the opposite of separating x* from x_neg. It
  also costs a second forward/backward per update.

Sign conventions checked against the code (the paper's formulas have two slips): the KL uses the k3
estimator with log g = log pi_neg - log pi (the paper writes g = pi / pi_neg), clamped as in EasyR1
(log g to [-20, 20], KL to [-10, 10]); the paper defines H = log pi, but "low-entropy" and the code
(``entropy_loss = -mean(log pi)``, added to the loss) mean H = -log pi, minimised.

Variants of the ablations (key components, Fig. 3c): ``TapoConfig.variant("dapo" | "intra" | "inter" | "tapo")``,
``"tapo-eq4"`` (full TAPO with gradients through x_neg, the literal Eq. 4) and any n1:n2 ratio (Table 3a:
10:0, 8:2, 5:5, 2:8, 0:10) through ``n1`` / ``n2``.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import math
import os
import random
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import processes
from .inference import generate, rescore, token_kl_k3
from .io import DataError, atomic_write_text, write_json
from .metrics import accuracy_reward, reward
from .model import load_model, save_model
from .prompts import tapo_prompt
from .protocol import Triplet, question_templates

log = logging.getLogger(__name__)

__all__ = ["TapoConfig", "TapoTrainer", "tapo_loss", "group_advantages", "keep_group", "k3_kl_clamped",
           "xneg_gradient", "bench_tapo", "LOG_COLUMNS", "VARIANTS"]

#: Ablation presets (paper Fig. 3c): DAPO baseline, intra-class only, inter-class only, full TAPO (official:
#: no gradient through x_neg), and full TAPO read literally (Eq. 4 with gradients through x_neg).
VARIANTS = {
    "dapo": dict(n1=10, n2=0, gamma=0.0, eta1=0.0, eta2=0.0),
    "intra": dict(n1=5, n2=5, gamma=0.0, eta1=0.0, eta2=0.0),
    "inter": dict(n1=10, n2=0, gamma=0.01, eta1=0.03, eta2=0.03),
    "tapo": dict(n1=5, n2=5, gamma=0.01, eta1=0.03, eta2=0.03),
    # the literal Eq. 4: gradients through the x_neg log-probs (see the module docstring for why not default)
    "tapo-eq4": dict(n1=5, n2=5, gamma=0.01, eta1=0.03, eta2=0.03, entropy_neg_grad=True),
}

LOG_COLUMNS = ["step", "reward", "accuracy", "accuracy_anchor", "kl", "entropy", "entropy_neg", "clip_frac",
               "kept_ratio", "retries", "response_len", "loss", "grad_norm", "kept_groups", "generated_groups",
               "skipped", "seconds", "t_generate", "t_rescore", "t_update"]


def _cpu_tapo(key: str):
    from .profiles import PROFILES

    return PROFILES["cpu"].tapo[key]


@dataclass
class TapoConfig:
    """Hyper-parameters of TAPO; defaults are the paper's / official ones unless noted.

    lr, steps: the cpu profile's (``profiles.PROFILES["cpu"].tapo``, the one place they are set: 5e-5 and 16
    steps for the tiny model; official lr 1e-6 for Qwen2.5-VL-3B/7B); the other profiles override them.
    top_p: 1.0 here (official 0.99; a near no-op, kept configurable).
    updates_per_batch: optimizer steps per rollout batch; the kept groups are split into that many
    minibatches, one pass (official: rollout batch 384 / global batch 128 = 3 updates, ppo_epochs 1), with
    the old-policy log-probs taken from the rollout.
    micro_batch_size: responses per forward/backward inside a minibatch (gradient accumulation with the
    token mean over the whole minibatch kept exact); None = the whole minibatch at once (on CPU, 8 is ~20%
    faster than one big batch for DAPO and ~25% for TAPO's two-image forward).
    """

    # Eq. 1: rollouts per group
    n1: int = 5                      # from the anchor (x, q)
    n2: int = 5                      # from the positive (x_pos, q)
    # Eq. 4
    gamma: float = 0.01              # weight of the inter-class KL (maximised)
    eta1: float = 0.03               # entropy of pi(.|q, x*)
    eta2: float = 0.03               # entropy of pi(.|q, x_neg)
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 3.0           # dual-clip PPO bound for negative advantages (EasyR1 clip_ratio_dual)
    # sampling
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 160
    # optimisation
    lr: float = field(default_factory=lambda: _cpu_tapo("lr"))
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    prompts_per_step: int = 8        # groups per rollout batch
    updates_per_batch: int = 2
    micro_batch_size: int | None = 8
    # DAPO dynamic sampling
    dynamic_sampling: bool = True
    filter_low: float = 0.01
    filter_high: float = 0.99
    max_retries: int = 20
    # run
    steps: int = field(default_factory=lambda: _cpu_tapo("steps"))
    seed: int = 0
    checkpoint_every: int = 10
    generate_batch_size: int = 64
    rescore_batch_size: int = 16
    system: str | None = None        # None: Qwen's default system prompt, as the official TAPO data
    # paper vs official code
    entropy_neg_grad: bool = False   # official: x_neg log-probs under no_grad; True = literal Eq. 4 (tapo-eq4)
    positive_update_image: str = "anchor"
    # precision: fp32 weights and AdamW states, forward passes in bf16 (the real profiles; see pipeline)
    bf16_autocast: bool = False

    def __post_init__(self):
        if self.n1 < 0 or self.n2 < 0 or self.n1 + self.n2 < 2:
            raise ValueError(f"need n1, n2 >= 0 and n1 + n2 >= 2 rollouts per group (a group std needs two), "
                             f"got n1={self.n1}, n2={self.n2}")
        if self.positive_update_image not in ("anchor", "positive"):
            raise ValueError(f"positive_update_image must be 'anchor' (paper) or 'positive' (official code), "
                             f"got {self.positive_update_image!r}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0 and self.dual_clip > 1):
            raise ValueError(f"need 0 <= eps_low < 1, eps_high >= 0, dual_clip > 1; got {self.eps_low}, "
                             f"{self.eps_high}, {self.dual_clip}")
        for name in ("prompts_per_step", "updates_per_batch", "steps", "checkpoint_every", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def variant(cls, name: str, **overrides) -> "TapoConfig":
        """A preset of the ablation (``VARIANTS``: dapo, intra, inter, tapo, tapo-eq4) with ``overrides`` on top."""
        if name not in VARIANTS:
            raise ValueError(f"unknown TAPO variant {name!r}; choose one of {sorted(VARIANTS)}")
        return cls(**{**VARIANTS[name], **overrides})

    @property
    def uses_negative(self) -> bool:
        """Whether x_neg enters the loss at all (gamma or eta2 non-zero)."""
        return self.gamma != 0 or self.eta2 != 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# The pieces of Eq. 1-4 as pure functions
# --------------------------------------------------------------------------------------------------


def group_advantages(rewards, eps: float = 1e-6) -> list[float]:
    """(r - mean) / (std + eps) over one group of n1 + n2 rewards (Eq. 1 pools both kinds of rollouts).

    std is the sample std (Bessel-corrected), as ``torch.std`` in the official EasyR1
    ``compute_grpo_outcome_advantage``; a group whose rewards are all equal gets all-zero advantages.
    """
    r = torch.tensor(list(rewards), dtype=torch.float64)
    if r.numel() < 2:
        raise ValueError(f"a group needs at least 2 rewards, got {r.numel()}")
    return ((r - r.mean()) / (r.std() + eps)).tolist()


def keep_group(accuracies, low: float = 0.01, high: float = 0.99) -> bool:
    """DAPO dynamic sampling (condition under Eq. 4): keep iff low < mean accuracy < high (official filter)."""
    return low < float(np.mean(accuracies)) < high


def k3_kl_clamped(logp: torch.Tensor, logp_neg: torch.Tensor) -> torch.Tensor:
    """Per-token KL[pi(.|q,x*) || pi(.|q,x_neg)] (Eq. 3), k3 estimator with the official clamps.

    log g = log pi_neg - log pi, clamped to [-20, 20]; k3 = g - log g - 1 (``inference.token_kl_k3``), clamped
    to [-10, 10] (EasyR1 ``compute_kl(..., "low_var_kl")``). Eq. 4's text writes g = pi / pi_neg; the code,
    followed here, uses its inverse (the k3 estimator of KL(pi || pi_neg) for o ~ pi).
    """
    log_g = (logp_neg - logp).clamp(-20.0, 20.0)
    return token_kl_k3(torch.zeros_like(log_g), log_g).clamp(-10.0, 10.0)


def tapo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              logp_neg: torch.Tensor | None, cfg: TapoConfig, *, n_tokens: float | None = None):
    """The TAPO loss (minus Eq. 4) on padded (B, T) tensors; returns ``(loss, stats)``.

    logp / old_logp: per-token log-probs of the responses under x* (the update image), current policy (with
    grad) and old policy; advantages: (B,) or (B, T); mask: (B, T), True on response tokens; logp_neg:
    log-probs under x_neg (None: no inter-class term, e.g. DAPO). Every term is a token mean over all
    response tokens (DAPO token-level loss), divided by ``n_tokens`` when given (micro-batches of one
    minibatch), else by ``mask.sum()``:

        ratio = exp(logp - old_logp)                                   (log-ratio clamped to [-20, 20])
        pg    = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))
        pg    = min(pg, -A dual_clip)            where A < 0            (dual clip, EasyR1 semantics)
        loss  = mean(pg) - gamma mean(KL_k3(logp, logp_neg))           (Eq. 3, maximised)
                + eta1 mean(-logp) + eta2 mean(-logp_neg)              (double entropy, minimised)

    With ``cfg.entropy_neg_grad=False`` logp_neg is detached (official code: the eta2 term has no gradient).
    stats: loss and pg_loss (the terms as returned), token means over ``mask`` of kl, entropy, entropy_neg,
    clip_frac (PPO clip active), dual_clip_frac, ppo_kl, and the token count.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # padded positions may hold anything: zero them before exp() so no inf/NaN reaches the gradient
    logp = torch.where(mask, logp, zero)
    old_logp = torch.where(mask, old_logp.to(logp), zero)
    adv = advantages.to(logp)
    adv = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv
    tokens = int(mask.sum())
    denom = float(n_tokens) if n_tokens is not None else float(max(tokens, 1))

    def token_mean(x):  # a loss term: sum over response tokens / denom
        return torch.where(mask, x, zero).sum() / denom

    def stat(x):  # a logged statistic: the mean over this call's response tokens
        return (torch.where(mask, x, zero).sum() / max(tokens, 1)).item()

    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    clipped = torch.exp(log_ratio.clamp(math.log(1.0 - cfg.eps_low), math.log(1.0 + cfg.eps_high)))
    pg1, pg2, pg3 = -adv * ratio, -adv * clipped, -adv * cfg.dual_clip
    pg_high = torch.maximum(pg1, pg2)                   # -min(r A, clip(r) A)
    pg = torch.where(adv < 0, torch.minimum(pg_high, pg3), pg_high)
    pg_loss = token_mean(pg)
    entropy = token_mean(-logp)
    loss = pg_loss + cfg.eta1 * entropy

    stats = {"tokens": tokens}
    if logp_neg is not None:
        lq = logp_neg if cfg.entropy_neg_grad else logp_neg.detach()
        lq = torch.where(mask, lq.to(logp), zero)
        kl = k3_kl_clamped(logp, lq)
        loss = loss - cfg.gamma * token_mean(kl) + cfg.eta2 * token_mean(-lq)
        with torch.no_grad():
            stats.update(kl=stat(kl), entropy_neg=stat(-lq))
    with torch.no_grad():
        stats.update(loss=loss.item(), pg_loss=pg_loss.item(), entropy=stat(-logp), ppo_kl=stat(-log_ratio),
                     clip_frac=stat((pg1 < pg2).to(logp)),
                     dual_clip_frac=stat(((pg_high > pg3) & (adv < 0)).to(logp)))
    return loss, stats


def xneg_gradient(log_g, cfg: TapoConfig, logp: float = -1.0) -> torch.Tensor:
    """N * d loss / d log pi(o_t|q, x_neg) per token, by autograd through ``tapo_loss``, for tokens whose
    log g = log pi_neg - log pi is ``log_g`` (N = number of tokens; the policy-gradient term does not involve
    x_neg). The literal Eq. 4 (``entropy_neg_grad=True``) gives -[gamma (e^{log g} - 1) + eta2] (only -eta2
    where the KL clamp is active); the official reading gives 0."""
    log_g = torch.as_tensor(log_g, dtype=torch.float64).reshape(1, -1)
    lp = torch.full_like(log_g, logp)
    lq = (lp + log_g).requires_grad_(True)
    loss, _ = tapo_loss(lp, lp, torch.zeros(1, dtype=torch.float64), torch.ones_like(lp, dtype=torch.bool), lq, cfg)
    if loss.requires_grad:  # official reading: nothing in the loss depends on lq with a gradient
        loss.backward()
    grad = lq.grad if lq.grad is not None else torch.zeros_like(lq)
    return (grad * log_g.numel()).reshape(-1)


# --------------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One sampled response of a group."""

    source: str                      # "anchor" (one of the n1) or "positive" (one of the n2)
    text: str
    token_ids: list[int]
    gen_logp: torch.Tensor           # log-probs under the image it was sampled from (old policy)
    reward: float
    accuracy: float
    advantage: float = 0.0
    old_logp: torch.Tensor | None = None   # old-policy log-probs under the update image x*
    neg_logp: torch.Tensor | None = None   # old-policy log-probs under x_neg (entropy_neg_grad=False)


@dataclass
class Group:
    """The n1 + n2 rollouts of one triplet (Eq. 1)."""

    cursor: int                      # position of the triplet in the seeded triplet stream
    triplet: Triplet
    prompt: str
    images: dict                     # "anchor", "positive", "negative" -> PIL image
    rollouts: list[Rollout] = field(default_factory=list)

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean([r.accuracy for r in self.rollouts]))

    @staticmethod
    def update_source(rollout: Rollout, mode: str) -> str:
        """Which image is x* for this rollout: the anchor for anchor rollouts; for positive ones the anchor
        (paper, ``mode="anchor"``) or the positive image they were sampled from (official, ``"positive"``)."""
        return "anchor" if rollout.source == "anchor" or mode == "anchor" else "positive"

    def update_image(self, rollout: Rollout, mode: str):
        return self.images[self.update_source(rollout, mode)]

    def negative_for(self, image):
        """x_neg resized to x*'s size (the official code requires equal sizes)."""
        neg = self.images["negative"]
        return neg if neg.size == image.size else neg.resize(image.size)


def _stable_seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _pad(rows: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D tensors into (B, T) plus the boolean mask (T >= 1 even when all rows are empty)."""
    width = max([len(r) for r in rows] + [1])
    out = torch.zeros(len(rows), width, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r.to(device)
        mask[i, : len(r)] = True
    return out, mask


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


class TapoTrainer:
    """TAPO (or any variant) on a benchmark's triplets: ``TapoTrainer(model, processor, bench, cfg, out).train()``.

    ``out_dir`` receives ``checkpoint/`` (model + trainer_state.pt: step, triplet cursor, optimizer, RNG),
    ``tapo_log.csv`` (one row per step, ``LOG_COLUMNS``), ``tapo.json`` (summary) and ``model/`` (final).
    Rerunning with the same ``out_dir`` resumes from the checkpoint. ``out_dir=None`` writes nothing
    (benchmarks); ``step(s)`` runs one step and returns its log row. Under ``accelerate launch --num_processes N``
    the same trainer runs data-parallel (``distributed.py``: groups dealt out to processes, global batch, loss and
    gradients as one process's); one process, the default, is unchanged.
    """

    def __init__(self, model, processor, bench, cfg: TapoConfig | None = None, out_dir=None):
        self.model, self.processor, self.bench = model, processor, bench
        self.cfg = cfg or TapoConfig()
        self.out = Path(out_dir) if out_dir is not None else None
        if not bench.triplets:
            raise ValueError(f"the benchmark at {bench.root} has no triplets: TAPO needs (anchor, positive, "
                             f"negative) triplets; rebuild it with `python -m finer1_lib world`")
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.procs = processes()         # this process among those launched (one by default; distributed.py)
        self.cursor = 0                  # next triplet of the seeded stream
        self._kept_cursors: list[int] = []  # the step's kept groups over all processes, in stream order
        self.start_step = 0
        self.elapsed = 0.0
        self._orders: dict[int, list[int]] = {}
        self._images: dict[str, object] = {}

    # ---------------------------------------------------------------- data
    def _triplet(self, cursor: int) -> Triplet:
        """The stream of triplets: each epoch a fresh seeded shuffle of bench.triplets."""
        n = len(self.bench.triplets)
        epoch = cursor // n
        if epoch not in self._orders:
            order = list(range(n))
            random.Random(_stable_seed("tapo-order", self.cfg.seed, epoch)).shuffle(order)
            self._orders = {epoch: order}
        return self.bench.triplets[self._orders[epoch][cursor % n]]

    def _image(self, rec):
        if rec.image_id not in self._images:
            if len(self._images) > 4096:
                self._images.clear()
            self._images[rec.image_id] = self.bench.image(rec)
        return self._images[rec.image_id]

    def _new_group(self, cursor: int) -> Group:
        t = self._triplet(cursor)
        questions = question_templates(t.anchor.super_category)
        question = random.Random(_stable_seed("tapo-question", self.cfg.seed, cursor)).choice(questions)
        images = {k: self._image(getattr(t, k)) for k in ("anchor", "positive", "negative")}
        return Group(cursor, t, tapo_prompt(question), images)

    # ---------------------------------------------------------------- Eq. 1 + dynamic sampling
    def _rollout_round(self, groups: list[Group], seed: int) -> None:
        """Sample n1 responses from (x, q) and n2 from (x_pos, q) for every group, in one batched call."""
        cfg = self.cfg
        images, prompts, sources = [], [], []
        for g in groups:
            for source, n in (("anchor", cfg.n1), ("positive", cfg.n2)):
                images += [g.images[source]] * n
                prompts += [g.prompt] * n
                sources += [source] * n
        self.model.eval()
        out = generate(self.model, self.processor, images, prompts, system=cfg.system,
                       max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                       top_p=cfg.top_p, seed=seed, batch_size=cfg.generate_batch_size, return_scores=True,
                       progress=False)
        k = 0
        for g in groups:
            label = g.triplet.anchor.label
            for _ in range(cfg.n1 + cfg.n2):
                text = out.texts[k]
                g.rollouts.append(Rollout(sources[k], text, list(out.token_ids[k]), out.logprobs[k].float(),
                                          reward(text, label), accuracy_reward(text, label)))
                k += 1

    def rollout(self, step: int) -> tuple[list[Group], dict]:
        """Groups for one step with DAPO dynamic sampling; returns (kept groups, sampling stats).

        Several processes (``distributed.py``): each round's new triplets are dealt out round-robin, each process
        generates its groups (seeded with its rank too), and all learn every group's accuracies, so that they
        keep the same groups and stop when the global batch holds ``prompts_per_step``; the returned groups are
        this process's kept ones, the stats are over every process's groups."""
        cfg, procs = self.cfg, self.procs
        kept, generated = [], []         # generated: (cursor, [(source, reward, accuracy, tokens)]) of every group
        n_kept = rounds = 0
        self._kept_cursors = []
        while n_kept < cfg.prompts_per_step and rounds <= cfg.max_retries:
            need = cfg.prompts_per_step - n_kept
            groups = [self._new_group(c) for c in procs.share(list(range(self.cursor, self.cursor + need)))]
            self.cursor += need
            if groups:
                rank = [procs.rank] if procs.world > 1 else []
                self._rollout_round(groups, _stable_seed("tapo-generate", cfg.seed, step, rounds, *rank))
            rounds += 1
            seen = sorted(procs.gather([(g.cursor, [(r.source, r.reward, r.accuracy, len(r.token_ids))
                                                    for r in g.rollouts]) for g in groups]), key=lambda x: x[0])
            generated += seen
            keep = {c for c, rs in seen if not cfg.dynamic_sampling
                    or keep_group([r[2] for r in rs], cfg.filter_low, cfg.filter_high)}
            kept += [g for g in groups if g.cursor in keep]
            self._kept_cursors += sorted(keep)
            n_kept += len(keep)
            if not cfg.dynamic_sampling:
                break
        if cfg.dynamic_sampling and 0 < n_kept < cfg.prompts_per_step:
            msg = (f"TAPO step {step + 1}: dynamic sampling ran out of retries ({rounds - 1} of max_retries="
                   f"{cfg.max_retries}): the step trains on {n_kept} of {cfg.prompts_per_step} groups "
                   f"({len(generated)} generated)")
            warnings.warn(msg)
            log.warning(msg)
        for g in kept:
            for r, a in zip(g.rollouts, group_advantages([r.reward for r in g.rollouts])):
                r.advantage = a
        every = [r for _, rs in generated for r in rs]
        anchors = [acc for source, _, acc, _ in every if source == "anchor"]
        info = {"reward": float(np.mean([r[1] for r in every])),
                "accuracy": float(np.mean([r[2] for r in every])),
                "accuracy_anchor": float(np.mean(anchors)) if anchors else float("nan"),
                "response_len": float(np.mean([r[3] for r in every])),
                "retries": rounds - 1, "kept_groups": n_kept, "generated_groups": len(generated),
                "kept_ratio": n_kept / len(generated)}
        return kept, info

    # ---------------------------------------------------------------- old-policy log-probs
    def _rescore_rows(self, rows: list[tuple], grad: bool, whole: bool = False) -> list[torch.Tensor]:
        """rescore() for (image, prompt, ids) rows; rows with no tokens give empty tensors without a forward.

        A group's rows share their prompt (the same image object and question): ``rescore`` encodes it once
        and reuses its KV cache for every row (``share_prompts``). ``whole``: one batch (as the update's
        micro-batches), else no-grad batches of ``rescore_batch_size`` rows."""
        out: list[torch.Tensor] = [torch.zeros(0, device=self.device) for _ in rows]
        idx = [i for i, (_, _, ids) in enumerate(rows) if len(ids) > 0]
        if idx:
            scored = rescore(self.model, self.processor, [rows[i][0] for i in idx], [rows[i][1] for i in idx],
                             [rows[i][2] for i in idx], system=self.cfg.system, grad=grad,
                             batch_size=None if grad or whole else self.cfg.rescore_batch_size)
            for i, s in zip(idx, scored):
                out[i] = s
        return out

    def _minibatches(self, groups: list[Group]) -> list[list[int]]:
        """Group indices of the ``updates_per_batch`` minibatches (one optimizer step each). Several processes:
        the global batch is split, and each process gets the indices of its own groups in each part."""
        cursors = [g.cursor for g in groups] if self.procs.world == 1 else self._kept_cursors
        mine = {g.cursor: i for i, g in enumerate(groups)}
        n = min(self.cfg.updates_per_batch, len(cursors))
        parts = np.array_split(np.arange(len(cursors)), n)
        return [[mine[cursors[j]] for j in part if cursors[j] in mine] for part in parts]

    def _micro_batches(self, groups: list[Group], part: list[int]) -> list[list[tuple]]:
        """The (group, rollout) rows of one minibatch in micro-batches of whole groups: about
        ``micro_batch_size`` rows, at least one group (its prompt is encoded once per micro-batch)."""
        micro = self.cfg.micro_batch_size
        chunks: list[list[tuple]] = []
        current: list[tuple] = []
        for i in part:
            rows = [(groups[i], r) for r in groups[i].rollouts]
            if current and micro is not None and len(current) + len(rows) > micro:
                chunks.append(current)
                current = []
            current = current + rows
        if current:
            chunks.append(current)
        return chunks

    @property
    def _neg_with_grad(self) -> bool:
        """The literal Eq. 4 (``tapo-eq4``): x_neg log-probs recomputed with gradients in every update."""
        return self.cfg.uses_negative and self.cfg.entropy_neg_grad

    @property
    def _exact_generation_logprobs(self) -> bool:
        """Generation's log-probs equal a forward pass's (to float tolerance) only in fp32: in bf16 the
        incremental decode and the update's full forward round differently, and the importance ratio at
        theta = theta_old would not be 1."""
        return not self.cfg.bf16_autocast and all(p.dtype == torch.float32 for p in self.params)

    def _score(self, chunk: list[tuple], grad: bool) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Log-probs of a micro-batch's responses under x* (the update image) and, for the literal Eq. 4,
        under x_neg in the same forward; the update and the bf16 old-log-prob pass score the same batches."""
        mode = self.cfg.positive_update_image
        star = [(g.update_image(r, mode), g.prompt, r.token_ids) for g, r in chunk]
        neg = ([(g.negative_for(img), p, ids) for (g, _), (img, p, ids) in zip(chunk, star)]
               if self._neg_with_grad else [])
        scored = self._rescore_rows(star + neg, grad=grad, whole=True)
        return scored[: len(chunk)], (scored[len(chunk):] if neg else None)

    @torch.no_grad()
    def _old_logprobs(self, groups: list[Group]) -> None:
        """Old-policy log-probs under x*: in fp32 the rollout's own (sampled under x*), else (positive rollouts
        scored under the anchor, paper mode) a no-grad pass; in bf16 (``bf16_autocast``) a no-grad forward of
        every response, over the same micro-batches as the update, so that the ratio is 1 at theta = theta_old;
        plus, for the official no-grad negative, log-probs under x_neg. The first minibatch's missing ones are
        left to ``_update``: until the first optimizer step theta = theta_old, so its own detached log-probs are
        exactly the old ones (no extra pass)."""
        mode = self.cfg.positive_update_image
        self.model.eval()
        todo = [(g, r) for g in groups for r in g.rollouts]
        exact = self._exact_generation_logprobs
        for g, r in todo:
            r.old_logp = r.gen_logp if exact and g.update_source(r, mode) == r.source else None
        parts = self._minibatches(groups)
        if exact:  # only positive rollouts under the anchor (paper mode): batched, prompts shared
            later = {id(groups[i]) for part in parts[1:] for i in part}
            rows = [(g, r) for g, r in todo if r.old_logp is None and id(g) in later]
            for (g, r), lp in zip(rows, self._rescore_rows([(g.update_image(r, mode), g.prompt, r.token_ids)
                                                             for g, r in rows], grad=False)):
                r.old_logp = lp.float().cpu()
        else:  # bf16: the update's own forward, batch for batch
            for part in parts[1:]:
                for chunk in self._micro_batches(groups, part):
                    for (_, r), lp in zip(chunk, self._score(chunk, grad=False)[0]):
                        r.old_logp = lp.float().cpu()
        if self.cfg.uses_negative and not self.cfg.entropy_neg_grad:
            negs = self._rescore_rows([(g.negative_for(g.update_image(r, mode)), g.prompt, r.token_ids)
                                       for g, r in todo], grad=False)
            for (_, r), lp in zip(todo, negs):
                r.neg_logp = lp.float().cpu()

    # ---------------------------------------------------------------- Eq. 4 updates
    def _update(self, groups: list[Group]) -> dict:
        """``updates_per_batch`` optimizer steps, one per minibatch of groups (token mean per minibatch)."""
        cfg = self.cfg
        self.model.train()
        stats: list[dict] = []
        for part in self._minibatches(groups):
            rows = [(groups[i], r) for i in part for r in groups[i].rollouts]
            n_tokens = sum(len(r.token_ids) for _, r in rows)
            if self.procs.world > 1:  # the token mean is over the global minibatch
                n_tokens = int(self.procs.all_sum([n_tokens])[0])
            if n_tokens == 0:
                continue  # only empty responses: nothing to learn from
            self.opt.zero_grad(set_to_none=True)
            acc: dict[str, float] = {}
            for chunk in self._micro_batches(groups, part):
                scored, scored_neg = self._score(chunk, grad=True)  # eq4: x* and x_neg rows in one forward
                if scored_neg is not None:
                    logp_neg = _pad(scored_neg, self.device)[0]
                else:
                    logp_neg = _pad([r.neg_logp for _, r in chunk], self.device)[0] if cfg.uses_negative else None
                logp, mask = _pad(scored, self.device)
                if any(r.old_logp is None for _, r in chunk) and stats:
                    raise RuntimeError("old log-probs missing after an optimizer step")
                old = _pad([r.old_logp if r.old_logp is not None else lp.detach()  # theta = theta_old here
                            for (_, r), lp in zip(chunk, scored)], self.device)[0]
                adv = torch.tensor([r.advantage for _, r in chunk], device=self.device)
                loss, s = tapo_loss(logp, old, adv, mask, logp_neg, cfg, n_tokens=n_tokens)
                if mask.any():
                    loss.backward()
                # loss and pg_loss are already divided by the minibatch's n_tokens: they add up over micro-batches;
                # the other stats are token means of the chunk: weight them by its share of the tokens
                for k, v in s.items():
                    w = 1.0 if k in ("loss", "pg_loss", "tokens") else s["tokens"] / n_tokens
                    acc[k] = acc.get(k, 0.0) + w * v
            if self.procs.world > 1:  # each process's part of the token sums: the global ones are their sum
                self.procs.sum_grads(self.params)
                keys = [k for k in _STAT_KEYS if cfg.uses_negative or k not in ("kl", "entropy_neg")]
                acc = dict(zip(keys, self.procs.all_sum([acc.get(k, 0.0) for k in keys])))
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            if torch.isfinite(grad_norm):
                self.opt.step()
            else:
                warnings.warn("TAPO: non-finite gradient norm, update skipped (as the official code does)")
            self.opt.zero_grad(set_to_none=True)
            stats.append({**acc, "grad_norm": float(grad_norm)})
        self.model.eval()
        keys = ("loss", "kl", "entropy", "entropy_neg", "clip_frac", "grad_norm")
        return {k: float(np.mean([s[k] for s in stats if k in s])) if any(k in s for s in stats) else float("nan")
                for k in keys}

    def step(self, step: int) -> dict:
        """One TAPO step (rollouts, dynamic sampling, old log-probs, updates); returns its log row."""
        device = next(self.model.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.cfg.bf16_autocast):
            return self._step(step)

    def _step(self, step: int) -> dict:
        _sync()
        t0 = time.perf_counter()
        groups, info = self.rollout(step)
        _sync()
        t1 = time.perf_counter()
        if info["kept_groups"]:  # over all processes: one with no group of its own still joins the update
            self._old_logprobs(groups)
        _sync()
        t2 = time.perf_counter()
        if info["kept_groups"]:
            upd, skipped = self._update(groups), 0
        else:  # dynamic sampling found no informative group in max_retries rounds: no update this step
            upd = {k: float("nan") for k in ("loss", "kl", "entropy", "entropy_neg", "clip_frac", "grad_norm")}
            skipped = 1
            msg = (f"TAPO step {step + 1}: no group with mixed accuracy after {info['retries']} retries "
                   f"({info['generated_groups']} generated): the step trains on 0 groups, update skipped")
            warnings.warn(msg)
            log.warning(msg)
        _sync()
        t3 = time.perf_counter()
        row = {"step": step + 1, **info, **upd, "skipped": skipped, "seconds": t3 - t0,
               "t_generate": t1 - t0, "t_rescore": t2 - t1, "t_update": t3 - t2}
        return self.procs.broadcast(row)  # the main process's timings: every process logs the same row

    # ---------------------------------------------------------------- checkpoints
    def _ckpt(self) -> Path:
        return self.out / "checkpoint"

    def save_checkpoint(self, step: int) -> None:
        """Model + trainer state to ``out/checkpoint``, never losing the previous checkpoint on the way: both are
        written to ``.checkpoint.new``, the old folder is moved to ``.checkpoint.old`` and the new one renamed
        into place; only then is the old one deleted (``load_checkpoint`` finishes an interrupted swap). Several
        processes: the main one writes (the replicas are identical; nothing in the state is per process)."""
        if not self.procs.main:
            return
        ckpt = self._ckpt()
        new, old = _ckpt_aside(ckpt, "new"), _ckpt_aside(ckpt, "old")
        _recover_checkpoint(ckpt)
        shutil.rmtree(new, ignore_errors=True)
        save_model(self.model, self.processor, new)
        state = {"step": step, "cursor": self.cursor, "elapsed": self.elapsed, "optimizer": self.opt.state_dict(),
                 "torch_rng": torch.get_rng_state(), "cfg": self.cfg.to_dict()}
        if hasattr(self.model, "peft_config"):  # LoRA: the folder holds the merged model; keep the adapter too
            state["trainable"] = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        torch.save(state, new / "tmp_state.pt")
        (new / "tmp_state.pt").replace(new / _STATE)  # the state file last: its presence marks a complete folder
        if ckpt.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(ckpt, old)
        os.replace(new, ckpt)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> bool:
        """Restore weights, optimizer, step, cursor and RNG from ``out/checkpoint``; False when there is none.

        An interrupted save is finished first (the newest complete folder is put in place). The state is read
        with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts): a file that holds
        anything else is refused with a DataError naming it; a truncated (half-written) one is skipped with a
        warning, falling back to the previous checkpoint if one is complete, else to a fresh start."""
        if not self.out:
            return False
        ckpt = self._ckpt()
        with self.procs.main_first():  # the main process repairs the folder, then the others read it
            _recover_checkpoint(ckpt)
            state = None
            for folder in (ckpt, _ckpt_aside(ckpt, "old")):
                path = folder / _STATE
                if not path.is_file():
                    continue
                state = _load_state(path)
                if state is not None:
                    if folder != ckpt:  # the previous checkpoint is the last complete one: put it back in place
                        shutil.rmtree(ckpt, ignore_errors=True)
                        os.replace(folder, ckpt)
                    break
        if state is None:
            return False
        changed = {k for k, v in state["cfg"].items() if getattr(self.cfg, k, None) != v}
        changed -= {"steps", "checkpoint_every"}  # extending a run is fine
        if changed:
            warnings.warn(f"resuming {self.out} with a different TapoConfig ({sorted(changed)}): "
                          f"the run mixes settings")
        if "trainable" in state:
            self.model.load_state_dict(state["trainable"], strict=False)
        else:
            self.model.load_state_dict(load_model(ckpt)[0].state_dict())
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.start_step, self.cursor, self.elapsed = state["step"], state["cursor"], state["elapsed"]
        return True

    # ---------------------------------------------------------------- loop
    def train(self, progress: bool = True) -> dict:
        """Run (or resume) ``cfg.steps`` steps; returns a summary (also ``out/tapo.json``). Several processes:
        the main one writes the log, checkpoints and model; every one returns the same summary."""
        cfg, main = self.cfg, self.procs.main
        log = self.out / "tapo_log.csv" if self.out else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.load_checkpoint()
        if log is not None and main:
            if resumed and log.is_file():  # drop rows logged after the checkpoint: they are redone
                lines = log.read_text().splitlines(keepends=True)
                keep = [ln for ln in lines[1:] if int(ln.split(",")[0]) <= self.start_step]
                atomic_write_text(log, "".join(lines[:1] + keep))
            elif not resumed:
                atomic_write_text(log, ",".join(LOG_COLUMNS) + "\n")
        if not resumed:  # nothing here draws from the global RNG, but a model with dropout would
            torch.manual_seed(cfg.seed)
        rows = []
        bar = tqdm(range(self.start_step, cfg.steps), initial=self.start_step, total=cfg.steps, desc="tapo",
                   disable=not progress or not main)
        for step in bar:
            row = self.step(step)
            self.elapsed += row["seconds"]
            rows.append(row)
            if log is not None and main:
                with open(log, "a", newline="") as f:
                    csv.writer(f).writerow([_fmt(row.get(c)) for c in LOG_COLUMNS])
            bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}",
                            kept=f"{row['kept_ratio']:.2f}")
            if self.out and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                self.save_checkpoint(step + 1)
        self.model.eval()
        summary = {"steps": cfg.steps, "resumed_from": self.start_step if resumed else None,
                   "seconds": round(self.elapsed, 1), "cfg": cfg.to_dict()}
        if rows:
            summary.update({f"mean_{k}": float(np.nanmean([r[k] for r in rows]))
                            for k in ("t_generate", "t_rescore", "t_update", "seconds")})
        if self.out:
            summary["log"] = str(log)
            if main:
                save_model(self.model, self.processor, self.out / "model")
                write_json(self.out / "tapo.json", summary)
            self.procs.barrier()  # no process returns before the model is on disk
        return summary


_STATE = "trainer_state.pt"
#: The statistics of ``tapo_loss`` that ``_update`` adds up over micro-batches (and processes).
_STAT_KEYS = ("loss", "pg_loss", "tokens", "kl", "entropy", "entropy_neg", "ppo_kl", "clip_frac", "dual_clip_frac")


def _ckpt_aside(ckpt: Path, kind: str) -> Path:
    """``.checkpoint.new`` (being written) or ``.checkpoint.old`` (the previous one, during the swap)."""
    return ckpt.with_name(f".{ckpt.name}.{kind}")


def _recover_checkpoint(ckpt: Path) -> None:
    """Finish a checkpoint save that was interrupted: with ``checkpoint`` missing or incomplete, the newest
    complete folder (``.checkpoint.new``, then ``.checkpoint.old``) takes its place (the next save removes
    leftovers). A folder is complete when it holds the state file, which a save writes last."""
    new, old = _ckpt_aside(ckpt, "new"), _ckpt_aside(ckpt, "old")
    if not (ckpt / _STATE).is_file():
        for folder in (new, old):
            if (folder / _STATE).is_file():
                if ckpt.exists():
                    shutil.rmtree(ckpt)
                os.replace(folder, ckpt)
                warnings.warn(f"{ckpt}: finished an interrupted checkpoint save (from {folder.name})")
                break


def _load_state(path: Path):
    """The trainer state at ``path`` with ``weights_only=True``; None (and a warning) for a truncated file."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise DataError(f"{path}: refused to load this TAPO trainer state: it holds objects other than "
                            f"tensors, numbers, strings, lists and dicts, which unpickling could run as code "
                            f"({str(err).splitlines()[0]}). Delete the checkpoint folder to start over, or "
                            f"restore it from a copy you trust") from None
        warnings.warn(f"{path}: unreadable trainer state ({err}); checkpoint skipped")
    except (RuntimeError, EOFError, OSError) as err:
        warnings.warn(f"{path}: half-written or damaged trainer state ({str(err).splitlines()[0]}); "
                      f"checkpoint skipped")
    return None


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------------
# Benchmark: TAPO step time / DAPO step time
# --------------------------------------------------------------------------------------------------


def bench_tapo(profile=None, out=None, prompts: int = 4, max_new_tokens: int = 128, repeats: int = 2,
               seed: int = 0, *, model=None, processor=None, bench=None,
               variants=("dapo", "tapo", "tapo-eq4"), **overrides) -> dict:
    """Seconds per step of DAPO, TAPO (default: the official no-grad x_neg) and the literal Eq. 4 (tapo-eq4) on
    the same triplets and generation seeds, interleaved in one process (a shared machine slows all alike).

    All start from the same weights each repeat (restored in between); dynamic sampling is off so each does
    exactly one rollout round; otherwise TapoConfig defaults (2 updates per step, micro-batches of whole
    groups); one warm-up step of each variant is excluded; the order of the variants rotates every repeat.
    Returns ``ratio`` (TAPO / DAPO step time, target <= 1.25), ``ratio_tapo_eq4`` (target <= 1.5), the
    phase seconds of each (generate / rescore / update / step), the same ratios of this process's CPU time
    (``cpu_time_ratio*``: steadier than wall time on a machine that other jobs share), TAPO's dominant phase
    and peak memory. ``overrides`` go to every config.
    """
    from .bench import peak_memory_gb
    from .benchmark import build_benchmark
    from .profiles import get_profile

    profile = get_profile(profile)
    if bench is None:
        bench = build_benchmark(profile, out or profile.run_dir() / "benchmark-seed0", seed, progress=False)
    if model is None:
        model, processor = load_model(profile.model, dtype=profile.load_dtype)
    common = {**dict(prompts_per_step=prompts, max_new_tokens=max_new_tokens, dynamic_sampling=False,
                     generate_batch_size=prompts * 10), **overrides}
    configs = {name: TapoConfig.variant(name, **common) for name in variants}
    initial = copy.deepcopy(model.state_dict())
    phases = {"generate": "t_generate", "rescore": "t_rescore", "update": "t_update", "step": "seconds"}
    totals = {name: {p: 0.0 for p in phases} for name in configs}
    cpu = {name: 0.0 for name in configs}
    lengths: dict[str, list[float]] = {name: [] for name in configs}

    def run(name, r):
        model.load_state_dict(initial)
        trainer = TapoTrainer(model, processor, bench, dataclasses.replace(configs[name], seed=seed + r))
        return trainer.step(0)

    for name in configs:  # warm-up (first calls allocate and fill caches)
        run(name, -1)
    names = list(configs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            c0 = time.process_time()
            row = run(name, r)
            cpu[name] += (time.process_time() - c0) / repeats
            lengths[name].append(row["response_len"])
            for p, col in phases.items():
                totals[name][p] += row[col] / repeats
    model.load_state_dict(initial)
    result = {}
    base = totals.get("dapo", {}).get("step")
    for name in configs:
        if name != "dapo" and base:
            suffix = "" if name == "tapo" else f"_{name.replace('-', '_')}"
            result["ratio" + suffix] = round(totals[name]["step"] / base, 3)
    for name in configs:
        if name != "dapo" and cpu.get("dapo"):
            suffix = "" if name == "tapo" else f"_{name.replace('-', '_')}"
            result["cpu_time_ratio" + suffix] = round(cpu[name] / cpu["dapo"], 3)
    result.update(target=1.25, target_tapo_eq4=1.5)
    result["seconds"] = {name: {p: round(v, 3) for p, v in t.items()} for name, t in totals.items()}
    result["cpu_seconds_per_step"] = {name: round(v, 3) for name, v in cpu.items()}
    if "tapo" in totals:
        t = totals["tapo"]
        dominant = max(("generate", "rescore", "update"), key=lambda p: t[p])
        result.update(dominant_phase=dominant, dominant_share=round(t[dominant] / t["step"], 3))
    result.update({"rollouts_per_step": prompts * 10, "max_new_tokens": max_new_tokens, "repeats": repeats,
                   "mean_response_len": {k: round(float(np.mean(v)), 1) for k, v in lengths.items()},
                   "threads": torch.get_num_threads(), "peak_memory_gb": round(peak_memory_gb(), 2)})
    return result
