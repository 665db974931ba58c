#!/usr/bin/env bash
# End-to-end cases of the `titanax` CLI on real MNIST digits, run by CTest (tests/e2e.cmake):
#   cases.sh CASE
# Environment (set by CTest): TITANAX (the CLI), SRC (source tree), DATA (MNIST IDX folder, filled by the
# `fetch` case), BROWN (Brown corpus shards, filled by the `fetch_brown` case), WORK (an empty scratch
# folder for this case), MPIEXEC (mpirun).
# Each case exits non-zero with a message saying what differed from the expectation.
set -euo pipefail
case_name=$1
: "${TITANAX:?}" "${SRC:?}" "${DATA:?}" "${WORK:?}" "${MPIEXEC:?}"
rm -rf "$WORK" && mkdir -p "$WORK"
cd "$WORK"

root=(); [[ $(id -u) -eq 0 ]] && root=(--allow-run-as-root)
mpi() { local np=$1; shift; OMP_NUM_THREADS=1 "$MPIEXEC" "${root[@]}" --oversubscribe -np "$np" "$@"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
# `titanax run` with quiet logging, the fetched data and scratch outputs; extra arguments are --set pairs.
run() {
  local np=$1 config=$2; shift 2
  mpi "$np" "$TITANAX" run --config "$SRC/examples/configs/$config" --set "data.path=$DATA" --set data.fetch=false \
    --set logging.level=warn --set "logging.csv=$WORK/metrics.csv" --set checkpoint.dir= "$@"
}
value() { sed -n "s/^$1 //p" | tail -1; }  # the number after a "key " prefix in the last matching line
# at_least ACTUAL MIN WHAT
at_least() { awk -v a="$1" -v m="$2" 'BEGIN { exit !(a != "" && a + 0 >= m + 0) }' || fail "$3: $1 < $2"; }
# rel_close A B TOL WHAT: |A - B| <= TOL * |B|
rel_close() {
  awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { d = a - b; if (d < 0) d = -d; r = b < 0 ? -b : b; exit !(a != "" && d <= t * r) }' \
    || fail "$4: $1 vs $2 (relative tolerance $3)"
}
# expect_error PATTERN COMMAND...: the command must exit with a code in 1..125 (not a crash or signal) and
# print a line matching PATTERN (extended regex) on stderr or stdout.
expect_error() {
  local pattern=$1; shift
  set +e; "$@" >out.txt 2>&1; local rc=$?; set -e
  cat out.txt
  [[ $rc -ne 0 ]] || fail "expected a non-zero exit from: $*"
  [[ $rc -le 125 ]] || fail "exit code $rc (a crash or signal) from: $*"
  grep -Eq 'Segmentation|signal [0-9]+|core dumped|terminate called' out.txt && fail "crashed: $*"
  grep -Eq "$pattern" out.txt || fail "output does not match /$pattern/"
  echo "ok: exit $rc, matched /$pattern/"
}

# A small GPT-2 tokenizer (tok/: vocab.json, merges.txt) and random GPT-2 weights for it (w/hf.safetensors),
# from tests/gpt2's references; gpt2_model: the --set pairs of that model.
gpt2_files() {
  mkdir -p tok w
  /usr/bin/python3 "$SRC/tests/gpt2/gpt2_bpe_reference.py" tok
  local V; V=$(/usr/bin/python3 -c "import json; print(len(json.load(open('tok/vocab.json'))))")
  /usr/bin/python3 "$SRC/tests/gpt2/gpt2_reference.py" make --out w --vocab "$V" --padded-vocab "$V" --layers 2 --heads 4 \
    --dim 32 --positions 24 --seq 16 --batch 1 --seed 3
  gpt2_model=(--set "model.vocab=$V" --set model.layers=2 --set model.heads=4 --set model.dim=32 --set model.seq_len=16
              --set model.init_from=w/hf.safetensors)
}

case $case_name in
fetch)
  "$TITANAX" fetch mnist --out "$DATA"
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [[ -s $DATA/$f || -s $DATA/$f.gz ]] || fail "missing $DATA/$f"
  done ;;

fetch_brown)  # tokenizer + llm.c shards; Brown has ~1.16M words: ~1.39M train / ~77k val BPE tokens at vocab 8192
  : "${BROWN:?}"
  "$TITANAX" fetch brown --out "$BROWN" | tee out.txt
  line=$(grep -E '^(wrote|found) Brown corpus' out.txt) || fail "no summary line"
  train=$(sed -n 's/.*train\.bin (\([0-9]*\) tokens).*/\1/p' <<<"$line")
  val=$(sed -n 's/.*val\.bin (\([0-9]*\) tokens).*/\1/p' <<<"$line")
  grep -q 'tokenizer.model (vocab 8192)' <<<"$line" || fail "vocabulary is not 8192: $line"
  at_least "$train" 1200000 "train tokens"; at_least 1600000 "$train" "train tokens (upper bound)"
  at_least "$val" 50000 "val tokens"; at_least 110000 "$val" "val tokens (upper bound)"
  for f in train val; do  # llm.c's rule: the file is exactly 1024 + 2 * count bytes
    n=$([[ $f == train ]] && echo "$train" || echo "$val")
    [[ $(stat -c %s "$BROWN/$f.bin") -eq $((1024 + 2 * n)) ]] || fail "$f.bin size is not 1024 + 2 * $n"
  done
  [[ -s $BROWN/tokenizer.model ]] || fail "missing $BROWN/tokenizer.model"
  "$TITANAX" fetch brown --out "$BROWN" | grep -q '^found Brown corpus' || fail "a second fetch did not find the files" ;;

mlp_accuracy)  # the README's main job: 784-512-512-10 over 2 ranks, at least 95% on the held-out digits
  run 2 mnist_mlp.yaml | tee out.txt
  at_least "$(value 'test accuracy' <out.txt)" 0.95 "MLP test accuracy"
  grep -q '^700,eval/accuracy,' metrics.csv || fail "metrics.csv lacks the final eval/accuracy row" ;;

cnn_accuracy)  # two conv3x3+pool stages, 128 hidden: at least 97.5%
  run 2 mnist_cnn.yaml | tee out.txt
  at_least "$(value 'test accuracy' <out.txt)" 0.975 "CNN test accuracy" ;;

loss_parity)  # same seed and global batch on 1, 2 and 4 ranks (4 with the optimizer state sharded too): the same loss after 50 steps
  for np in 1 2 4; do
    run "$np" mnist_mlp.yaml --set train.steps=50 --set schedule.warmup_steps=10 | tee "np$np.txt"
  done
  run 4 mnist_mlp.yaml --set train.steps=50 --set schedule.warmup_steps=10 --set plan.dp.shard_optimizer=true | tee np4zero.txt
  "$TITANAX" describe --config "$SRC/examples/configs/mnist_mlp.yaml" --ranks 4 --set plan.dp.shard_optimizer=true | tee zero.txt
  grep -q 'optimizer state sharded over it (ZeRO-1)' zero.txt || fail "the plan does not say the optimizer state is sharded"
  # AdamW's two moments of the 669706 parameters
  grep -q "^optimizer state: 1339412 values (5.4 MB) for the whole model; each of the 4 ranks of axis 'data' keeps 1/4 of its share (ZeRO-1)$" zero.txt \
    || fail "no sharded optimizer-state line"
  l1=$(value 'final train loss' <np1.txt)
  for f in np2 np4 np4zero; do rel_close "$(value 'final train loss' <$f.txt)" "$l1" 1e-4 "loss after 50 steps, $f vs 1 rank"; done
  echo "losses: $l1 $(value 'final train loss' <np2.txt) $(value 'final train loss' <np4.txt) $(value 'final train loss' <np4zero.txt)" ;;

