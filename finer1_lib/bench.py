"""Benchmarks (commands, not timed tests): ``python -m finer1_lib bench generate|tapo|train``.

``generate``: batched sampled rollouts of the base model on training images with the TAPO prompt, as the RL
stage does them; prints generated tokens/s and peak memory, with each prompt prefilled once for its samples
(the default) and, for comparison, once per row (``share_prompts=False``).
``train``: GPU memory and speed of the real-size path (Qwen2.5-VL-3B/7B architecture, random weights) for
full fine-tuning, LoRA and QLoRA, and rollout tokens/s (README, "Which GPU").
"""
from __future__ import annotations

import json
import resource
import sys
import time

import torch
from pathlib import Path

from .benchmark import build_benchmark
from .inference import generate
from .model import load_model
from .profiles import get_profile
from .prompts import tapo_prompt
from .protocol import question_templates

__all__ = ["bench_generate", "bench_train", "peak_memory_gb", "TRAIN_MODES"]


def peak_memory_gb() -> float:
    """Peak resident memory of this process (GB); peak allocated GPU memory when on CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def bench_generate(profile=None, out=None, prompts: int = 8, samples: int = 10, max_new_tokens: int = 128,
                   repeats: int = 2, seed: int = 0, compare: bool = True) -> dict:
    """Tokens/s of n-sample rollouts (``prompts`` images x ``samples`` completions), after one warm-up call.

    The top-level numbers are generate()'s default path (each prompt prefilled once, its KV cache shared by its
    samples). ``compare``: also the row-by-row path (``share_prompts=False``), interleaved with it on the same
    seeds (the same tokens), under ``row_by_row``, and ``speedup`` = shared tokens/s / row-by-row tokens/s."""
    profile = get_profile(profile)
    bench = build_benchmark(profile, out or profile.run_dir() / "benchmark-seed0", seed, progress=False)
    model, processor = load_model(profile.model, dtype=profile.load_dtype)
    records = bench.train[:prompts]
    images = [bench.image(r) for r in records]
    texts = [tapo_prompt(question_templates(r.super_category)[0]) for r in records]
    kwargs = dict(do_sample=True, temperature=1.0, num_return_sequences=samples, max_new_tokens=max_new_tokens,
                  batch_size=prompts * samples, return_scores=True, progress=False)
    paths = {"shared": True, "row_by_row": False} if compare else {"shared": True}
    for share in paths.values():  # warm-up
        generate(model, processor, images[:2], texts[:2], seed=seed, share_prompts=share,
                 **dict(kwargs, num_return_sequences=2))
    runs = {name: [] for name in paths}
    for r in range(repeats):
        for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            t0 = time.perf_counter()
            g = generate(model, processor, images, texts, seed=seed + r, share_prompts=paths[name], **kwargs)
            dt = time.perf_counter() - t0
            runs[name].append((sum(len(ids) for ids in g.token_ids), dt))
    speed = {}
    for name, rs in runs.items():
        tokens, seconds = sum(t for t, _ in rs), sum(s for _, s in rs)
        speed[name] = {"generated_tokens": tokens, "seconds": round(seconds, 2),
                       "tokens_per_s": round(tokens / seconds, 1)}
    shared = speed["shared"]
    result = {"model": profile.model, "rollouts": prompts * samples, "max_new_tokens": max_new_tokens, **shared,
              "mean_length": round(shared["generated_tokens"] / (repeats * prompts * samples), 1),
              "threads": torch.get_num_threads(), "peak_memory_gb": round(peak_memory_gb(), 2)}
    if compare:
        result["row_by_row"] = speed["row_by_row"]
        result["speedup"] = round(shared["tokens_per_s"] / speed["row_by_row"]["tokens_per_s"], 3)
    return result


#: What ``bench train`` measures: how the model is loaded for SFT (paper §4.2); every mode computes in bf16 on a GPU.
TRAIN_MODES = {
    "full": dict(dtype="float32"),              # fp32 master weights + AdamW, bf16 autocast (as ZeRO-3 bf16)
    "full-bf16": dict(dtype="bfloat16"),        # weights and AdamW states in bf16 (loses lr 5e-6 updates)
    "lora": dict(dtype="bfloat16", lora=True),
    "qlora": dict(dtype="bfloat16", lora=True, load_in_4bit=True),
}
BENCH_LORA = dict(r=64, alpha=128, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])


def _random_model_folder(size: str, folder: Path, processor, seed: int = 0) -> Path:
    """Save a random-weight Qwen2.5-VL of ``size`` (``REAL_SIZES`` or a tiny size) once, in bf16 on GPU."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .model import REAL_SIZES, build_real_size_config, build_tiny_config, save_model

    if (folder / "config.json").is_file():
        return folder
    config = (build_real_size_config if size in REAL_SIZES else build_tiny_config)(processor.tokenizer, size)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    save_model(model, processor, folder)
    del model
    return folder


