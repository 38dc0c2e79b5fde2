"""Inference API used by every later stage: batched inputs, generation, rescoring, the k3 KL estimator.

- :func:`generate` samples (or greedily decodes) completions and can return each generated token's log-prob
  under the model (log-softmax of the raw logits, i.e. temperature 1) plus the token ids. Rows that share a
  prompt (``num_return_sequences`` > 1, a TAPO group's rollouts) prefill it once and sample on its KV cache.
- :func:`rescore` recomputes those log-probs for given completions under any image (anchor, positive,
  negative), optionally with gradients: the building block of SFT losses and TAPO. Rows that share a prompt
  (a TAPO group: one image + question, ten responses) encode it once and reuse its KV cache.
- :func:`token_kl_k3` is Schulman's k3 estimator used by TAPO's inter-class term (paper Eq. 3).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import (LogitsProcessorList, Qwen2_5_VLModel, SuppressTokensLogitsProcessor,
                          TemperatureLogitsWarper, TopPLogitsWarper)

from .model import vision_token_ids

__all__ = ["Generations", "build_messages", "build_inputs", "generate", "rescore", "token_kl_k3", "image_embeddings",
           "image_embedding_fn"]


class Generations(NamedTuple):
    """What :func:`generate` returns with ``return_scores=True`` (one entry per completion)."""

    texts: list[str]
    token_ids: list[list[int]]  # generated ids, ending with <|im_end|> when the model stopped
    logprobs: list[torch.Tensor]  # float32, one value per token id


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def build_messages(image: Image.Image | None, prompt: str, system: str | None = None) -> list[dict]:
    """One chat: [system], user = [image] + prompt. ``system=None`` keeps Qwen's default system prompt."""
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def build_inputs(
    processor,
    images: Sequence[Image.Image | None],
    prompts: Sequence[str],
    system: str | None = None,
    padding_side: str = "left",
):
    """Chat template + processor for a batch; an image may be ``None`` (text-only prompt)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    texts = [
        processor.apply_chat_template(build_messages(img, p, system), tokenize=False, add_generation_prompt=True)
        for img, p in zip(images, prompts)
    ]
    present = [img for img in images if img is not None]
    return processor(
        images=present or None,
        text=texts,
        padding=True,
        padding_side=padding_side,
        return_tensors="pt",
    )


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _vl_model(model) -> Qwen2_5_VLModel:
    """The inner Qwen2_5_VLModel (through a peft wrapper if any)."""
    for module in model.modules():
        if isinstance(module, Qwen2_5_VLModel):
            return module
    raise TypeError(f"no Qwen2_5_VLModel inside {type(model).__name__}")


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's RNG inside the block only; the caller's RNG state is restored afterwards."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def generate(
    model,
    processor,
    images: Sequence[Image.Image | None],
    prompts: Sequence[str],
    *,
    system: str | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    seed: int | None = None,
    batch_size: int = 16,
    return_scores: bool = False,
    progress: bool = True,
    share_prompts: bool | None = None,
) -> list[str] | Generations:
    """Complete each (image, prompt); returns ``num_return_sequences`` completions per prompt, prompt-major.

    KV cache, vision tokens suppressed, stops at ``<|im_end|>``. With ``return_scores`` a :class:`Generations`
    carries the token ids and their log-probs at temperature 1 (raw logits).

    ``share_prompts``: rows of a batch with the same prompt (the same image object and text: the
    ``num_return_sequences`` rows of a prompt, a TAPO group's rollouts) prefill it once; its KV cache is
    gathered to the rows and each row samples on it (:func:`_generate_shared_batch`). ``False``: Hugging Face
    ``model.generate`` on every row, left-padded (the prompt encoded once per row). ``None`` (default): share
    when some prompt repeats. Both paths take the same random draws (one ``torch.multinomial`` over the batch
    per step, after the same logits processors) on the same batches of ``batch_size`` consecutive rows, so
    they return the same tokens, and log-probs equal to float tolerance (tests check greedy and seeded
    sampling); a batch boundary inside a prompt's rows encodes that prompt in both batches.
    """
    tokenizer = processor.tokenizer
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [(img, p) for img, p in zip(images, prompts, strict=True) for _ in range(num_return_sequences)]
    if share_prompts is None:
        share_prompts = len({_prompt_key(img, p) for img, p in rows}) < len(rows)
    device = _device(model)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, suppress=vision_token_ids(tokenizer),
                    eos_id=eos_id, pad_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens)
    batch = _generate_shared_batch if share_prompts else _generate_batch
    texts, all_ids, all_logps = [], [], []
    starts = range(0, len(rows), batch_size)
    with _seeded(seed, device), torch.no_grad():
        for start in tqdm(starts, desc="generate", disable=not progress or len(starts) == 0):
            chunk = rows[start : start + batch_size]
            new, logps = batch(model, processor, [r[0] for r in chunk], [r[1] for r in chunk], system,
                               return_scores, **sampling)
            for i, seq in enumerate(new.tolist()):
                n = seq.index(eos_id) + 1 if eos_id in seq else len(seq)
                all_ids.append(seq[:n])
                texts.append(tokenizer.decode(seq[:n], skip_special_tokens=True))
                if return_scores:
                    all_logps.append(logps[i, :n].clone())
    if return_scores:
        return Generations(texts, all_ids, all_logps)
    return texts


def _generate_batch(model, processor, images, prompts, system, return_scores, *, do_sample, temperature, top_p,
                    suppress, eos_id, pad_id, max_new_tokens):
    """Every row on its own: left-padded prompts through ``model.generate``. Returns the generated ids
    (B, T) (pad after a row's end) and, with ``return_scores``, their log-probs at temperature 1 (B, T)."""
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        repetition_penalty=1.0,
        suppress_tokens=suppress,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=return_scores,
    )
    if do_sample:  # explicit values, so a hub generation_config.json (top_k=1, ...) cannot leak in
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    inputs = build_inputs(processor, images, prompts, system, "left").to(_device(model))
    out = model.generate(**inputs, **gen_kwargs)
    _vl_model(model).rope_deltas = None  # do not leave this batch's rope deltas behind
    new = out.sequences[:, inputs["input_ids"].shape[1] :].cpu()
    logps = None
    if return_scores:
        logits = torch.stack(out.logits, dim=1).float().cpu()  # (B, T, V) raw logits
        logps = torch.log_softmax(logits, dim=-1).gather(-1, new[..., None]).squeeze(-1)
    return new, logps


def _generate_shared_batch(model, processor, images, prompts, system, return_scores, *, do_sample, temperature,
                           top_p, suppress, eos_id, pad_id, max_new_tokens):
    """The batch's distinct prompts prefilled once (:func:`_shared_prompt_cache`, as rescoring), then a
    sampling loop over the rows on the gathered cache; the same outputs as :func:`_generate_batch`.

    Step t feeds each row its previous token (step 0: its prompt's held-back last token) at the 3-D position
    of the prompt's last token + t on every mrope axis (text after the prompt, as ``model.generate`` assigns),
    with the prompt's padding masked. Token choice is ``model.generate``'s: raw logits in float32, vision
    tokens suppressed, temperature and top-p when sampling (top_k off), one ``torch.multinomial`` over the
    batch (or argmax), rows that ended get the pad token; the loop stops when every row has ended."""
    device = _device(model)
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor(suppress, device=device)])
    if do_sample and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if do_sample and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    shared = _shared_prompt_cache(model, processor, images, prompts, system)
    n = len(prompts)
    tokens = shared.last_token.to(device)
    positions = shared.last_pos.to(device)[:, :, None]  # (3, B, 1)
    mask = shared.mask.to(device)
    unfinished = torch.ones(n, dtype=torch.bool, device=device)
    new = torch.zeros((n, 0), dtype=torch.long, device=device)
    logps = []
    for step in range(max_new_tokens):
        mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions + step,
                    past_key_values=shared.cache, use_cache=True)
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        scores = processors(new, logits)
        if do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_id))
        new = torch.cat([new, tokens[:, None]], dim=1)
        if return_scores:
            logps.append(torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1))
        unfinished &= tokens != eos_id
        if not unfinished.any():
            break
    if not return_scores:
        return new.cpu(), None
    return new.cpu(), torch.stack(logps, dim=1).cpu() if logps else torch.zeros((n, 0))