resume)  # 100 steps, checkpoint, stop; resume for 100 more == 200 straight steps, bitwise, on 2 ranks
  common=(--set train.steps=200 --set schedule.warmup_steps=20 --set model.dropout=0.1 --set train.eval_every=0)
  # The straight run writes a checkpoint every 50 steps in the background (checkpoint.async) as it trains.
  run 2 mnist_mlp.yaml "${common[@]}" --set checkpoint.dir="$WORK/straight" --set checkpoint.every=50 \
    --set checkpoint.async=true --set checkpoint.keep_last=4 | tee straight.txt
  run 2 mnist_mlp.yaml "${common[@]}" --set checkpoint.dir="$WORK/split" --set train.stop_at=100 | tee first.txt
  [[ -d split/step_00000100 ]] || fail "no checkpoint at step 100"
  for r in 00000 00001; do  # the background write holds step 100's state though training went on
    cmp "straight/step_00000100/rank_$r.safetensors" "split/step_00000100/rank_$r.safetensors" \
      || fail "rank $r: the asynchronous checkpoint of step 100 differs from the synchronous one"
  done
  run 2 mnist_mlp.yaml "${common[@]}" --set checkpoint.dir="$WORK/split" --set checkpoint.resume=true | tee second.txt
  for r in 00000 00001; do
    cmp "straight/step_00000200/rank_$r.safetensors" "split/step_00000200/rank_$r.safetensors" \
      || fail "rank $r state after a resumed run differs from the straight run"
  done
  [[ $(value 'final train loss' <straight.txt) == "$(value 'final train loss' <second.txt)" ]] || fail "final losses differ"
  [[ $(value 'test accuracy' <straight.txt) == "$(value 'test accuracy' <second.txt)" ]] || fail "accuracies differ"
  grep -q '^trained 100 steps' second.txt || fail "the resumed run does not count the 100 steps it ran"
  # Resuming a finished run trains nothing and says so, with the same evaluation (no made-up loss of 0).
  run 2 mnist_mlp.yaml "${common[@]}" --set checkpoint.dir="$WORK/split" --set checkpoint.resume=true | tee third.txt
  grep -q '^nothing to train: the checkpoint is at step 200 of 200' third.txt || fail "no 'nothing to train' line"
  grep -q '^final train loss' third.txt && fail "a loss printed for a run that trained nothing"
  [[ $(value 'test accuracy' <third.txt) == "$(value 'test accuracy' <straight.txt)" ]] || fail "accuracy after a no-op resume" ;;

jit_parity)  # train.jit: the compiled step follows the eager losses on real digits (MLP 50 steps, CNN 20, MLP on 2 ranks)
  run 1 mnist_mlp.yaml --set train.steps=50 --set schedule.warmup_steps=10 | tee mlp_eager.txt
  run 1 mnist_mlp.yaml --set train.steps=50 --set schedule.warmup_steps=10 --set train.jit=true | tee mlp_jit.txt
  rel_close "$(value 'final train loss' <mlp_jit.txt)" "$(value 'final train loss' <mlp_eager.txt)" 1e-5 "MLP loss, jit vs eager"
  run 1 mnist_cnn.yaml --set train.steps=20 --set schedule.warmup_steps=5 --set train.eval_every=0 | tee cnn_eager.txt
  run 1 mnist_cnn.yaml --set train.steps=20 --set schedule.warmup_steps=5 --set train.eval_every=0 --set train.jit=true | tee cnn_jit.txt
  rel_close "$(value 'final train loss' <cnn_jit.txt)" "$(value 'final train loss' <cnn_eager.txt)" 1e-5 "CNN loss, jit vs eager"
  echo "MLP: $(value 'final train loss' <mlp_eager.txt) eager, $(value 'final train loss' <mlp_jit.txt) jit;" \
       "CNN: $(value 'final train loss' <cnn_eager.txt) eager, $(value 'final train loss' <cnn_jit.txt) jit"
  "$TITANAX" describe --config "$SRC/examples/configs/mnist_mlp.yaml" --graph text | tee graph.txt
  grep -q '= adamw_update' graph.txt || fail "the step graph has no optimizer update"
  grep -Eq '^# training step of MLP.*: [0-9]+ nodes, 19 in-place updates$' graph.txt || fail "graph summary (3 x 6 parameters + step)"
  grep -q '= fused_matmul\[gemm=linear .*relu' graph.txt || fail "the graph a replay runs: linear + relu fused"
  grep -Eq "= state f32\[512, 784\] 'layers/0/weight'" graph.txt || fail "the graph names the parameters"
  grep -Eq '= fused_matmul.*   # layers/0$' graph.txt || fail "the graph gives a node's module path"
  grep -q '^# memory plan: arena ' graph.txt || fail "the graph's memory plan"
  "$TITANAX" describe --config "$SRC/examples/configs/mnist_mlp.yaml" --graph dot >graph.dot
  [[ $(head -1 graph.dot) == "digraph jit {" ]] || fail "dot output"
  # Data parallelism under jit: the gradient and loss averages are collectives in the graph.
  run 2 mnist_mlp.yaml --set train.steps=30 --set schedule.warmup_steps=5 --set train.eval_every=0 | tee dp_eager.txt
  run 2 mnist_mlp.yaml --set train.steps=30 --set schedule.warmup_steps=5 --set train.eval_every=0 --set train.jit=true | tee dp_jit.txt
  rel_close "$(value 'final train loss' <dp_jit.txt)" "$(value 'final train loss' <dp_eager.txt)" 1e-5 "MLP loss on 2 ranks, jit vs eager"
  echo "MLP on 2 ranks: $(value 'final train loss' <dp_eager.txt) eager, $(value 'final train loss' <dp_jit.txt) jit"
  # Dropout under jit: the masks follow the step counter at every replay, as eager's
  drop=(--set train.steps=50 --set schedule.warmup_steps=10 --set train.eval_every=0 --set model.dropout=0.1)
  run 1 mnist_mlp.yaml "${drop[@]}" | tee drop_eager.txt
  run 1 mnist_mlp.yaml "${drop[@]}" --set train.jit=true | tee drop_jit.txt
  rel_close "$(value 'final train loss' <drop_jit.txt)" "$(value 'final train loss' <drop_eager.txt)" 1e-5 "MLP with dropout, jit vs eager" ;;

