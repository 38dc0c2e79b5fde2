"""generate() / rescore() agreement, batching, suppression, seeding, gradients and the k3 KL estimator."""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from finer1_lib.inference import Generations, build_inputs, generate, rescore, token_kl_k3
from finer1_lib.model import VISION_TOKENS, build_processor, build_tiny_model, build_tokenizer, vision_token_ids

CORPUS = [
    "The Marovi Talsek is a small bird with a red crest, striped wings and a blue breast.",
    "The Marovi Dunel has a yellow crest and spotted wings; its beak is short.",
    "What species is this bird? Describe the crest first. Answer with its name.",
    "<think>The crest is red.</think><answer>Marovi Talsek</answer>",
]
PROMPTS = [
    "What species is this bird?",
    "What species?",
    "Describe the crest first. What species is this bird? Answer with its name.",
]
GEN = dict(max_new_tokens=12, progress=False)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    tokenizer = build_tokenizer(CORPUS)
    return build_tiny_model(tokenizer, "tiny-3m", seed=0), build_processor(tokenizer)


def _image(seed, size=112):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


IMAGES = [_image(0), _image(1), _image(2)]


def test_build_inputs_left_and_right_padding(tiny):
    _, processor = tiny
    pad = processor.tokenizer.pad_token_id
    left = build_inputs(processor, IMAGES, PROMPTS, padding_side="left")
    right = build_inputs(processor, IMAGES, PROMPTS, system="You are a bird expert.", padding_side="right")
    assert left["input_ids"][1, 0] == pad and left["input_ids"][1, -1] != pad
    assert right["input_ids"][1, -1] == pad and right["input_ids"][1, 0] != pad
    assert left["pixel_values"].shape[0] == 3 * 64  # 3 images x 8 x 8 patches
    assert "mm_token_type_ids" in left


def test_greedy_batch_equals_one_by_one(tiny):
    model, processor = tiny
    batched = generate(model, processor, IMAGES, PROMPTS, return_scores=True, **GEN)
    assert isinstance(batched, Generations)
    for i in range(3):
        single = generate(model, processor, IMAGES[i : i + 1], PROMPTS[i : i + 1], return_scores=True, **GEN)
        assert single.token_ids[0] == batched.token_ids[i]
        assert single.texts[0] == batched.texts[i]
        torch.testing.assert_close(single.logprobs[0], batched.logprobs[i], atol=1e-4, rtol=0)
    # batch_size splits the work without changing greedy results
    assert generate(model, processor, IMAGES, PROMPTS, batch_size=2, **GEN) == batched.texts


def test_vision_tokens_are_never_generated(tiny):
    model, processor = tiny
    # a model that strongly prefers vision tokens (tied embeddings -> scale their output rows)
    biased = copy.deepcopy(model)
    with torch.no_grad():
        for token_id in vision_token_ids(processor.tokenizer):
            biased.lm_head.weight[token_id] *= 200.0
    out = generate(biased, processor, IMAGES, PROMPTS, return_scores=True, do_sample=True, seed=0,
                   num_return_sequences=2, **GEN)
    banned = set(vision_token_ids(processor.tokenizer))
    assert all(not banned & set(ids) for ids in out.token_ids)
    assert all(token not in text for text in out.texts for token in VISION_TOKENS)


