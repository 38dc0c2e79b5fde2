"""Profiles: every size and name the pipeline uses, in one place (nanoGPT style: plain values).

A notebook never edits code to switch worlds: it calls :func:`get_profile`, which reads ``FINER1_PROFILE``
(default ``cpu``). ``smoke`` shrinks everything for CI; ``cpu`` is the full micro-world tutorial on a 2-core
CPU; ``qwen2.5-vl-3b`` / ``qwen2.5-vl-7b`` are the paper's settings on real data (a GPU and the weights needed).
The algorithms never branch on the profile name: they read these values.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .records import DATA_DIR, REPO_ROOT

__all__ = ["Profile", "PROFILES", "get_profile", "profile_names", "current_run_dir", "BASE_MODEL_DIR", "SFT_BASE",
           "ProfileError"]

#: The shipped micro-world base model (built by ``python -m finer1_lib pretrain --profile cpu``).
BASE_MODEL_DIR = DATA_DIR / "base_model"


@dataclass(frozen=True)
class Profile:
    name: str
    world: str = "micro"             # "micro" (rendered here) or "real" (the six datasets on disk)
    # --- micro world
    world_seed: int = 0
    image_size: int = 112
    n_genera: int = 4
    # --- protocol (paper §5: 60/40 seen/unseen split, 4-shot training images per seen class)
    seen_frac: float = 0.6
    shots: int = 4
    test_per_class: int = 5          # held-out test images per class (seen and unseen)
    rl_per_class: int = 8            # extra training-pool images per seen class for TAPO positives
    reference_per_class: int = 4     # images per class used only to measure visual similarity
    super_categories: tuple[str, ...] = ("aircraft", "bird", "car", "dog", "flower", "pet")
    data_root: str | None = None     # real world: folder holding the six datasets (see datasets.py)
    # --- model
    model: str = str(BASE_MODEL_DIR)  # local folder or hub id
    tiny_size: str = "tiny-6m"       # size of the tiny model pretrained from scratch
    dtype: str = "float32"
    # --- stages: plain dicts of hyper-parameters, one per stage
    pretrain: dict = field(default_factory=dict)
    concepts: dict = field(default_factory=dict)   # §4.2 (1)
    cot: dict = field(default_factory=dict)        # §4.2 (2)
    sft: dict = field(default_factory=dict)        # §4.2 stage 1 (SFT_BASE and its overrides)
    tapo: dict = field(default_factory=dict)       # §4.3 stage 2 (TapoConfig fields; + epochs, seeds)
    eval: dict = field(default_factory=dict)
    # --- output
    figures_in_repo: bool = True     # False: figures go to the run folder (CI must not touch figures/)

    def replace(self, **changes) -> "Profile":
        return dataclasses.replace(self, **changes)

    @property
    def load_dtype(self) -> str | None:
        """The dtype to load models in for inference: None keeps the checkpoint's own (the fp32 tiny model)."""
        return None if self.dtype == "float32" else self.dtype

    def run_dir(self, out: str | os.PathLike | None = None) -> Path:
        return Path(out) if out else REPO_ROOT / "data" / "runs" / self.name

    def figures_dir(self, out: str | os.PathLike | None = None) -> Path:
        out = out or os.environ.get("FINER1_RUN_DIR")
        path = REPO_ROOT / "figures" if self.figures_in_repo else self.run_dir(out) / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path


# Pretraining (finer1_lib.pretrain): four stages, as real MLLMs are built. `train` maps the parameter groups
# that learn in a stage (vision tower, merger, language model) to a learning-rate scale; the rest is frozen.
# Mixture tasks: caption / attribute / super / choice / coarse_choice / cot_choice (image), knowledge / reasoning
# (text), naming (rare). cot_choice (the closed-world prompt answered in Table 5 with the options as candidates)
# keeps choosing alive through CoT SFT (data/results/base-model-cot-choice-probe/).
_PRETRAIN_STAGES = dict(
    text=dict(steps=800, batch_size=32, lr=1e-3, min_lr=1e-4, warmup=100, train=dict(language=1.0),
              mixture=dict(knowledge=0.6, reasoning=0.4)),
    vision=dict(steps=2400, batch_size=64, lr=1e-3, min_lr=5e-5, warmup=50, p_full=0.4, attribute_weight=2.0),
    align=dict(steps=400, batch_size=32, lr=1e-3, min_lr=1e-4, warmup=50, train=dict(merger=1.0, language=0.1),
               mixture=dict(caption=0.6, attribute=0.3, super=0.1)),
    instruct=dict(steps=1500, batch_size=16, lr=5e-4, min_lr=5e-5, warmup=100,
                  train=dict(merger=1.0, language=1.0),
                  mixture=dict(caption=0.11, attribute=0.09, super=0.02, choice=0.18, coarse_choice=0.08,
                               cot_choice=0.10, knowledge=0.18, naming=0.06, reasoning=0.18)),
)
PRETRAIN_MIXTURE = _PRETRAIN_STAGES["instruct"]["mixture"]