precision)  # train.precision: bf16 and fp16 (dynamic loss scaling) autocast reach the MLP's f32 accuracy bar; fp16 under jit
  for prec in bf16 fp16; do
    run 2 mnist_mlp.yaml --set train.precision=$prec | tee $prec.txt
    at_least "$(value 'test accuracy' <$prec.txt)" 0.95 "MLP test accuracy under $prec"
  done
  echo "test accuracy: $(value 'test accuracy' <bf16.txt) bf16, $(value 'test accuracy' <fp16.txt) fp16"
  # fp16 under jit: the loss scaler's decisions are ops of the compiled step; the same losses as eager
  short=(--set train.steps=50 --set schedule.warmup_steps=10 --set train.eval_every=0 --set train.precision=fp16)
  run 1 mnist_mlp.yaml "${short[@]}" | tee fp16_eager.txt
  run 1 mnist_mlp.yaml "${short[@]}" --set train.jit=true | tee fp16_jit.txt
  rel_close "$(value 'final train loss' <fp16_jit.txt)" "$(value 'final train loss' <fp16_eager.txt)" 1e-5 "fp16 loss, jit vs eager"
  expect_error "ConfigError.*train.precision" run 1 mnist_mlp.yaml --set train.precision=f8 ;;

gpt_jit_parity)  # train.jit on the GPT config and real Brown tokens: the same loss as eager after 10 steps (TP too); bf16 close to f32
  gpt() { run 1 gpt_small_tp.yaml --set "data.path=$BROWN" --set train.steps=10 --set schedule.warmup_steps=3 \
            --set train.eval_every=0 --set data.val_batches=2 "$@"; }
  gpt | tee eager.txt
  gpt --set train.jit=true | tee jit.txt
  rel_close "$(value 'final train loss' <jit.txt)" "$(value 'final train loss' <eager.txt)" 1e-5 "GPT loss, jit vs eager"
  echo "GPT: $(value 'final train loss' <eager.txt) eager, $(value 'final train loss' <jit.txt) jit"
  # bf16 autocast (attention and MLP GEMMs in bf16, softmax / layer-norm / cross-entropy in f32) tracks f32
  gpt --set train.precision=bf16 | tee bf16.txt
  rel_close "$(value 'final train loss' <bf16.txt)" "$(value 'final train loss' <eager.txt)" 1e-3 "GPT loss, bf16 vs f32"
  # Tensor parallelism under jit (TP 2, and DP x TP 2 x 2): the collectives, the vocabulary shard and the
  # TP-aware gradient norm are nodes of the graph
  for np in 2 4; do
    run $np gpt_small_tp.yaml --set "data.path=$BROWN" --set train.steps=10 --set schedule.warmup_steps=3 \
      --set train.eval_every=0 --set data.val_batches=2 --set mesh.model=2 | tee tp_eager_$np.txt
    run $np gpt_small_tp.yaml --set "data.path=$BROWN" --set train.steps=10 --set schedule.warmup_steps=3 \
      --set train.eval_every=0 --set data.val_batches=2 --set mesh.model=2 --set train.jit=true | tee tp_jit_$np.txt
    rel_close "$(value 'final train loss' <tp_jit_$np.txt)" "$(value 'final train loss' <tp_eager_$np.txt)" 1e-5 \
      "GPT TP 2 on $np ranks, jit vs eager"
  done
  expect_error 'data- and tensor-parallel plans only' run 2 gpt_small_pp.yaml --set "data.path=$BROWN" --set train.steps=2 \
    --set schedule.warmup_steps=1 --set train.jit=true
  expect_error 'mixed precision runs data-parallel plans only' run 2 gpt_small_tp.yaml --set "data.path=$BROWN" \
    --set train.steps=2 --set schedule.warmup_steps=1 --set mesh.model=2 --set train.precision=bf16 ;;

describe)  # no training; the parameter count of 784-512-512-10 is 784*512+512 + 512*512+512 + 512*10+10
  "$TITANAX" describe --config "$SRC/examples/configs/mnist_mlp.yaml" --ranks 4 | tee out.txt
  grep -q '^parameters: 669706 (the whole model)$' out.txt || fail "parameter count"
  grep -q 'mesh over 4 rank(s): {data: 4}' out.txt || fail "mesh line"
  # GPT-2 124M with its vocabulary padded to 50304, described without its weights file: 50304 x 768 (wte)
  # + 1024 x 768 (wpe) + 12 x 7087872 (a block: 2 x 1536 + 768 x 2304 + 2304 + 768 x 768 + 768 + 768 x 3072
  # + 3072 + 3072 x 768 + 768) + 1536 (lnf)
  "$TITANAX" describe --config "$SRC/examples/configs/gpt2_finetune.yaml" --ranks 4 --set mesh.model=2 | tee gpt2.txt
  grep -q '^parameters: 124475904 (the whole model)$' gpt2.txt || fail "GPT-2 124M parameter count"
  grep -q '^weights: GPT-2 weights .*gpt2/model.safetensors (model.init_from)$' gpt2.txt || fail "no weights line"
  # 8 sequences over 2 data ranks: 4 x 1024 tokens per rank; 50304 / 2 vocabulary rows per TP rank
  grep -q '^loss head: logits of 4096 tokens x 25152 vocabulary entries per microbatch and rank, 412.1 MB in f32 and as much for their gradient; at most 1024 tokens at a time: 103.0 MB (model.loss_chunk_tokens)$' gpt2.txt \
    || fail "no loss-head line"
  "$TITANAX" describe --schema >schema.txt
  grep -q '^optimizer\.lr ' schema.txt || fail "schema lacks optimizer.lr"
  # docs/config.md holds the same table between its first pair of ``` fences
  awk '/^```/ { n++; next } n == 1' "$SRC/docs/config.md" | diff - schema.txt || fail "docs/config.md is not the schema" ;;