def bench_train(size: str = "qwen2.5-vl-3b", out=None, modes=tuple(TRAIN_MODES), batch_size: int = 4,
                response_words: int = 480, image_size: int = 448, steps: int = 4, gradient_checkpointing: bool = True,
                rollouts: tuple[int, int] = (8, 10), max_new_tokens: int = 512, seed: int = 0) -> dict:
    """GPU memory and speed of the real-size path on random weights (no download): one CoT-SFT example is an
    ``image_size``² image (256 vision tokens at 448) + the SFT prompt + a ``response_words``-word response.

    For each of ``TRAIN_MODES``: ``steps`` optimizer steps of ``train_sft`` (batch ``batch_size``), peak
    allocated memory, seconds per step; then sampled rollouts (``rollouts`` = prompts x samples, as TAPO draws
    them) in bf16: generated tokens/s. A mode that runs out of memory is reported as such.
    """
    import gc
    import random

    from PIL import Image

    from .chat import ChatExample
    from .io import write_json
    from .model import count_parameters, load_processor
    from .profiles import BASE_MODEL_DIR, get_profile
    from .chat import encode_example
    from .sft import train_sft

    out = Path(out or get_profile("cpu").run_dir().parent / f"bench-train-{size}")
    cuda = torch.cuda.is_available()
    processor = load_processor(BASE_MODEL_DIR, min_pixels=image_size ** 2, max_pixels=image_size ** 2)
    folder = _random_model_folder(size, out / "random-model", processor, seed)
    rng = random.Random(seed)
    words = [w for w in processor.tokenizer.get_vocab() if w.isalpha()]
    image = Image.fromarray((torch.rand(image_size, image_size, 3, generator=torch.Generator().manual_seed(seed))
                             * 255).to(torch.uint8).numpy())
    prompt = tapo_prompt(question_templates("bird")[0])
    examples = [ChatExample(prompt, "<think> " + " ".join(rng.choices(words, k=response_words)) + " </think> "
                            "<answer> x </answer>", image) for _ in range(batch_size * steps)]
    rows = []
    for mode in modes:
        spec = TRAIN_MODES[mode]
        if spec.get("load_in_4bit") and not cuda:
            rows.append({"mode": mode, "error": "4-bit needs a CUDA GPU"})
            continue
        row = {"mode": mode, "weights": spec["dtype"] if not spec.get("load_in_4bit") else "nf4",
               "batch_size": batch_size, "gradient_checkpointing": gradient_checkpointing}
        model = None
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model, _ = load_model(folder, dtype=spec["dtype"] if cuda else None, lora=BENCH_LORA if spec.get("lora") else None,
                                  load_in_4bit=spec.get("load_in_4bit", False))
            row.update(params_b=round(count_parameters(model) / 1e9, 3),
                       trainable_b=round(count_parameters(model, trainable_only=True) / 1e9, 3))
            cfg = dict(epochs=1, batch_size=batch_size, grad_accum=1, lr=5e-6, warmup_frac=0.0, weight_decay=0.1,
                       lr_scheduler="constant", bf16=cuda, save_every_epochs=10**6, seed=seed,
                       logging_steps=1, gradient_checkpointing=gradient_checkpointing)
            summary = train_sft(model, processor, examples, out / f"sft-{mode}", cfg, resume=False, progress=False,
                                max_steps=steps, save=False)
            row.update(seconds_per_step=round(summary["seconds"] / steps, 3),
                       peak_memory_gb=round(peak_memory_gb(), 2), loss=summary["train_loss"])
        except torch.OutOfMemoryError as err:
            row.update(error="out of memory", peak_memory_gb=round(peak_memory_gb(), 2), detail=str(err)[:120])
        finally:
            del model
            gc.collect()
        rows.append(row)
        print(json.dumps(row), flush=True)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, _ = load_model(folder, dtype="bfloat16" if cuda else None)
    n_prompts, n_samples = rollouts
    images = [image.copy() for _ in range(n_prompts)]  # n_prompts distinct prompts (one prefill each), as TAPO
    t0 = time.perf_counter()
    g = generate(model, processor, images, [prompt] * n_prompts, do_sample=True,
                 num_return_sequences=n_samples, max_new_tokens=max_new_tokens, batch_size=n_prompts * n_samples,
                 seed=seed, return_scores=True, progress=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(ids) for ids in g.token_ids)
    gen = {"rollouts": n_prompts * n_samples, "max_new_tokens": max_new_tokens, "generated_tokens": tokens,
           "seconds": round(dt, 2), "tokens_per_s": round(tokens / dt, 1), "peak_memory_gb": round(peak_memory_gb(), 2)}
    print(json.dumps({"generate": gen}), flush=True)
    result = {"size": size, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "sequence_tokens": len(encode_example(processor, examples[0])["input_ids"]), "train": rows,
              "generate": gen}
    write_json(out / "bench_train.json", result)
    return result
