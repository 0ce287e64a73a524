#!/usr/bin/env bash
# `make demo`: phantom data -> patient-level split -> MAE pretraining -> ViT fine-tuning -> evaluation on test patients.
# Everything runs on CPU in a few minutes; outputs go to $1 (default outputs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/demo}
BIN=.venv/bin
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
LAUNCH=("$BIN/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
DATA="$OUT/data"
SPLIT="$OUT/split"

echo "== 1/5 synthetic chest X-rays (phantoms v3: non-square, subtle findings, AP/site effects, label noise) -> $DATA"
"$BIN/hf-medvis" demo-data "$DATA" --version 3 --overwrite

echo "== 2/5 patient-level split (train / val / test) -> $SPLIT"
"$BIN/hf-medvis" split "$DATA/labels.csv" --out "$SPLIT" --val 0.15 --test 0.2 --seed 0

echo "== 3/5 MAE pretraining on the training patients -> $OUT/mae"
"${LAUNCH[@]}" recipes/pretrain_mae.py --train_data "$DATA/images" --labels_file "$SPLIT/train.csv" \
    --output_dir "$OUT/mae" --overwrite_output_dir

echo "== 4/5 ViT fine-tuning from the MAE encoder -> $OUT/vit"
"${LAUNCH[@]}" recipes/finetune_vit.py --model_name_or_path "$OUT/mae" \
    --train_data "$DATA/images" --labels_file "$SPLIT/train.csv" \
    --validation_data "$DATA/images" --validation_labels_file "$SPLIT/val.csv" \
    --output_dir "$OUT/vit" --overwrite_output_dir

echo "== 5/5 evaluation on the held-out test patients (bootstrap CIs over patients) -> $OUT/eval"
"$BIN/hf-medvis" evaluate --model "$OUT/vit" --data "$DATA/images" --labels "$SPLIT/test.csv" --out "$OUT/eval" \
    --subgroups "View Position" "Site"

echo
echo "Outputs:"
echo "  data and split:  $DATA, $SPLIT (split_report.json: per-class counts and expected CI widths)"
echo "  pretrained MAE:  $OUT/mae  (reconstructions.png, README.md model card, loss_history.jsonl)"
echo "  fine-tuned ViT:  $OUT/vit  (all_results.json, README.md model card)"
echo "  test metrics:    $OUT/eval (metrics.json, per_class.json, roc.png, pr.png, reliability.png)"
echo "  report:          $OUT/eval/report.html (self-contained: open it in a browser)"
