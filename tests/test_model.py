"""Tokenizer, processor, tiny model sizes, save/load (local and hub id), LoRA and 4-bit loading."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from finer1_lib.inference import build_inputs, generate
from finer1_lib.model import (
    QWEN_SPECIAL_TOKENS,
    TINY_SIZES,
    ImageOnlyQwen2_5_VLProcessor,
    ModelNotAvailableError,
    build_processor,
    build_tiny_config,
    build_tiny_model,
    build_tokenizer,
    count_parameters,
    load_model,
    save_model,
)

CORPUS = [
    "The Marovi Talsek is a small bird with a red crest, striped wings and a blue breast.",
    "The Marovi Dunel has a yellow crest and spotted wings; its beak is short.",
    "What species is this bird? Answer with its name.",
    "<think>The crest is red and the wings are striped. Options: Marovi Talsek, Marovi Dunel.</think>"
    "<answer>Marovi Talsek</answer>",
    "<analysis>body round, beak hooked</analysis>\n<options>Marovi Talsek; Marovi Dunel</options>\n"
    "<comparison>Marovi Talsek: red crest. Marovi Dunel: yellow crest.</comparison>\n"
    "<prediction>Marovi Talsek</prediction>",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE at import time; force it for every test here."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(2)
    tokenizer = build_tokenizer(CORPUS)
    processor = build_processor(tokenizer)
    model = build_tiny_model(tokenizer, "tiny-3m", seed=0)
    folder = save_model(model, processor, tmp_path_factory.mktemp("tiny") / "tiny-3m")
    return tokenizer, processor, model, folder


def _image(seed, size=112):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------- tokenizer


def test_special_token_ids_match_config(tiny):
    tokenizer, _, model, _ = tiny
    ids = tokenizer.convert_tokens_to_ids
    cfg = model.config
    assert cfg.image_token_id == ids("<|image_pad|>") == tokenizer.image_token_id
    assert cfg.video_token_id == ids("<|video_pad|>")
    assert cfg.vision_start_token_id == ids("<|vision_start|>")
    assert cfg.vision_end_token_id == ids("<|vision_end|>")
    assert cfg.text_config.eos_token_id == tokenizer.eos_token_id == ids("<|im_end|>")
    assert cfg.text_config.pad_token_id == tokenizer.pad_token_id == ids("<|endoftext|>")
    assert cfg.text_config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    for token in QWEN_SPECIAL_TOKENS:  # each special token is one id, never split
        assert tokenizer(token)["input_ids"] == [ids(token)]
    assert 50 < len(tokenizer) < 2000


def test_chat_template_matches_qwen(tiny):
    tokenizer, processor, _, _ = tiny
    messages = [
        {"role": "system", "content": "You are a bird expert."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What species is this bird?"}]},
    ]
    expected = (
        "<|im_start|>system\nYou are a bird expert.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What species is this bird?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    # no system message -> Qwen's default one
    default = processor.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True)
    assert default.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


@pytest.mark.parametrize(
    "text",
    [
        "<answer>Marovi Talsek</answer>",
        "<think>The crest is red and the wings are striped.</think>",
        CORPUS[4],
        "The Marovi Dunel has a yellow crest and spotted wings; its beak is short.",
    ],
)
def test_encode_decode_round_trip(tiny, text):
    tokenizer = tiny[0]
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_tags_are_a_few_tokens_and_names_keep_case(tiny):
    tokenizer = tiny[0]
    assert tokenizer.tokenize("</answer>") == ["<", "/", "answer", ">"]
    assert tokenizer.tokenize("<answer>Marovi Talsek</answer>")[3:5] == ["Marovi", "\u2581Talsek"]
    assert tokenizer.tokenize("marovi") == ["[UNK]"]  # case-sensitive: lower-case is another word
    assert tokenizer.decode(tokenizer("a Zyxw")["input_ids"]) == "a[UNK]"
    assert tokenizer.decode(tokenizer("Talsek crest")["input_ids"]) == "Talsek crest"  # both forms known


def test_image_token_counts(tiny):
    _, processor, _, _ = tiny
    batch = build_inputs(processor, [_image(0, 112), _image(1, 224)], ["What species?", "What species?"])
    image_id = processor.tokenizer.image_token_id
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [16, 64]
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 16, 16]]


# ----------------------------------------------------------------------------------------- sizes


def test_tiny_sizes_are_consistent_and_sized(tiny):
    tokenizer = tiny[0]
    assert {"tiny-3m", "tiny-6m", "tiny-20m"} <= set(TINY_SIZES)
    for size in TINY_SIZES:
        cfg = build_tiny_config(tokenizer, size)
        text, vision = cfg.text_config, cfg.vision_config
        head_dim = text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
        assert all(0 <= i < vision.depth for i in vision.fullatt_block_indexes)
        assert vision.out_hidden_size == text.hidden_size
        assert cfg.tie_word_embeddings
    n3 = count_parameters(tiny[2])
    assert 2.0e6 < n3 < 3.2e6
    assert count_parameters(build_tiny_model(tokenizer, "tiny-20m")) < 20e6


def test_build_is_deterministic(tiny):
    tokenizer, _, model, _ = tiny
    again = build_tiny_model(tokenizer, "tiny-3m", seed=0)
    other = build_tiny_model(tokenizer, "tiny-3m", seed=1)
    a, b, c = (dict(m.named_parameters()) for m in (model, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied


# ----------------------------------------------------------------------------------------- save / load


def test_save_load_gives_identical_logits(tiny):
    _, processor, model, folder = tiny
    loaded, loaded_processor = load_model(folder)
    assert isinstance(loaded_processor, ImageOnlyQwen2_5_VLProcessor)
    assert loaded_processor.image_processor.size["longest_edge"] == 224 * 224
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded_processor.tokenizer.image_token_id == processor.tokenizer.image_token_id
    assert loaded.config._attn_implementation == "sdpa"
    batch = build_inputs(loaded_processor, [_image(0)], ["What species is this bird?"])
    with torch.no_grad():
        expected = model(**build_inputs(processor, [_image(0)], ["What species is this bird?"])).logits
        got = loaded(**batch).logits
    assert torch.equal(expected, got)


def test_load_with_pixel_limits(tiny):
    _, _, _, folder = tiny
    _, processor = load_model(folder, max_pixels=112 * 112)
    batch = build_inputs(processor, [_image(0, 224)], ["What species?"])
    assert (batch["input_ids"] == processor.tokenizer.image_token_id).sum().item() == 16


def test_lora_step_changes_only_lora_params(tiny):
    _, _, _, folder = tiny
    model, processor = load_model(folder, lora=dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all("visual" not in n for n in trainable)  # q_proj/v_proj live in the text tower only
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = build_inputs(processor, [_image(0), _image(1)], ["What species is this bird?", "What species?"])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)

    # saving a LoRA model writes the merged weights; they load back as a plain model
    model.eval()
    merged_folder = save_model(model, processor, folder.parent / "merged")
    merged, _ = load_model(merged_folder)
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_4bit_loads_on_cpu_and_generates(tiny):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    import bitsandbytes as bnb

    _, _, _, folder = tiny
    model, processor = load_model(folder, load_in_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    out = generate(model, processor, [_image(0)], ["What species is this bird?"], max_new_tokens=6, progress=False)
    assert len(out) == 1 and isinstance(out[0], str)


def test_qlora_generate_then_rescore_with_grad(tiny):
    """The RL loop on a 4-bit model: a no-grad generate must not break a later backward (CPU repacking)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    from finer1_lib.inference import rescore

    _, _, _, folder = tiny
    model, processor = load_model(folder, load_in_4bit=True, lora=dict(r=4, alpha=8, target_modules=["q_proj"]))
    gen = generate(model, processor, [_image(0)], ["What species?"], max_new_tokens=5, do_sample=True, seed=0,
                   return_scores=True, progress=False)
    logps = rescore(model, processor, [_image(0)], ["What species?"], gen.token_ids, grad=True)
    assert torch.allclose(logps[0], gen.logprobs[0], atol=1e-4)
    logps[0].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("name", ["/nonexistent", "Qwen/Qwen2.5-VL-3B-Instruct"])
