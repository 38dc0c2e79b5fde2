#!/usr/bin/env bash
# Copy the stopped pretraining run (the stages done, the model of the last one) to data/runs/exp/p2400 so that
# `python -m finer1_lib pretrain --profile cpu --out data/runs/exp/p2400 --measure` resumes it (README).
set -euo pipefail
cd "$(dirname "$0")/../../.."
src=data/results/base-model-vision2400
dst=data/runs/exp/p2400
for stage in text vision align instruct; do
  [ -f "$src/$stage/done.json" ] || continue
  mkdir -p "$dst/$stage/model"
  cp "$src/$stage/done.json" "$src/$stage/key.txt" "$src/$stage/log.csv" "$dst/$stage/"
  if [ -d "$src/$stage/model" ]; then cp "$src/$stage/model/"* "$dst/$stage/model/"; fi
done
echo "restored to $dst: run  python -m finer1_lib pretrain --profile cpu --out $dst --measure"