error_truncated_idx)
  mkdir bad && cp "$DATA"/* bad/ && gunzip -f bad/*.gz 2>/dev/null || true
  truncate -s 100000 bad/train-images-idx3-ubyte
  expect_error 'DataError.*(truncated|short|size)' run 2 mnist_mlp.yaml --set "data.path=$WORK/bad" ;;

error_malformed_idx)
  mkdir bad && cp "$DATA"/* bad/ && gunzip -f bad/*.gz 2>/dev/null || true
  printf '\x00\x00\x07\x01garbage' >bad/t10k-labels-idx1-ubyte
  expect_error 'DataError.*t10k-labels' run 1 mnist_mlp.yaml --set "data.path=$WORK/bad" ;;

error_unknown_key)
  sed 's/^optimizer:/optimzer:/' "$SRC/examples/configs/mnist_mlp.yaml" >typo.yaml
  expect_error "ConfigError: unknown config key 'optimzer\.name' \(typo\.yaml:[0-9]+" mpi 2 "$TITANAX" run --config typo.yaml
  grep -q "fix: *did you mean 'optimizer.name'?" out.txt || fail "no suggestion of the nearest key" ;;

error_range)  # a number outside its key's range stops the run before any step, on every rank alike (an
              # evaluation batch of 0 used to hang the final evaluation, a huge thread count to abort in OpenMP)
  expect_error "ConfigError: value '0' is out of range for data.eval_batch_size \(--set data.eval_batch_size=0\)" \
    run 2 mnist_mlp.yaml --set data.eval_batch_size=0
  grep -q "fix: *set data.eval_batch_size to a value >= 1" out.txt || fail "no fix in the message"
  expect_error "ConfigError: value '-7' is out of range for train.steps" run 2 mnist_mlp.yaml --set train.steps=-7
  expect_error "ConfigError: value '99999999999' is out of range for runtime.threads" \
    run 1 mnist_mlp.yaml --set runtime.threads=99999999999
  expect_error "ConfigError: value 'nan' is out of range for optimizer.grad_clip" run 1 mnist_mlp.yaml --set optimizer.grad_clip=nan
  expect_error "ConfigError: value '-0.5' is out of range for model.dropout" run 1 mnist_mlp.yaml --set model.dropout=-0.5 ;;

error_mesh_ranks)
  expect_error 'MeshError: mesh \{data: 3\} does not divide 2 ranks' run 2 mnist_mlp.yaml --set mesh.data=3
  # A batch of 128 over 3 ranks: describe finds what the run would, and the run stops on every rank alike.
  expect_error "ConfigError: data.batch_size does not split evenly over the 3 data-parallel ranks" \
    "$TITANAX" describe --config "$SRC/examples/configs/mnist_mlp.yaml" --ranks 3
  expect_error "ConfigError: data.batch_size does not split evenly over the 3 data-parallel ranks" run 3 mnist_mlp.yaml
  [[ $(grep -c "ConfigError" out.txt) == 1 ]] || fail "the error was not reported once (by rank 0)"
  expect_error "ConfigError: each rank's batch of 64 does not split into plan.dp.accumulate_steps = 3" \
    run 2 mnist_mlp.yaml --set plan.dp.accumulate_steps=3
  # An axis no plan uses (mesh.model=2 on an MLP, which has no tensor parallelism) would only repeat work.
  expect_error "ConfigError: mesh axis 'model' has 2 ranks but no plan uses it" run 2 mnist_mlp.yaml --set mesh.model=2
  expect_error "ConfigError: mesh.data is too large" run 2 mnist_mlp.yaml --set mesh.data=99999999999 ;;

error_axis)
  expect_error "PlanError: DP axis 'dta' is not in the mesh; did you mean 'data'" run 2 mnist_mlp.yaml --set plan.dp.axis=dta ;;

error_device)  # runtime.device naming a GPU this machine (or build) does not have, and a malformed device
  expect_error "DeviceError: device 'cuda:64' (requested but no CUDA device is visible|does not exist)" \
    run 2 mnist_mlp.yaml --set runtime.device=cuda:64
  expect_error "DeviceError" run 1 mnist_mlp.yaml --set runtime.device=gpu0
  # The default (auto: the CPU in a build without CUDA, else the GPU) trains, and the log names the device.
  run 1 mnist_mlp.yaml --set train.steps=2 --set schedule.name=constant --set logging.level=info | tee out.txt
  grep -Eq "parameters on this rank \((cpu:0|cuda:0)\)" out.txt || fail "the run log does not name the model's device" ;;

error_nan)  # a diverging run: the loss check points to anomaly detection, which names the op that made the
           # NaN, its module and its weight, on every rank, in eager steps and in jit-compiled ones
  args=(--set optimizer.name=sgd --set optimizer.lr=1e30 --set train.steps=5 --set schedule.name=constant)
  expect_error "ValueError: the training loss is not finite at step" run 2 mnist_mlp.yaml "${args[@]}"
  grep -q "debug.nans: true" out.txt || fail "the loss error does not point to anomaly detection"
  expect_error "FloatingPointError: op 'linear' produced nan in output 0 in 'layers/1'" \
    run 2 mnist_mlp.yaml "${args[@]}" --set debug.nans=true
  grep -q "input 1 'layers/1/weight' f32\[512, 512\]: finite" out.txt || fail "the report does not name the weight"
  TITANAX_DEBUG_INFS=1 expect_error \
    "FloatingPointError: op 'linear' produced inf in output 0 in 'layers/1', at node [0-9]+ of a jit graph" \
    run 2 mnist_mlp.yaml "${args[@]}" --set train.jit=true ;;

error_checksum)
  args=(--set train.steps=20 --set schedule.warmup_steps=5 --set "checkpoint.dir=$WORK/ck")
  run 2 mnist_mlp.yaml "${args[@]}" --set train.stop_at=10
  # DP state is replicated, so rank 0's shard holds it all (rank 1's holds no tensors) and both ranks read it.
  f=ck/step_00000010/rank_00000.safetensors
  size=$(stat -c %s "$f")
  printf '\xff\xff\xff\xff' | dd of="$f" bs=1 seek=$((size - 1000)) conv=notrunc status=none  # flip tensor bytes
  expect_error "CheckpointError: checksum mismatch in checkpoint shard '.*rank_00000.safetensors'" \
    run 2 mnist_mlp.yaml "${args[@]}" --set checkpoint.resume=true ;;

example)  # the library-API example of the README
  mpi 2 "$EXAMPLE" "$DATA" | tee out.txt
  at_least "$(value 'test accuracy' <out.txt)" 0.95 "example test accuracy" ;;

gpt_tp_parity)  # the GPT config on real Brown tokens: TP 1, 2, 4 and DP x TP 2 x 2 (also with ZeRO-1 and a chunked loss head) give the same loss after 20 steps
  gpt() { local np=$1; shift; run "$np" gpt_small_tp.yaml --set "data.path=$BROWN" --set train.steps=20 \
            --set schedule.warmup_steps=5 --set train.eval_every=0 --set data.val_batches=2 "$@"; }
  gpt 1 | tee tp1.txt
  gpt 2 --set mesh.model=2 | tee tp2.txt
  gpt 4 --set mesh.model=4 | tee tp4.txt
  gpt 4 --set mesh.model=2 | tee dp2tp2.txt
  # ZeRO-1 and a chunked loss head change where values live, not the loss
  gpt 4 --set mesh.model=2 --set plan.dp.shard_optimizer=true --set model.loss_chunk_tokens=1000 | tee dp2tp2_zero_chunked.txt
  l1=$(value 'final train loss' <tp1.txt)
  for f in tp2 tp4 dp2tp2 dp2tp2_zero_chunked; do rel_close "$(value 'final train loss' <$f.txt)" "$l1" 1e-4 "GPT loss after 20 steps, $f vs TP 1"; done
  echo "losses: $l1 $(value 'final train loss' <tp2.txt) $(value 'final train loss' <tp4.txt) $(value 'final train loss' <dp2tp2.txt)" \
    "$(value 'final train loss' <dp2tp2_zero_chunked.txt)" ;;

gpt_pp_parity)  # pipeline stages on real Brown tokens: PP 2 and 4, GPipe with recomputation, and DP x TP x PP
  # 2 x 2 x 2 on 8 ranks give the loss of one stage after 20 steps; describe prints the 1F1B schedule
  gpt() { local np=$1; shift; run "$np" gpt_small_pp.yaml --set "data.path=$BROWN" --set train.steps=20 \
            --set schedule.warmup_steps=5 --set train.eval_every=0 --set data.val_batches=2 "$@"; }
  gpt 1 --set mesh.pipe=1 --set "checkpoint.dir=$WORK/ck1" | tee pp1.txt
  gpt 2 --set "checkpoint.dir=$WORK/ck2" | tee pp2.txt
  gpt 4 --set mesh.pipe=4 | tee pp4.txt
  gpt 2 --set 'plan.pp.boundaries=[3]' | tee pp2uneven.txt
  gpt 2 --set plan.pp.schedule=gpipe --set plan.pp.microbatches=8 --set plan.pp.recompute=full | tee gpipe.txt
  gpt 8 --set mesh.data=2 --set mesh.model=2 --set plan.pp.microbatches=2 | tee dp2pp2tp2.txt
  gpt 1 --set mesh.pipe=1 --set plan.pp.microbatches=8 | tee pp1m8.txt
  gpt 1 --set mesh.pipe=1 --set plan.pp.microbatches=2 | tee pp1m2.txt
  l1=$(value 'final train loss' <pp1.txt)
  for f in pp2 pp4 pp2uneven; do rel_close "$(value 'final train loss' <$f.txt)" "$l1" 1e-4 "GPT loss after 20 steps, $f vs PP 1"; done
  rel_close "$(value 'final train loss' <gpipe.txt)" "$(value 'final train loss' <pp1m8.txt)" 1e-4 "GPipe M=8 + recompute vs PP 1"
  rel_close "$(value 'final train loss' <dp2pp2tp2.txt)" "$(value 'final train loss' <pp1m2.txt)" 1e-4 "DP x TP x PP 2 x 2 x 2 vs PP 1"
  rel_close "$(value 'val loss' <pp4.txt)" "$(value 'val loss' <pp1.txt)" 1e-4 "val loss, PP 4 vs PP 1"
  "$TITANAX" describe --config "$SRC/examples/configs/gpt_small_pp.yaml" --ranks 4 --set mesh.pipe=4 | tee describe.txt
  grep -q "pipeline parallel: axis 'pipe', 4 microbatches, schedule 1f1b" describe.txt || fail "describe: plan line"
  grep -Eq '^stage 0 +F0 +F1 +F2 +F3 +\. +\. +\. +B0 +\. +B1 +\. +B2 +\. +B3$' describe.txt || fail "describe: stage 0's 1F1B row"
  grep -Eq '^stage 3 +\. +\. +\. +F0 +B0 +F1 +B1 +F2 +B2 +F3 +B3 +\. +\. +\.$' describe.txt || fail "describe: stage 3's row"
  # Sampling joins the stages (the checkpoint of 2 stages loads into the whole model): the same greedy
  # text as from the one-stage run's checkpoint.
  smp() { "$TITANAX" sample --config "$SRC/examples/configs/gpt_small_pp.yaml" --set "data.path=$BROWN" \
            --set logging.level=warn --set "checkpoint.dir=$1" --prompt "The jury said" -n 12 -t 0; }
  smp "$WORK/ck1" | tee s1.txt
  smp "$WORK/ck2" | tee s2.txt
  [[ $(wc -w <s2.txt) -gt 4 ]] || fail "no text sampled"
  cmp s1.txt s2.txt || fail "greedy samples from the 1-stage and 2-stage checkpoints differ"
  expect_error "PlanError: 1F1B needs at least as many microbatches as stages" \
    gpt 4 --set mesh.pipe=4 --set plan.pp.microbatches=2
  expect_error "PlanError: GPT: layers \(4\) do not divide into the 3 pipeline stages" gpt 3 --set mesh.pipe=3 \
    --set plan.pp.microbatches=3
  echo "losses: PP1 $l1, PP2 $(value 'final train loss' <pp2.txt), PP4 $(value 'final train loss' <pp4.txt)," \
       "GPipe+recompute M8 $(value 'final train loss' <gpipe.txt) vs $(value 'final train loss' <pp1m8.txt)," \
       "DPxTPxPP $(value 'final train loss' <dp2pp2tp2.txt) vs $(value 'final train loss' <pp1m2.txt)" ;;

gpt_reshard)  # checkpoints move TP 2 -> TP 4 -> PP x TP 2 x 2 -> TP 1 mid-run and training continues as if they had not
  common=(--set "data.path=$BROWN" --set train.steps=40 --set schedule.warmup_steps=5 --set train.eval_every=0
          --set data.val_batches=2 --set checkpoint.keep_last=5)
  gpt() { local np=$1; shift; run "$np" gpt_small_tp.yaml "${common[@]}" "$@"; }
  gpt 1 --set "checkpoint.dir=$WORK/straight" | tee straight.txt
  gpt 2 --set mesh.model=2 --set "checkpoint.dir=$WORK/moved" --set train.stop_at=10 | tee a.txt
  gpt 4 --set mesh.model=4 --set "checkpoint.dir=$WORK/moved" --set checkpoint.resume=true --set train.stop_at=20 | tee b.txt
  # Pipeline stages under TP: no rank holds every tensor, and rank 0 writes the checkpoint's metadata.
  run 4 gpt_small_pp.yaml "${common[@]}" --set mesh.model=2 --set "checkpoint.dir=$WORK/moved" --set checkpoint.resume=true \
    --set train.stop_at=30 | tee c.txt
  gpt 1 --set "checkpoint.dir=$WORK/moved" --set checkpoint.resume=true | tee d.txt
  grep -q '^resumed from checkpoint step 10$' b.txt || fail "the TP 4 run did not resume from step 10"
  grep -q '^resumed from checkpoint step 20$' c.txt || fail "the PP x TP run did not resume from step 20"
  grep -q '^resumed from checkpoint step 30$' d.txt || fail "the TP 1 run did not resume from step 30"
  rel_close "$(value 'final train loss' <d.txt)" "$(value 'final train loss' <straight.txt)" 1e-5 \
    "loss after 40 steps with TP 2 -> 4 -> PP x TP -> 1 checkpoints vs a straight TP 1 run"
  rel_close "$(value 'val loss' <d.txt)" "$(value 'val loss' <straight.txt)" 1e-5 "val loss after the round trip"
  # A checkpoint of another model, and a truncated shard, are CheckpointErrors naming the file and the check.
  expect_error "CheckpointError: .*(shape|global).*" gpt 1 --set "checkpoint.dir=$WORK/moved" --set checkpoint.resume=true \
    --set model.dim=128 --set train.steps=50
  grep -q 'step_00000040' out.txt || fail "the error does not name the checkpoint"
  f=moved/step_00000040/rank_00000.safetensors
  truncate -s $(( $(stat -c %s "$f") / 2 )) "$f"
  expect_error "CheckpointError: .*rank_00000\.safetensors.*(truncated|size)" gpt 1 --set "checkpoint.dir=$WORK/moved" \
    --set checkpoint.resume=true --set train.steps=50 ;;

error_memory)  # a batch no machine can hold (the token stream takes any batch size): a message saying so and
               # what to lower, a non-zero exit, no crash
  expect_error "titanax: out of host memory \(std::bad_alloc\)" run 1 gpt_small_tp.yaml --set "data.path=$BROWN" \
    --set mesh.model=1 --set train.steps=2 --set schedule.warmup_steps=0 --set data.batch_size=99999999999
  grep -q "fix: lower data.batch_size" out.txt || fail "no fix in the message" ;;

error_token_ids)  # token ids the model's vocabulary cannot embed: stopped before any step, on every rank alike
  expect_error "ConfigError: .*/train\.bin holds token id [0-9]+, outside model\.vocab 100" run 2 gpt_small_tp.yaml \
    --set "data.path=$BROWN" --set data.dataset=tokens --set mesh.model=1 --set model.vocab=100
  grep -q "fix: *set model.vocab to at least" out.txt || fail "no fix in the message"
  [[ $(grep -c "ConfigError" out.txt) == 1 ]] || fail "the error was not reported once (by rank 0)" ;;