# --------------------------------------------------------------------------------------------------
# Rescoring
# --------------------------------------------------------------------------------------------------


def rescore(
    model,
    processor,
    images: Sequence[Image.Image | None],
    prompts: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    *,
    system: str | None = None,
    grad: bool = False,
    batch_size: int | None = None,
    share_prompts: bool | None = None,
) -> list[torch.Tensor]:
    """Per-token log-probs of ``completion_ids[i]`` given (images[i], prompts[i]); one tensor per row.

    Rows are prompt + completion with the 3-D (mrope) positions of the whole row, exactly as generation assigns
    them. ``grad=True`` keeps the graph for a backward pass.

    ``share_prompts``: rows with the same prompt (the same image object and text, e.g. a TAPO group's rollouts)
    encode it once: a forward over the distinct prompts with the KV cache, then every row's completion on
    its prompt's cache (gathered to the row, so gradients reach the prompt's tokens and the vision tower
    through every row that uses it). The same numbers as one forward per full row, to float tolerance (a
    test checks log-probs and gradients). ``None`` (default): share when some prompt repeats. Batches
    (``batch_size`` rows) then hold whole sets of rows of one prompt where they fit.
    """
    if not len(images) == len(prompts) == len(completion_ids):
        raise ValueError("images, prompts and completion_ids must have the same length")
    n = len(prompts)
    keys = [_prompt_key(img, p) for img, p in zip(images, prompts)]
    if share_prompts is None:
        share_prompts = len(set(keys)) < n
    batch_size = batch_size or max(1, n)
    if share_prompts:
        batches = _prompt_batches(keys, batch_size)
    else:
        batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    score = _rescore_shared_batch if share_prompts else _rescore_batch
    results: list[torch.Tensor | None] = [None] * n
    context = torch.enable_grad() if grad else torch.no_grad()
    with context:
        for rows in batches:
            scored = score(model, processor, [images[i] for i in rows], [prompts[i] for i in rows],
                           [completion_ids[i] for i in rows], system)
            for i, s in zip(rows, scored):
                results[i] = s
    return results


