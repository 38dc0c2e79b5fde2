"""Which names the base model answers when its closed-world answer is not one of the four options (run trunc.py
first). python data/results/base-model-options-diagnosis/outside.py [OUT]"""
import collections
import sys

import pandas as pd

from finer1_lib.benchmark import load_benchmark
from finer1_lib.world import World

out = sys.argv[1] if len(sys.argv) > 1 else "data/runs/exp/trunc"
df = pd.read_csv(f"{out}/closed512.csv", keep_default_na=False)
rows = load_benchmark(f"{out}/bench").eval_rows
world = World(0)
genus = lambda n: world.by_name[n].genus if n in world.by_name else None  # noqa: E731
kinds = collections.Counter()
for (_, d), r in zip(df.iterrows(), rows):
    if d["prediction"].strip().lower() in {o.lower() for o in r["options"]}:
        continue
    g, truth = genus(d["prediction"]), genus(r["ground_truth"])
    what = ("a species of the image's genus" if g == truth else "a species of another option's genus"
            if g in {genus(o) for o in r["options"]} else "a species of a genus not offered" if g else "no species name")
    style = "genus template (coarse_choice)" if d["output"].startswith("<think>Of the options") else "Table 5"
    kinds[what, style] += 1
print(pd.Series(kinds).rename_axis(["answer names", "rationale"]).rename("answers").sort_index().to_string())
print("closed-world answers:", len(df), "outside the options:", sum(kinds.values()))
