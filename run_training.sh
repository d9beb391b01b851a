#!/usr/bin/env bash
# The whole job in one command: (model + images) -> cache -> LoRA -> sample image.
#
#   bash run_training.sh                                   # offline demo: tiny random Z-Image + synthetic shapes
#   MODEL=Tongyi-MAI/Z-Image-Turbo DATA=my_photos TRIGGER="sks person" RESOLUTION=1024 STEPS=2000 \
#     bash run_training.sh                                 # a real run (any variable below can be overridden)
#   RESOLUTION="512 1024" ...                              # several resolutions: one cache each, trained together
#
# Every step is an ordinary command you can also run yourself; EXTRA_PRECOMPUTE_ARGS / EXTRA_TRAIN_ARGS are
# passed through (e.g. EXTRA_TRAIN_ARGS="--gradient_checkpointing --optimizer adamw8bit").
set -euo pipefail
# Paths given relative to where you run this are taken from there (the script itself runs in its own folder)
here() { if [ -n "$1" ] && [ -e "$1" ] && [[ "$1" != /* ]]; then echo "$PWD/$1"; else echo "$1"; fi; }
MODEL=$(here "${MODEL:-}")
DATA=$(here "${DATA:-}")
ACCELERATE_CONFIG=$(here "${ACCELERATE_CONFIG:-}")
[ -n "${OUT:-}" ] && [[ "$OUT" != /* ]] && OUT=$PWD/$OUT
if [ -n "$DATA" ] && [ ! -d "$DATA" ]; then
  echo "error: DATA=$DATA is not a folder (relative paths are taken from $PWD)" >&2
  exit 2
fi
cd "$(dirname "$0")"

OUT=${OUT:-demo_output}
TRIGGER=${TRIGGER:-}
RESOLUTION=${RESOLUTION:-}
STEPS=${STEPS:-}
LORA_RANK=${LORA_RANK:-}  # not RANK: torchrun and SLURM export RANK as the process number
LR=${LR:-}
PROMPT=${PROMPT:-"a red circle on a blue background"}

if [ -z "$MODEL" ]; then
  # The embedded default: nothing is downloaded.
  export HF_HUB_OFFLINE=1
  MODEL=$OUT/tiny_model
  [ -f "$MODEL/model_index.json" ] || python -m zimage_utils.tiny --model_dir "$MODEL"
  RESOLUTION=${RESOLUTION:-64}; STEPS=${STEPS:-60}; LORA_RANK=${LORA_RANK:-8}; LR=${LR:-2e-3}
fi
if [ -z "$DATA" ]; then
  DATA=$OUT/tiny_data
  [ -d "$DATA" ] || python -m zimage_utils.tiny --data_dir "$DATA" --num_images 24
fi
RESOLUTION=${RESOLUTION:-1024}; STEPS=${STEPS:-1500}; LORA_RANK=${LORA_RANK:-16}; LR=${LR:-1e-4}

launch=(accelerate launch)
if [ -n "$ACCELERATE_CONFIG" ]; then
  launch+=(--config_file "$ACCELERATE_CONFIG")
else
  launch+=(--num_processes 1 --num_machines 1 --dynamo_backend no)
  if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    launch+=(--mixed_precision bf16)
  else
    launch+=(--cpu --mixed_precision no)
  fi
fi
prefix=()
[ -n "$TRIGGER" ] && prefix=(--caption_prefix "$TRIGGER")

read -ra resolutions <<< "$RESOLUTION"
caches=()
for res in "${resolutions[@]}"; do
  cache=$OUT/cache
  [ ${#resolutions[@]} -gt 1 ] && cache=$OUT/cache_$res
  caches+=("$cache")
  echo "== 1/3 precompute: $DATA -> $cache ($res px)"
  "${launch[@]}" precompute_embeddings.py --pretrained_model_name_or_path "$MODEL" --train_data_dir "$DATA" \
    --output_dir "$cache" --resolution "$res" --validation_prompts "$PROMPT" "${prefix[@]}" \
    ${EXTRA_PRECOMPUTE_ARGS:-}
done
largest=$(printf '%s\n' "${resolutions[@]}" | sort -n | tail -1)

echo "== 2/3 train: $STEPS steps -> $OUT/lora"
"${launch[@]}" train_zimage_lora.py --pretrained_model_name_or_path "$MODEL" --precomputed_dir "${caches[@]}" \
  --output_dir "$OUT/lora" --rank "$LORA_RANK" --learning_rate "$LR" --max_train_steps "$STEPS" \
  --checkpointing_steps $((STEPS / 2 > 0 ? STEPS / 2 : 1)) --checkpoints_total_limit 2 \
  --resume_from_checkpoint latest ${EXTRA_TRAIN_ARGS:-}

echo "== 3/3 sample with the LoRA"
python generate.py --pretrained_model_name_or_path "$MODEL" --lora "$OUT/lora" --prompt "$PROMPT" \
  --height "$largest" --width "$largest" --output "$OUT/sample.png"

echo
echo "LoRA (diffusers):        $OUT/lora/pytorch_lora_weights.safetensors"
echo "LoRA (ComfyUI):          $OUT/lora/pytorch_lora_weights_comfyui.safetensors"
echo "validation samples:      $OUT/lora/samples/"
echo "sample image:            $OUT/sample.png"