_CPU_PRETRAIN = dict(stages=_PRETRAIN_STAGES, weight_decay=0.01, naming_images=2, checkpoint_every=100, seed=0,
                     max_tokens_per_chunk=2048)
_SMOKE_PRETRAIN = dict(_CPU_PRETRAIN, checkpoint_every=10,
                       stages={k: dict(v, steps=5, batch_size=4, warmup=1) for k, v in _PRETRAIN_STAGES.items()})

# Concept extraction and CoT construction. per_class: few-shot images per seen class that get a rationale
# (the paper: about one per class; the tiny model gets all four shots, a stated deviation: it needs more data).
_CPU_CONCEPTS = dict(per_class=4, samples_per_prompt=2, temperature=1.0, max_new_tokens=40, beta=0.1,
                     min_support=0.3, neighbours=3)
_CPU_COT = dict(teacher="knowledge-base", max_retries=5, p_wrong=0.2, p_drop_gt=0.1, p_extra_candidates=0.1)
# SFT (§4.2 stage 1): every setting sft.train_sft reads, with the tiny model's values (the one place they are
# set: sft.SFT_DEFAULTS is this dict). Optional, off unless set: max_steps, lora, gradient_checkpointing.
# lr 2e-6 (was 1e-4, before that 3e-4): chosen on validation renders by the harmonic mean of seen and unseen
# closed-world accuracy among the rates whose answers all keep the CoT structure (Table 5): 1e-4 61.6, 3e-5 68.7,
# 1e-5 71.1, 5e-6 75.5, 2e-6 75.9; 1e-6 scores 77.4 but 5 % of its answers lose the structure; the zero-shot base
# model 79.7. data/results/sft-validation/README.md; the long run on the test images: data/results/cpu-reproduce-v5.
# `direct_lr`: the rate of the direct-answer baseline (Fig. 3a) when it differs from `lr` (None: `lr`), chosen on
# the same validation renders: at 1e-4 the direct model's closed-world answers are none of them well-formed
# (16.7 % seen), at 3e-4 64.4 %.
SFT_BASE = dict(epochs=15, batch_size=8, grad_accum=1, lr=2e-6, direct_lr=3e-4, warmup_frac=0.05, weight_decay=0.1,
                lr_scheduler="cosine", max_grad_norm=1.0, bf16=False, save_every_epochs=5, seed=0, replay=0.0,
                logging_steps=5)
_CPU_SFT = dict(SFT_BASE)
# The official settings (official-implementation.md): full FT, bs 4 x accum 4, lr 5e-6 cosine, wd 0.1, 10 epochs.
_PAPER_SFT = dict(SFT_BASE, epochs=10, batch_size=4, grad_accum=4, lr=5e-6, direct_lr=None, warmup_frac=0.03, bf16=True,
                  save_every_epochs=1)
# TAPO (§4.3). The tiny model: 16 steps of 4 triplets x 10 rollouts (~10-15 s a step on 2 cores), lr 5e-5
# (SFT runs at 2e-6). `seeds`: the seeds the notebooks run (the CLI's --seeds overrides).
# Response limit: the CoT SFT targets run up to ~160 tokens, so a limit of 160 cut 9-13 % of the CoT SFT model's
# closed-world answers before </answer> (scored wrong, data/results/sft-validation); 256 leaves room, as the
# paper's 2048 (TAPO) / 1024 (eval) do for its responses.
_CPU_TAPO = dict(steps=16, prompts_per_step=4, updates_per_batch=2, lr=5e-5, max_new_tokens=256,
                 checkpoint_every=4, generate_batch_size=40, seeds=(0,))
