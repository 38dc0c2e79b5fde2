"""Tokenizer, processor and model: one code path for a tiny Qwen2.5-VL and the real one.

The tiny model is a genuine ``Qwen2_5_VLForConditionalGeneration`` with a few million parameters and a
word-level tokenizer built offline; the real one (e.g. ``Qwen/Qwen2.5-VL-3B-Instruct``) is loaded by the
same :func:`load_model`. Everything downstream (SFT, TAPO, evaluation) sees the same classes.
"""
from __future__ import annotations

import collections
import copy
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import is_torchvision_available

__all__ = [
    "QWEN_SPECIAL_TOKENS",
    "VISION_TOKENS",
    "QWEN2_5_VL_CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "TINY_SIZES",
    "ModelNotAvailableError",
    "ImageOnlyQwen2_5_VLProcessor",
    "build_tokenizer",
    "build_processor",
    "build_tiny_config",
    "build_tiny_model",
    "save_model",
    "load_model",
    "load_processor",
    "vision_token_ids",
    "count_parameters",
]

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

#: Qwen2.5-VL's special tokens, in Qwen's own order (they get the highest ids, as in Qwen).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
#: Tokens a policy must never sample (a sampled <|image_pad|> breaks rescoring).
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

#: The chat template shipped with Qwen2.5-VL-*-Instruct (verbatim).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

UNK_TOKEN = "[UNK]"
SPACE = "\u2581"  # "▁": a space glued to the front of the next piece (Metaspace / SentencePiece style)

# One piece = an optional leading space + (a run of letters | one digit | one other symbol), or a lone
# space, or a newline. "<answer>Marovi Talsek</answer>" -> < answer > Marovi ▁Talsek < / answer >
_PIECE = Regex(
    rf"{SPACE}?[\p{{L}}\p{{M}}]+|{SPACE}?\p{{N}}|{SPACE}?[^\p{{L}}\p{{M}}\p{{N}}{SPACE}\n]|{SPACE}|\n"
)
# Always in the vocabulary, whatever the corpus: digits, ASCII punctuation, with and without a space.
_BASE_PIECES = list("0123456789") + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _word_level_pipeline(vocab: dict[str, int] | None = None) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab or {UNK_TOKEN: 0}, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(r"\r\n?"), "\n"),
            normalizers.Replace(Regex(r"[^\S\n]"), SPACE),  # every other whitespace char -> ▁
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Split(_PIECE, behavior="isolated")
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never")
    return tok


