#!/usr/bin/env bash
# the emoji demo's two stages (latentdiff/demo.py at c50aec1, its default step counts) on emoji+emojione
set -eu
PY=/work/main/.venv/bin/python3
DATA="--dataset_name emoji+emojione --resolution 32 --seed 0 --max_train_samples 8000"
O=out/both_hour
start=$(date +%s)
echo "== VAE" ; $PY -m latentdiff.scripts.train_vae --output_dir $O/vae --resume_from_checkpoint latest $DATA \
  --max_train_steps 7589 --learning_rate 1e-3 --l1_weight 0.1 --use_ema
vae_end=$(date +%s)
echo "== text-to-image"; $PY -m latentdiff.scripts.train_ldm --output_dir $O/ldm --resume_from_checkpoint latest $DATA \
  --pretrained_vae_name_or_path $O/vae --max_train_steps 3000 --train_batch_size 64 --learning_rate 2e-3 --snr_gamma 5 \
  --lr_scheduler constant_with_warmup --lr_warmup_steps 50 --no-train_text_encoder --pretrained_text_encoder_name_or_path minilm \
  --cache_latents --use_ema --validation_prompts "cat face" "red apple" "rocket" "smiling face with sunglasses"
end=$(date +%s)
echo "wall: vae $((vae_end-start)) s, ldm $((end-vae_end)) s, total $((end-start)) s" | tee $O/wall.txt