export_onnx)  # train the CNN a few steps, export its checkpoint as ONNX, check and run the model in numpy
  run 1 mnist_cnn.yaml --set train.steps=5 --set schedule.warmup_steps=1 --set train.eval_every=0 --set "checkpoint.dir=$WORK/ck" \
    | tee run.txt
  # titanax eval of the checkpoint: the run's own final test accuracy
  "$TITANAX" eval --config "$SRC/examples/configs/mnist_cnn.yaml" --set "data.path=$DATA" --set logging.level=warn \
    --set "checkpoint.dir=$WORK/ck" | tee eval.txt
  [[ "$(value 'test accuracy' <eval.txt)" == "$(value 'test accuracy' <run.txt)" ]] || fail "eval's accuracy differs from the run's"
  e=(export --config "$SRC/examples/configs/mnist_cnn.yaml" --set "data.path=$DATA" --set logging.level=warn)
  "$TITANAX" "${e[@]}" --set "checkpoint.dir=$WORK/ck" --out cnn.onnx --batch 4 | tee out.txt
  grep -q '^wrote cnn.onnx: ONNX opset 17, images f32\[4, 1, 28, 28\] -> logits, CNN weights of checkpoint step 5' out.txt \
    || fail "no summary line"
  "$TITANAX" "${e[@]}" --set "checkpoint.dir=$WORK/ck" --out any.onnx --dynamic-batch | tee out.txt
  grep -q '^wrote any.onnx: ONNX opset 17, images f32\[batch, 1, 28, 28\]' out.txt || fail "no dynamic-batch summary line"
  for b in 4 3; do  # the static model at its batch, the dynamic one at another
    m=$([[ $b == 4 ]] && echo cnn.onnx || echo any.onnx)
    /usr/bin/python3 -c "import numpy as np; np.save('x.npy', np.random.default_rng(0).random(($b, 1, 28, 28), dtype=np.float32))"
    /usr/bin/python3 "$SRC/tests/onnx/onnx_reference.py" "$m" out x.npy || fail "the numpy reference rejected $m"
    /usr/bin/python3 -c "import numpy as np; y = np.load('out/output0.npy'); assert y.shape == ($b, 10) and np.isfinite(y).all(), y" \
      || fail "the logits of $m are not [$b, 10] and finite"
  done
  expect_error 'ConfigError: titanax export needs a checkpoint' "$TITANAX" "${e[@]}" --set checkpoint.dir= --out none.onnx
  [[ ! -e none.onnx ]] || fail "a failed export left a file" ;;

