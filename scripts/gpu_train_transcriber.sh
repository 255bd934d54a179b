#!/bin/bash
# How the shipped transcriber was trained on lent GPU machines (the device tool runs this from the
# repository root with .whl, wheels of the packages the image lacks, and the subset carried; $OUT
# comes back with the last and the half-way checkpoint, metrics.jsonl and the log).
#
#   DATA=.gpudata/piano-4 INIT=shipped LR=0.0003 LIMIT=540 bash scripts/gpu_train_transcriber.sh
#
# Without STEPS, a 150-step run first measures the rate (steps/s) and max_steps is set so the cosine
# schedule ends when the time (LIMIT seconds for the whole script, less 50 for the end) runs out.
# Stage 12 (2026-11-27, H200): DATA from `scripts/gpu_subset.py data/piano-audio,data/piano-salamander,
# data/piano-mellow .gpudata/piano-4 5 49` (all four training timbres, 3.5 h), INIT=shipped (stage 11),
# LR=0.0003, LIMIT=540: 8.5 steps/s, 3,708 steps of 16 in 7.3 minutes; then INIT=that model in fp16,
# DATA from `gpu_subset.py ... .gpudata/piano-5 6 46` (3.3 h, another draw of pieces), LR=0.0002,
# WARMUP=30, STEPS=1650 (from that rate), MINUTES=3.3. Thresholds were then tuned on the full
# datasets' validation split on a CPU. The calibration run's 150 steps are thrown away: they cost
# about 35 s, and a schedule that ends on time is worth more than they would add.
# Stages 14-17 added augment.graphic_eq_probability=0.5 on a CPU (GRAPHIC_EQ=0 turns it off). EXTRA holds
# more overrides; the next step for the shipped model (stage 17, 384 / 192) is a longer run of it or
# of a wider one, from a subset of the three current builds:
#   python scripts/gpu_subset.py data/piano-audio,data/piano-salamander,data/piano-gmfree .gpudata/piano-6 7 44
#   DATA=.gpudata/piano-6 INIT=shipped LR=0.0003 LIMIT=540 \
#     EXTRA="model_settings.d_model=512 model_settings.rnn_hidden=256" bash scripts/gpu_train_transcriber.sh
# A model trained from scratch there (INIT= set empty: the preset; hours, not minutes) should read harmonic
# channels, EXTRA="model_settings.onset_stack=true model_settings.harmonics=[0.25,0.3333333333333333,0.5,2,3]":
# from scratch they learnt onsets faster on a CPU, while grown into the shipped model a CPU fine-tune
# left them unused (the model card, stage 17).
# then average the result with its start (scripts/average_weights.py --float16) and compare it with
# scripts/compare_transcribers.py before it replaces the shipped model.
# Earlier stages (1-5) used this recipe without masked_note_weight and the detune / low-pass
# augmentations (added in stages 6-11, on a CPU), from scratch at lr 8e-4 and then init_from=shipped.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
COMMON="--config transcriber_small --data ${DATA:-.gpudata/piano-4} init_from=${INIT-shipped} masked_note_weight=1.7 \
 augment.pitch_shift_probability=0.5 augment.pitch_shift_semitones=[-3,5] augment.detune_probability=0.5 \
 augment.lowpass_probability=0.3 augment.graphic_eq_probability=${GRAPHIC_EQ:-0.5} train.batch_size=16 train.loader_threads=14 train.precision=fp32 \
 train.lr=${LR:-0.0003} train.warmup_steps=${WARMUP:-50} final_split= tune_decoding=false $EXTRA"
if [ -z "$STEPS" ]; then
  python3 -m musefm train-transcriber --out /tmp/cal $COMMON train.max_steps=150 train.log_every=25 \
    train.eval_every=100000 train.eval_batches=1 train.save_every=100000 2>&1 | tail -1
  RATE=$(python3 -c "
import json; t={d['step']:d['time'] for d in map(json.loads,open('/tmp/cal/metrics.jsonl')) if d['split']=='train'}
print(100/(t[150]-t[50]))")
  LEFT=$(( ${LIMIT:-540} - ($(date +%s) - T0) - 50 ))
  STEPS=$(python3 -c "print(int($RATE*$LEFT*0.96))")
  MINUTES=$(python3 -c "print(round(($LEFT-15)/60,2))")
  echo "rate $RATE steps/s, $LEFT s left -> $STEPS steps"
fi
mkdir -p $OUT/final $OUT/half
python3 -m musefm train-transcriber --out /tmp/run $COMMON train.max_steps=$STEPS train.max_minutes=${MINUTES:-7} \
  train.log_every=100 train.eval_every=$((STEPS/2)) train.eval_batches=8 train.save_every=$((STEPS/2)) 2>&1 \
  | tee $OUT/train.log | grep -v "^step" | tail -4
latest=/tmp/run/checkpoints/$(cat /tmp/run/checkpoints/latest)
cp $latest/config.json $latest/model.safetensors $OUT/final/
half=/tmp/run/checkpoints/$(printf "step-%08d" $((STEPS/2)))
[ -d $half ] && cp $half/model.safetensors $OUT/half/
# With init_from, the (grown) model the run started from: the other end of a WiSE-FT average.
[ -d /tmp/run/start ] && mkdir -p $OUT/start && cp /tmp/run/start/config.json /tmp/run/start/model.safetensors $OUT/start/
cp /tmp/run/metrics.jsonl $OUT/
echo "done at $(( $(date +%s) - T0 )) s"
