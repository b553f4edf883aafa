#!/usr/bin/env bash
# The GPU benchmarks, batched by phase for a lent GPU machine (a machine start costs minutes).
# Build the bundle first on a machine with a package index (bash bench/gpu/make-bundle.sh), carry
# .whl along, and run from the repository root on the GPU machine (bench/README.md):
#   bash bench/gpu_session.sh single   # one GPU each: DeepSpeed (GPU 0) | optimizers, PEFT, aggregation (GPU 1)
#   bash bench/gpu_session.sh ds1 ds collectives   # DeepSpeed on 1 GPU and on all, collectives and exchanges
#   SIZES=20b,16b bash bench/gpu_session.sh largest  # ZeRO-3 + CPU offload, the first of SIZES that trains
#   bash bench/gpu_session.sh compile         # torch.compile: 1 GPU at micro 8 and 16 (+ 2 GPUs on a 4+ GPU host)
#   bash bench/gpu_session.sh compile_all     # torch.compile on every GPU (scaling against `compile`)
#   bash bench/gpu_session.sh scaling         # compile_all's 1- and 2-GPU baselines, side by side on a 4+ GPU host
#   bash bench/gpu_session.sh coding collectives4   # gradient coding across GPUs; aggregation + exchanges
#   bash bench/gpu_session.sh gram gram_exchange   # Flag's Triton kernels: GPU tests, sweep, rules; exchanges
# The Flag authors' code (hamidralmasi/FlagAggregator, not on a package index) is timed beside ours
# only when FLAG_REF names a checkout of it (commit 1ae2c4536753a91f1726a229719bca177dd8ac7a),
# carried along; without it the aggregation benches time our rules alone.
# Each benchmark's output goes to $OUT/<name>.log (or ./gpu-logs) as it runs.
set -u
source .whl/install.sh || exit 1
ref=()  # the authors' Flag code, when a checkout is carried
if [ -n "${FLAG_REF:-}" ]; then ref=(--ref-path "$FLAG_REF"); fi
out=${OUT:-gpu-logs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpus.txt"
python3 -c "import mlflow, ray, ray.train.torch, deepspeed, pydantic, fastapi; print('imports ok')" > "$out/imports.txt" 2>&1
ngpu=$(wc -l < "$out/gpus.txt")
run() {  # run NAME SECONDS CMD...: one benchmark, its output kept even if it times out
  local name=$1 secs=$2; shift 2
  echo "== $name: $*" > "$out/$name.log"
  local t0=$SECONDS
  timeout "$secs" "$@" >> "$out/$name.log" 2>&1
  echo "== exit $? after $((SECONDS - t0)) s" >> "$out/$name.log"
}
dsc() {  # dsc GPUS DEVICES|all MICRO SECONDS: the DeepSpeed bench with torch.compile, both paths
  local n=$1 devs=$2 mb=$3 secs=$4
  local cmd=(run "deepspeed_${n}gpu_compile_mb$mb" "$secs" python3 bench/gpu_deepspeed.py --gpus "$n" --micro-batch "$mb"
             --compile)
  if [ "$devs" = all ]; then "${cmd[@]}"; else CUDA_VISIBLE_DEVICES=$devs "${cmd[@]}"; fi
}
for phase in "$@"; do
case "$phase" in
  single)
    # with two GPUs or more, DeepSpeed takes GPU 0 while the others share GPU 1 (separate GPUs, shared CPUs)
    one() { run deepspeed_1gpu 500 python3 bench/gpu_deepspeed.py --gpus 1 --micro-batch 8; }
    rest() {
      run optimizers 240 python3 bench/gpu_optimizers.py --gap 100
      [ -n "${SKIP_PEFT:-}" ] || run peft 150 python3 bench/gpu_peft.py
      # the authors' Flag code fails in cuSOLVER's gesvdj at d >= 25M: 1M and 5M compare it
      run aggregation_1gpu 150 python3 bench/gpu_aggregation.py ${ref[@]+"${ref[@]}"} --sizes 1e6 5e6 25e6 100e6
    }
    if [ "$ngpu" -gt 1 ]; then
      CUDA_VISIBLE_DEVICES=0 one &
      CUDA_VISIBLE_DEVICES=1 rest &
      wait
    else
      one; rest
    fi
    ;;
  ds1)  # DeepSpeed on one GPU, both paths
    CUDA_VISIBLE_DEVICES=0 run deepspeed_1gpu 270 python3 bench/gpu_deepspeed.py --gpus 1 --micro-batch 8
    ;;
  ds)   # DeepSpeed on every GPU, both paths (scaling against ds1)
    run deepspeed_${ngpu}gpu 290 python3 bench/gpu_deepspeed.py --gpus "$ngpu" --micro-batch 8
    ;;
  collectives)  # robust exchange and aggregation across every GPU
    run aggregation_${ngpu}gpu 150 torchrun --nproc_per_node "$ngpu" bench/gpu_aggregation.py ${ref[@]+"${ref[@]}"} --sizes 1e6 5e6 25e6 100e6
    run exchange_${ngpu}gpu 120 torchrun --nproc_per_node "$ngpu" bench/gpu_exchange.py --iters 5
    ;;
  compile)  # 1 GPU (micro 8 and 16) and 2 GPUs (micro 8), side by side on separate GPUs where there are 4+
    if [ "$ngpu" -ge 2 ]; then  # with 2-3 GPUs the 2-GPU run is compile_all's
      last=$((ngpu >= 4 ? 3 : 1))  # the GPU for Flag's profile and micro-batch 16
      dsc 1 0 8 540 &
      [ "$ngpu" -lt 4 ] || dsc 2 1,2 8 540 &
      (CUDA_VISIBLE_DEVICES=$last run flag_profile 60 python3 bench/gpu_aggregation.py --profile flag --reps 3
       dsc 1 "$last" 16 470) &
      wait
    else
      dsc 1 0 8 540
    fi
    ;;
  scaling)  # the 1- and 2-GPU baselines of compile_all on one 4+ GPU host, side by side (GPU 0 | GPUs 1,2)
    dsc 1 0 "${MB:-16}" 400 &
    dsc 2 1,2 "${MB:-16}" 400 &
    wait
    ;;
  compile_all)
    dsc "$ngpu" all "${MB:-16}" 360
    ;;
  coding)  # Ray actors on the GPUs (one each, then two per GPU), a char-level Llama (13M), one straggler per round
    for w in "$ngpu" $((2 * ngpu)); do
      run coding_${ngpu}gpu_${w}workers 200 env PYTHONPATH="$PWD:$PYTHONPATH" python3 bench/straggler_coding.py --gpu \
        --workers "$w" --model llama --llama 512 4 --seq 512 --batch 64 --stragglers 1 --delays 5 20 --steps 12 \
        --methods wait_all gc --no-check --num-cpus 16 --object-store-gb 8
    done
    ;;
  collectives4)  # as collectives, at 25M and 100M only (no reference: it fails at >= 25M)
    run aggregation_${ngpu}gpu 150 torchrun --nproc_per_node "$ngpu" bench/gpu_aggregation.py --sizes 25e6 100e6
    run exchange_${ngpu}gpu 120 torchrun --nproc_per_node "$ngpu" bench/gpu_exchange.py --iters 5
    ;;
  gram)  # Flag's Triton Gram kernel: its tests on the GPU, its settings, then Flag and the exchanges, kernel vs bmm
    CUDA_VISIBLE_DEVICES=0 run gram_tests 200 python3 -m pytest -q -p no:cacheprovider -k "not interpreter" \
      tests/unit/aggregation/test_row_kernels.py
    CUDA_VISIBLE_DEVICES=0 run gram_sweep 200 python3 bench/gpu_aggregation.py --gram-sweep --sizes 25e6 100e6 --reps 10
    for g in kernel bmm; do
      CUDA_VISIBLE_DEVICES=0 run aggregation_1gpu_$g 100 python3 bench/gpu_aggregation.py --sizes 25e6 100e6 --gram $g
    done
    CUDA_VISIBLE_DEVICES=0 run flag_profile_kernel 60 python3 bench/gpu_aggregation.py --profile flag --reps 3
    ;;
  gram_exchange)  # the exchanges on 2 GPUs and on all of them: kernel (gather keeps its buckets) vs bmm (re-gathers)
    worlds=""  # 2 GPUs, and all of them when there are more
    [ "$ngpu" -lt 2 ] || worlds=2
    [ "$ngpu" -le 2 ] || worlds="2 $ngpu"
    for np in $worlds; do
      devs=$(seq -s, 0 $((np - 1)))
      CUDA_VISIBLE_DEVICES=$devs run exchange_${np}gpu_kernel 100 torchrun --nproc_per_node "$np" bench/gpu_exchange.py \
        --iters 5 --rules flag geometric_median mean
      CUDA_VISIBLE_DEVICES=$devs run exchange_${np}gpu_bmm_regather 100 torchrun --nproc_per_node "$np" \
        bench/gpu_exchange.py --iters 5 --rules flag geometric_median mean --gram bmm --keep-elems 0
      CUDA_VISIBLE_DEVICES=$devs run exchange_${np}gpu_kernel_regather 100 torchrun --nproc_per_node "$np" \
        bench/gpu_exchange.py --iters 5 --rules flag --keep-elems 0
      CUDA_VISIBLE_DEVICES=$devs run aggregation_${np}gpu 100 torchrun --nproc_per_node "$np" bench/gpu_aggregation.py \
        --sizes 25e6 100e6 --reps 10
    done
    ;;
  largest)
    # host memory bounds it: 20b trains on 4 x H200 (504 GiB host); on 1 x H200 (252 GiB host) use SIZES=13b,9b
    run largest 560 python3 bench/gpu_deepspeed.py --mode largest --sizes "${SIZES:-20b,16b,13b}" --micro-batch 1 --act-ckpt
    ;;
esac
done
tail -n 40 "$out"/*.log