def build_tokenizer(corpus: list[str], *, min_count: int = 1) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer from ``corpus``, with Qwen's special tokens and chat template.

    Words are case-sensitive; a preceding space is part of the token (``▁Talsek``), so decoding restores
    the text exactly for known words. Unknown words become ``[UNK]``. Ids are ordered by frequency.
    """
    # count words in their bare form ("Talsek"), whether or not a space preceded them ("▁Talsek")
    pipeline = _word_level_pipeline()
    counts: collections.Counter[str] = collections.Counter()
    for text in [*corpus, DEFAULT_SYSTEM_PROMPT, "system user assistant"]:
        pieces = pipeline.pre_tokenizer.pre_tokenize_str(pipeline.normalizer.normalize_str(text))
        counts.update(piece.removeprefix(SPACE) for piece, _ in pieces)
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in ("", "\n")),
                   key=lambda w: (-counts[w], w))  # most frequent first, ties alphabetical
    # each word enters in both forms, so a known word never becomes [UNK] because of where it stands
    base = [SPACE, "\n"] + _BASE_PIECES + [SPACE + p for p in _BASE_PIECES]
    pieces = [UNK_TOKEN] + list(dict.fromkeys(base + [form for w in words for form in (w, SPACE + w)]))
    vocab = {piece: i for i, piece in enumerate(pieces)}

    pipeline = _word_level_pipeline(vocab)
    pipeline.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=pipeline,
        unk_token=UNK_TOKEN,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        padding_side="left",
    )


# --------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video processor (which needs torchvision).

    Identical to the stock processor for images and text.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


# Without this, AutoProcessor.from_pretrained on a torchvision-less machine returns only the tokenizer.
AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)


def build_processor(tokenizer, *, min_pixels: int = 56 * 56, max_pixels: int = 224 * 224):
    """Image processor (PIL backend) + tokenizer; a 112-px image becomes 16 image tokens."""
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return ImageOnlyQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the vision special tokens (to suppress when sampling)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]


# --------------------------------------------------------------------------------------------------
# Tiny model
# --------------------------------------------------------------------------------------------------

#: Named sizes of the tiny model: (text tower, vision tower) hyper-parameters of Qwen2_5_VLConfig.
#: Rules: sum(mrope_section) = head_dim / 2; fullatt_block_indexes inside depth.
TINY_SIZES: dict[str, dict] = {
    "tiny-3m": dict(
        text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[4, 6, 6]),
        vision=dict(hidden_size=128, intermediate_size=512, depth=2, num_heads=4),
    ),
    "tiny-6m": dict(
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[4, 6, 6]),
        vision=dict(hidden_size=192, intermediate_size=768, depth=2, num_heads=3),
    ),
    "tiny-8m": dict(  # tiny-6m's text tower with a deeper, wider vision tower
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[4, 6, 6]),
        vision=dict(hidden_size=256, intermediate_size=1024, depth=4, num_heads=4),
    ),
    "tiny-20m": dict(
        text=dict(hidden_size=512, intermediate_size=2304, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(hidden_size=192, intermediate_size=768, depth=2, num_heads=3),
    ),
}


def build_tiny_config(tokenizer, size: str = "tiny-3m") -> Qwen2_5_VLConfig:
    """A Qwen2_5_VLConfig of a named tiny size whose token ids match ``tokenizer``."""
    if size not in TINY_SIZES:
        raise KeyError(f"unknown tiny size {size!r}; choose one of {sorted(TINY_SIZES)}")
    text, vision = dict(TINY_SIZES[size]["text"]), dict(TINY_SIZES[size]["vision"])
    ids = tokenizer.convert_tokens_to_ids
    mrope_section = text.pop("mrope_section")
    text_config = dict(
        **text,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope_section),
        bos_token_id=ids("<|endoftext|>"),  # as in Qwen2.5-VL: bos = <|endoftext|>, never prepended
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    vision_config = dict(
        **vision,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[vision["depth"] - 1],
        out_hidden_size=text["hidden_size"],
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    # generation defaults live on the top-level config too (GenerationConfig is derived from it)
    config.bos_token_id = text_config["bos_token_id"]
    config.eos_token_id = text_config["eos_token_id"]
    config.pad_token_id = text_config["pad_token_id"]
    return config


def build_tiny_model(tokenizer, size: str = "tiny-3m", seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised tiny Qwen2.5-VL (deterministic given ``seed``)."""
    config = build_tiny_config(tokenizer, size)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model.eval()


#: The architecture of the released checkpoints (config.json of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct):
#: random-weight stand-ins of the real size measure GPU memory and speed without a download (``bench train``).
REAL_SIZES: dict[str, dict] = {
    "qwen2.5-vl-3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        vision=dict(out_hidden_size=2048)),
    "qwen2.5-vl-7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
        vision=dict(out_hidden_size=3584)),
}
_REAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])


def build_real_size_config(tokenizer, name: str) -> Qwen2_5_VLConfig:
    """A Qwen2_5_VLConfig with the layer sizes of a released Qwen2.5-VL (``REAL_SIZES``) and ``tokenizer``'s
    special-token ids; the vocabulary keeps the released size (the tokenizer's ids all fall inside it)."""
    if name not in REAL_SIZES:
        raise KeyError(f"unknown real size {name!r}; choose one of {sorted(REAL_SIZES)}")
    text, vision = dict(REAL_SIZES[name]["text"]), dict(_REAL_VISION, **REAL_SIZES[name]["vision"])
    if len(tokenizer) > text["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than {name}'s vocabulary {text['vocab_size']}")
    ids = tokenizer.convert_tokens_to_ids
    tie = text.pop("tie_word_embeddings")
    text_config = dict(**text, max_position_embeddings=128000,
                       rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
                       bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie)
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision,
                              image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                              vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                              tie_word_embeddings=tie)
    config.bos_token_id, config.eos_token_id = text_config["bos_token_id"], text_config["eos_token_id"]
    config.pad_token_id = text_config["pad_token_id"]
    return config


