#!/usr/bin/env bash
# The whole pipeline on one machine with no set-up: every part embedded (SQLite file,
# Milvus Lite file) under demo-data/, which each run starts afresh. About 5 minutes on
# 2 cores, most of it training.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARSEARCH_DATA_DIR="${CARSEARCH_DATA_DIR:-$PWD/demo-data}"
export CARSEARCH_LOG_LEVEL="${CARSEARCH_LOG_LEVEL:-WARNING}"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
D="$CARSEARCH_DATA_DIR"
N_IMAGES="${DEMO_IMAGES:-1200}"
rm -rf "$D" && mkdir -p "$D"

step() { printf '\n== %s\n' "$*"; }

step "1. database schema (Alembic migrations)"
carsearch db upgrade

step "2. render a labelled vehicle catalogue ($N_IMAGES images; even numbers are the test split)"
carsearch data synth --out "$D/catalogue" --n "$N_IMAGES"

step "3. write messy search queries for the train split, each checked by the guardrail judge"
carsearch augment --root "$D/catalogue" --out "$D/queries.jsonl" --n 5

step "4. build the compact SigLIP base, publish it and make it serve"
carsearch base build --out "$D/base/compact-siglip"
carsearch models publish "$D/base/compact-siglip" --name compact-base --promote

step "5. a camera gateway drops the test images (with sidecar labels) into the inbox; the worker ingests them"
python scripts/demo_inbox.py --root "$D/catalogue" --inbox "$D/inbox"
carsearch ingest once --inbox "$D/inbox"
carsearch ingest status

step "6. search with the untrained base (zero-shot: essentially random)"
carsearch search "red 2012 chevy pickup" --k 5

step "7. fine-tune (Accelerate, sigmoid loss), evaluate zero-shot vs trained, publish, promote"
carsearch train --data "$D/catalogue" --queries "$D/queries.jsonl" --out "$D/runs/demo" \
  --name demo-finetuned --promote
carsearch models list

step "8. search again with the fine-tuned version (natural-language filters work on the page)"
carsearch search "red 2012 chevy pickup" --k 5
carsearch search "older model mercedes convertible" --k 5
carsearch search "jeep" --k 5 --body suv --year-max 2000

step "9. audit Milvus against FAISS exact search, and reconcile the index with the database"
carsearch evaluate ann --n 36
carsearch reconcile

printf '\nThe search page, with the ingest worker and an hourly drift job in the same process:\n'
printf '  CARSEARCH_DATA_DIR=%s carsearch serve --ingest --inbox %s/inbox --drift-every 3600\n' "$D" "$D"
printf '  (http://127.0.0.1:7860; drop images, with optional NAME.json labels, into the inbox)\n'
