"""Are the closed-world answers outside the options cut off by the 256-token budget? Closed world at 512 tokens
on the cpu benchmark (seed 0), then each answer re-scored as if cut at 160 / 256 / 384 tokens (greedy decoding:
the shorter budget's answer is a prefix of this one).

python data/results/base-model-options-diagnosis/trunc.py [MODEL_DIR] [OUT]   (default data/base_model,
data/runs/exp/trunc; ~6 min on one thread)"""
import json, sys
import torch
import pandas as pd
from pathlib import Path
torch.set_num_threads(1)
from finer1_lib.profiles import PROFILES
from finer1_lib.benchmark import build_benchmark
from finer1_lib.model import load_model
from finer1_lib.evaluate import run_eval
from finer1_lib.metrics import closed_world_correct, open_world_prediction
model_dir = sys.argv[1] if len(sys.argv) > 1 else "data/base_model"
out = Path(sys.argv[2] if len(sys.argv) > 2 else "data/runs/exp/trunc")
prof = PROFILES["cpu"]
bench = build_benchmark(prof, out / "bench", seed=0, progress=False)
model, proc = load_model(model_dir)
model.eval()
df = run_eval(model, proc, bench, modes=("closed",), max_new_tokens=512, batch_size=32, progress=False)
df.to_csv(out / "closed512.csv", index=False)
tok = proc.tokenizer
rows = bench.eval_rows
res = {}
for budget in (160, 256, 384, 512):
    hit, acc, cut = [], [], []
    for (_, d), r in zip(df.iterrows(), rows):
        ids = tok(d["output"], add_special_tokens=False)["input_ids"]
        text = tok.decode(ids[:budget]) if len(ids) > budget else d["output"]
        pred = open_world_prediction(text)
        hit.append(str(pred).strip().lower() in {o.lower() for o in r["options"]})
        acc.append(closed_world_correct(text, r["ground_truth"]))
        cut.append(len(ids) >= budget)
    g = pd.DataFrame({"split": df["split"], "in_options": hit, "correct": acc, "cut": cut}).groupby("split").mean() * 100
    res[budget] = g.round(1).to_dict()
print(json.dumps(res, indent=1))
(out / "trunc.json").write_text(json.dumps(res, indent=1))
