#!/usr/bin/env bash
# Every GPU figure in the README in one call: the head's training step against the official recipe at
# d 4096 / h 16384 (batch 4096 and 128, k 2 annealed from 64 and k 64 fixed, then batch 4096 in full
# float32; the two batch-4096 runs again with --gather-limit 32, zero-filling from hidden_dim / 32 non-zeros),
# then end-to-end finetuning of all-MiniLM-L6-v2 with the head (all weights, then LoRA).
#
#     benchmarks/gpu.sh [OUT_DIR]        # one JSON file per run in OUT_DIR (default gpu-results)
#
# Each run goes on when an earlier one fails, so that one call measures all it can.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c 'import torch; print("torch", torch.__version__)'
step="python benchmarks/train_step.py --device cuda --input-dim 4096 --hidden-dim 16384 --steps 30 --repeats 2"
status=0
run() { echo; echo "== $*"; "$@" || { echo "FAILED: $*"; status=1; }; }
run $step --batch-size 4096 --k 2 --profile --json "$out/step-b4096-k2.json"
run $step --batch-size 4096 --k 64 --no-anneal --json "$out/step-b4096-k64.json"
run $step --batch-size 4096 --k 2 --gather-limit 32 --repeats 1 --json "$out/step-b4096-k2-g32.json"
run $step --batch-size 4096 --k 64 --no-anneal --gather-limit 32 --repeats 1 --json "$out/step-b4096-k64-g32.json"
run $step --batch-size 128 --k 2 --json "$out/step-b128-k2.json"
run $step --batch-size 128 --k 64 --no-anneal --json "$out/step-b128-k64.json"
run $step --batch-size 4096 --k 2 --no-tf32 --json "$out/step-b4096-k2-fp32.json"
run python benchmarks/finetune_step.py --device cuda --batch-size 64 --steps 50 --json "$out/finetune-b64.json"
run python benchmarks/finetune_step.py --device cuda --batch-size 64 --steps 50 --lora-rank 8 --json "$out/finetune-b64-lora8.json"
exit $status
