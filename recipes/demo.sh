#!/usr/bin/env bash
# `make demo`: MAE pretraining -> ViT fine-tuning -> evaluation on the embedded phantom chest X-rays, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/demo}
BIN=.venv/bin
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
LAUNCH=("$BIN/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)

echo "== 1/3 MAE pretraining (tiny ViT-MAE, embedded phantom X-rays) -> $OUT/mae"
"${LAUNCH[@]}" recipes/pretrain_mae.py --output_dir "$OUT/mae" --overwrite_output_dir --disable_tqdm false

echo "== 2/3 ViT fine-tuning from the MAE encoder -> $OUT/vit"
"${LAUNCH[@]}" recipes/finetune_vit.py --model_name_or_path "$OUT/mae" --output_dir "$OUT/vit" --overwrite_output_dir

echo "== 3/3 Evaluation on held-out patients (bootstrap CIs over patients) -> $OUT/eval"
"$BIN/hf-medvis" evaluate --model "$OUT/vit" --data "$OUT/vit/splits/test.csv" --out "$OUT/eval"

echo
echo "Outputs:"
echo "  pretrained MAE:    $OUT/mae   (reconstructions.png, README.md model card, loss_history.jsonl)"
echo "  fine-tuned ViT:    $OUT/vit   (all_results.json, README.md model card)"
echo "  evaluation:        $OUT/eval  (metrics.json, roc.png)"
