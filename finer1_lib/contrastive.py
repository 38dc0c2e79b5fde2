"""Stage (a) of pretraining: the Qwen2.5-VL vision tower learns to see, contrastively (SigLIP).

Real MLLMs do not learn to see from caption tokens predicted through the language model: Qwen2.5-VL's vision
tower starts from a contrastively pretrained ViT. The miniature does the same. The tower's merged image tokens
(what the LLM will read) are pooled by a small attention-pooling head into one embedding; a small text tower
embeds attribute captions; the two are trained with SigLIP's pairwise sigmoid loss (Zhai et al. 2023):

    L = -1/B * sum_{i,j} log sigmoid( z_ij * (t * <img_i, txt_j> + b) ),   z_ij = +1 if text j describes image i

Captions name a random subset of the image's attributes ("a bird with a red crest", or all five), never a
species name, so one caption can describe many images in the batch: z_ij = +1 for every image whose species has
all the caption's attribute values. The sigmoid loss takes such multi-positive targets as they are (InfoNCE
would need one positive per row).

Random in-batch negatives rarely differ from an image in just one attribute, and that one attribute is what
fine-grained recognition is about. So a second term gives every attribute its hard negatives, CLIP's InfoNCE
over one-attribute captions: for each image and each of its five attributes, the candidates are the captions
of every value of that attribute ("a bird with a red crest", "... a blue crest", ...), the right one is the
positive (``attribute_nce_loss``; the zero-shot classifier of CLIP, trained). Both heads are thrown away after
the stage; only the tower (and merger) is kept.

A batch is a pure function of (seed, step): a resumed run sees exactly the data an uninterrupted one would.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .records import SUPER_CATEGORY_WORD
from .rationale import article
from .world import SCHEMAS, Species, World, join_phrases

__all__ = ["CaptionBatch", "caption_batch", "ContrastiveHeads", "siglip_loss", "image_tokens", "pixel_inputs",
           "tower_features", "tower_probe", "attribute_captions", "attribute_nce_loss"]

_FRESH = 10**6  # images from pretrain-pool indices >= naming_images (the naming images stay rare)
_LEADS = ("a photo of", "This is", "The image shows")


@dataclass
class CaptionBatch:
    species: list[Species]          # one per image
    indices: list[int]              # pretrain-pool index of each image
    texts: list[str]                # one caption per image (of its own species, a random attribute subset)
    targets: torch.Tensor           # [images, texts]: 1 where the text describes the image, else 0


def _describes(text_sp: Species, dims: tuple[str, ...], image_sp: Species) -> bool:
    return (text_sp.super_category == image_sp.super_category
            and all(text_sp.attributes[d] == image_sp.attributes[d] for d in dims))


def caption_batch(world: World, step: int, batch_size: int, seed: int = 0, naming_images: int = 2,
                  p_full: float = 0.4) -> CaptionBatch:
    """Images and attribute captions of contrastive step ``step`` (deterministic in (seed, step)).

    Each caption names all five attributes with probability ``p_full``, else a random subset of 1-4 of them."""
    rng = random.Random(f"contrastive-{seed}-{step}")
    species = [rng.choice(world.species) for _ in range(batch_size)]
    indices = [naming_images + rng.randrange(_FRESH) for _ in species]
    texts, chosen = [], []
    for sp in species:
        dims = [d for d in SCHEMAS[sp.super_category].dims]
        k = len(dims) if rng.random() < p_full else rng.randint(1, len(dims) - 1)
        pick = sorted(rng.sample(range(len(dims)), k))
        word = SUPER_CATEGORY_WORD[sp.super_category]
        phrases = [dims[i].say(sp.attributes[dims[i].name]) for i in pick]
        texts.append(f"{rng.choice(_LEADS)} {article(word)} {word} with {join_phrases(rng.sample(phrases, k))}.")
        chosen.append(tuple(dims[i].name for i in pick))
    targets = torch.tensor([[float(_describes(tsp, dims, isp)) for tsp, dims in zip(species, chosen)]
                            for isp in species])
    return CaptionBatch(species, indices, texts, targets)


class ContrastiveHeads(nn.Module):
    """The two throw-away heads of stage (a): attention pooling of image tokens, and a small text tower.

    Image side: ``pool="flatten"`` (default) concatenates an image's ``n_tokens`` merged tokens in order and
    projects them (the tokens' layout is what the LLM reads too); ``pool="attention"``: ``queries`` learned
    queries attend over the tokens (SigLIP's MAP head), their outputs concatenated and projected. Text side: token + position embeddings, ``text_layers`` pre-norm
    transformer layers, mean over real tokens, projection. Both end L2-normalised in ``embed_dim``; a learned
    scale t and bias b (SigLIP's init: t = 10, b = -10) turn cosines into logits."""

    def __init__(self, token_dim: int, vocab_size: int, pad_id: int, embed_dim: int = 128, width: int = 128,
                 text_layers: int = 2, queries: int = 4, max_len: int = 64, pool: str = "flatten",
                 n_tokens: int = 16):
        super().__init__()
        if pool not in ("flatten", "attention"):
            raise ValueError(f"pool must be 'flatten' or 'attention', got {pool!r}")
        self.pad_id, self.pool = pad_id, pool
        if pool == "attention":
            self.query = nn.Parameter(torch.randn(queries, token_dim) * 0.02)
            self.attn = nn.MultiheadAttention(token_dim, num_heads=4, batch_first=True)
        n_in = (queries if pool == "attention" else n_tokens) * token_dim
        self.image_proj = nn.Sequential(nn.LayerNorm(n_in), nn.Linear(n_in, embed_dim))
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, batch_first=True,
                                           norm_first=True, dropout=0.0)
        self.text = nn.TransformerEncoder(layer, text_layers, enable_nested_tensor=False)
        self.text_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
        self.log_t = nn.Parameter(torch.tensor(10.0).log())
        self.b = nn.Parameter(torch.tensor(-10.0))

    def embed_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """[images, tokens, dim] merged image tokens -> [images, embed_dim], unit norm."""
        if self.pool == "attention":
            q = self.query.unsqueeze(0).expand(tokens.shape[0], -1, -1)
            tokens, _ = self.attn(q, tokens, tokens, need_weights=False)
        return F.normalize(self.image_proj(tokens.flatten(1)), dim=-1)

    def embed_texts(self, ids: torch.Tensor) -> torch.Tensor:
        """[texts, length] token ids (padded with pad_id) -> [texts, embed_dim], unit norm."""
        real = ids.ne(self.pad_id)
        h = self.text(self.tok(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=~real)
        h = (h * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_proj(h), dim=-1)


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, targets: torch.Tensor, log_t: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss with (possibly several) positives per row, summed over pairs / images."""
    logits = log_t.exp() * img @ txt.T + b
    z = 2 * targets - 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


def attribute_captions(world_species) -> tuple[list[str], dict[tuple[str, str], list[int]], dict]:
    """Every one-attribute caption ("a bird with a red crest") of every (super-category, attribute) pair.

    Returns the texts, the text indices of each (super-category, attribute) and each (sc, attribute, value)'s index."""
    texts, by_dim, index = [], {}, {}
    for sc in dict.fromkeys(sp.super_category for sp in world_species):
        word = SUPER_CATEGORY_WORD[sc]
        for d in SCHEMAS[sc].dims:
            for v in d.values:
                index[(sc, d.name, v)] = len(texts)
                by_dim.setdefault((sc, d.name), []).append(len(texts))
                texts.append(f"{article(word)} {word} with {d.say(v)}.")
    return texts, by_dim, index


def attribute_nce_loss(img: torch.Tensor, txt: torch.Tensor, species: list[Species], by_dim: dict, index: dict,
                       log_t: torch.Tensor) -> torch.Tensor:
    """InfoNCE of each image against the one-attribute captions of each of its attributes (mean over both)."""
    logits = log_t.exp() * img @ txt.T
    losses = []
    for i, sp in enumerate(species):
        for d in SCHEMAS[sp.super_category].dims:
            cand = by_dim[(sp.super_category, d.name)]
            target = cand.index(index[(sp.super_category, d.name, sp.attributes[d.name])])
            losses.append(F.cross_entropy(logits[i, cand].unsqueeze(0), torch.tensor([target])))
    return torch.stack(losses).mean()


def pixel_inputs(processor, images) -> dict:
    """The image processor's pixel_values and image_grid_thw for a list of PIL images."""
    out = processor.image_processor(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def image_tokens(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """The merged image tokens the LLM reads, as [images, tokens, dim] (all images of one size)."""
    feats = model.model.get_image_features(pixel_values, image_grid_thw)
    feats = getattr(feats, "pooler_output", feats)
    return torch.stack(list(feats))


def tower_features(model, processor, images, batch_size: int = 64) -> "torch.Tensor":
    """The merged image tokens of each image, concatenated into one row (the LLM's whole view of the image)."""
    rows = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            rows.append(image_tokens(model, **pixel_inputs(processor, images[i:i + batch_size])).flatten(1))
    return torch.cat(rows).float()


def tower_probe(model, processor, world: World, test_images, test_labels, seen_labels, train_per_class: int = 20,
                seed: int = 0) -> dict:
    """Linear probes of the vision tower alone: can each attribute be read off its image tokens?

    One softmax probe per attribute slot (classes "super-category:dim=value"; slots 1-2 are the genus attributes,
    3-5 the species ones) on the concatenated merged tokens, trained on ``train_per_class`` pretrain-pool images
    per species (reduced to 256 principal components) and tested on ``test_images`` (held-out test
    images of species ``test_labels``). Returns accuracies in % per split (seen / unseen / all): each slot, their
    mean, all five right, both genus slots right."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def slots(sp):
        return [f"{sp.super_category}:{d.name}={sp.attributes[d.name]}" for d in SCHEMAS[sp.super_category].dims]

    train_img = [world.render(sp.name, "pretrain", 10**7 + i) for sp in world.species for i in range(train_per_class)]
    y_tr = np.array([slots(sp) for sp in world.species for _ in range(train_per_class)])
    y_te = np.array([slots(world.get(lab)) for lab in test_labels])
    reduce = make_pipeline(StandardScaler(), PCA(min(256, len(train_img)), random_state=seed), StandardScaler())
    x_tr = reduce.fit_transform(tower_features(model, processor, train_img).numpy())
    x_te = reduce.transform(tower_features(model, processor, list(test_images)).numpy())
    right = np.zeros_like(y_te, dtype=bool)
    for k in range(y_te.shape[1]):
        clf = LogisticRegression(C=0.1, max_iter=1000, random_state=seed).fit(x_tr, y_tr[:, k])
        right[:, k] = clf.predict(x_te) == y_te[:, k]
    seen = np.array([lab in set(seen_labels) for lab in test_labels])
    out = {}
    for split, mask in (("seen", seen), ("unseen", ~seen), ("all", np.ones_like(seen))):
        r = right[mask]
        if not len(r):
            continue
        out[split] = {**{f"attribute {k + 1}": round(100 * r[:, k].mean(), 1) for k in range(r.shape[1])},
                      "mean attribute": round(100 * r.mean(), 1), "all five": round(100 * r.all(1).mean(), 1),
                      "both genus": round(100 * r[:, :2].all(1).mean(), 1)}
    return out
