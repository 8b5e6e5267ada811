#!/usr/bin/env bash
# How many steps, at which batch size and learning rate, does the small preset need on shapes?
# Trains one VAE as the demo does (or takes VAE=DIR, a train_vae output folder), then one train_ldm run
# per "name|flags" argument (in parallel: a GPU fits them all; on a CPU give each OMP_NUM_THREADS=1),
# writing a pipeline every EVERY steps, and scores each with benchmarks/eval_checkpoints.py into
# $OUT/sweep.jsonl. Both stages keep EMA weights and export them, as the demo does (EMA=0: not; the
# H100 sweep below predates EMA). The demo's batch and learning rate came from this, run on an H100
# (benchmarks/results/demo_sweep_h100.jsonl); its frozen text encoder and step count from a CPU run
# (benchmarks/results/demo_sweep_cpu.jsonl):
#
#   OMP_NUM_THREADS=1 VAE=out/demo/vae OUT=out/sweep bash benchmarks/sweep_demo.sh 900 200 \
#     "frozen_te|--train_batch_size 64 --learning_rate 2e-3 --snr_gamma 5 --no-train_text_encoder"
# and the H100 sweep:
#
#   EMA=0 OUT=out/sweep bash benchmarks/sweep_demo.sh 1500 250 \
#     "b64_lr2e-3_snr5|--train_batch_size 64 --learning_rate 2e-3 --snr_gamma 5" \
#     "b32_lr1e-3|--train_batch_size 32 --learning_rate 1e-3"
set -u
STEPS=$1; EVERY=$2; shift 2
OUT=${OUT:-out/sweep}; W=${W:-$OUT}; mkdir -p "$OUT" "$W"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
EMA_FLAG=$([ "${EMA:-1}" = 1 ] && echo --use_ema)
COMMON="--dataset_name shapes --resolution 32 --seed 0 --max_train_samples 8000 --cache_latents
  --lr_scheduler constant_with_warmup --lr_warmup_steps 50 --report_to none --save_pipeline_at_checkpoints
  --checkpointing_steps $EVERY --max_train_steps $STEPS --data_cache_dir $W/cache $EMA_FLAG"
VAE=${VAE:-$W/vae}
if [ ! -f "$VAE/vae/config.json" ]; then
  # shellcheck disable=SC2086
  python training/train_vae.py --output_dir "$VAE" --dataset_name shapes --resolution 32 --seed 0 \
    --max_train_samples 8000 --max_train_steps "${VAE_STEPS:-1500}" --learning_rate 1e-3 --report_to none --data_cache_dir "$W/cache" \
    $EMA_FLAG > "$W/vae.log" 2>&1 || { tail -20 "$W/vae.log"; exit 1; }
fi
first=1
for spec in "$@"; do
  name=${spec%%|*}; flags=${spec#*|}
  # shellcheck disable=SC2086
  ( python training/train_ldm.py --output_dir "$W/$name" --pretrained_vae_name_or_path "$VAE" $COMMON $flags \
      > "$W/$name.log" 2>&1 && python benchmarks/eval_checkpoints.py "$OUT/sweep.jsonl" "$W/$name" > /dev/null ) &
  if [ $first -eq 1 ]; then sleep 20; first=0; fi  # the first run builds the shared latent cache
done
wait
cat "$OUT/sweep.jsonl"
