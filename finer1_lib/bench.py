"""Benchmarks (commands, not timed tests): ``python -m finer1_lib bench generate``.

``generate``: batched sampled rollouts of the base model on training images with the TAPO prompt, as the RL
stage does them; prints generated tokens/s and peak memory.
"""
from __future__ import annotations

import resource
import sys
import time

import torch

from .benchmark import build_benchmark
from .inference import generate
from .model import load_model
from .profiles import get_profile
from .prompts import tapo_prompt
from .protocol import question_templates

__all__ = ["bench_generate", "peak_memory_gb"]


def peak_memory_gb() -> float:
    """Peak resident memory of this process (GB); peak allocated GPU memory when on CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def bench_generate(profile=None, out=None, prompts: int = 8, samples: int = 10, max_new_tokens: int = 128,
                   repeats: int = 2, seed: int = 0) -> dict:
    """Tokens/s of n-sample rollouts (``prompts`` images x ``samples`` completions), after one warm-up call."""
    profile = get_profile(profile)
    bench = build_benchmark(profile, out or profile.run_dir() / "benchmark-seed0", seed, progress=False)
    model, processor = load_model(profile.model, dtype=profile.dtype if profile.dtype != "float32" else None,
                                  device="cuda" if torch.cuda.is_available() else None)
    records = bench.train[:prompts]
    images = [bench.image(r) for r in records]
    texts = [tapo_prompt(question_templates(r.super_category)[0]) for r in records]
    kwargs = dict(do_sample=True, temperature=1.0, num_return_sequences=samples, max_new_tokens=max_new_tokens,
                  batch_size=prompts * samples, return_scores=True, progress=False)
    generate(model, processor, images[:2], texts[:2], seed=seed, **dict(kwargs, num_return_sequences=2))  # warm-up
    runs = []
    for r in range(repeats):
        t0 = time.perf_counter()
        g = generate(model, processor, images, texts, seed=seed + r, **kwargs)
        dt = time.perf_counter() - t0
        runs.append((sum(len(ids) for ids in g.token_ids), dt))
    tokens, seconds = sum(t for t, _ in runs), sum(s for _, s in runs)
    return {"model": profile.model, "rollouts": prompts * samples, "max_new_tokens": max_new_tokens,
            "generated_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "mean_length": round(tokens / (repeats * prompts * samples), 1), "threads": torch.get_num_threads(),
            "peak_memory_gb": round(peak_memory_gb(), 2)}
