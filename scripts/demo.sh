#!/usr/bin/env bash
# The whole pipeline on one machine with no set-up: every part embedded (SQLite file,
# Milvus Lite file) under demo-data/, which each run starts afresh, ending on the search
# page (with the ingest worker, an hourly drift job and the retrain job in the same
# process) until Ctrl-C.
#   scripts/demo.sh              the pipeline, then the page
#   scripts/demo.sh --no-serve   the pipeline only (CI, benchmarks)
#   scripts/demo.sh --serve-only the page on the demo data of an earlier run (`make serve`)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
SERVE=1 PIPELINE=1
for arg in "$@"; do
  case "$arg" in
    --no-serve) SERVE=0 ;;
    --serve-only) PIPELINE=0 ;;
    *) echo "usage: scripts/demo.sh [--no-serve | --serve-only]" >&2; exit 2 ;;
  esac
done
# The commands this script prints must work pasted into a new shell: name the project's
# own carsearch by its path, not by a PATH this script was given.
CARSEARCH_BIN="$(command -v carsearch || true)"
if [ -z "$CARSEARCH_BIN" ]; then
  echo "carsearch is not installed: run \`make demo\` (it creates .venv first)" >&2; exit 1
fi
CARSEARCH_BIN="$(cd "$(dirname "$CARSEARCH_BIN")" && pwd)/carsearch"

export CARSEARCH_DATA_DIR="${CARSEARCH_DATA_DIR:-$PWD/demo-data}"
export CARSEARCH_LOG_LEVEL="${CARSEARCH_LOG_LEVEL:-WARNING}"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
D="$CARSEARCH_DATA_DIR"
N_IMAGES="${DEMO_IMAGES:-1200}"
HOST="${DEMO_HOST:-127.0.0.1}" PORT="${DEMO_PORT:-7860}"

step() { printf '\n== %s\n' "$*"; }

serve() {
  if [ ! -f "$D/carsearch.db" ] && [ -z "${CARSEARCH_DATABASE_URL:-}" ]; then
    echo "no demo data in $D: run \`make demo\` first" >&2; exit 1
  fi
  printf '\n== the search page on the demo data: open http://%s:%s (Ctrl-C stops it)\n' \
    "$HOST" "$PORT"
  printf '   drop images, with optional NAME.json labels, into %s/inbox: they are ingested\n' "$D"
  printf '   again later: make serve   (or: CARSEARCH_DATA_DIR=%s %s serve --host %s --port %s --ingest --inbox %s/inbox --drift-every 3600 --retrain-every 60)\n' \
    "$D" "$CARSEARCH_BIN" "$HOST" "$PORT" "$D"
  export CARSEARCH_LOG_LEVEL=INFO
  exec "$CARSEARCH_BIN" serve --host "$HOST" --port "$PORT" --ingest --inbox "$D/inbox" \
    --drift-every 3600 --retrain-every 60
}

if [ "$PIPELINE" = 0 ]; then
  serve
fi
rm -rf "$D" && mkdir -p "$D"
START=$SECONDS

step "1. database schema (Alembic migrations)"
carsearch db upgrade

step "2. render a labelled vehicle catalogue ($N_IMAGES images; even numbers are the test split)"
carsearch data synth --out "$D/catalogue" --n "$N_IMAGES"

step "3. write messy search queries for the train split, each checked by the guardrail judge"
carsearch augment --root "$D/catalogue" --out "$D/queries.jsonl" --n 5

step "4. build the compact pretrained base (ImageNet EfficientNet-Lite0 image tower, WordLlama text tower: weights from pip packages), publish it and make it serve"
# (into base/compact-siglip, the base path every command defaults to, the retrain job too)
# 160 px and one text layer: the demo recipe was chosen on the catalogue's validation
# split with this base (docs/BENCHMARKS.md); `base build` alone makes the 224 px,
# mean-pooled base chosen on Stanford Cars.
carsearch base build --kind pretrained --image-size 160 --text-layers 1 --out "$D/base/compact-siglip"
carsearch models publish "$D/base/compact-siglip" --name compact-base --promote

step "5. a camera gateway drops the test images (sidecar labels and each vehicle's box) into the inbox; the worker embeds each box's crop"
python scripts/demo_inbox.py --root "$D/catalogue" --inbox "$D/inbox"
carsearch ingest once --inbox "$D/inbox"
carsearch ingest status

step "6. search with the base before training (its two towers are not aligned yet: essentially random)"
carsearch search "red 2012 chevy pickup" --k 5

step "7. train on views from the box out to the whole frame (stage 1: the text side and projections on cached image features; the image tower stays as pre-trained), evaluate on validation, publish, promote"
# The recipe was chosen on the catalogue's validation split (docs/BENCHMARKS.md, "The demo
# recipe on the pretrained base"); the test split only reports (it was chosen without the
# feature dropout of the Stanford recipe, so that stays off here). The projection is learned
# here, not the Stanford recipe's ridge: on this catalogue's validation split ridge scored
# class-name mAP 0.802 (0.786 with dropout 0.3) against 0.858 learned (docs/BENCHMARKS.md,
# "fifth pass"). DEMO_STEPS=N adds N steps of LoRA on both towers (stage 2).
if [ "${DEMO_STEPS:-0}" -gt 0 ]; then STAGE2=(--steps "$DEMO_STEPS" --batch-size 32)
else STAGE2=(--no-stage2); fi
carsearch train --data "$D/catalogue" --queries "$D/queries.jsonl" --out "$D/runs/demo" \
  --stage1-steps "${DEMO_STAGE1_STEPS:-400}" --stage1-lr 1e-3 --stage1-feature-dropout 0 \
  --stage1-projection learned \
  "${STAGE2[@]}" \
  --train-views box-to-frame \
  --name demo-finetuned --promote
carsearch models list

step "8. search again with the fine-tuned version (natural-language filters work on the page)"
carsearch search "red 2012 chevy pickup" --k 5
carsearch search "older model mercedes coupe" --k 5
carsearch search "jeep" --k 5 --body suv --year-max 2000

step "9. what is served, measured: the class names and held-out phrasings through the search service, nothing read from the text, scored on the database's labels"
carsearch evaluate --served

if [ "${DEMO_WHOLE_FRAMES:-0}" = 1 ]; then
  step "9b. the same test photos without their boxes (whole camera frames) in a collection of their own, served by the same model, measured the same way"
  carsearch collections create whole --kind vehicles
  carsearch models publish "$D/runs/demo/model" --collection whole --name demo-whole --promote
  python scripts/demo_inbox.py --root "$D/catalogue" --inbox "$D/inbox-whole" --no-box
  carsearch ingest once --inbox "$D/inbox-whole" --collection whole
  carsearch evaluate --served --collection whole
fi

step "10. audit Milvus against FAISS exact search, and reconcile the index with the database"
carsearch evaluate ann --n 36
carsearch reconcile

printf '\nThe pipeline took %d s.\n' "$((SECONDS - START))"
printf 'Try it on the command line in any shell:\n'
printf '  CARSEARCH_DATA_DIR=%s %s search "older model mercedes coupe"\n' "$D" "$CARSEARCH_BIN"
if [ "$SERVE" = 1 ]; then
  serve
fi
printf 'The search page on this data: make serve   (from %s)\n' "$ROOT"
