"""The micro-world CLIP baseline (paper Table 1, CLIP rows): option choice, data, training, resume, evaluation."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from finer1_lib import clip_baseline as cb
from finer1_lib.clip_baseline import (DEFAULT_TEMPLATE, ClipConfig, ClipModel, build_vocab, choose_option, clip_batch,
                                      closed_world_eval, encode_images, encode_texts, load_clip, masked_descriptions,
                                      train_clip, world_eval_rows, world_image_loader)
from finer1_lib.world import World

torch.set_num_threads(1)

# A small world (56-px images) and small towers keep training tests to a few seconds on one thread.
TINY = dict(super_categories=("bird",), batch_size=16, text_batch_size=16, channels=(8, 16, 32, 64), embed_dim=64,
            text_width=64, image_size=56, warmup=5)


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def small_world():
    return World(0, image_size=56)


class FixedModel(nn.Module):
    """Encoders that return fixed vectors: every image -> ``image_vec``; text -> ``table[text]``."""

    def __init__(self, image_vec, table):
        super().__init__()
        self.image_vec = torch.tensor(image_vec, dtype=torch.float)
        self.table = {k: torch.tensor(v, dtype=torch.float) for k, v in table.items()}
        self.seen_texts = []

    def embed_images(self, pixels):
        return self.image_vec.expand(len(pixels), -1)

    def embed_texts(self, texts):
        self.seen_texts += list(texts)
        return torch.stack([self.table[t] for t in texts])


def _img(value=128):
    return Image.new("RGB", (112, 112), (value, value, value))


def _t(name, word="bird"):
    return DEFAULT_TEMPLATE.format(name=name, word=word)


# ------------------------------------------------------------------------------------------ option choice


def test_choose_option_takes_max_cosine_not_max_dot_product():
    # image along x. "Big" has the larger dot product (10) but cosine 0.71; "Aligned" has cosine 1.
    model = FixedModel([1.0, 0.0], {_t("Big"): [10.0, 10.0], _t("Aligned"): [0.5, 0.0], _t("Away"): [-1.0, 0.2],
                                    _t("Ortho"): [0.0, 3.0]})
    assert choose_option(model, _img(), ["Big", "Aligned", "Away", "Ortho"], "bird") == 1
    assert choose_option(model, _img(), ["Away", "Ortho", "Big"], "bird") == 2
    # the template is filled with each option and the super word
    assert set(model.seen_texts) >= {_t("Big"), _t("Aligned")}
    model.table.update({"Big!": torch.tensor([10.0, 10.0]), "Aligned!": torch.tensor([1.0, 0.0])})
    assert choose_option(model, _img(), ["Big", "Aligned"], "bird", template="{name}!") == 1


def test_choose_option_ties_go_to_the_first_option():
    model = FixedModel([1.0, 0.0], {_t("A"): [1.0, 1.0], _t("B"): [2.0, 2.0], _t("C"): [3.0, 3.0], _t("D"): [0.0, 1.0]})
    assert choose_option(model, _img(), ["D", "B", "A", "C"], "bird") == 1  # A, B, C tie (same direction)
    assert choose_option(model, _img(), ["C", "A", "B"], "bird") == 0


def test_closed_world_eval_rows_and_summarize():
    from finer1_lib.evaluate import summarize

    table = {_t(n, w): v for n, w, v in [("Good", "bird", [1, 0]), ("Bad", "bird", [0, 1]),
                                         ("Good", "flower", [1, 0.1]), ("Worse", "flower", [-1, 0])]}
    model = FixedModel([1.0, 0.0], table)
    rows = [
        {"image_path": "a.png", "question": "q", "options": ["Bad", "Good"], "ground_truth": "Good",
         "super_category": "bird", "split": "seen", "image_id": "id-a"},
        {"image_path": "b.png", "question": "q", "options": ["Good", "Bad"], "ground_truth": "Bad",
         "super_category": "bird", "split": "seen"},
        {"image_path": "c.png", "question": "q", "options": ["Worse", "Good"], "ground_truth": "Good",
         "super_category": "flower", "split": "unseen"},
        # the ground truth need not be among the options: simply wrong
        {"image_path": "d.png", "question": "q", "options": ["Worse", "Good"], "ground_truth": "Missing",
         "super_category": "flower", "split": "unseen"},
    ]
    loaded = []
    df = closed_world_eval(model, rows, lambda p: loaded.append(p) or _img(), batch_size=3)
    assert loaded == ["a.png", "b.png", "c.png", "d.png"]
    assert {"image_id", "image_path", "super_category", "split", "mode", "ground_truth", "prediction",
            "correct"} <= set(df.columns)
    assert df["image_id"].tolist() == ["id-a", "b.png", "c.png", "d.png"]
    assert (df["mode"] == "closed").all()
    assert df["prediction"].tolist() == ["Good", "Good", "Good", "Good"]
    assert df["correct"].tolist() == [True, False, True, False]
    s = summarize(df, per_super=True)
    assert s.loc[("closed-world acc", "seen"), "all"] == 50.0
    assert s.loc[("closed-world acc", "unseen"), "all"] == 50.0
    assert s.loc[("closed-world acc", "seen"), "bird"] == 50.0


def test_bad_inputs_raise_value_errors_naming_the_value(small_world):
    model = FixedModel([1.0, 0.0], {_t("A"): [1.0, 0.0]})
    with pytest.raises(ValueError, match=r"no options to choose from \(options=\[\]\)"):
        choose_option(model, _img(), [], "bird")
    with pytest.raises(ValueError, match="unknown super-category 'reptile'"):
        choose_option(model, _img(), ["A"], "reptile")
    with pytest.raises(ValueError, match=r"must contain '\{name\}', got 'a photo'"):
        choose_option(model, _img(), ["A"], "bird", template="a photo")
    row = {"image_path": "x.png", "question": "q", "options": ["A"], "ground_truth": "A", "super_category": "bird",
           "split": "seen"}
    with pytest.raises(ValueError, match="unknown super-category 'dinosaur'"):
        closed_world_eval(model, [row, dict(row, super_category="dinosaur")], lambda p: _img())
    with pytest.raises(ValueError, match=r"eval record 1 \(y.png\): no options"):
        closed_world_eval(model, [row, dict(row, image_path="y.png", options=[])], lambda p: _img())
    with pytest.raises(ValueError, match=r"eval record 0 is missing \['split'\]"):
        closed_world_eval(model, [{k: v for k, v in row.items() if k != "split"}], lambda p: _img())
    with pytest.raises(ValueError, match="no evaluation records"):
        closed_world_eval(model, [], lambda p: _img())
    with pytest.raises(ValueError, match=r"unknown super-categories \['reptile'\]"):
        ClipConfig(super_categories=("bird", "reptile"))
    with pytest.raises(ValueError, match="naming_share must be in"):
        ClipConfig(naming_share=1.5)
    with pytest.raises(ValueError, match=r"batch_size=17 exceeds the 16 species of \['bird'\]"):
        clip_batch(small_world, 0, ClipConfig(**dict(TINY, batch_size=17)))
    with pytest.raises(ValueError, match="unknown CLIP preset 'huge'"):
        cb.clip_config("huge")
    assert cb.clip_config("smoke", seed=3).seed == 3 and cb.clip_config("cpu").channels == (16, 32, 64, 128)
    with pytest.raises(FileNotFoundError, match="no CLIP model"):
        load_clip("/nonexistent/clip_dir")


# ---------------------------------------------------------------------------------------------------- data


def test_clip_batch_is_deterministic_and_keeps_the_knowledge_budget(world):
    cfg = ClipConfig(batch_size=48, text_batch_size=32, naming_share=0.3)
    a, b = clip_batch(world, 5, cfg), clip_batch(world, 5, cfg)
    assert (a.image_keys, a.texts, a.name_texts, a.description_texts) == \
           (b.image_keys, b.texts, b.name_texts, b.description_texts)
    assert a.image_keys != clip_batch(world, 6, cfg).image_keys
    assert a.image_keys != clip_batch(world, 5, ClipConfig(batch_size=48, text_batch_size=32, naming_share=0.3,
                                                            seed=1)).image_keys
    kinds = []
    for step in range(40):
        batch = clip_batch(world, step, cfg)
        names = [n for n, _ in batch.image_keys]
        assert len(set(names)) == len(names) == 48                     # distinct species: no false negatives
        assert len(batch.name_texts) == len(batch.description_texts) == 32
        for (name, index), text, kind in zip(batch.image_keys, batch.texts, batch.kinds):
            sp = world.get(name)
            if kind == "naming":                                       # only the fixed naming images get names
                assert index < cfg.naming_images and text == cb.naming_text(sp)
            else:                                                       # fresh images with attribute captions
                assert index >= cfg.naming_images and name not in text
                assert all(p in text for p in sp.phrases())
            kinds.append(kind)
        for name_text, desc in zip(batch.name_texts, batch.description_texts):
            sp = next(s for s in world.species if s.name in name_text)
            assert desc in masked_descriptions(sp) and sp.name not in desc and sp.genus in " ".join(
                masked_descriptions(sp))
    assert abs(kinds.count("naming") / len(kinds) - 0.3) < 0.05
    # every species, seen and unseen alike, has naming pairs; naming images are the same 2 per species
    naming = set()
    for step in range(200):
        batch = clip_batch(world, step, cfg)
        naming |= {k for k, kind in zip(batch.image_keys, batch.kinds) if kind == "naming"}
    assert {n for n, _ in naming} == {s.name for s in world.species}
    assert {i for _, i in naming} == {0, 1}


def test_vocab_tokenizer_and_encoders(small_world):
    vocab = build_vocab(small_world)
    assert vocab[:3] == ["<pad>", "<unk>", "<cls>"] and len(set(vocab)) == len(vocab)
    sp = small_world.species[0]
    assert all(w in vocab for w in cb.tokenize(cb.naming_text(sp) + " " + sp.descriptions[0]))
    assert cb.tokenize("A long-tailed bird, the Marovi Talsek.") == ["a", "long-tailed", "bird", ",", "the", "marovi",
                                                                      "talsek", "."]
    torch.manual_seed(0)
    model = ClipModel(ClipConfig(**TINY), vocab)
    ids = model.token_ids(["a zzyzx bird", "a"])
    assert ids[0].tolist() == [vocab.index("a"), 1, vocab.index("bird")] and ids[1].tolist() == [vocab.index("a"), 0, 0]
    model.train()
    imgs = [small_world.render(sp.name, "test", i) for i in range(3)] + [_img()]  # a 112-px image is resized
    e = encode_images(model, imgs, batch_size=2)
    t = encode_texts(model, ["a photo of a bird.", "a zzyzx", "fur"])
    assert e.shape == (4, 64) and t.shape == (3, 64)
    assert torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert model.training and not e.requires_grad  # eval mode only while encoding, no gradients
    assert torch.allclose(encode_images(model, imgs[:1]), e[:1], atol=1e-5)  # batching does not change results


# ------------------------------------------------------------------------------------------------ training


def test_short_training_learns_names_of_the_naming_images(small_world):
    # measured (5 seeds, 60 steps): naming-image accuracy 75-81 %, total loss x0.55-0.67, image-text loss -0.5..-0.7
    cfg = ClipConfig(**TINY, steps=60)
    model, log = train_clip(small_world, cfg, progress=False)
    assert list(log["step"]) == list(range(1, 61)) and not model.training
    first, last = log.head(10), log.tail(10)
    assert last["loss"].mean() < 0.8 * first["loss"].mean()
    assert last["loss_image_text"].mean() < first["loss_image_text"].mean() - 0.2
    assert log["temperature"].between(0.01, 0.2).all()  # learnable, logit scale capped at 100
    rows = world_eval_rows(small_world, "pretrain", range(cfg.naming_images), super_categories=("bird",))
    assert len(rows) == 32 and all(r["ground_truth"] in r["options"] and len(r["options"]) == 4 for r in rows)
    df = closed_world_eval(model, rows, world_image_loader(small_world))
    assert df["correct"].mean() >= 0.5, df["correct"].mean()  # chance: 25 %


def _tiny_run(world, out=None, **kw):
    cfg = ClipConfig(**dict(TINY, steps=6, batch_size=8, text_batch_size=8, checkpoint_every=2, warmup=2))
    return train_clip(world, cfg, out, progress=False, **kw)


def _assert_same(a: dict, b: dict, tol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=tol, rtol=0), k


def test_same_seed_same_weights_and_resume_equivalence(small_world, tmp_path):
    ref, ref_log = _tiny_run(small_world)
    again, _ = _tiny_run(small_world)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    other, _ = train_clip(small_world, ClipConfig(**dict(TINY, steps=6, batch_size=8, text_batch_size=8, warmup=2,
                                                         seed=1)), progress=False)
    assert not torch.equal(ref.image_proj.weight, other.image_proj.weight)

    out = tmp_path / "clip"
    partial, partial_log = _tiny_run(small_world, out, stop_at=3)  # "interrupted" after step 3 (checkpointed)
    assert list(partial_log["step"]) == [1, 2, 3] and not (out / "clip.pt").exists()
    assert (out / "checkpoint.pt").is_file()
    (out / ".checkpoint.pt.a1b2.tmp").write_bytes(b"half")  # a kill during an atomic write leaves this
    resumed, log = _tiny_run(small_world, out)
    _assert_same(ref.state_dict(), resumed.state_dict())
    assert list(log["step"]) == list(range(1, 7))
    assert log["loss"].round(4).tolist() == ref_log["loss"].round(4).tolist()
    csv = pd.read_csv(out / "clip_log.csv")
    assert list(csv["step"]) == list(range(1, 7)) and {"loss", "loss_image_text", "loss_text_text",
                                                       "temperature", "lr", "seconds"} <= set(csv.columns)
    loaded = load_clip(out)
    _assert_same(ref.state_dict(), loaded.state_dict())
    assert loaded.vocab == ref.vocab and loaded.cfg == ref.cfg and not loaded.training
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporary files
    # a finished run is not redone; another config in the same folder is refused
    done, _ = _tiny_run(small_world, out)
    _assert_same(ref.state_dict(), done.state_dict())
    with pytest.raises(ValueError, match="other settings.*'steps': \\(6, 7\\)"):
        train_clip(small_world, ClipConfig(**dict(TINY, steps=7, batch_size=8, text_batch_size=8, checkpoint_every=2,
                                                  warmup=2)), out, progress=False)
    # the loaded model chooses like the trained one
    img = small_world.render(small_world.species_of("bird")[0].name, "test", 0)
    opts = [s.name for s in small_world.species_of("bird")[:4]]
    assert choose_option(loaded, img, opts, "bird") == choose_option(ref, img, opts, "bird")


class _RunsCode:
    """A pickle payload: unpickling it calls a function (here: creates a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_naming_the_file(small_world, tmp_path):
    """load_clip and a resumed train_clip read with weights_only=True: no code runs, a clear error names the file."""
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil" / "clip.pt"
    bad.parent.mkdir()
    torch.save({"cfg": {}, "vocab": [], "state_dict": {}, "x": _RunsCode(marker)}, bad)
    with pytest.raises(ValueError, match=r"refusing to load the CLIP model .*evil/clip\.pt.*weights_only"):
        load_clip(bad.parent)
    assert not marker.exists()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.save({"step": 1, "x": _RunsCode(marker)}, ckpt)
    with pytest.raises(ValueError, match=r"refusing to load the CLIP checkpoint .*run/checkpoint\.pt"):
        _tiny_run(small_world, ckpt.parent)
    assert not marker.exists()
    # a truncated file: named, not a bare RuntimeError from the zip reader
    good = tmp_path / "good"
    _tiny_run(small_world, good)
    data = (good / "clip.pt").read_bytes()
    (good / "clip.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read the CLIP model .*good/clip\.pt"):
        load_clip(good)
