"""Supervised chat examples: response-only labels, vision inputs, right-padded collation, padding-free loss."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from finer1_lib.chat import IGNORE_INDEX, ChatExample, collate, encode_example
from finer1_lib.inference import build_inputs
from finer1_lib.model import build_processor, build_tiny_model, build_tokenizer

CORPUS = [
    "What species is this bird? Describe the Marovi Talsek in one sentence.",
    "This is the Marovi Talsek. It is a small bird with a red crest and striped wings.",
    "Which genus does the Marovi Dunel belong to? The Marovi Dunel belongs to the Talsek genus.",
    "You are a bird expert.",
]
SYSTEM = "You are a bird expert."


def _image(seed, size=112):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer(CORPUS)
    processor = build_processor(tokenizer)
    model = build_tiny_model(tokenizer, "tiny-3m", seed=0)
    return tokenizer, processor, model


@pytest.fixture(scope="module")
def examples():
    return [
        ChatExample("What species is this bird?", "This is the Marovi Talsek.", _image(0)),
        ChatExample("Describe the Marovi Talsek in one sentence.",
                    "It is a small bird with a red crest and striped wings."),
        ChatExample("Which genus does the Marovi Dunel belong to?",
                    "The Marovi Dunel belongs to the Talsek genus.", _image(1), system=SYSTEM),
        ChatExample("What species is this bird?", "This is the Marovi Dunel.", None, system=SYSTEM),
    ]


# ----------------------------------------------------------------------------------------- encode_example


@pytest.mark.parametrize("i", range(4))
def test_labels_mask_everything_but_the_response(tiny, examples, i):
    tokenizer, processor, _ = tiny
    ex = examples[i]
    enc = encode_example(processor, ex)
    prompt_ids = build_inputs(processor, [ex.image], [ex.prompt], ex.system)["input_ids"][0].tolist()
    n = len(prompt_ids)
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape == enc["mm_token_type_ids"].shape
    assert ids[:n].tolist() == prompt_ids  # the prompt exactly as at inference
    assert (labels[:n] == IGNORE_INDEX).all()
    assert (labels[n:] != IGNORE_INDEX).all()  # exactly the prompt positions are masked
    assert labels[n:].tolist() == ids[n:].tolist()
    assert labels[-1].item() == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(labels[n:-1]) == ex.response
    assert tokenizer.unk_token_id not in ids.tolist()  # the corpus covers the texts
    if ex.system is not None:
        assert SYSTEM in tokenizer.decode(ids[:n])


def test_image_example_has_vision_inputs(tiny, examples):
    tokenizer, processor, _ = tiny
    enc = encode_example(processor, examples[0])
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert enc["pixel_values"].shape[0] == 64  # 8 x 8 patches of 14 px before the 2x2 merge
    mm = enc["mm_token_type_ids"]
    n_image_tokens = int((enc["input_ids"] == tokenizer.image_token_id).sum())
    assert n_image_tokens == 16
    assert int(mm.sum()) == 16 and set(mm.tolist()) <= {0, 1}
    assert (enc["input_ids"][mm == 1] == tokenizer.image_token_id).all()
    assert (enc["labels"][mm == 1] == IGNORE_INDEX).all()


def test_text_only_example_has_no_vision_inputs(tiny, examples):
    tokenizer, processor, _ = tiny
    enc = encode_example(processor, examples[1])
    assert "pixel_values" not in enc and "image_grid_thw" not in enc
    assert int(enc["mm_token_type_ids"].sum()) == 0
    assert tokenizer.image_token_id not in enc["input_ids"].tolist()


@pytest.mark.parametrize("response", ["", "   ", None])
def test_empty_response_is_an_error(tiny, response):
    with pytest.raises(ValueError, match="empty response"):
        encode_example(tiny[1], ChatExample("What species is this bird?", response))


def test_max_length(tiny, examples):
    processor = tiny[1]
    n = len(encode_example(processor, examples[0])["input_ids"])
    assert len(encode_example(processor, examples[0], max_length=n)["input_ids"]) == n  # exactly fits
    with pytest.raises(ValueError, match=rf"example of {n} tokens exceeds max_length={n - 1}"):
        encode_example(processor, examples[0], max_length=n - 1)


# ----------------------------------------------------------------------------------------- collate


def test_collate_right_pads(tiny, examples):
    tokenizer, processor, _ = tiny
    enc = [encode_example(processor, ex) for ex in examples]
    pad = tokenizer.pad_token_id
    batch = collate(enc, pad)
    lengths = [len(e["input_ids"]) for e in enc]
    longest = max(lengths)
    assert len(set(lengths)) > 1  # padding really happens
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        assert batch[key].shape == (len(enc), longest) and batch[key].dtype == torch.long
    for i, (e, k) in enumerate(zip(enc, lengths)):
        assert torch.equal(batch["input_ids"][i, :k], e["input_ids"])
        assert torch.equal(batch["labels"][i, :k], e["labels"])
        assert torch.equal(batch["mm_token_type_ids"][i, :k], e["mm_token_type_ids"])
        assert (batch["attention_mask"][i, :k] == 1).all()
        assert (batch["input_ids"][i, k:] == pad).all()
        assert (batch["attention_mask"][i, k:] == 0).all()
        assert (batch["labels"][i, k:] == IGNORE_INDEX).all()
        assert (batch["mm_token_type_ids"][i, k:] == 0).all()
    # pixel values of the image rows only, in row order
    with_images = [e for e in enc if "pixel_values" in e]
    assert len(with_images) == 2
    assert torch.equal(batch["pixel_values"], torch.cat([e["pixel_values"] for e in with_images]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([e["image_grid_thw"] for e in with_images]))
    assert int(batch["mm_token_type_ids"].sum()) == 32


def test_collate_text_only_batch_has_no_pixels(tiny, examples):
    tokenizer, processor, _ = tiny
    batch = collate([encode_example(processor, examples[1]), encode_example(processor, examples[3])],
                    tokenizer.pad_token_id)
    assert "pixel_values" not in batch and "image_grid_thw" not in batch


def test_collate_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty batch"):
        collate([], 0)


# ----------------------------------------------------------------------------------------- loss


def test_batch_loss_equals_token_weighted_mean_of_single_losses(tiny, examples):
    """Right padding changes nothing: the padded batch's loss is the token-weighted mean of per-example losses."""
    tokenizer, processor, model = tiny
    enc = [encode_example(processor, ex) for ex in examples]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        batch_loss = model(**collate(enc, pad)).loss
        singles, counts = [], []
        for e in enc:
            one = collate([e], pad)
            singles.append(model(**one).loss.item())
            counts.append(int(one["labels"][:, 1:].ne(IGNORE_INDEX).sum()))
    assert torch.isfinite(batch_loss)
    expected = sum(l * c for l, c in zip(singles, counts)) / sum(counts)
    assert abs(batch_loss.item() - expected) < 1e-5
    assert len({round(s, 4) for s in singles}) > 1  # not a degenerate all-equal case