def _prompt_key(image, prompt: str):
    """Rows with equal keys share one prompt encoding: the same image object and the same text."""
    return (id(image) if image is not None else None, prompt)


def _prompt_batches(keys: list, batch_size: int) -> list[list[int]]:
    """Row indices grouped by prompt (first-appearance order); whole groups per batch while they fit in
    ``batch_size`` rows; a group larger than that is split (each part encodes the prompt again)."""
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    batches: list[list[int]] = []
    current: list[int] = []
    for rows in groups.values():
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            if current and len(current) + len(part) > batch_size:
                batches.append(current)
                current = []
            current = current + part
    if current:
        batches.append(current)
    return batches


def _rescore_batch(model, processor, images, prompts, completion_ids, system):
    device = _device(model)
    tokenizer = processor.tokenizer
    prompt_inputs = build_inputs(processor, images, prompts, system, padding_side="right")
    prompt_lens = prompt_inputs["attention_mask"].sum(dim=1).tolist()
    completions = [list(map(int, c)) for c in completion_ids]
    total = max(p + len(c) for p, c in zip(prompt_lens, completions))

    # prompt (unpadded) + completion, then right padding
    input_ids = torch.full((len(prompts), total), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), total), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, completions)):
        input_ids[i, :p] = prompt_inputs["input_ids"][i, :p]
        input_ids[i, p : p + len(c)] = torch.tensor(c, dtype=torch.long)
        attention_mask[i, : p + len(c)] = 1
    # modality of each token (1 = image, 2 = video); the completion is text (0)
    mm_token_type_ids = torch.zeros_like(input_ids)
    mm_token_type_ids[:, : prompt_inputs["mm_token_type_ids"].shape[1]] = prompt_inputs["mm_token_type_ids"]
    mm_token_type_ids *= attention_mask

    input_ids, attention_mask, mm_token_type_ids = (t.to(device) for t in (input_ids, attention_mask, mm_token_type_ids))
    image_grid_thw = prompt_inputs.get("image_grid_thw")
    image_grid_thw = image_grid_thw.to(device) if image_grid_thw is not None else None
    pixel_values = prompt_inputs.get("pixel_values")
    pixel_values = pixel_values.to(device) if pixel_values is not None else None

    # 3-D rope positions over the full row (text after the image continues from the image's max position)
    vl = _vl_model(model)
    position_ids, _ = vl.get_rope_index(
        input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
    )
    vl.rope_deltas = None

    # logits are only needed from the earliest completion start on
    first = min(prompt_lens) - 1
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        mm_token_type_ids=mm_token_type_ids,
        use_cache=False,
        logits_to_keep=total - first,
    )
    logits = out.logits  # (B, total - first, V); position j predicts token j + 1 (+ first)
    result = []
    for i, (p, c) in enumerate(zip(prompt_lens, completions)):
        rows = logits[i, p - 1 - first : p - 1 - first + len(c)].float()
        targets = input_ids[i, p : p + len(c)]
        result.append(torch.log_softmax(rows, dim=-1).gather(-1, targets[:, None]).squeeze(-1))
    return result


