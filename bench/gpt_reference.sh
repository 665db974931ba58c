#!/usr/bin/env bash
# Reference perplexity (issue: GPT-small with TP): our GPT-small config for 2000 steps beside
# ../shared/peers/gpt_small_torch.py on the same Brown token files, same hyperparameters and batch order.
# Prints key=value lines: ours_val_loss, peer_val_loss, val_loss_rel_diff (target <= 0.02), and seconds.
#   bench/gpt_reference.sh [--steps N] [--np R --set mesh.model=R ...]   (after scripts/test.sh or a build)
# Both run at once, one thread each (on 2 cores); set THREADS=2 and run one at a time for timings.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=2000
if [[ ${1:-} == --steps ]]; then steps=$2; shift 2; fi
np=1
if [[ ${1:-} == --np ]]; then np=$2; shift 2; fi
bin=build/cpu/apps/titanax
data=${TITANAX_DATA:-data}/brown
peers=${TITANAX_PEERS:-../shared/peers}
out=runs/gpt_reference
rm -rf "$out" && mkdir -p "$out"
"$bin" fetch brown --out "$data" >/dev/null
root=(); [[ $(id -u) -eq 0 ]] && root=(--allow-run-as-root)

( /usr/bin/python3 "$peers/gpt_small_torch.py" --train "$data/train.bin" --val "$data/val.bin" --steps "$steps" \
    --device cpu >"$out/peer.txt" 2>&1 ) &
peer=$!
start=$(date +%s)
mpirun "${root[@]}" --oversubscribe -np "$np" "$bin" run --config examples/configs/gpt_small_tp.yaml \
  --set "data.path=$data" --set "train.steps=$steps" --set "runtime.threads=${THREADS:-1}" --set checkpoint.dir= \
  --set logging.csv= --set train.log_every=100 "$@" >"$out/ours.txt" 2>&1
ours_s=$(( $(date +%s) - start ))
wait $peer

ours=$(sed -n 's/^val loss //p' "$out/ours.txt" | tail -1)
peer_line=$(grep '^ref=torch' "$out/peer.txt" | tail -1)
peer_loss=$(sed -n 's/.*val_loss=\([0-9.]*\).*/\1/p' <<<"$peer_line")
peer_s=$(sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' <<<"$peer_line")
echo "bench=gpt_reference steps=$steps ranks=$np ours_val_loss=$ours peer_val_loss=$peer_loss" \
  "val_loss_rel_diff=$(awk -v a="$ours" -v b="$peer_loss" 'BEGIN { d = (a - b) / b; printf "%.4f", d < 0 ? -d : d }')" \
  "ours_val_ppl=$(awk -v a="$ours" 'BEGIN { printf "%.2f", exp(a) }')" \
  "peer_val_ppl=$(awk -v a="$peer_loss" 'BEGIN { printf "%.2f", exp(a) }')" \
  "ours_seconds=$ours_s peer_seconds=$peer_s"
