"""Does the vision stage gain from 2x steps (1200 -> 2400, same loss, same tower)? Runs text (copied) + vision in a
pretrain folder so the remaining stages can continue from it; then the tower probe on VAL renders.
python data/results/base-model-tower-probe/vision_steps.py [STEPS]   (from the repository root)"""
import json, shutil, sys
from pathlib import Path
import torch
from finer1_lib.profiles import get_profile
from finer1_lib.pretrain import pretrain
from finer1_lib.model import load_model
from finer1_lib.contrastive import tower_probe
from finer1_lib.world import World
from finer1_lib.benchmark import build_benchmark

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 2400
prof = get_profile("cpu")
cfg = dict(prof.pretrain)
cfg["stages"] = dict(cfg["stages"], vision=dict(cfg["stages"]["vision"], steps=steps))
prof = prof.replace(pretrain=cfg)
out = Path(f"data/runs/exp/v2400/pretrain-vision{steps}")
out.mkdir(parents=True, exist_ok=True)
if not (out / "text").exists():
    shutil.copytree("data/runs/cpu/pretrain/text", out / "text")
final = pretrain(prof, out, stages=("text", "vision"))
world = World(prof.world_seed, prof.image_size, prof.n_genera)
bench = build_benchmark(prof, Path("data/runs/cpu/benchmark-seed0"), seed=0, progress=False)
labels = sorted(set(r.label for r in bench.test))
images = [world.render(l, "val", i) for l in labels for i in range(5)]
model, processor = load_model(out / "vision" / "model")
with torch.no_grad():
    r = tower_probe(model.eval(), processor, world, images, [l for l in labels for i in range(5)], bench.seen_labels())
(out / "probe_val.json").write_text(json.dumps(r, indent=1))
print(json.dumps(r["all"]))