class _SharedPrompts(NamedTuple):
    """The distinct prompts of a batch encoded once, gathered to its rows (B of them)."""

    cache: object  # KV cache of each row's prompt but its last token, (B, ..., width, ...)
    mask: torch.Tensor  # (B, width) attention mask of that cache (1 on the prompt's tokens, 0 on padding)
    last_token: torch.Tensor  # (B,) each row's prompt's held-back last token
    last_pos: torch.Tensor  # (3, B) its mrope position; text after it continues +1 per token on all axes


def _shared_prompt_cache(model, processor, images, prompts, system) -> _SharedPrompts:
    """One forward over the distinct prompts of the batch (right-padded, ``use_cache=True``, with the graph when
    grad is on), their last token held back; the KV cache is then gathered to the rows (differentiable), so
    every row continues on its own prompt: :func:`_rescore_shared_batch` and :func:`_generate_shared_batch`."""
    device = _device(model)
    pad_id = processor.tokenizer.pad_token_id
    index: dict = {}
    distinct, row_prompt = [], []
    for img, p in zip(images, prompts):
        k = _prompt_key(img, p)
        if k not in index:
            index[k] = len(distinct)
            distinct.append((img, p))
        row_prompt.append(index[k])
    enc = build_inputs(processor, [d[0] for d in distinct], [d[1] for d in distinct], system, padding_side="right")
    ids, mask, mm_types = enc["input_ids"], enc["attention_mask"], enc["mm_token_type_ids"]
    lens = mask.sum(dim=1)
    grid = enc.get("image_grid_thw")
    vl = _vl_model(model)
    positions, _ = vl.get_rope_index(ids, mm_types, image_grid_thw=grid, attention_mask=mask)
    vl.rope_deltas = None
    g = torch.arange(len(distinct))
    if (mm_types[g, lens - 1] != 0).any():
        raise ValueError("a prompt ends in an image token: cannot hold its last token back for the completion pass")
    last_token, last_pos = ids[g, lens - 1], positions[:, g, lens - 1]  # (G,), (3, G)

    width = int(lens.max()) - 1
    prefix_mask = (torch.arange(width)[None, :] < (lens - 1)[:, None]).long()
    prefix_ids = torch.where(prefix_mask.bool(), ids[:, :width], torch.full_like(ids[:, :width], pad_id))
    pixel_values = enc.get("pixel_values")
    out = model(
        input_ids=prefix_ids.to(device),
        attention_mask=prefix_mask.to(device),
        position_ids=positions[:, :, :width].to(device),
        pixel_values=pixel_values.to(device) if pixel_values is not None else None,
        image_grid_thw=grid.to(device) if grid is not None else None,
        mm_token_type_ids=mm_types[:, :width].to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    rows = torch.tensor(row_prompt, dtype=torch.long)
    cache.batch_select_indices(rows.to(device))  # (G, ...) -> (B, ...): a gather, differentiable
    return _SharedPrompts(cache, prefix_mask[rows], last_token[rows], last_pos[:, rows])


def _rescore_shared_batch(model, processor, images, prompts, completion_ids, system):
    """One forward over the distinct prompts of the batch (:func:`_shared_prompt_cache`), then every row's
    completion on its prompt's KV cache. Each prompt's last token is held back and opens the row's completion
    pass (its logits predict the first completion token); positions continue from the prompt's exactly as in a
    full row (text after the image: +1 per token on all three mrope axes from the last prompt token's position)."""
    device = _device(model)
    pad_id = processor.tokenizer.pad_token_id
    shared = _shared_prompt_cache(model, processor, images, prompts, system)

    # each row: its prompt's last token + completion, right-padded, on the gathered cache
    completions = [list(map(int, c)) for c in completion_ids]
    length = 1 + max(len(c) for c in completions)
    input_ids = torch.full((len(completions), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(completions), length), dtype=torch.long)
    for i, c in enumerate(completions):
        input_ids[i, 0] = shared.last_token[i]
        input_ids[i, 1 : 1 + len(c)] = torch.tensor(c, dtype=torch.long)
        attention_mask[i, : 1 + len(c)] = 1
    position_ids = shared.last_pos[:, :, None] + torch.arange(length)[None, None, :]
    input_ids = input_ids.to(device)
    out = model(
        input_ids=input_ids,
        attention_mask=torch.cat([shared.mask, attention_mask], dim=1).to(device),
        position_ids=position_ids.to(device),
        past_key_values=shared.cache,
        use_cache=True,
    )
    logits = out.logits  # (B, length, V); position j predicts completion token j
    return [torch.log_softmax(logits[i, : len(c)].float(), dim=-1).gather(-1, input_ids[i, 1 : 1 + len(c), None])
            .squeeze(-1) for i, c in enumerate(completions)]


# --------------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------------


def token_kl_k3(logp_p: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(p || q) per token: g - log g - 1 with g = q/p (paper Eq. 3); >= 0."""
    log_g = logp_q - logp_p
    return torch.exp(log_g) - log_g - 1.0


# --------------------------------------------------------------------------------------------------
# Image embeddings (pluggable similarity for triplet negatives and closed-world distractors)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def image_embeddings(model, processor, images: Sequence[Image.Image], batch_size: int = 64):
    """Mean-pooled vision-tower outputs (the tokens the LLM sees), L2-normalised; a numpy (n, d) array."""
    import numpy as np

    vl = _vl_model(model)
    device = _device(model)
    rows = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        enc = processor.image_processor(images=chunk, return_tensors="pt")
        feats = vl.get_image_features(enc["pixel_values"].to(device), enc["image_grid_thw"].to(device)).pooler_output
        rows += [f.float().mean(0) for f in feats]
    x = torch.stack(rows)
    return torch.nn.functional.normalize(x, dim=-1).cpu().numpy().astype(np.float64)


def image_embedding_fn(model, processor):
    """An ``embed_fn`` for :func:`finer1_lib.protocol.build_similarity` from a model's vision tower."""
    return lambda images: image_embeddings(model, processor, images)