npy_parity)  # MNIST written as .npy arrays (normalised as the IDX loader does) trains exactly as the IDX files
  /usr/bin/python3 - "$DATA" npy <<'PY'
import gzip, os, sys
import numpy as np
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
def idx(name):
    p = os.path.join(src, name)
    raw = gzip.open(p + ".gz").read() if not os.path.exists(p) else open(p, "rb").read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)
for split, prefix in (("train", "train"), ("test", "t10k")):
    x = idx(prefix + "-images-idx3-ubyte").astype(np.float32)
    x = (x / np.float32(255) - np.float32(0.1307)) / np.float32(0.3081)  # float32 throughout, as io/mnist.cpp
    np.save(os.path.join(dst, split + "_x.npy"), x.reshape(len(x), 1, 28, 28))
    np.save(os.path.join(dst, split + "_y.npy"), idx(prefix + "-labels-idx1-ubyte").astype(np.int64))
PY
  args=(--set train.steps=30 --set schedule.warmup_steps=5 --set train.eval_every=0)
  run 1 mnist_mlp.yaml "${args[@]}" | tee idx.txt
  run 1 mnist_mlp.yaml "${args[@]}" --set data.dataset=npy --set "data.path=$WORK/npy" | tee npy.txt
  [[ -n $(value 'final train loss' <idx.txt) ]] || fail "no final train loss"
  [[ $(value 'final train loss' <idx.txt) == $(value 'final train loss' <npy.txt) ]] || fail "the .npy run's loss differs"
  [[ $(value 'test accuracy' <idx.txt) == $(value 'test accuracy' <npy.txt) ]] || fail "the .npy run's accuracy differs"
  /usr/bin/python3 -c 'import numpy as np; np.save("npy/test_y.npy", np.load("npy/test_y.npy") + 10)'
  expect_error 'ConfigError: .*holds class id 1[0-9], outside the model.s 10 classes' \
    run 1 mnist_mlp.yaml "${args[@]}" --set data.dataset=npy --set "data.path=$WORK/npy" ;;

gpt_sample)  # train a few steps, then continue a prompt with the checkpoint (TP 2 checkpoint, TP 1 and 2 sampling)
  run 2 gpt_small_tp.yaml --set "data.path=$BROWN" --set mesh.model=2 --set train.steps=10 --set schedule.warmup_steps=2 \
    --set train.eval_every=0 --set data.val_batches=1 --set "checkpoint.dir=$WORK/ck"
  s=(sample --config "$SRC/examples/configs/gpt_small_tp.yaml" --set "data.path=$BROWN" --set "checkpoint.dir=$WORK/ck"
     --set logging.level=warn --prompt "The jury said" -n 12 --seed 3)
  "$TITANAX" "${s[@]}" | tee one.txt
  mpi 2 "$TITANAX" "${s[@]}" --set mesh.model=2 | tee two.txt
  grep -q '^The jury said' one.txt || fail "the sample does not start with the prompt"
  cmp one.txt two.txt || fail "TP 2 sampling differs from TP 1 sampling with the same seed"
  [[ $(tail -1 one.txt | wc -w) -gt 3 ]] || fail "no text generated" ;;