def test_sampling_is_seeded_and_returns_n_per_prompt(tiny):
    model, processor = tiny
    kwargs = dict(do_sample=True, temperature=1.0, num_return_sequences=3, **GEN)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = generate(model, processor, IMAGES[:2], PROMPTS[:2], seed=7, return_scores=True, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    b = generate(model, processor, IMAGES[:2], PROMPTS[:2], seed=7, return_scores=True, **kwargs)
    c = generate(model, processor, IMAGES[:2], PROMPTS[:2], seed=8, return_scores=True, **kwargs)
    assert len(a.texts) == len(a.token_ids) == len(a.logprobs) == 6
    assert a.token_ids == b.token_ids and a.texts == b.texts
    assert a.token_ids != c.token_ids
    assert len(set(map(tuple, a.token_ids[:3]))) > 1  # the 3 samples of one prompt differ
    eos = processor.tokenizer.eos_token_id
    for ids, lp in zip(a.token_ids, a.logprobs):
        assert len(ids) == len(lp) <= GEN["max_new_tokens"]
        assert eos not in ids[:-1]
        assert (lp <= 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rescore_matches_generate_scores(tiny, temperature):
    """THE key invariant: rescoring sampled completions reproduces generate()'s log-probs."""
    model, processor = tiny
    images = [IMAGES[0], _image(5, 224), IMAGES[2]]  # different prompt lengths AND image sizes
    out = generate(model, processor, images, PROMPTS, do_sample=True, temperature=temperature, seed=3,
                   num_return_sequences=2, return_scores=True, **GEN)
    rows_images = [img for img in images for _ in range(2)]
    rows_prompts = [p for p in PROMPTS for _ in range(2)]
    again = rescore(model, processor, rows_images, rows_prompts, out.token_ids)
    for got, expected in zip(again, out.logprobs):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # a smaller rescoring batch gives the same numbers
    small = rescore(model, processor, rows_images, rows_prompts, out.token_ids, batch_size=2)
    for got, expected in zip(small, again):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_rescore_text_only_prompt(tiny):
    model, processor = tiny
    out = generate(model, processor, [None, IMAGES[0]], PROMPTS[:2], do_sample=True, seed=0, return_scores=True, **GEN)
    again = rescore(model, processor, [None, IMAGES[0]], PROMPTS[:2], out.token_ids)
    for got, expected in zip(again, out.logprobs):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_k3_kl_same_image_zero_other_image_positive(tiny):
    model, processor = tiny
    out = generate(model, processor, IMAGES, PROMPTS, do_sample=True, seed=1, return_scores=True, **GEN)
    anchor = rescore(model, processor, IMAGES, PROMPTS, out.token_ids)
    same = rescore(model, processor, IMAGES, PROMPTS, out.token_ids)
    negatives = [_image(10), _image(11, 168), _image(12)]
    other = rescore(model, processor, negatives, PROMPTS, out.token_ids)
    for a, s, o in zip(anchor, same, other):
        assert token_kl_k3(a, s).abs().max() < 1e-6
        kl = token_kl_k3(a, o)
        assert (kl >= 0).all() and kl.sum() > 0


def test_token_kl_k3_values():
    logp_p = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    logp_q = torch.log(torch.tensor([0.25, 0.2, 0.45]))
    kl = token_kl_k3(logp_p, logp_q)
    g = torch.tensor([0.5, 1.0, 0.5])
    torch.testing.assert_close(kl, g - torch.log(g) - 1)
    assert kl[1] == 0 and (kl >= 0).all()


def test_rescore_with_grad_reaches_vision_and_language(tiny):
    model, processor = tiny
    out = generate(model, processor, IMAGES[:2], PROMPTS[:2], do_sample=True, seed=2, return_scores=True, **GEN)
    model.zero_grad(set_to_none=True)
    anchor = rescore(model, processor, IMAGES[:2], PROMPTS[:2], out.token_ids, grad=True)
    negative = rescore(model, processor, [_image(20), _image(21)], PROMPTS[:2], out.token_ids, grad=True)
    assert all(t.requires_grad for t in anchor)
    no_grad = rescore(model, processor, IMAGES[:2], PROMPTS[:2], out.token_ids)
    assert not any(t.requires_grad for t in no_grad)
    loss = -sum(a.sum() for a in anchor) - sum(token_kl_k3(a, n).sum() for a, n in zip(anchor, negative))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["model.visual.patch_embed.proj.weight"].abs().sum() > 0
    assert grads["model.visual.merger.mlp.2.weight"].abs().sum() > 0
    assert grads["model.language_model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0  # tied with the input embeddings
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------ one prompt encoding per group

SHARED_IMAGES = [IMAGES[0], IMAGES[0], IMAGES[0], _image(7, 168), _image(7, 168), None, None, IMAGES[2]]
SHARED_PROMPTS = [PROMPTS[0]] * 3 + [PROMPTS[2]] * 2 + [PROMPTS[1]] * 2 + [PROMPTS[0]]


def _shared_rows(model, processor):
    """Groups of rows with one prompt each (the same image object + text), images of two sizes, a text-only
    prompt, and completions of different lengths (one of a single token)."""
    images = [SHARED_IMAGES[i] for i in (0, 0, 0, 3, 3, 5, 5, 7)]
    out = generate(model, processor, images, SHARED_PROMPTS, do_sample=True, seed=4, return_scores=True, **GEN)
    ids = [list(t) for t in out.token_ids]
    ids[1] = ids[1][:1]
    return images, ids, out


def test_shared_prompt_rescoring_equals_row_by_row(tiny):
    model, processor = tiny
    images, ids, out = _shared_rows(model, processor)
    rows = rescore(model, processor, images, SHARED_PROMPTS, ids, share_prompts=False)
    shared = rescore(model, processor, images, SHARED_PROMPTS, ids, share_prompts=True)
    auto = rescore(model, processor, images, SHARED_PROMPTS, ids)  # prompts repeat: shared
    split = rescore(model, processor, images, SHARED_PROMPTS, ids, share_prompts=True, batch_size=2)
    for r, s, a, b, g in zip(rows, shared, auto, split, out.logprobs):
        assert s.shape == r.shape
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, s, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[0], out.logprobs[0], rtol=0, atol=1e-4)  # and generation's


def test_shared_prompt_gradients_equal_row_by_row(tiny):
    """The prompt's forward runs with the graph: every parameter, the vision tower included, gets the same
    gradient as with one full forward per row (to float tolerance)."""
    model, processor = tiny
    images, ids, _ = _shared_rows(model, processor)
    weights = torch.linspace(0.5, 2.0, len(ids))
    negatives = [_image(30) if img is not None else None for img in images]  # a second prompt set, as TAPO's x_neg
    grads = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        lp = rescore(model, processor, images + negatives, SHARED_PROMPTS * 2, ids + ids, grad=True,
                     share_prompts=share)
        loss = sum(w * (a.sum() - token_kl_k3(a, n).sum()) for w, a, n in zip(weights, lp[: len(ids)], lp[len(ids):]))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    rows, shared = grads
    assert set(rows) == set(shared)
    assert shared["model.visual.patch_embed.proj.weight"].abs().sum() > 0  # through the shared prompt's cache
    for name in rows:  # float32 sums in another order: tolerance relative to the tensor's scale
        scale = float(rows[name].abs().max())
        torch.testing.assert_close(shared[name], rows[name], rtol=1e-4, atol=1e-5 * scale + 1e-8, msg=name)


def test_prompt_batches_keep_groups_whole():
    from finer1_lib.inference import _prompt_batches

    keys = ["a", "a", "b", "a", "c", "c", "c", "b"]
    assert _prompt_batches(keys, 4) == [[0, 1, 3], [2, 7], [4, 5, 6]]
    assert _prompt_batches(keys, 2) == [[0, 1], [3], [2, 7], [4, 5], [6]]  # a group over batch_size is split
    assert _prompt_batches(keys, 100) == [[0, 1, 3, 2, 7, 4, 5, 6]]