# The official settings (official-implementation.md): rollout batch 384 (3B) / 192 (7B) prompts, global batch
# 128 / 64 (= 3 updates per rollout batch), 10 / 5 epochs, lr 1e-6, wd 1e-2, top_p 0.99, responses <= 2048.
_PAPER_TAPO = dict(epochs=10, prompts_per_step=384, updates_per_batch=3, lr=1e-6, weight_decay=1e-2, top_p=0.99,
                   max_new_tokens=2048, checkpoint_every=5, generate_batch_size=64, micro_batch_size=4, seeds=(0,))
_REAL_CONCEPTS = dict(per_class=1, samples_per_prompt=2, temperature=1.0, max_new_tokens=128, beta=0.1,
                      min_support=0.3, neighbours=3)
_REAL_COT = dict(teacher="Qwen/Qwen2.5-VL-32B-Instruct", max_retries=5)

PROFILES: dict[str, Profile] = {
    "cpu": Profile(name="cpu", pretrain=_CPU_PRETRAIN, concepts=_CPU_CONCEPTS, cot=_CPU_COT, sft=_CPU_SFT,
                   tapo=_CPU_TAPO,
                   eval=dict(max_new_tokens=256, batch_size=32, seeds=(0,), clip=dict(preset="cpu"))),
    "smoke": Profile(name="smoke", test_per_class=2, rl_per_class=2, reference_per_class=2,
                     figures_in_repo=False,
                     pretrain=_SMOKE_PRETRAIN,
                     concepts=dict(_CPU_CONCEPTS, per_class=1, samples_per_prompt=1), cot=_CPU_COT,
                     sft=dict(_CPU_SFT, epochs=3),
                     tapo=dict(_CPU_TAPO, steps=2, prompts_per_step=2, max_new_tokens=96, max_retries=2,
                               generate_batch_size=20, checkpoint_every=1),
                     eval=dict(max_new_tokens=160, batch_size=32, seeds=(0,), clip=dict(preset="smoke"))),
    "qwen2.5-vl-3b": Profile(name="qwen2.5-vl-3b", world="real", model="Qwen/Qwen2.5-VL-3B-Instruct",
                             image_size=448, data_root=str(DATA_DIR / "datasets"), dtype="bfloat16",
                             test_per_class=10**9, concepts=_REAL_CONCEPTS, cot=_REAL_COT, sft=_PAPER_SFT,
                             tapo=_PAPER_TAPO, eval=dict(max_new_tokens=1024, batch_size=16)),
    "qwen2.5-vl-7b": Profile(name="qwen2.5-vl-7b", world="real", model="Qwen/Qwen2.5-VL-7B-Instruct",
                             image_size=448, data_root=str(DATA_DIR / "datasets"), dtype="bfloat16",
                             test_per_class=10**9, concepts=_REAL_CONCEPTS, cot=_REAL_COT, sft=_PAPER_SFT,
                             tapo=dict(_PAPER_TAPO, epochs=5, prompts_per_step=192),
                             eval=dict(max_new_tokens=1024, batch_size=8)),
}


def current_run_dir(profile: Profile | str | None = None) -> Path:
    """Where this run's artifacts go: ``$FINER1_RUN_DIR`` (set by the tutorial runner) or the profile's folder."""
    env = os.environ.get("FINER1_RUN_DIR")
    path = Path(env) if env else get_profile(profile).run_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def profile_names() -> list[str]:
    return list(PROFILES)


class ProfileError(ValueError):
    """An unknown profile name (from an argument or ``$FINER1_PROFILE``)."""


def get_profile(name: str | Profile | None = None) -> Profile:
    """The named profile, or ``$FINER1_PROFILE``, or ``cpu``."""
    if isinstance(name, Profile):
        return name
    source = "argument" if name else "FINER1_PROFILE" if os.environ.get("FINER1_PROFILE") else "default"
    name = name or os.environ.get("FINER1_PROFILE") or "cpu"
    if name not in PROFILES:
        raise ProfileError(f"unknown profile {name!r} (from {source}); choose one of {', '.join(profile_names())}")
    return PROFILES[name]