gpt_pretrained)  # a GPT trained with TP 2, written as a Hugging Face GPT-2 (5289472 parameters: 8192 x 256 + 128 x 256
  # + 4 x 789760 per block + 512), evaluates and starts a run (TP 1) with its validation loss
  g=(--set "data.path=$BROWN" --set train.eval_every=0 --set data.val_batches=2)
  run 2 gpt_small_tp.yaml "${g[@]}" --set mesh.model=2 --set train.steps=10 --set schedule.warmup_steps=2 \
    --set "checkpoint.dir=$WORK/ck" | tee a.txt
  e=(export --config "$SRC/examples/configs/gpt_small_tp.yaml" --set "data.path=$BROWN" --set logging.level=warn
     --set "checkpoint.dir=$WORK/ck" --format hf)
  mpi 2 "$TITANAX" "${e[@]}" --set mesh.model=2 --out hf | tee out.txt
  grep -q '^wrote hf/model.safetensors and config.json: a Hugging Face GPT2LMHeadModel with 5289472 parameters, the weights of checkpoint step 10' out.txt \
    || fail "no summary line"
  /usr/bin/python3 -c "import json; c = json.load(open('hf/config.json')); assert (c['n_layer'], c['n_head'], c['n_embd'], c['vocab_size'], c['n_positions']) == (4, 4, 256, 8192, 128), c" \
    || fail "config.json does not describe the model"
  # titanax eval of the exported weights (TP 1) and of the TP 2 checkpoint resharded to TP 1: the trained model's loss.
  v=(eval --config "$SRC/examples/configs/gpt_small_tp.yaml" "${g[@]}" --set logging.level=warn)
  "$TITANAX" "${v[@]}" --set checkpoint.dir= --set model.init_from=hf/model.safetensors | tee b.txt
  grep -q '^\[GPT-2 weights hf/model.safetensors\]$' b.txt || fail "eval does not name the weights"
  rel_close "$(value 'val loss' <b.txt)" "$(value 'val loss' <a.txt)" 1e-5 "val loss of the loaded GPT-2 vs the trained model"
  # A checkpoint.dir with no checkpoint yet (before fine-tuning): model.init_from's weights.
  "$TITANAX" "${v[@]}" --set "checkpoint.dir=$WORK/none" --set model.init_from=hf/model.safetensors | tee e.txt
  grep -q '^\[GPT-2 weights hf/model.safetensors\]$' e.txt || fail "eval without a checkpoint does not use model.init_from"
  "$TITANAX" "${v[@]}" --set "checkpoint.dir=$WORK/ck" | tee c.txt
  grep -q '^\[checkpoint step 10\]$' c.txt || fail "eval does not name the checkpoint"
  rel_close "$(value 'val loss' <c.txt)" "$(value 'val loss' <a.txt)" 1e-5 "eval of the TP 2 checkpoint at TP 1"
  # And a run started from the GPT-2 weights: lr 0 makes its one step change nothing.
  run 1 gpt_small_tp.yaml "${g[@]}" --set train.steps=1 --set schedule.name=constant --set optimizer.lr=0 \
    --set model.init_from=hf/model.safetensors | tee d.txt
  rel_close "$(value 'val loss' <d.txt)" "$(value 'val loss' <a.txt)" 1e-5 "a run from the GPT-2 weights"
  expect_error "ValueError: GPT-2 weights 'hf/model.safetensors': the file's number of blocks is 4, the model's 2" \
    run 1 gpt_small_tp.yaml "${g[@]}" --set train.steps=1 --set schedule.name=constant --set model.layers=2 \
    --set model.init_from=hf/model.safetensors
  expect_error "ConfigError: model.init_from loads GPT-2 weights, but model.kind is mlp" \
    run 1 mnist_mlp.yaml --set train.steps=1 --set model.init_from=hf/model.safetensors
  expect_error "titanax export: --batch and --dynamic-batch are options of --format onnx" "$TITANAX" "${e[@]}" --out hf2 --batch 2
  expect_error "ConfigError: titanax export --format hf writes a GPT-2" \
    "$TITANAX" export --config "$SRC/examples/configs/mnist_mlp.yaml" --format hf --out hf3 ;;

gpt_lora)  # LoRA fine-tuning from a GPT-2 file at TP 2 (only the adapters train), its checkpoint evaluated at
  # TP 1 (the adapters resharded) and exported merged into a plain GPT-2, which computes the same loss
  g=(--set "data.path=$BROWN" --set train.eval_every=0 --set data.val_batches=2)
  run 1 gpt_small_tp.yaml "${g[@]}" --set train.steps=10 --set schedule.name=constant --set optimizer.lr=1e-2 \
    --set "checkpoint.dir=$WORK/base_ck" | tee base.txt
  x=(--config "$SRC/examples/configs/gpt_small_tp.yaml" "${g[@]}" --set logging.level=warn)
  "$TITANAX" export "${x[@]}" --set "checkpoint.dir=$WORK/base_ck" --format hf --out base
  l=(--set model.init_from=base/model.safetensors --set model.lora_rank=8 --set model.lora_alpha=16
     --set "model.lora_targets=[attn/qkv, mlp/out]")
  # The whole model's count: gpt_pretrained's 5289472 and 4 blocks x (qkv: 8 x 256 + 768 x 8, out: 8 x 1024 +
  # 256 x 8) = 73728 adapter parameters.
  "$TITANAX" describe "${x[@]}" "${l[@]}" | tee d.txt
  grep -q '^parameters: 5363200 (the whole model), 73728 trainable$' d.txt || fail "describe does not count the adapters"
  run 2 gpt_small_tp.yaml "${g[@]}" "${l[@]}" --set mesh.model=2 --set train.steps=10 --set schedule.name=constant \
    --set optimizer.lr=1e-2 --set "checkpoint.dir=$WORK/lora_ck" | tee a.txt
  a=$(value 'val loss' <a.txt)
  # Fresh adapters (lora_b = 0, here kept by lr 0) compute the base model; the trained ones do not.
  run 2 gpt_small_tp.yaml "${g[@]}" "${l[@]}" --set mesh.model=2 --set train.steps=1 --set schedule.name=constant \
    --set optimizer.lr=0 | tee z.txt
  rel_close "$(value 'val loss' <z.txt)" "$(value 'val loss' <base.txt)" 1e-5 "fresh adapters vs the base model"
  /usr/bin/python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); assert a < b - 0.01, (a, b)" "$a" \
    "$(value 'val loss' <base.txt)" || fail "training the adapters did not lower the validation loss"
  # The adapters' checkpoint at TP 1, and exported merged (a plain GPT-2: no adapters in the file) at TP 1.
  "$TITANAX" eval "${x[@]}" "${l[@]}" --set "checkpoint.dir=$WORK/lora_ck" | tee c.txt
  rel_close "$(value 'val loss' <c.txt)" "$a" 1e-5 "eval of the TP 2 LoRA checkpoint at TP 1"
  mpi 2 "$TITANAX" export "${x[@]}" "${l[@]}" --set mesh.model=2 --set "checkpoint.dir=$WORK/lora_ck" --format hf --out merged
  /usr/bin/python3 -c "import json; h = json.loads(open('merged/model.safetensors', 'rb').read()[8:][:int.from_bytes(open('merged/model.safetensors', 'rb').read(8), 'little')]); assert not [k for k in h if 'lora' in k], h.keys()" \
    || fail "the merged export holds adapters"
  "$TITANAX" eval "${x[@]}" --set checkpoint.dir= --set model.init_from=merged/model.safetensors | tee m.txt
  rel_close "$(value 'val loss' <m.txt)" "$a" 1e-5 "eval of the merged export"
  # The adapters alone for PEFT: merged by tests/gpt2's reference into the base file, the merged export's weights.
  mpi 2 "$TITANAX" export "${x[@]}" "${l[@]}" --set mesh.model=2 --set "checkpoint.dir=$WORK/lora_ck" --format peft \
    --out adapter | tee p.txt
  grep -q '^wrote adapter/adapter_model.safetensors and adapter_config.json: PEFT LoRA adapters of rank 8 on attn/qkv, mlp/out' p.txt \
    || fail "no peft summary line"
  /usr/bin/python3 - "$SRC/tests/gpt2" <<'PY' || fail "the PEFT adapter merged into the base is not the merged export"
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import gpt2_reference as ref
w, _ = ref.read_safetensors("base/model.safetensors")
problems = ref.apply_peft_adapter(w, "adapter", 4)
merged, _ = ref.read_safetensors("merged/model.safetensors")
assert not problems, problems
assert sorted(w) == sorted(merged), (sorted(w), sorted(merged))
for k in w:
    err = np.abs(w[k] - merged[k]).max() / max(1.0, np.abs(merged[k]).max())
    assert err < 1e-6, (k, err)
