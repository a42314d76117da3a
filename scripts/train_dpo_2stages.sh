#!/usr/bin/env bash
# MMed-RAG's RAG-PT training (the original scripts/train_dpo_2stages.sh), made runnable: the original command line,
# unchanged but for paths relative to the repo root and stage 2 in the same run (--stage2_data_path), e.g.
#   MODEL=checkpoints/llava-med-v1.5-mistral-7b-hf DATA_STAGE1=pairs/radiology_stage1.json \
#   DATA_STAGE2=pairs/radiology_stage2.json IMAGE_FOLDER=data/images OUTPUT_DIR=checkpoints/rag-pt-radiology \
#   bash scripts/train_dpo_2stages.sh [more flags, which override the ones below]
# Environment (defaults in brackets): MODEL, DATA_STAGE1, DATA_STAGE2, IMAGE_FOLDER, OUTPUT_DIR, INCLUDE
# [localhost:0,1,2,3: the GPUs], MASTER_PORT [29500], DEEPSPEED_CONFIG [configs/deepspeed/zero3.json], BF16 [True],
# REPORT_TO [none; the original used wandb], DEEPSPEED [the project's .venv/bin/deepspeed, else deepspeed].
# Stage 2 alone, as the original ran it: DATA_STAGE2= and add --lora_checkpoint_path STAGE1_DIR (DATA_STAGE1 is
# then the stage-2 data). Rerun the same command to resume. On a machine without a GPU set DS_ACCELERATOR=cpu
# and BF16=False. See docs/DPO.md.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
deepspeed="${DEEPSPEED:-}"
if [ -z "$deepspeed" ]; then
  if [ -x "$repo/.venv/bin/deepspeed" ]; then deepspeed="$repo/.venv/bin/deepspeed"; else deepspeed=deepspeed; fi
fi
stage2=()
if [ -n "${DATA_STAGE2-./data/training/alignment/radiology/radiology_report_stage2.json}" ]; then
  stage2=(--stage2_data_path "${DATA_STAGE2-./data/training/alignment/radiology/radiology_report_stage2.json}")
fi
"$deepspeed" --include "${INCLUDE:-localhost:0,1,2,3}" --master_port "${MASTER_PORT:-29500}" \
    ./train/dpo/train_dpo_2stages.py \
    --model_name_or_path "${MODEL:-./checkpoints/llava-med-v1.5-mistral-7b-hf}" \
    --deepspeed "${DEEPSPEED_CONFIG:-./configs/deepspeed/zero3.json}" \
    --version v1 \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --data_path "${DATA_STAGE1:-./data/training/alignment/radiology/radiology_report_stage1.json}" \
    --image_folder "${IMAGE_FOLDER:-./data/images}" \
    --vision_tower openai/clip-vit-large-patch14-336 \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 "${BF16:-True}" \
    --output_dir "${OUTPUT_DIR:-./checkpoints/rag-pt}" \
    --num_train_epochs 3 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 200 \
    --save_total_limit 1 \
    --learning_rate 1e-7 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --report_to "${REPORT_TO:-none}" \
    --tf32 True \
    --model_max_length 1024 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    ${stage2[@]+"${stage2[@]}"} \
    "$@"
