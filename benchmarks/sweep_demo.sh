#!/usr/bin/env bash
# How many steps, at which batch size and learning rate, does the small preset need on shapes?
# Trains one VAE as the demo does, then one train_ldm run per "name|flags" argument (in parallel: a
# GPU fits them all), writing a pipeline every CKPT_EVERY steps, and scores each with
# benchmarks/eval_checkpoints.py into $OUT/sweep.jsonl. The demo's settings came from this, run on
# an H100 (benchmarks/results/demo_sweep_h100.jsonl):
#
#   OUT=out/sweep bash benchmarks/sweep_demo.sh 1500 250 \
#     "b64_lr2e-3_snr5|--train_batch_size 64 --learning_rate 2e-3 --snr_gamma 5" \
#     "b32_lr1e-3|--train_batch_size 32 --learning_rate 1e-3"
set -u
STEPS=$1; EVERY=$2; shift 2
OUT=${OUT:-out/sweep}; W=${W:-$OUT}; mkdir -p "$OUT" "$W"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
COMMON="--dataset_name shapes --resolution 32 --seed 0 --max_train_samples 8000 --cache_latents
  --lr_scheduler constant_with_warmup --lr_warmup_steps 50 --report_to none --save_pipeline_at_checkpoints
  --checkpointing_steps $EVERY --max_train_steps $STEPS --data_cache_dir $W/cache"
if [ ! -f "$W/vae/vae/config.json" ]; then
  python training/train_vae.py --output_dir "$W/vae" --dataset_name shapes --resolution 32 --seed 0 \
    --max_train_samples 8000 --max_train_steps "${VAE_STEPS:-1500}" --report_to none --data_cache_dir "$W/cache" \
    > "$W/vae.log" 2>&1 || { tail -20 "$W/vae.log"; exit 1; }
fi
first=1
for spec in "$@"; do
  name=${spec%%|*}; flags=${spec#*|}
  # shellcheck disable=SC2086
  ( python training/train_ldm.py --output_dir "$W/$name" --pretrained_vae_name_or_path "$W/vae" $COMMON $flags \
      > "$W/$name.log" 2>&1 && python benchmarks/eval_checkpoints.py "$OUT/sweep.jsonl" "$W/$name" > /dev/null ) &
  if [ $first -eq 1 ]; then sleep 20; first=0; fi  # the first run builds the shared latent cache
done
wait
cat "$OUT/sweep.jsonl"
