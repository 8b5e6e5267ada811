#!/usr/bin/env bash
# Levers of the emoji demo's text-to-image stage at equal steps (issue 20): one train_ldm run per
# "name|flags" argument, in parallel at OMP_NUM_THREADS=1 each, with the demo's emoji recipe (32 px, batch 64,
# 2e-3, frozen MiniLM, cached latents, EMA) on the VAE in VAE=DIR (a demo's vae/ folder), and min-SNR 5
# unless the flags start with --no_snr_gamma; then benchmarks/emoji_curve.py scores every checkpoint of each
# run into $OUT/levers.jsonl. SEED (default 0) is the demo's --seed whose VAE is given. The demo's own curve is
# the baseline (the same VAE, seed and recipe):
#
#   VAE=out/emoji32_confirm/vae OUT=out/levers bash benchmarks/emoji_levers.sh 500 \
#     "vpred_ztsnr|--prediction_type v_prediction --rescale_betas_zero_snr" \
#     "edm|--no_snr_gamma --loss_weighting edm" "immiscible|--immiscible_noise"
set -u
STEPS=$1; shift
OUT=${OUT:-out/levers}; VAE=${VAE:?VAE=DIR, a demo vae/ folder}; mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON="--dataset_name emoji --resolution 32 --seed ${SEED:-0} --max_train_samples 8000 --pretrained_vae_name_or_path $VAE
  --max_train_steps $STEPS --train_batch_size 64 --learning_rate 2e-3 --lr_scheduler constant_with_warmup
  --lr_warmup_steps 50 --no-train_text_encoder --pretrained_text_encoder_name_or_path minilm --cache_latents
  --use_ema --report_to none"
for spec in "$@"; do
  name=${spec%%|*}; flags=${spec#*|}
  snr="--snr_gamma 5"
  case $flags in --no_snr_gamma*) snr=""; flags=${flags#--no_snr_gamma} ;; esac
  # shellcheck disable=SC2086
  ( python training/train_ldm.py --output_dir "$OUT/$name" $COMMON $snr $flags > "$OUT/$name.log" 2>&1 \
      && python benchmarks/emoji_curve.py "$OUT/levers.jsonl" "$OUT/$name" > /dev/null 2>> "$OUT/$name.log" ) &
done
wait
cat "$OUT/levers.jsonl"