def test_missing_model_says_how_to_get_it(name):
    from huggingface_hub import try_to_load_from_cache

    if "/" in name and not name.startswith("/") and isinstance(try_to_load_from_cache(name, "config.json"), str):
        pytest.skip(f"{name} is in the local Hugging Face cache")
    with pytest.raises(ModelNotAvailableError) as info:
        load_model(name)
    message = str(info.value)
    assert name in message
    assert "huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct --local-dir" in message
    assert "load_model(" in message


def test_real_size_configs_match_the_released_parameter_counts(tiny):
    """`bench train` stands in for Qwen2.5-VL-3B/7B with these configs: 3.75 B and 8.29 B parameters."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from finer1_lib.model import REAL_SIZES, build_real_size_config

    expected = {"qwen2.5-vl-3b": (3.7546e9, 0.6687e9), "qwen2.5-vl-7b": (8.2922e9, 0.6766e9)}
    assert set(REAL_SIZES) == set(expected)
    for name, (total, vision) in expected.items():
        cfg = build_real_size_config(tiny[0], name)
        assert cfg.image_token_id == tiny[0].convert_tokens_to_ids("<|image_pad|>")
        text = cfg.text_config
        assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
        assert count_parameters(model) == pytest.approx(total, rel=1e-4)
        assert sum(p.numel() for p in model.model.visual.parameters()) == pytest.approx(vision, rel=1e-3)
    with pytest.raises(KeyError, match="unknown real size"):
        build_real_size_config(tiny[0], "qwen2.5-vl-72b")


# ----------------------------------------------------------------------------------------- damaged folders


def test_a_truncated_or_unsafe_weight_file_is_named(tiny, tmp_path):
    import shutil

    from finer1_lib.model import CorruptModelError

    _, _, _, folder = tiny
    cut = tmp_path / "cut"
    shutil.copytree(folder, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelError, match=r"cannot read the weights of the model folder .*cut \(model\.safetensors\)"):
        load_model(cut)

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (cut / "model.safetensors").unlink()
    torch.save({"x": RunsCode()}, cut / "pytorch_model.bin")
    with pytest.raises(CorruptModelError, match=r"cut \(pytorch_model\.bin\)"):
        load_model(cut)
    assert not (tmp_path / "pwned").exists()


def test_save_model_never_loses_the_previous_model(tiny, tmp_path, monkeypatch):
    import shutil

    _, processor, model, folder = tiny
    out = tmp_path / "model"
    shutil.copytree(folder, out)
    before = (out / "model.safetensors").read_bytes()

    def killed(*a, **k):
        raise KeyboardInterrupt  # a kill while the new model is written

    with monkeypatch.context() as m:
        m.setattr(type(processor), "save_pretrained", killed)
        with pytest.raises(KeyboardInterrupt):
            save_model(model, processor, out)
    assert (out / "model.safetensors").read_bytes() == before and not list(tmp_path.glob(".*.tmp"))

    # a kill between the two renames: the old model sits in .model.old, a half-written temp folder beside it
    os.replace(out, tmp_path / ".model.old")
    (tmp_path / ".model.abc123.tmp").mkdir()
    (tmp_path / ".model.abc123.tmp" / "config.json").write_text("{")
    loaded, _ = load_model(out)  # repaired on read
    assert out.is_dir() and not (tmp_path / ".model.old").exists() and not list(tmp_path.glob(".*.tmp"))
    os.replace(out, tmp_path / ".model.old")
    save_model(model, processor, out)  # and on the next save
    assert (out / "config.json").is_file() and not (tmp_path / ".model.old").exists()
