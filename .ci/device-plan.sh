#!/usr/bin/env bash
# The GPU measurements, one step a device call (each call is capped at 10 minutes), from the repo root:
#   run(command="bash .ci/device-plan.sh STEP", carry=[".whl"])      (../shared/device/prepare-wheels first, here)
# STEP: tests-kernels | tests-decode | tests-prefill | tests-models | kernels | targets | prefill | sweep | skinny | skinny-engine | stream-k | decode-tiles | pipeline | ragged | order-kernels | order | throughput-order | compile-scope | blas | steps | pdl | throughput | lognormal | thousand | memory. Results go
# to $OUT (the device tool's folder that comes back) or /tmp/out, logs as they are written (a call cut off at its
# limit still brings them back); record them in docs/benchmarks.md and docs/kernels.md with the command.
# Together the two test steps ran past one 8-minute call on a fresh H200 (most of it Triton and inductor
# compiling); on 2026-12-02 105 of the 108 kernel tests took 240 s on a fresh H200 and the model tests 110 s, so
# the kernel tests also run as two halves (tests-decode, tests-prefill: every test in exactly one).
set -euo pipefail
. .ci/device-env.sh
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
tp="python3 -P -m hf_paged.bench.throughput --model llama2-7b"
diff="python3 -P -m hf_paged.bench.diff"  # A/B tables (bench diff) of the switch steps
pytest="python3 -P -m pytest -m cuda -q -rs -p no:cacheprovider --durations=10"
decode_tests="decode or reduce or write_kv or block_copy"  # tests-decode; tests-prefill runs the rest
skinny_runs() { # GRID RUN...: each RUN, on the skinny matmul's grid GRID (HF_PAGED_SKINNY_GRID), is WORKLOAD:ROWS, the
  # engine with HF_PAGED_SKINNY_MATMUL=ROWS (a table against WORKLOAD:off, run before it), or gemm, the kernel's
  # rows against cuBLAS at 16 and 64 rows; the runs' tails and tables go to one log
  local grid=$1 run w s; shift
  for run in "$@"; do
    if [ "$run" = gemm ]; then
      HF_PAGED_SKINNY_GRID=$grid python3 -P -m hf_paged.bench.kernels --only gemm --gemm-rows 16,64 \
        --out "$out/kernels_skinny_$grid.json" 2>&1
      continue
    fi
    w=${run%:*} s=${run#*:}
    HF_PAGED_SKINNY_MATMUL=$s HF_PAGED_SKINNY_GRID=$grid $tp --workload $w --num-requests 128 --systems d \
      --out "$out/tp_skinny_${s}_$w.json" 2>&1 | tail -n 25 >> "$out/tp_skinny.log"
    [ "$s" = off ] || $diff "$out/tp_skinny_off_$w.json" "$out/tp_skinny_${s}_$w.json" >> "$out/tp_skinny.log"
  done
}
case "${1:?STEP: tests-kernels | tests-decode | tests-prefill | tests-models | kernels | targets | prefill | sweep | skinny | skinny-engine | stream-k | decode-tiles | pipeline | ragged | order-kernels | order | throughput-order | compile-scope | blas | steps | pdl | throughput | lognormal | thousand | memory}" in
  tests-kernels) $pytest tests/kernels 2>&1 | tee "$out/tests_kernels.log" ;;
  tests-decode) $pytest tests/kernels -k "$decode_tests" 2>&1 | tee "$out/tests_decode.log" ;;
  tests-prefill) $pytest tests/kernels -k "not ($decode_tests)" 2>&1 | tee "$out/tests_prefill.log" ;;
  tests-models) $pytest tests/hf/test_cuda.py tests/engine tests/integrations 2>&1 | tee "$out/tests_models.log" ;;
  kernels) python3 -P -m hf_paged.bench.kernels --out "$out/kernels.json" ;;
  targets) # issue 4's targets with their verdicts (printed after the table): decode at batch 64, 1k-4k, and
      # prefill, GQA 4 and MHA, at the defaults; no sweep (~1.5 minutes on a warm machine)
      python3 -P -m hf_paged.bench.kernels --only attention --heads 32/8,32/32 --contexts 1024 2048 4096 \
             --step-batches "" --out "$out/kernels_targets.json" 2>&1 | tee "$out/kernels_targets.log" ;;
  prefill) # issue 4's prefill rows (8 x 1,024 new tokens; GQA 4 and MHA): through the block tables, the step's own
      # K/V unstored (sdpa's work) and stored (against sdpa then the KV write too), each kind's tile sweep
      python3 -P -m hf_paged.bench.kernels --only attention --sweep --sweep-kinds prefill --heads 32/8,32/32 \
             --contexts 1024 --step-batches "" --out "$out/kernels_prefill.json" 2>&1 | tee "$out/kernels_prefill.log" ;;
  sweep) # tiles, PrefillConfig.store_last, and the decode layer at 1/16/64 sequences, even and ragged contexts
         # (DecodeConfig.min_split_tiles in the sweep)
      python3 -P -m hf_paged.bench.kernels --only attention --sweep --heads 32/8,32/32 --contexts 1024 \
             --step-batches 1,16,64 --out "$out/kernels_sweep.json" 2>&1 | tee "$out/kernels_sweep.log" ;;
  skinny) # the skinny matmul (kernels/skinny_matmul.py): its GPU tests, then against cuBLAS for a decode step's
      # projections at 16, 32 and 64 rows, every tile, split and stream-K grid of the sweep (hf_paged/bench/gemm_rows.py)
      $pytest tests/kernels/test_skinny_matmul.py 2>&1 | tee "$out/tests_skinny.log"
      python3 -P -m hf_paged.bench.kernels --only gemm --gemm-rows 16,32,64 --sweep --out "$out/kernels_skinny.json" \
             2>&1 | tee "$out/kernels_skinny.log" ;;
  skinny-engine) # the engine with the small decode steps' projections on the skinny matmul (HF_PAGED_SKINNY_MATMUL:
      # off; 64 / 16: steps of up to 64 / 16 sequences) against cuBLAS on its default grid, ShareGPT-128 then
      # lognormal-128, each run its own process; tables off -> each
      skinny_runs strips sharegpt:off sharegpt:64 sharegpt:16 lognormal:off lognormal:64 ;;
  stream-k) # one call for the stream-K skinny matmul (HF_PAGED_SKINNY_GRID=stream), most telling first (a call cut
      # short keeps what it wrote): its GPU tests (stop on a failure); the engine, cuBLAS against the skinny matmul
      # up to 64 rows on ShareGPT-128; its rows against cuBLAS at 16 and 64 rows (the defaults, no sweep); the same
      # pair on lognormal-128; up to 16 rows on ShareGPT. Eight files come back
      $pytest -x tests/kernels/test_skinny_matmul.py 2>&1 | tee "$out/tests_skinny.log"
      skinny_runs stream sharegpt:off sharegpt:64 gemm lognormal:off lognormal:64 sharegpt:16 ;;
  decode-tiles) # the GQA decode tile at block size 8 (the default) and 16 (docs/kernels.md "Measured on an H200")
      for bs in 8 16; do
        python3 -P -m hf_paged.bench.kernels --only attention --sweep --heads 32/8 --contexts 1024 4096 \
          --block-size $bs --prefill 1x256 --step-batches "" --out "$out/decode_tiles_bs$bs.json" \
          2>&1 | tee "$out/decode_tiles_bs$bs.log"
      done ;;
  pipeline) # K/V loops pipelined through the block table (kernels/attention_tile.py HF_PAGED_KV_PIPELINE): none,
      # the default (prefill) and all, each its own process: attention rows (decode, prefill, prefix, mixed), then
      # decode steps; tables none -> prefill and prefill -> all
      for mode in none prefill all; do
        HF_PAGED_KV_PIPELINE=$mode python3 -P -m hf_paged.bench.kernels --only attention --heads 32/8,32/32 \
          --contexts 1024 4096 --step-batches 1,16 --out "$out/pipeline_$mode.json" 2>&1 | tee "$out/pipeline_$mode.log"
        HF_PAGED_KV_PIPELINE=$mode python3 -P -m hf_paged.bench.steps --model llama2-7b --batch 1,16,128 \
          --context 512 --out "$out/steps_pipeline_$mode.json" 2>&1 | tee "$out/steps_pipeline_$mode.log"
      done
      for f in pipeline steps_pipeline; do
        $diff "$out/${f}_none.json" "$out/${f}_prefill.json" | tee "$out/${f}_none_prefill.md"
        $diff "$out/${f}_prefill.json" "$out/${f}_all.json" | tee "$out/${f}_prefill_all.md"
      done ;;
  ragged) # decode steps over a serving batch's contexts (mean 208: the ShareGPT run's 65-256 bucket), splits for
      # the long sequences only (HF_PAGED_LONG_SPLITS=S:M, kernels/tuning.py) off and two ways on, each its own
      # process; tables off -> each
      for mode in off 4:4 8:4; do
        HF_PAGED_LONG_SPLITS=${mode/off/} python3 -P -m hf_paged.bench.steps --model llama2-7b --batch 16,64,128 \
          --context 208 --ragged --out "$out/steps_ragged_${mode/:/_}.json" 2>&1 | tee "$out/steps_ragged_${mode/:/_}.log"
      done
      for mode in 4_4 8_4; do $diff "$out/steps_ragged_off.json" "$out/steps_ragged_$mode.json" | tee "$out/ragged_$mode.md"; done ;;
  order-kernels) # the decode rows (batch 64, 1k-4k) and decode layers (16 and 64 sequences, even and ragged) with the
      # grid sequences first (HF_PAGED_DECODE_ORDER=sequences, the layout before 2026-12-07) and KV heads first
      # (heads; the default, longest, launches the same grid), each its own process
      for order in sequences heads; do
        HF_PAGED_DECODE_ORDER=$order python3 -P -m hf_paged.bench.kernels --only attention --heads 32/8,32/32 \
          --contexts 1024 4096 --prefill 1x64 --step-batches 16,64 --out "$out/kernels_order_$order.json" \
          2>&1 | tee -a "$out/kernels_order.log"
      done
      $diff "$out/kernels_order_sequences.json" "$out/kernels_order_heads.json" | tee "$out/kernels_order_diff.md" ;;
  order) # decode steps over a serving batch's contexts as in `ragged`, by HF_PAGED_DECODE_ORDER (kernels/ops.py):
      # sequences (before 2026-12-07), heads, longest (the default), and longest with splits for the long sequences;
      # each its own process; tables sequences -> each
      for mode in sequences heads longest longest+4:4; do
        name=${mode/+/_}; name=${name/:/_}; splits=${mode#*+}; [ "$splits" = "$mode" ] && splits=
        HF_PAGED_DECODE_ORDER=${mode%+*} HF_PAGED_LONG_SPLITS=$splits python3 -P -m hf_paged.bench.steps \
          --model llama2-7b --batch 64,128 --context 208 --ragged --out "$out/steps_order_$name.json" \
          2>&1 | tee -a "$out/steps_order.log"
      done
      for name in heads longest longest_4_4; do  # one file: a call brings back at most 8
        $diff "$out/steps_order_sequences.json" "$out/steps_order_$name.json" | tee -a "$out/order_diffs.md"
      done ;;
  throughput-order) # the engine on 128 ShareGPT requests, decode steps sequences first in scheduling order, then
      # longest first (the default), each its own process; table sequences -> longest
      for order in sequences longest; do
        HF_PAGED_DECODE_ORDER=$order $tp --workload sharegpt --num-requests 128 --systems d \
          --out "$out/tp_order_$order.json" 2>&1 | tee -a "$out/tp_order.log"
      done
      $diff "$out/tp_order_sequences.json" "$out/tp_order_longest.json" | tee "$out/tp_order_diff.md" ;;
  compile-scope) # the whole forward compiled as one graph (HF_PAGED_COMPILE_SCOPE=model: inductor may fuse one
      # layer's last residual add into the next layer's norm) against the layers' shared graph (the default): decode
      # steps at 1, 16 and 128 sequences, each its own process (table layers -> model), then the ShareGPT engine run
      # with it (the whole model's cold compile took 123 s on the H200 on 2026-12-01)
      for scope in layers model; do
        HF_PAGED_COMPILE_SCOPE=$scope python3 -P -m hf_paged.bench.steps --model llama2-7b --batch 1,16,128 \
          --context 512 --out "$out/steps_scope_$scope.json" 2>&1 | tee -a "$out/steps_scope.log"
      done
      $diff "$out/steps_scope_layers.json" "$out/steps_scope_model.json" | tee "$out/steps_scope_diff.md"
      HF_PAGED_COMPILE_SCOPE=model $tp --workload sharegpt --num-requests 128 --systems d \
        --out "$out/tp_scope_model.json" 2>&1 | tee "$out/tp_scope_model.log" ;;
  blas) # cuBLAS as torch calls it by default against cuBLASLt (TORCH_BLAS_PREFER_CUBLASLT=1, torch's switch): the
      # decode steps' skinny matmuls at 1, 4 and 16 sequences, each its own process; table default -> cublaslt
      for lib in default cublaslt; do
        [ $lib = cublaslt ] && export TORCH_BLAS_PREFER_CUBLASLT=1
        python3 -P -m hf_paged.bench.steps --model llama2-7b --batch 1,4,16 --context 512 \
          --out "$out/steps_blas_$lib.json" 2>&1 | tee -a "$out/steps_blas.log"
      done
      $diff "$out/steps_blas_default.json" "$out/steps_blas_cublaslt.json" | tee "$out/steps_blas_diff.md" ;;
  steps) python3 -P -m hf_paged.bench.steps --model llama2-7b --batch 1,16,128 --context 512 --out "$out/steps.json" ;;
  pdl) # programmatic dependent launch (kernels/tuning.py use_pdl, engine/compiled.py), each side its own process
      for on in 0 1; do
        HF_PAGED_PDL=$on python3 -P -m hf_paged.bench.steps --model llama2-7b \
          --batch 1,16,128 --context 512 --out "$out/steps_pdl$on.json" 2>&1 | tee "$out/steps_pdl$on.log"
      done
      $diff "$out/steps_pdl0.json" "$out/steps_pdl1.json" | tee "$out/steps_pdl_diff.md"
      HF_PAGED_PDL=1 $tp --workload sharegpt --num-requests 128 --systems d \
        --out "$out/tp_pdl.json" 2>&1 | tee "$out/tp_pdl.log" ;;
  throughput) $tp --workload sharegpt --num-requests 128 --time-budget 1 --systems d,b,a \
                  --out "$out/tp_sharegpt.json" --plot "$out/tp_sharegpt.png" ;;
  lognormal) $tp --workload lognormal --num-requests 128 --systems d,b --out "$out/tp_lognormal.json" \
                 --plot "$out/tp_lognormal.png" ;;
  thousand) $tp --workload sharegpt --num-requests 1000 --systems d,b --out "$out/tp_1000.json" \
                --plot "$out/tp_1000.png" ;;
  memory) python3 -P -m hf_paged.bench.memory --model llama2-7b --out "$out/memory.json" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
