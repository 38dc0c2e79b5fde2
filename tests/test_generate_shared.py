"""generate() with one prompt prefill per group (share_prompts) against the row-by-row model.generate path:
greedy tokens, log-probs, seeded sampling, mixed batches of several prompts."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from finer1_lib import inference
from finer1_lib.inference import _vl_model, generate, rescore
from finer1_lib.model import build_processor, build_tiny_model, build_tokenizer, load_model
from finer1_lib.profiles import BASE_MODEL_DIR
from finer1_lib.prompts import tapo_prompt
from finer1_lib.protocol import question_templates
from finer1_lib.world import World
from test_inference import CORPUS, _image  # the same tiny corpus and random images

GEN = dict(max_new_tokens=16, progress=False, return_scores=True)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    tokenizer = build_tokenizer(CORPUS)
    return build_tiny_model(tokenizer, "tiny-3m", seed=0).eval(), build_processor(tokenizer)


# two prompts of different lengths and image sizes (so the shared prefill pads one of them)
IMAGES = [_image(0), _image(1, 168)]
PROMPTS = ["What species is this bird?", "Describe the crest first. What species is this bird? Answer with its name."]


def _assert_same(shared, rows, atol=1e-4):
    assert shared.token_ids == rows.token_ids
    assert shared.texts == rows.texts
    for s, r in zip(shared.logprobs, rows.logprobs):
        assert s.shape == r.shape
        torch.testing.assert_close(s, r, rtol=1e-4, atol=atol)


def test_greedy_shared_equals_row_by_row(tiny):
    model, processor = tiny
    kw = dict(num_return_sequences=3, **GEN)
    rows = generate(model, processor, IMAGES, PROMPTS, share_prompts=False, **kw)
    shared = generate(model, processor, IMAGES, PROMPTS, share_prompts=True, **kw)
    assert len(shared.token_ids) == 6
    assert shared.token_ids[0] == shared.token_ids[1] == shared.token_ids[2]  # greedy: one answer per prompt
    _assert_same(shared, rows)
    assert _vl_model(model).rope_deltas is None
    # and one prompt at a time, without repeats
    for i in range(2):
        single = generate(model, processor, IMAGES[i : i + 1], PROMPTS[i : i + 1], share_prompts=False, **GEN)
        assert single.token_ids[0] == shared.token_ids[3 * i]
        torch.testing.assert_close(single.logprobs[0], shared.logprobs[3 * i], rtol=1e-4, atol=1e-4)


def test_greedy_on_the_shipped_base_model_equals_row_by_row():
    """A random tiny model repeats one token; the pretrained base writes a rationale, so greedy decoding
    checks every step's positions and mask: TAPO prompts of two super-categories (two question lengths)."""
    model, processor = load_model(BASE_MODEL_DIR)
    model.eval()
    world = World(0)
    first = {}
    for s in world.species:
        first.setdefault(s.super_category, s)
    picks = [first["bird"], first["car"]]
    images = [world.render(s.name, "train", i) for i, s in enumerate(picks)]
    prompts = [tapo_prompt(question_templates(s.super_category)[3 * i]) for i, s in enumerate(picks)]
    kw = dict(num_return_sequences=3, max_new_tokens=40, progress=False, return_scores=True)
    rows = generate(model, processor, images, prompts, share_prompts=False, **kw)
    shared = generate(model, processor, images, prompts, **kw)  # prompts repeat: shared by default
    assert len({tuple(ids) for ids in shared.token_ids}) == 2  # one answer per prompt, two prompts
    assert all(len(set(ids)) > 5 for ids in shared.token_ids)
    _assert_same(shared, rows)


def test_sampled_logprobs_match_row_by_row_and_rescoring(tiny):
    model, processor = tiny
    kw = dict(num_return_sequences=3, do_sample=True, temperature=0.8, top_p=0.95, seed=11, **GEN)
    rows = generate(model, processor, IMAGES, PROMPTS, share_prompts=False, **kw)
    shared = generate(model, processor, IMAGES, PROMPTS, share_prompts=True, **kw)
    # the same random draws on the same batches: the same tokens (log-probs to float tolerance)
    _assert_same(shared, rows)
    row_images = [img for img in IMAGES for _ in range(3)]
    row_prompts = [p for p in PROMPTS for _ in range(3)]
    again = rescore(model, processor, row_images, row_prompts, shared.token_ids, share_prompts=False)
    for got, expected in zip(again, shared.logprobs):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_shared_sampling_is_seeded(tiny):
    model, processor = tiny
    kw = dict(num_return_sequences=5, do_sample=True, seed=3, share_prompts=True, **GEN)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = generate(model, processor, IMAGES, PROMPTS, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    b = generate(model, processor, IMAGES, PROMPTS, **kw)
    c = generate(model, processor, IMAGES, PROMPTS, **dict(kw, seed=4))
    assert a.token_ids == b.token_ids and a.texts == b.texts
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)  # same process, same path
    assert a.token_ids != c.token_ids
    assert len(set(map(tuple, a.token_ids[:5]))) > 1  # the rollouts of one prompt differ
    eos = processor.tokenizer.eos_token_id
    for ids, lp in zip(a.token_ids, a.logprobs):
        assert len(ids) == len(lp) <= GEN["max_new_tokens"]
        assert eos not in ids[:-1]
        assert (lp <= 0).all()


def test_mixed_batch_two_prompts_three_rollouts_and_a_split_group(tiny, monkeypatch):
    """TAPO's layout: rows grouped by prompt (same image object + question), here 2 x 3, plus a text-only
    prompt; batch_size=4 cuts a group in two (its prompt is prefilled in both batches)."""
    model, processor = tiny
    images = [IMAGES[0]] * 3 + [IMAGES[1]] * 3 + [None] * 2
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3 + [PROMPTS[0]] * 2
    calls = []
    real = inference._generate_shared_batch

    def spy(model, processor, images, prompts, *a, **kw):
        calls.append(len({inference._prompt_key(i, p) for i, p in zip(images, prompts)}))
        return real(model, processor, images, prompts, *a, **kw)

    monkeypatch.setattr(inference, "_generate_shared_batch", spy)
    for do_sample in (False, True):
        kw = dict(do_sample=do_sample, seed=5, batch_size=4, **GEN)
        rows = generate(model, processor, images, prompts, share_prompts=False, **kw)
        calls.clear()
        auto = generate(model, processor, images, prompts, **kw)  # prompts repeat: shared by default
        assert calls == [2, 2]  # rows 0-3 hold 2 distinct prompts, rows 4-7 too
        _assert_same(auto, rows)
        if not do_sample:  # the greedy answers of the split group agree across the batch boundary
            assert auto.token_ids[3] == auto.token_ids[4] == auto.token_ids[5]