PY
  # And read back (model.lora_from) onto the base file at TP 2: the trained model's loss.
  mpi 2 "$TITANAX" eval "${x[@]}" "${l[@]}" --set mesh.model=2 --set checkpoint.dir= --set model.lora_from=adapter | tee r.txt
  grep -q '^\[GPT-2 weights base/model.safetensors with PEFT adapter adapter\]$' r.txt || fail "eval does not name the adapter"
  rel_close "$(value 'val loss' <r.txt)" "$a" 1e-5 "eval of the base with the PEFT adapter read back"
  expect_error "ValueError: PEFT adapter 'adapter' has rank r 8, the model 4" \
    "$TITANAX" eval "${x[@]}" "${l[@]}" --set model.lora_rank=4 --set checkpoint.dir= --set model.lora_from=adapter
  expect_error "ConfigError: titanax export --format peft writes LoRA adapters, but model.lora_rank is 0" \
    "$TITANAX" export "${x[@]}" --set "checkpoint.dir=$WORK/base_ck" --format peft --out none
  # The base weights did not move: the base file's loss is the base run's.
  "$TITANAX" eval "${x[@]}" --set checkpoint.dir= --set model.init_from=base/model.safetensors | tee b.txt
  rel_close "$(value 'val loss' <b.txt)" "$(value 'val loss' <base.txt)" 1e-5 "the base model"
  expect_error "ConfigError: model.lora_rank adds LoRA adapters to a GPT, but model.kind is mlp" \
    run 1 mnist_mlp.yaml --set train.steps=1 --set model.lora_rank=4
  expect_error "ConfigError: train.freeze: 'blocks/9/\*\*' matches no parameter" \
    run 1 gpt_small_tp.yaml "${g[@]}" --set train.steps=1 --set 'train.freeze=[blocks/9/**]' ;;

gpt2_sample)  # sampling straight from GPT-2 weights with GPT-2's tokenizer (model.init_from, data.tokenizer, no
  # checkpoint), greedy, against tests/gpt2's NumPy GPT-2 and encoder.py reference; the same at TP 2, padded too;
  # and the weights exported as ONNX, evaluated by the ONNX reference
  gpt2_files
  s=(sample --config "$SRC/examples/configs/gpt_small_tp.yaml" "${gpt2_model[@]}" --set data.tokenizer=tok
     --set checkpoint.dir= --set logging.level=warn --prompt "The jury said" -n 30 --temperature 0)
  "$TITANAX" "${s[@]}" | tee one.txt
  mpi 2 "$TITANAX" "${s[@]}" --set mesh.model=2 | tee two.txt
  /usr/bin/python3 "$SRC/tests/gpt2/gpt2_reference.py" greedy --weights w/hf.safetensors --tokenizer tok --heads 4 \
    --layers 2 --seq 16 --prompt "The jury said" -n 30 >want.txt || fail "the reference could not decode greedily"
  [[ $(head -1 one.txt) == "[GPT-2 weights w/hf.safetensors]" ]] || fail "the sample does not name its weights"
  tail -n +2 one.txt | cmp - want.txt || fail "the greedy sample differs from the reference's"
  cmp one.txt two.txt || fail "TP 2 sampling differs from TP 1"
  # The vocabulary padded to a multiple of 64 (its logits masked): the same text at TP 2.
  mpi 2 "$TITANAX" "${s[@]}" --set mesh.model=2 --set model.pad_vocab_to=64 | tee pad.txt
  cmp one.txt pad.txt || fail "sampling with a padded vocabulary differs"
  # The GPT-2 weights exported as ONNX (padded vocabulary) compute, in the ONNX reference, the NumPy GPT-2's logits.
  "$TITANAX" export --config "$SRC/examples/configs/gpt_small_tp.yaml" "${gpt2_model[@]}" --set model.pad_vocab_to=64 \
    --set checkpoint.dir= --set logging.level=warn --out g.onnx --batch 1
  /usr/bin/python3 -c "import numpy as np; np.save('ids.npy', np.load('w/ids.npy'))"
  /usr/bin/python3 "$SRC/tests/onnx/onnx_reference.py" g.onnx onnx_out ids.npy || fail "the ONNX reference rejected g.onnx"
  /usr/bin/python3 - <<'PY' || fail "the exported GPT-2's logits differ from the NumPy GPT-2's"
import numpy as np
y, ref = np.load("onnx_out/output0.npy"), np.load("w/logits_f32.npy")
V = ref.shape[-1]
assert np.isinf(y[..., V:]).all() and (y[..., V:] < 0).all(), "padding logits are not -inf"
err = np.abs(y[..., :V] - ref).max() / np.abs(ref).max()
assert err < 1e-5, err  # f32 through two blocks
PY
  ;;

gpt2_finetune)  # text files -> GPT-2 token shards (titanax tokenize) -> a few steps from the GPT-2 weights
  gpt2_files
  /usr/bin/python3 - <<'PY'
for k, line in enumerate(["The jury said it did not find that many voters were unhappy. ",
                          "Über die Straße gehen Käufer, naïve café! Привет, как дела? 東京は日本の首都です。",
                          "They'll say they've seen it, and we'd agree: 1961, 3,500 votes. "]):
    open("doc%d.txt" % k, "w", encoding="utf-8").write(line * 12)
PY
  "$TITANAX" tokenize --tokenizer tok --out shards --val-fraction 0.2 doc0.txt doc1.txt doc2.txt | tee out.txt
  grep -Eq '^wrote shards/train.bin \([0-9]+ tokens\) and shards/val.bin \([0-9]+ tokens\) from 3 files, vocabulary [0-9]+$' out.txt \
    || fail "no summary line"
  /usr/bin/python3 - "$SRC/tests/gpt2" <<'PY' || fail "the shards are not the reference's tokens"
import math, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import gpt2_bpe_reference as bpe
enc, ranks = bpe.load("tok")
want = []
for k in range(3):
    want += [enc[bpe.EOT]] + bpe.encode(open("doc%d.txt" % k, encoding="utf-8").read(), enc, ranks)
def shard(p):
    raw = open(p, "rb").read()
    h = np.frombuffer(raw[:1024], dtype=np.int32)
    assert h[0] == 20240520 and h[1] == 1 and len(raw) == 1024 + 2 * h[2], p
    return np.frombuffer(raw[1024:], dtype=np.uint16).tolist()
n_val = math.ceil(0.2 * len(want))
assert shard("shards/val.bin") == want[:n_val] and shard("shards/train.bin") == want[n_val:], "token mismatch"
PY
  run 1 gpt_small_tp.yaml "${gpt2_model[@]}" --set data.dataset=tokens --set data.path=shards --set data.batch_size=4 \
    --set data.val_batches=2 --set train.steps=3 --set schedule.name=constant --set optimizer.lr=1e-3 | tee run.txt
  grep -q '^val loss [0-9.]*$' run.txt || fail "no finite validation loss"
  expect_error "ValueError: titanax tokenize: too little text" "$TITANAX" tokenize --tokenizer tok --out none --val-fraction 0.5 /dev/null
  expect_error "IOError: titanax tokenize: cannot read 'absent.txt'" "$TITANAX" tokenize --tokenizer tok --out none absent.txt ;;

*) fail "unknown case '$case_name'" ;;
esac