def count_parameters(model, trainable_only: bool = False) -> int:
    """Number of (unique) parameters; tied embeddings count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------------
# Save / load: the same call for a local folder and a hub id
# --------------------------------------------------------------------------------------------------


class ModelNotAvailableError(FileNotFoundError):
    """Raised when neither a local folder nor a (cached or downloadable) hub model is found."""


class CorruptModelError(ValueError):
    """A model folder whose weights cannot be read (truncated, half-written, or a pickle that is not plain
    tensors); the message names the file."""


def clean_tmp(folder: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Remove the temporary files and folders an interrupted atomic write leaves behind in ``folder``
    (``.<name>.<random>.tmp``, from :func:`save_model` and ``io.atomic_write_bytes``; with ``prefix``: only
    those of ``.<prefix>.``). Returns what was removed. Only call it when no other process writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for p in folder.glob(f".{prefix + '.' if prefix else ''}*.tmp"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def _is_complete_model_dir(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) or (folder / "adapter_config.json").is_file()


def recover_model_dir(out_dir: str | os.PathLike) -> Path:
    """Finish a :func:`save_model` that was interrupted between its two renames: the previous model sits in
    ``.<name>.old`` and ``out_dir`` is missing -> put it back. Removes the leftover temp folders. Returns
    ``out_dir``."""
    out_dir = Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old")
    if not out_dir.exists() and old.is_dir() and _is_complete_model_dir(old):
        os.replace(old, out_dir)
    clean_tmp(out_dir.parent, out_dir.name)
    return out_dir


def _how_to_get(name: str) -> str:
    hub_id = name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists() else \
        "Qwen/Qwen2.5-VL-3B-Instruct"
    local = f"data/models/{hub_id.split('/')[-1]}"
    return (
        "How to get a model:\n"
        f"  * real model: on a machine with internet run\n"
        f"      huggingface-cli download {hub_id} --local-dir {local}\n"
        f"    (or `hf download {hub_id} --local-dir {local}`), then pass the folder: load_model('{local}');\n"
        "  * tiny model: build one with build_tokenizer / build_processor / build_tiny_model and write it with\n"
        "    save_model(model, processor, folder), or use the checkpoint shipped under data/."
    )


def _is_local_path(name: str) -> bool:
    """True for an existing path or anything that reads as a path rather than a hub id ("owner/name")."""
    if Path(name).expanduser().exists():
        return True
    return name.startswith(("/", "./", "../", "~", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", name)) \
        or name.count("/") > 1


def is_4bit_lora(model) -> bool:
    """A peft model on a bitsandbytes 4-bit base (QLoRA): its adapter cannot be merged losslessly."""
    return hasattr(model, "get_base_model") and getattr(model.get_base_model(), "is_loaded_in_4bit", False)


def save_model(model, processor, out_dir: str | os.PathLike) -> Path:
    """Write model + processor to ``out_dir`` atomically (temp folder, then rename).

    A LoRA (peft) model is saved merged, as a plain model that :func:`load_model` reads back;
    for a 4-bit one save the adapter itself with ``model.save_pretrained(folder)``.
    """
    if hasattr(model, "merge_and_unload"):
        if is_4bit_lora(model):
            raise ValueError("a 4-bit LoRA model cannot be merged losslessly; save the adapter with "
                             "model.save_pretrained(folder) instead")
        model = copy.deepcopy(model).merge_and_unload()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_model_dir(out_dir)  # a save killed between its renames: its previous model comes back first
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if out_dir.exists():
            # the new model is complete in tmp; the old one is moved aside (never deleted) until tmp is in place.
            # A kill between the two renames leaves it in .<name>.old, which recover_model_dir puts back.
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)  # out_dir exists, so this is a stale copy
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _is_unreadable_weights(err: BaseException) -> bool:
    """A weight file that is truncated, half-written or an unsafe pickle (not a missing GPU, memory, ...)."""
    import pickle

    if isinstance(err, (pickle.UnpicklingError, EOFError)) or type(err).__name__ == "SafetensorError":
        return True
    if isinstance(err, torch.OutOfMemoryError):
        return False
    text = str(err)
    return isinstance(err, (RuntimeError, OSError, ValueError)) and any(
        k in text for k in ("PytorchStreamReader", "header", "deserializ", "incomplete", "Weights only load"))


def load_processor(name_or_path: str | os.PathLike, *, min_pixels: int | None = None,
                   max_pixels: int | None = None, **hub_kwargs):
    """The stock AutoProcessor where torchvision exists; else the image-only processor."""
    processor = None
    if is_torchvision_available():
        try:
            processor = AutoProcessor.from_pretrained(name_or_path, **hub_kwargs)
        except Exception:  # e.g. a tiny folder saved without a video processor config
            processor = None
        if processor is not None and not hasattr(processor, "image_processor"):
            processor = None
    if processor is None:
        processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(name_or_path, **hub_kwargs)
    if min_pixels is not None:
        processor.image_processor.size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        processor.image_processor.size["longest_edge"] = max_pixels
    return processor


def load_model(
    name_or_path: str | os.PathLike,
    *,
    lora: dict | None = None,
    load_in_4bit: bool = False,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    attn_implementation: str = "sdpa",
):
    """Load ``(model, processor)`` from a local folder or a hub id (e.g. ``Qwen/Qwen2.5-VL-3B-Instruct``).

    ``lora=dict(r=..., alpha=..., target_modules=[...], dropout=0.0)`` wraps the model with peft;
    ``load_in_4bit=True`` quantises the text tower's linear layers to nf4 with bitsandbytes (QLoRA when
    combined). ``dtype=None`` keeps the checkpoint's dtype (transformers 5 loads with dtype="auto");
    ``device=None`` puts the model on the GPU when there is one.
    """
    name = str(name_or_path)
    local = _is_local_path(name)
    if local:
        name = str(Path(name).expanduser())
        if not Path(name).exists():
            recover_model_dir(name)  # an interrupted save_model left the model in .<name>.old
        if not (Path(name) / "config.json").is_file():
            raise ModelNotAvailableError(
                f"No model folder at {name!r} (looked for {Path(name).resolve() / 'config.json'}).\n"
                + _how_to_get(name)
            )
    else:  # a hub id: fail fast, with a clear message, when it is neither cached nor downloadable
        try:
            AutoConfig.from_pretrained(name)
        except (OSError, HFValidationError) as err:
            raise ModelNotAvailableError(
                f"Could not load {name!r}: no local folder by that name, and the Hugging Face hub model is not"
                f" in the local cache (hub offline or unreachable; HF_HUB_OFFLINE="
                f"{os.environ.get('HF_HUB_OFFLINE', '')!r}).\n"
                f"Underlying error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
                + _how_to_get(name)
            ) from err

    kwargs: dict = dict(attn_implementation=attn_implementation)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = kwargs.get("dtype") or torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=["lm_head", "visual"],  # keep the vision tower and head in full precision
        )
        if device is not None:
            kwargs["device_map"] = {"": str(device)}
        elif torch.cuda.is_available():
            kwargs["device_map"] = {"": 0}
        else:
            kwargs["device_map"] = {"": "cpu"}

    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name, **kwargs)
    except Exception as err:
        if not local or not _is_unreadable_weights(err):
            raise
        files = sorted(p.name for p in Path(name).iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise CorruptModelError(
            f"cannot read the weights of the model folder {name} ({', '.join(files) or 'no weight file'}): "
            f"{type(err).__name__}: {first}. The file is truncated, half-written or not plain tensors; "
            f"rebuild it (rerun the stage that wrote it) or restore it") from None
    if device is None and not load_in_4bit and torch.cuda.is_available():
        device = "cuda"  # every stage (generation, rescoring, TAPO, probes) runs where the weights are
    processor = load_processor(name, min_pixels=min_pixels, max_pixels=max_pixels)
    if device is not None and not load_in_4bit:
        model = model.to(device)
    if load_in_4bit:
        _keep_4bit_weights_trainable(model)
    if lora is not None:
        model = _wrap_lora(model, lora, quantized=load_in_4bit)
    else:
        model.eval()
    return model, processor


def _keep_4bit_weights_trainable(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference on the first no-grad forward.

    The repacked layout has no backward ("a view of a leaf Variable ... in-place operation"), which breaks
    the RL loop generate -> rescore with grad. Costs a little CPU inference speed; no effect on GPU.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _wrap_lora(model, lora: dict, *, quantized: bool):
    """peft LoRA (after prepare_model_for_kbit_training when quantised, BEFORE any forward pass)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = dict(lora)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=lora.pop("r", 8),
        lora_alpha=lora.pop("alpha", lora.pop("lora_alpha", 16)),
        lora_dropout=lora.pop("dropout", lora.pop("lora_dropout", 0.0)),
        target_modules=lora.pop("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        task_type="CAUSAL_LM",
        **lora,
    )
    return get_peft_model(model, config)
