"""Supervised chat examples: (image?, prompt, response) -> token ids with the loss on the response only.

Used by pretraining and by SFT (paper §4.2, stage 1). The prompt goes through the processor exactly as at
inference (:func:`finer1_lib.inference.build_inputs`: chat template, image tokens expanded); the response is
appended as token ids followed by ``<|im_end|>``. Labels are ``-100`` on the system prompt, the question and
the image tokens, so only the assistant's tokens (and its end-of-turn token) are learned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from .inference import build_inputs

__all__ = ["ChatExample", "encode_example", "collate", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass
class ChatExample:
    """One supervised example. ``image=None`` makes a text-only example; ``system=None`` = Qwen's default."""

    prompt: str
    response: str
    image: Image.Image | None = None
    system: str | None = None


def encode_example(processor, example: ChatExample, max_length: int | None = None) -> dict:
    """Token ids, labels (response only) and vision inputs of one example, unpadded."""
    if not isinstance(example.response, str) or not example.response.strip():
        raise ValueError(f"empty response for prompt {example.prompt[:60]!r}")
    prompt = build_inputs(processor, [example.image], [example.prompt], example.system, padding_side="right")
    tokenizer = processor.tokenizer
    prompt_ids = prompt["input_ids"][0].tolist()
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    if max_length is not None and len(input_ids) > max_length:
        raise ValueError(f"example of {len(input_ids)} tokens exceeds max_length={max_length}: "
                         f"{example.prompt[:60]!r} -> {example.response[:60]!r}")
    mm = prompt["mm_token_type_ids"][0].tolist() + [0] * len(response_ids)
    out = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor([IGNORE_INDEX] * len(prompt_ids) + response_ids, dtype=torch.long),
        "mm_token_type_ids": torch.tensor(mm, dtype=torch.long),
    }
    if example.image is not None:
        out["pixel_values"] = prompt["pixel_values"]
        out["image_grid_thw"] = prompt["image_grid_thw"]
    return out


def collate(features: Sequence[dict], pad_token_id: int) -> dict:
    """Right-pad a list of :func:`encode_example` outputs into one training batch."""
    if not features:
        raise ValueError("cannot collate an empty batch")
    length = max(len(f["input_ids"]) for f in features)
    n = len(features)
    batch = {
        "input_ids": torch.full((n, length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((n, length), dtype=torch.long),
        "labels": torch.full((n, length), IGNORE_INDEX, dtype=torch.long),
        "mm_token_type_ids": torch.zeros((n, length), dtype=torch.long),
    }
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        batch["input_ids"][i, :k] = f["input_ids"]
        batch["attention_mask"][i, :k] = 1
        batch["labels"][i, :k] = f["labels"]
        batch["mm_token_type_ids"][i, :k] = f["mm_token_type_ids"]
    with_images = [f for f in features if "pixel_values" in f]
    if with_images:
        batch["pixel_values"] = torch.cat([f["pixel_values"] for f in with_images])
        batch["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in with_images])
    return batch
