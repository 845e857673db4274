#!/usr/bin/env bash
# The pipeline as far as it exists, on one machine with no set-up: every part embedded
# (SQLite file, Milvus Lite file) under demo-data/, which each run starts afresh.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARSEARCH_DATA_DIR="${CARSEARCH_DATA_DIR:-$PWD/demo-data}"
export CARSEARCH_LOG_LEVEL="${CARSEARCH_LOG_LEVEL:-WARNING}"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
STANFORD="${CARSEARCH_STANFORD_ROOT:-$PWD/../shared/stanford_cars}"
D="$CARSEARCH_DATA_DIR"
rm -rf "$D" && mkdir -p "$D"

step() { printf '\n== %s\n' "$*"; }

step "1. database schema (Alembic)"
carsearch db upgrade

step "2. build the compact SigLIP base model"
carsearch base build --out "$D/base"

step "3. publish it as a model version and promote it to serving"
carsearch models publish "$D/base" --name compact-base --base compact-siglip --promote
carsearch models list

step "4. index a few images"
python scripts/demo_manifest.py --stanford "$STANFORD" --out "$D/manifest.jsonl" --n 60
carsearch ingest manifest "$D/manifest.jsonl"

step "5. search"
carsearch search "red 2012 chevy pickup" --k 5
carsearch search "older model mercedes coupe" --k 5
