"""Issue 16 probe: continue the shipped model's instruct stage 400 steps, with (cot_choice) or without (control)
the Table-5 closed-world task; then CoT SFT on the seed-0 cpu benchmark and the validation table (val renders)."""
import json, shutil, sys, time
from pathlib import Path
import torch
from finer1_lib import pretrain as P
from finer1_lib.model import load_model, save_model
from finer1_lib.profiles import get_profile, PROFILES
from finer1_lib.world import World
from finer1_lib.validation import validate_sft

variant = sys.argv[1]
root = Path("data/runs/exp/cotchoice") / variant
root.mkdir(parents=True, exist_ok=True)
prof = get_profile("cpu")
base_mix = dict(prof.pretrain["stages"]["instruct"]["mixture"])
if variant == "cot_choice":
    mix = dict(base_mix, coarse_choice=0.08, cot_choice=0.10, reasoning=0.18)
else:
    mix = base_mix
assert abs(sum(mix.values()) - 1) < 1e-9, mix
s = dict(steps=400, batch_size=16, lr=2e-4, min_lr=2e-5, warmup=20, train=dict(merger=1.0, language=1.0),
         mixture=mix, seed=0, naming_images=2, weight_decay=0.01, checkpoint_every=100, max_tokens_per_chunk=2048)
model_dir = root / "model"
if not (model_dir / "config.json").is_file():
    torch.manual_seed(0)
    model, processor = load_model("data/base_model")
    world = World(0, 112, 4)
    t = time.time()
    P._run_lm_stage("instruct-cont", s, root / "stage", model, processor, world, 10, True)
    model.eval()
    save_model(model, processor, model_dir)
    for f in ("chat_template.jinja",):
        if (Path("data/base_model") / f).is_file() and not (model_dir / f).is_file():
            shutil.copy(Path("data/base_model") / f, model_dir / f)
    print("instruct-cont seconds", round(time.time() - t, 1), flush=True)
p = prof.replace(model=str(model_dir))
out = root / "runs"
if not (out / "benchmark-seed0").exists() and Path("data/runs/val/pc4/benchmark-seed0").exists():
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree("data/runs/val/pc4/benchmark-seed0", out / "benchmark-seed0",
                    ignore=shutil.ignore_patterns("val-*.csv"))
df = validate_sft(p, out=out, seed=0, modes=("closed", "open"), progress=True)
df.to_csv(root / "validation.csv")
print(df.T.to_string(), flush=True)
