"""Does a deeper/wider vision tower see better? Vision stage only, N steps, fresh tower; linear probe on VAL renders.

python data/results/base-model-tower-probe/tower_exp.py SIZE STEPS   (from the repository root; SIZE: a TINY_SIZES
key, or "shipped" for data/base_model; writes data/runs/exp/tower/<SIZE>-<STEPS>/probe.json and the stage log)
"""
import json, sys, time
from pathlib import Path
import torch
from finer1_lib.profiles import get_profile
from finer1_lib.pretrain import _run_vision_stage, _stage_settings, pretrain_corpus
from finer1_lib.model import build_tiny_model, build_tokenizer, build_processor, load_model, count_parameters
from finer1_lib.contrastive import tower_probe
from finer1_lib.world import World
from finer1_lib.benchmark import build_benchmark

size, steps = sys.argv[1], int(sys.argv[2])
prof = get_profile("cpu")
world = World(prof.world_seed, prof.image_size, prof.n_genera)
bench = build_benchmark(prof, Path("data/runs/cpu/benchmark-seed0"), seed=0, progress=False)
labels = sorted(set(r.label for r in bench.test))
images = [world.render(l, "val", i) for l in labels for i in range(5)]
img_labels = [l for l in labels for i in range(5)]
out = Path(f"data/runs/exp/tower/{size}-{steps}")
out.mkdir(parents=True, exist_ok=True)
if size == "shipped":
    model, processor = load_model("data/base_model")
    secs = None
else:
    cfg = dict(prof.pretrain)
    s = _stage_settings(cfg, "vision", steps)
    torch.manual_seed(cfg["seed"])
    tokenizer = build_tokenizer(pretrain_corpus(world))
    processor = build_processor(tokenizer)
    model = build_tiny_model(tokenizer, size, seed=cfg["seed"])
    t = time.time()
    secs = _run_vision_stage(s, out, model, processor, world, 10, False)
model.eval()
with torch.no_grad():
    r = tower_probe(model, processor, world, images, img_labels, bench.seen_labels())
r["train_seconds"] = secs
r["parameters"] = count_parameters(model)
(out / "probe.json").write_text(json.dumps(r, indent=1))
print(json.dumps(r, indent=1))
