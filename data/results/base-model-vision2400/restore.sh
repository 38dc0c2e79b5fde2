#!/usr/bin/env bash
# Copy the stopped pretraining run (text, vision, align done) to data/runs/exp/p2400 so `pretrain` resumes it.
set -euo pipefail
cd "$(dirname "$0")/../../.."
src=data/results/base-model-vision2400
dst=data/runs/exp/p2400
mkdir -p "$dst"
for stage in text vision align; do
  mkdir -p "$dst/$stage/model"
  cp "$src/$stage/done.json" "$src/$stage/key.txt" "$src/$stage/log.csv" "$dst/$stage/"
done
cp "$src"/align/model/* "$dst/align/model/"
echo "restored to $dst: run  python -m finer1_lib pretrain --profile cpu --out $dst --measure"
