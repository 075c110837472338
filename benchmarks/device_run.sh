#!/bin/bash
# Issue 7 measurements on a lent CUDA machine (../shared/docs/GPU.md stages the wheels into /tmp/site first).
# Usage there: bash benchmarks/device_run.sh STEP...   (steps below; each writes its output under $OUT)
# Staging as used since session 27 (the tracked tree plus a call's carry must stay under 64 MiB, so the wheel goes in
# three ~30 MiB parts): after ../shared/tools/stage-mlx-cuda.sh, `cat .whl1/part_aa .whl2/part_ab > /tmp/w.whl;
# split -b 30m /tmp/w.whl /tmp/wp_`, parts into .whlA/.whlB/.whlC (the small wheels from .whl2 into .whlC); call 1
# carries .whlA (copy to /root/stash), call 2 .whlB, call 3 .whlC and .whlP (mimalloc): cat the parts into
# /root/stash/mlx_cuda_13-<version>-py3-none-manylinux_2_35_x86_64.whl, `pip install --no-index --no-deps --target
# /tmp/site` it with .whlC/*.whl, then run steps; later calls carry .whlP only. The machine goes back after 30 s idle.
# tree-ab compares against ab_old/, made here first: mkdir ab_old && git archive BASE mlx_clip benchmarks | tar -x -C ab_old
# (each tree runs from its own directory: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH,
# so an old tree named only in PYTHONPATH would be shadowed by this one, as it was before session 7)
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# A row spec "VAR=1 VAR2=2 --flag value": e gets the variables (for env), a the bench arguments from the first --
split_row() { e=${1%%--*}; a=""; [[ $1 == *--* ]] && a="--${1#*--}"; }
BENCH="python3 -m benchmarks.bench --backend mlx,torch --task train --mode compiled --batch 256 --dtype bfloat16 --device cuda --runs 10 --warmup 3 --caption-tokens 5-30"
for step in "$@"; do
  case $step in
    # the card's tests in two calls (session 23: together they ran past 480 s on a bare machine, NVRTC compiling)
    tests) MLX_ENABLE_TF32=0 timeout ${TESTS_TIMEOUT:-540} python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_gpu_reduce.py tests/test_layer_norm.py tests/test_mlp_block.py tests/test_multi_tensor.py tests/test_linear.py tests/test_optim.py tests/test_gpu_buffers.py "tests/test_parity.py::test_loss_gradients_match_open_clip" "tests/test_finetune_recovery.py::test_a_nonfinite_step_is_as_if_it_never_happened" 2>&1 | tail -40 | tee $OUT/gpu-tests.txt ;;
    tests-attn) MLX_ENABLE_TF32=0 timeout ${TESTS_TIMEOUT:-540} python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_gpu_attention.py 2>&1 | tail -20 | tee $OUT/gpu-tests-attn.txt ;;
    modes) timeout 240 python3 -m benchmarks.attention_modes 2>&1 | tee $OUT/attention-modes.txt ;;
    b32) MLXCLIP_GPU_ATTENTION=fused timeout 300 $BENCH --arch ViT-B-32 --out $OUT/b32-fused 2>&1 | tail -25 ;;
    b32ab) for r in 0 1; do MLXCLIP_GPU_REDUCE=$r timeout 200 ${BENCH/mlx,torch/mlx} --arch ViT-B-32 --out $OUT/b32-reduce$r 2>&1 | grep items/s; done | tee $OUT/b32ab.txt ;;
    b32-sdpa) timeout 240 ${BENCH/mlx,torch/mlx} --arch ViT-B-32 --out $OUT/b32-sdpa 2>&1 | tail -15 ;;
    b16) MLXCLIP_GPU_ATTENTION=fused timeout 300 $BENCH --arch ViT-B-16 --out $OUT/b16-fused 2>&1 | tail -25 ;;
    ab32) timeout 400 python3 -m benchmarks.gpu_ab --arch ViT-B-32 --variants sdpa,fused 2>&1 | tee $OUT/ab32.txt ;;
    scale) for b in 64 128; do timeout 200 python3 -m benchmarks.gpu_ab --arch ViT-B-32 --batch $b --variants sdpa,fused --rounds 6 2>&1 | tail -2; done | tee $OUT/scale.txt ;;
    ab16) timeout 400 python3 -m benchmarks.gpu_ab --arch ViT-B-16 --variants sdpa,fused,padded 2>&1 | tee $OUT/ab16.txt ;;
    tree-ab) for r in 1 2 3; do for t in ab_old .; do echo "tree $t"; (cd $t && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 -m benchmarks.gpu_ab --arch ViT-B-32 --variants fused --rounds 8 2>&1 | tail -1); done; done | tee $OUT/tree-ab.txt ;;
    host) for v in "" MLX_MAX_OPS_PER_BUFFER=300 "MLX_MAX_OPS_PER_BUFFER=1000 MLX_MAX_MB_PER_BUFFER=100000" "MLX_MAX_OPS_PER_BUFFER=4000 MLX_MAX_MB_PER_BUFFER=100000" MLX_USE_CUDA_GRAPHS=0; do env $v timeout 150 python3 -m benchmarks.gpu_host --arch ViT-B-32 2>&1 | tail -1; done | tee $OUT/host.txt ;;
    mt) timeout 400 python3 -m benchmarks.gpu_ab --arch ViT-B-32 --variants default,optimizer=multi --torch 2>&1 | tee $OUT/mt-ab32.txt ;;
    pipe) for a in ViT-B-32 ViT-B-16; do timeout 200 python3 -m benchmarks.gpu_host --arch $a --rounds 4 2>&1 | tail -1; done | tee $OUT/pipe.txt ;;
    norm) timeout 500 python3 -m benchmarks.gpu_ab --arch ViT-B-32 --variants norm=dot,norm=reduce --rounds 8 --torch 2>&1 | tee $OUT/norm-ab32.txt ;;
    concat) timeout 500 python3 -m benchmarks.gpu_ab --arch ViT-B-32 --variants default,norm=concat,norm=concat+grads=rowmajor --rounds 8 2>&1 | tee $OUT/concat-ab32.txt ;;
    aligned) timeout 300 python3 -m benchmarks.gpu_ab --arch ViT-B-16 --variants default,attention=aligned --rounds 6 2>&1 | tee $OUT/ab16-aligned.txt ;;
    limit) MLXCLIP_GPU_ATTENTION=fused timeout 300 $BENCH --arch ViT-B-16 --memory-limit 19GiB --out $OUT/b16-fused-limit19 2>&1 | tail -8
           for l in 8GiB 9GiB; do timeout 150 ${BENCH/mlx,torch/mlx} --arch ViT-B-32 --memory-limit $l --out $OUT/b32-limit$l 2>&1 | grep items/s; done ;;
    host1) timeout 150 python3 -m benchmarks.gpu_host --arch ViT-B-32 2>&1 | tail -1 | tee -a $OUT/host.txt ;;
    prof) for b in mlx torch; do timeout 240 python3 -m benchmarks.gpu_profile --backend $b --arch ViT-B-32 2>&1 | tail -32; done | tee $OUT/profile.txt ;;
    prof-mt) MLXCLIP_MULTI_TENSOR=1 timeout 240 python3 -m benchmarks.gpu_profile --backend mlx --arch ViT-B-32 2>&1 | tail -32 | tee $OUT/profile-mt.txt ;;
    attn-prof) for v in 1 0; do MLXCLIP_GPU_LDMATRIX=$v timeout 100 python3 -m benchmarks.attention_profile --shape 256,12,197 --modes fused,padded 2>&1 | grep -v -i warn; done | tee $OUT/attn-profile.txt ;;
    dq32) MLXCLIP_GPU_DQ_ROWS=32 MLX_ENABLE_TF32=0 timeout 200 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_gpu_attention.py 2>&1 | tail -5 | tee $OUT/dq32-tests.txt
          for r in 16 32; do MLXCLIP_GPU_DQ_ROWS=$r timeout 60 python3 -m benchmarks.attention_profile --shape 256,12,197 --modes fused 2>&1 | grep -v -i warn | head -4; done | tee $OUT/dq32-profile.txt
          timeout 300 python3 -m benchmarks.gpu_ab --arch ViT-B-16 --variants dqrows=16,dqrows=32 --rounds 6 2>&1 | tee $OUT/dq32-ab16.txt ;;
    s14) MLX_ENABLE_TF32=0 timeout 240 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_gpu_attention.py -k "dkdv or ldmatrix or model_attention" 2>&1 | tail -5 | tee $OUT/s14-tests.txt
         for v in "" "MLXCLIP_GPU_DKDV_ROWS=32" "MLXCLIP_GPU_LDMATRIX=2" "MLXCLIP_GPU_DKDV_ROWS=32 MLXCLIP_GPU_LDMATRIX=2"; do echo "== $v"; env $v timeout 60 python3 -m benchmarks.attention_profile --shape 256,12,197 --modes fused 2>&1 | grep -v -i warn | head -5; done | tee $OUT/s14-attn-profile.txt
         timeout 420 python3 -m benchmarks.gpu_ab --arch ViT-B-16 --variants default,dkdvrows=32,ldmatrix=2,dkdvrows=32+ldmatrix=2 --rounds 6 2>&1 | tee $OUT/s14-ab16.txt ;;
    prof16) MLX_USE_CUDA_GRAPHS=0 timeout 240 python3 -m benchmarks.gpu_profile --backend mlx --arch ViT-B-16 --top 40 2>&1 | tail -52 | tee $OUT/prof16-nographs.txt ;;
    reduce) MLX_ENABLE_TF32=0 timeout 300 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_gpu_reduce.py tests/test_layer_norm.py tests/test_mlp_block.py tests/test_linear.py "tests/test_parity.py::test_loss_gradients_match_open_clip" 2>&1 | tail -15 | tee $OUT/reduce-tests.txt
            timeout 120 python3 -m benchmarks.column_sum 2>&1 | tee $OUT/colsum-micro.txt
            for a in ViT-B-16 ViT-B-32; do timeout 300 python3 -m benchmarks.gpu_ab --arch $a --variants reduce=mlx,reduce=ours --rounds 6 2>&1; done | tee $OUT/reduce-ab.txt ;;
    colsum-micro) timeout 120 python3 -m benchmarks.column_sum 2>&1 | tee $OUT/colsum-micro.txt ;;
    act-tests) MLX_ENABLE_TF32=0 timeout 300 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_gpu_activation.py tests/test_mlp_block.py "tests/test_parity.py::test_loss_gradients_match_open_clip" 2>&1 | tail -15 | tee $OUT/act-tests.txt
          MLX_ENABLE_TF32=0 timeout 240 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_gpu_attention.py -k "dkdv or ldmatrix or model_attention" 2>&1 | tail -8 | tee -a $OUT/act-tests.txt ;;
    act-ab) timeout 100 python3 -m benchmarks.activation 2>&1 | tee $OUT/activation-micro.txt
           timeout 480 python3 -m benchmarks.gpu_ab --arch ViT-B-16 --variants default,activation=mlx,grads=rowmajor,dkdvrows=32,ldmatrix=2 --rounds 6 2>&1 | tee $OUT/act-ab16.txt ;;
    regime) # session 14: MLX's step changes regime within a run (ViT-B-32 50 -> 61.5 ms halfway); 30 runs a process,
            # each MLX setting that could cause it (CUDA graph cache and commits, the allocator's cache) in its own
      i=0; for v in "" MLX_CUDA_GRAPH_CACHE_SIZE=4000 MLX_USE_CUDA_GRAPHS=0 "MLX_MAX_OPS_PER_BUFFER=400 MLX_MAX_MB_PER_BUFFER=4000"; do
        i=$((i + 1)); env $v timeout 150 ${BENCH/mlx,torch/mlx} --runs 30 --arch ViT-B-32 --out $OUT/regime$i 2>&1 | grep items/s | sed "s/^/[$v] /"
        python3 -c "import json,sys; r=json.loads(open(sys.argv[1]).readline()); print(' runs ms:', ' '.join(f'{1e3*t:.1f}' for t in r['times_s']))" $OUT/regime$i/*.jsonl
      done | tee $OUT/regime.txt ;;
    next-tests) MLX_ENABLE_TF32=0 timeout 300 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_gpu_activation.py tests/test_gpu_reduce.py tests/test_layer_norm.py tests/test_linear.py tests/test_qkv_block.py tests/test_mlp_block.py "tests/test_parity.py::test_loss_gradients_match_open_clip" 2>&1 | tail -15 | tee $OUT/next-tests.txt ;;
    next-mem) # session 14, prepared: ViT-B-16's peak in separate processes with the GELU backward as two kernels (did the
              # one-kernel form add its 1.2 GiB?) and with LayerNorm-1 recomputed (qkv_block)
      for v in "" MLXCLIP_GPU_ACTIVATION_FUSED=0 MLXCLIP_QKV_BLOCK=1 "MLXCLIP_GPU_ACTIVATION_FUSED=0 MLXCLIP_QKV_BLOCK=1" ""; do
        env $v timeout 150 ${BENCH/mlx,torch/mlx} --arch ViT-B-16 --out $OUT/next-mem 2>&1 | grep items/s | sed "s/^/[$v] /"; done | tee $OUT/next-mem.txt ;;
    next-ab) # session 14, prepared: the transposed weight gradients copied once at the source (AdamW read them strided),
             # the GELU backward as two kernels, LayerNorm-1 recomputed, our LayerNorm forward kernel, the multi-tensor
             # optimizer without its copies
      for a in ViT-B-32 ViT-B-16; do timeout 330 python3 -m benchmarks.gpu_ab --arch $a --variants default,gradcopy=1,actfused=0,qkv=on,lnforward=ours,gradcopy=1+optimizer=multi --rounds 6 2>&1; done | tee $OUT/next-ab.txt ;;
    mt-ab) # session 15: the ViT-B/32 step is host-bound (results/gpu-s15-h200.md §4) and the multi-tensor optimizer
           # cuts its launches 3,717 -> 2,053 and its kernels 44.1 -> 33.9 ms; separate processes, alternating, the
           # bench line now gives MLX's host time: does the host time fall with it? (then make it the CUDA default)
      for a in ${MT_ARCHS:-ViT-B-32 ViT-B-16}; do for r in 1 2 3; do for v in 0 1; do
        MLXCLIP_MULTI_TENSOR=$v timeout 150 ${BENCH/mlx,torch/mlx} --arch $a --out $OUT/mt-ab 2>&1 | grep items/s | sed "s/^/[multi-tensor $v] /"
      done; done; done | tee $OUT/mt-ab.txt ;;
    alloc) # session 15: on this 2-core CPU another malloc halved the compiled call's graph replay (small b2: 12.9-14.0 ->
           # 5.1-7.3 ms, jemalloc / mimalloc; a third of it was glibc malloc) and cut MLX's host time per small b32 step
           # 56.2 -> 45.0 ms, but not the CPU step's wall time. On the host-bound GPU step it may. Stage the libraries
           # here first (Debian's need glibc 2.34): apt-get install libjemalloc2 libmimalloc2.0, then
           # cp /usr/lib/x86_64-linux-gnu/lib{jemalloc,mimalloc}.so.2 .whlP/ and carry [".whlP"] with this call.
      for r in 1 2; do for lib in "" $PWD/.whlP/libjemalloc.so.2 $PWD/.whlP/libmimalloc.so.2; do
        LD_PRELOAD=$lib timeout 120 python3 -m benchmarks.gpu_host --arch ViT-B-32 --rounds 3 2>&1 | tail -1 | sed "s|^|[${lib##*/}] |"
      done; done | tee $OUT/alloc.txt ;;
    s15-tests) # session 15: the GPU tests of what changed since the last loan (the finish kernel, the GELU test's
               # two-kernel form held to float64)
      MLX_ENABLE_TF32=0 timeout 300 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_gpu_reduce.py tests/test_gpu_activation.py tests/test_layer_norm.py tests/test_mlp_block.py 2>&1 | tail -8 | tee $OUT/s15-tests.txt ;;
    finish) # session 15, prepared: the column sums' partials summed and cast by one kernel (MLXCLIP_GPU_REDUCE_FINISH),
            # ~230 fewer launches a ViT-B/32 step: host time in separate processes, then the same-process A/B
      for r in 1 2; do for v in 0 1; do MLXCLIP_GPU_REDUCE_FINISH=$v timeout 120 python3 -m benchmarks.gpu_host --arch ViT-B-32 --rounds 3 2>&1 | tail -1 | sed "s/^/[finish $v] /"; done; done | tee $OUT/finish.txt
      timeout 300 python3 -m benchmarks.gpu_ab --arch ViT-B-32 --variants default,finish=1 --rounds 8 2>&1 | tail -2 | tee -a $OUT/finish.txt ;;
    spy) # session 15: where the host's time goes in the steady state (py-spy --native, 100 Hz, 25 s, started once the
         # first steps' NVRTC compilation is over; the one taken in session 15 from the start caught mostly that).
         # Stage py-spy first: pip download --no-deps py-spy (manylinux x86-64) into .whlP/ and carry [".whlP"]
      python3 -m pip install -q --no-index --no-deps --target /tmp/spy .whlP/py_spy-*.whl
      python3 -m benchmarks.gpu_host --arch ${SPY_ARCH:-ViT-B-32} --rounds 20 > $OUT/spy-host.txt 2>&1 & pid=$!
      sleep ${SPY_AFTER:-60}; timeout 60 /tmp/spy/bin/py-spy record --native --format raw -r 100 -d 25 -o $OUT/spy.txt --pid $pid 2>&1 | tail -2
      kill $pid 2>/dev/null; wait $pid ;;
    tunables) # session 16: jemalloc / mimalloc cut the ViT-B/32 step's host time by a quarter; can glibc's own
              # malloc, tuned, do the same without a library? (tcache holds more freed blocks; no mmap / trim churn)
      M=glibc.malloc; for r in 1 2; do for v in "" "LD_PRELOAD=$PWD/.whlP/libmimalloc.so.2" "GLIBC_TUNABLES=$M.tcache_count=4096" \
          "GLIBC_TUNABLES=$M.mmap_threshold=1073741824:$M.trim_threshold=1073741824" \
          "GLIBC_TUNABLES=$M.tcache_count=4096:$M.mmap_threshold=1073741824:$M.trim_threshold=1073741824" "GLIBC_TUNABLES=$M.hugetlb=1"; do
        env $v timeout 100 python3 -m benchmarks.gpu_host --arch ViT-B-32 --rounds 3 2>&1 | tail -1 | sed "s|^|[${v##*/}] |"
      done; done | tee $OUT/tunables.txt ;;
    malloc-ab) # session 16: mlxclip bench's MLX row with and without mimalloc (MLXCLIP_MALLOC), separate processes, alternating
      for r in 1 2; do for m in "" $PWD/.whlP/libmimalloc.so.2; do
        MLXCLIP_MALLOC=$m timeout 120 ${BENCH/mlx,torch/mlx} --arch ${MALLOC_ARCH:-ViT-B-32} --out $OUT/malloc-ab 2>&1 | grep items/s | sed "s|^|[${m##*/}] |"
      done; done | tee $OUT/malloc-ab.txt ;;
    mt16) # session 16: with mimalloc ViT-B-16's step is kernel-bound (host 42.6 of 98.9 ms), and in its profile
          # AdamW's ~400 per-parameter kernels take ~7 ms and ~1,340 small launches around them (squares, sums,
          # scales) ~3 ms (results/gpu-s14-h200.md §4): the multi-tensor optimizer (64 parameters a launch) cut
          # ViT-B/32's kernels 44.1 -> 33.9 ms. Separate processes, alternating, both under mimalloc; its peak
          # (+2-6 GiB on ViT-B-32) decides whether it can be the default
      for r in 1 2; do for v in 0 1; do
        MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 MLXCLIP_MULTI_TENSOR=$v timeout 150 ${BENCH/mlx,torch/mlx} --arch ViT-B-16 --out $OUT/mt16 2>&1 | grep items/s | sed "s/^/[multi-tensor $v] /"
      done; done | tee $OUT/mt16.txt ;;
    normk) # session 16, prepared: the clip norm's ~400 sums of squares (~1,600 graph nodes of the host-bound ViT-B/32
           # step) as ~17 launches of our strided kernel, no copies (MLXCLIP_GPU_NORM_KERNEL, step.NORM_SQUARES =
           # "kernel"): its tests on the card, host time in separate processes under mimalloc, then same process,
           # against fold=0+norm=flat: session 16's two default changes (the clip factor in AdamW's moment
           # coefficients; each gradient's squares summed where it lies, no flattening) both switched off
      MLX_ENABLE_TF32=0 timeout 200 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_multi_tensor.py tests/test_optim.py "tests/test_finetune_recovery.py::test_a_nonfinite_step_is_as_if_it_never_happened" 2>&1 | tail -6 | tee $OUT/normk.txt
      for r in 1 2; do for v in 0 1; do LD_PRELOAD=$PWD/.whlP/libmimalloc.so.2 MLXCLIP_GPU_NORM_KERNEL=$v timeout 120 python3 -m benchmarks.gpu_host --arch ViT-B-32 --rounds 3 2>&1 | tail -1 | sed "s/^/[norm kernel $v] /"; done; done | tee -a $OUT/normk.txt
      LD_PRELOAD=$PWD/.whlP/libmimalloc.so.2 timeout 240 python3 -m benchmarks.gpu_ab --arch ViT-B-32 --variants default,norm=kernel,fold=0+norm=flat --rounds 6 2>&1 | tail -3 | tee -a $OUT/normk.txt ;;
    s17) # session 17: the strided sum of squares failed its layout test on an H200 (normk): each layout alone, then
         # the rest of the multi-tensor and optimizer tests with their tracebacks
      timeout 150 python3 -m benchmarks.strided_check 2>&1 | grep -v -i warn | tee $OUT/strided-check.txt
      MLX_ENABLE_TF32=0 timeout ${TESTS_TIMEOUT:-330} python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider -rf --tb=short --durations=8 tests/test_multi_tensor.py "tests/test_optim.py::test_guarded_update_clips_and_skips_like_torch" "tests/test_optim.py::test_global_norm_matches_torch_clip_grad_norm" "tests/test_finetune_recovery.py::test_a_nonfinite_step_is_as_if_it_never_happened" 2>&1 | tail -60 | tee $OUT/s17-tests.txt ;;
    s17b) # session 17: test_a_nonfinite_step_is_as_if_it_never_happened failed on an H200 (vision weights not bit-equal
          # after the runs with and without the skipped step): with the graph before change 33, and twice as it is
      MLX_ENABLE_TF32=0 timeout 150 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider "tests/test_multi_tensor.py::test_strided_sum_of_squares_reads_every_layout_in_place" 2>&1 | tail -2 | tee $OUT/s17b.txt
      for v in "" "MLXCLIP_GPU_FOLD_CLIP=0 MLXCLIP_NORM_SQUARES=flat" ""; do echo "== $v"; env $v MLX_ENABLE_TF32=0 timeout 100 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider --tb=line "tests/test_finetune_recovery.py::test_a_nonfinite_step_is_as_if_it_never_happened" 2>&1 | tail -3; done | tee -a $OUT/s17b.txt ;;
    fold-ab) # session 17: change 33 (the clip factor folded into AdamW's coefficients; squares summed where they lie)
             # against the graph before it, mlxclip bench's MLX row under mimalloc, separate processes, alternating
             # (run then with the fold on by default; it is opt-in since, so named here)
      for r in 1 2; do for v in "MLXCLIP_GPU_FOLD_CLIP=1" "MLXCLIP_GPU_FOLD_CLIP=0 MLXCLIP_NORM_SQUARES=flat"; do
        env $v MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 120 ${BENCH/mlx,torch/mlx} --arch ViT-B-32 --out $OUT/fold-ab 2>&1 | grep items/s | sed "s/^/[$v] /"
      done; done | tee $OUT/fold-ab.txt ;;
    determinism) # session 17: the tiny model's step twice from the same weights, the arrays that differ (on the H200 the
                 # skipped-step test's two runs ended with different vision weights), with suspect kernels switched off
                 # (session 18: one unclipped step, so the first moments name the gradients that differ; the stem as
                 # a product is the default since, "conv" is cuDNN's convolution)
      for v in "" MLXCLIP_PATCH_EMBED=conv MLXCLIP_GPU_ATTENTION=sdpa MLXCLIP_GPU_REDUCE=0 MLXCLIP_GPU_ACTIVATION=0; do
        echo "== $v"; env $v timeout 200 python3 -m benchmarks.determinism 2>&1 | grep -v -i warn | head -20
      done | tee $OUT/determinism.txt
      for ids in captions uniform; do timeout 100 python3 -m benchmarks.determinism --ids $ids --steps 2 2>&1 | grep -v -i warn | head -20; done | tee -a $OUT/determinism.txt
      timeout 200 python3 -m pytest -q -x -p no:cacheprovider \
        "tests/test_finetune_recovery.py::test_a_nonfinite_step_is_as_if_it_never_happened" 2>&1 | tail -3 ;;
    stem-ab) # session 18: the patch stem as one product (the default since) against cuDNN's convolution, ViT-B-16
             # (196 patches an image), separate processes, alternating, under mimalloc
      for r in 1 2; do for v in conv matmul; do
        MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 MLXCLIP_PATCH_EMBED=$v timeout 140 ${BENCH/mlx,torch/mlx} --arch ViT-B-16 --out $OUT/stem-ab 2>&1 | grep items/s | sed "s/^/[stem $v] /"
      done; done | tee $OUT/stem-ab.txt ;;
    s19) # session 19: the token table's gradient in a fixed order (mlx_clip/gpu_embedding.py, MLXCLIP_GPU_EMBEDDING):
         # its card tests, two identical tiny runs on caption-shaped ids with it and with MLX's scatter-add (atomics),
         # then the skipped-step test both ways
      MLX_ENABLE_TF32=0 timeout 200 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider -rf --tb=short tests/test_gpu_embedding.py 2>&1 | tail -15 | tee $OUT/s19-tests.txt
      for v in "" MLXCLIP_GPU_EMBEDDING=0; do echo "== $v"; env $v timeout 120 python3 -m benchmarks.determinism --steps 2 2>&1 | grep -v -i warn | head -12; done | tee $OUT/s19-determinism.txt
      for v in "" MLXCLIP_GPU_EMBEDDING=0; do echo "== $v"; env $v MLX_ENABLE_TF32=0 timeout 150 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider --tb=line "tests/test_finetune_recovery.py::test_a_nonfinite_step_is_as_if_it_never_happened" 2>&1 | tail -3; done | tee -a $OUT/s19-determinism.txt ;;
    s21t) # session 20: the tiled attention kernels' leaner loops (masks only on the tiles that need them, one MUFU per
          # probability, the forward's rescale only when a row's max grows by more than 2^8, ldmatrix addresses as
          # immediates). Their card tests first, with the skipped-step test on the final tree
      MLX_ENABLE_TF32=0 timeout ${TESTS_TIMEOUT:-420} python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider --tb=line tests/test_gpu_attention.py "tests/test_finetune_recovery.py::test_a_nonfinite_step_is_as_if_it_never_happened" 2>&1 | tail -8 | tee $OUT/s21-tests.txt ;;
    s21p) # the kernels alone, session 19's tree (ab_old/, see the top) against this one and its switches
      for shape in "256,12,197" "256,8,77 --causal"; do
        (echo "== ab_old $shape"; cd ab_old && PYTHONPATH=/tmp/site:$PWD timeout 90 python3 -m benchmarks.attention_profile --shape $shape --modes fused --top 4 2>&1 | grep -v -i warn)
        for v in "" MLXCLIP_GPU_LDMATRIX=2 MLXCLIP_GPU_DQ_ROWS=16; do echo "== new $v $shape"; env $v timeout 90 python3 -m benchmarks.attention_profile --shape $shape --modes fused --top 4 2>&1 | grep -v -i warn; done
      done | tee $OUT/s21-attn-profile.txt ;;
    s21ab) # ViT-B-16's step with them, same process, alternating; gradcopy is session 19's prepared s20 question
      LD_PRELOAD=$PWD/.whlP/libmimalloc.so.2 timeout 420 python3 -m benchmarks.gpu_ab --arch ViT-B-16 --variants default,ldmatrix=2,gradcopy=1 --rounds 6 2>&1 | tee $OUT/s21-ab16.txt ;;
    s22) # session 20, second change: the dq and dk/dv kernels walking two tiles a step (more independent products and
         # exponentials in flight: the loops were latency-bound, 40% fewer instructions gave 8%), 8-warp dk/dv blocks
         # (16 warps an SM). Kernels alone first, then ViT-B-16's step, then the new switches' card tests
      for v in "" MLXCLIP_GPU_DKDV_STEP=32 "MLXCLIP_GPU_DKDV_STEP=32 MLXCLIP_GPU_LDMATRIX=2" MLXCLIP_GPU_DKDV_WARPS=8 MLXCLIP_GPU_DQ_STEP=32 "MLXCLIP_GPU_DQ_ROWS=16 MLXCLIP_GPU_DQ_STEP=32"; do
        echo "== $v"; env $v timeout 60 python3 -m benchmarks.attention_profile --shape 256,12,197 --modes fused --top 3 2>&1 | grep -v -i warn; done | tee $OUT/s22-attn-profile.txt
      LD_PRELOAD=$PWD/.whlP/libmimalloc.so.2 timeout 240 python3 -m benchmarks.gpu_ab --arch ViT-B-16 --variants default,dkdvstep=32,dkdvstep=32+dqstep=32,dkdvstep=32+dqstep=32+gradcopy=1 --rounds 4 2>&1 | tee $OUT/s22-ab16.txt
      MLX_ENABLE_TF32=0 timeout 170 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider --tb=line tests/test_gpu_attention.py -k "step32 or warps8" 2>&1 | tail -6 | tee $OUT/s22-tests.txt ;;
    s23) # session 20, third: 8-warp dk/dv blocks gave 0.770 -> 0.475 ms (s22); the same for the forward (16 rows a
         # warp, 72 registers: 24 warps an SM) and dq (16 or 32 rows a warp), kernels alone, then the switches' card tests
      for v in "" "MLXCLIP_GPU_FWD_ROWS=16 MLXCLIP_GPU_FWD_WARPS=8" MLXCLIP_GPU_DQ_WARPS=8 "MLXCLIP_GPU_DQ_ROWS=16 MLXCLIP_GPU_DQ_WARPS=8" "MLXCLIP_GPU_DQ_ROWS=16 MLXCLIP_GPU_DQ_STEP=32 MLXCLIP_GPU_DQ_WARPS=8"; do
        echo "== $v"; env $v timeout 60 python3 -m benchmarks.attention_profile --shape 256,12,197 --modes fused --top 3 2>&1 | grep -v -i warn; done | tee $OUT/s23-attn-profile.txt
      MLX_ENABLE_TF32=0 timeout 240 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider --tb=line tests/test_gpu_attention.py -k "warps or fused_matches" 2>&1 | tail -6 | tee $OUT/s23-tests.txt ;;
    s23b) # ViT-B-16 against torch.compile with the kernels' best settings ($B16ENV) and the weight gradients copied at the source
      env $B16ENV MLXCLIP_GPU_CONTIGUOUS_GRADS=1 MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 280 $BENCH --arch ViT-B-16 --out $OUT/b16-s20 2>&1 | tail -22 ;;
    s24) # session 21: ViT-B-16's step after changes 39-40. Its bench runs were bimodal (88-89 ms three times, 94-98 ms
         # seven; torch's within 1%) and the median did not fall by the attention kernels' ~8 ms. A timeline of twelve
         # steps with CUDA graphs, cut per step by trace_steps (kernels vs device idle: host- or device-paced?) while
         # nvidia-smi logs clocks, power and throttle reasons; then the kernel table without graphs, per-parameter and
         # multi-tensor optimizer (session 19's table: AdamW ~7 ms against ~0.9 ms of bytes)
      nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -lms 200 > $OUT/s24-smi.csv 2>&1 & smi=$!
      LD_PRELOAD=$PWD/.whlP/libmimalloc.so.2 timeout 240 python3 -m benchmarks.gpu_profile --backend mlx --arch ViT-B-16 --steps 12 --top 5 --trace $OUT/s24-trace16.json 2>&1 | grep -v -i warn | tail -24 | tee $OUT/s24-trace16.txt
      MLX_USE_CUDA_GRAPHS=0 timeout 150 python3 -m benchmarks.gpu_profile --backend mlx --arch ViT-B-16 --top 40 2>&1 | tail -42 | tee $OUT/s24-prof16.txt
      MLXCLIP_MULTI_TENSOR=1 MLX_USE_CUDA_GRAPHS=0 timeout 150 python3 -m benchmarks.gpu_profile --backend mlx --arch ViT-B-16 --top 12 2>&1 | tail -14 | tee $OUT/s24-prof16-mt.txt
      kill $smi; gzip -f $OUT/s24-trace16.json ;;
    s24t) # torch.compile's kernel table for the same step (never taken for ViT-B-16), then the attention kernels'
          # default-shape card tests on the final source
      timeout 240 python3 -m benchmarks.gpu_profile --backend torch --arch ViT-B-16 --top 30 2>&1 | grep -v -i warn | tail -32 | tee $OUT/s24-prof16-torch.txt
      MLX_ENABLE_TF32=0 timeout 200 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider --tb=line tests/test_gpu_attention.py -k "fused_matches" 2>&1 | tail -4 | tee $OUT/s24-tests.txt ;;
    s24b) # ViT-B-16 against torch.compile, this tree's defaults, clocks logged alongside (a slow run's clocks)
      nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -lms 200 > $OUT/s24b-smi.csv 2>&1 & smi=$!
      MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 280 $BENCH --arch ViT-B-16 --out $OUT/s24-b16 2>&1 | grep "items/s\|MLX/torch" | tee $OUT/s24-b16.txt
      kill $smi ;;
    s24c) # ViT-B-32 against torch.compile under its 8 GiB limit (session 19: 1.20x at 7,644 vs 8,772 MiB)
      MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 280 $BENCH --arch ViT-B-32 --memory-limit 8GiB --out $OUT/s24-b32-limit8 2>&1 | grep "items/s\|MLX/torch" | tee $OUT/s24-b32.txt ;;
    s25) # session 21: s24's timeline showed the device idle for the first 11-18 ms of every ViT-B-16 step while the
         # host built it (busy 77 ms of a ~95 ms step). Train steps now queue back to back (train.loop, bench
         # --steps-per-run, default 4 on a GPU; torch's guard without a host sync): ViT-B-16 against torch.compile
      MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 420 $BENCH --arch ViT-B-16 --out $OUT/s25-b16 2>&1 | grep "items/s\|MLX/torch" | tee $OUT/s25-b16.txt ;;
    s25b) # ViT-B-32, plain and under its 8 GiB limit
      MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 280 $BENCH --arch ViT-B-32 --out $OUT/s25-b32 2>&1 | grep "items/s\|MLX/torch" | tee $OUT/s25-b32.txt
      MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 280 $BENCH --arch ViT-B-32 --memory-limit 8GiB --out $OUT/s25-b32-limit8 2>&1 | grep "items/s\|MLX/torch" | tee -a $OUT/s25-b32.txt ;;
    s25c) # MLX alone, queued steps: ViT-B-16 under memory limits (its peak against torch's 19,382 MiB) and with the
          # multi-tensor optimizer (the kernel table's 84.8 -> 77.2 ms; a device-bound step now gains by it)
      for v in "--memory-limit 19GiB" "--memory-limit 18GiB"; do MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 150 ${BENCH/mlx,torch/mlx} --arch ViT-B-16 $v --out $OUT/s25c 2>&1 | grep "items/s" | sed "s/^/[$v] /"; done | tee $OUT/s25c.txt
      MLXCLIP_MULTI_TENSOR=1 MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 150 ${BENCH/mlx,torch/mlx} --arch ViT-B-16 --out $OUT/s25c-mt 2>&1 | grep "items/s" | sed "s/^/[multi-tensor] /" | tee -a $OUT/s25c.txt ;;
    s25d) # s25: queued, MLX's ViT-B-16 step went 95 -> 91 ms only, not to the 77 ms its device was busy: a timeline
          # of four groups of four queued steps (is the device idle inside a group, or are its kernels slower?)
      LD_PRELOAD=$PWD/.whlP/libmimalloc.so.2 timeout 240 python3 -m benchmarks.gpu_profile --backend mlx --arch ViT-B-16 --steps 4 --queued 4 --top 8 --trace $OUT/s25d-trace16.json 2>&1 | grep -v -i warn | tail -16 | tee $OUT/s25d-trace16.txt
      gzip -f $OUT/s25d-trace16.json ;;
    s25e) # s25d: the device idles 6-15 ms at each step boundary while the host builds the next step's graph: MLX
          # keeps at most 10 command buffers in flight (transforms.cpp MAX_ACTIVE_TASKS, 100 ops each on an H200),
          # and the step ends with ~2,000 small optimizer kernels, ~8 ms of device work. More ops a buffer, fewer
          # optimizer kernels (multi-tensor), both: MLX alone, ViT-B-16, queued steps
      for v in "" "MLX_MAX_OPS_PER_BUFFER=400 MLX_MAX_MB_PER_BUFFER=4000" "MLXCLIP_MULTI_TENSOR=1" "MLXCLIP_MULTI_TENSOR=1 MLX_MAX_OPS_PER_BUFFER=400 MLX_MAX_MB_PER_BUFFER=4000"; do
        env $v MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 120 ${BENCH/mlx,torch/mlx} --runs 6 --warmup 2 --arch ${E_ARCH:-ViT-B-16} --out $OUT/s25e 2>&1 | grep "items/s" | sed "s/^/[$v] /"; done | tee $OUT/s25e.txt ;;
    s25f) # s25e: 400 ops a buffer took the queued ViT-B-16 step 91.3 -> 82.4 ms but its peak 22.0 -> 44.9 GiB (bigger
          # buffers hold their inputs longer, and a step runs ahead into the next): the same under MLX's memory limit
          # (the eval loop waits while active memory is over it), a middle size, then torch alone on this machine
      for v in "MLX_MAX_OPS_PER_BUFFER=400 MLX_MAX_MB_PER_BUFFER=4000 --memory-limit 19GiB" "MLX_MAX_OPS_PER_BUFFER=200 MLX_MAX_MB_PER_BUFFER=2000" "MLX_MAX_OPS_PER_BUFFER=200 MLX_MAX_MB_PER_BUFFER=2000 --memory-limit 19GiB"; do
        split_row "$v"
        env $e MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 100 ${BENCH/mlx,torch/mlx} --runs 6 --warmup 2 --arch ViT-B-16 $a --out $OUT/s25f 2>&1 | grep "items/s" | sed "s/^/[$v] /"; done | tee $OUT/s25f.txt
      timeout 150 ${BENCH/mlx,torch/torch} --runs 6 --warmup 2 --arch ViT-B-16 --out $OUT/s25f 2>&1 | grep "items/s" | tee -a $OUT/s25f.txt ;;
    s26) # prepared in session 21: the queued step's updates left to the next step's queueing (MLXCLIP_QUEUE_STATE=0),
         # so the 10 command buffers in flight when the host starts tracing the next step hold the backward's heavy
         # ops, not ~8 ms of optimizer kernels (results/gpu-s21-h200.md §3): MLX alone, 0 / 1 alternating, ViT-B-16
         # then ViT-B-32 (host-bound: no gain expected there)
      for r in 1 2; do for v in 0 1; do
        MLXCLIP_QUEUE_STATE=$v MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 200 ${BENCH/mlx,torch/mlx} --runs 6 --warmup 2 --arch ViT-B-16 --out $OUT/s26 2>&1 | grep "items/s" | sed "s/^/[queue state $v] /"
      done; done | tee $OUT/s26.txt ;;
    s26b) # queued, ViT-B-32's step is its host's time (39.1 of 40.9 ms, s25b): the graph-node cuts measured before
          # only one step at a time, where the host's time was not the step's: the clip norm by our strided kernel
          # (~1,200 nodes fewer), the clip factor folded into AdamW (~400 fewer), both; MLX alone, default twice
      for v in "" MLXCLIP_GPU_NORM_KERNEL=1 MLXCLIP_GPU_FOLD_CLIP=1 "MLXCLIP_GPU_NORM_KERNEL=1 MLXCLIP_GPU_FOLD_CLIP=1" ""; do
        env $v MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 160 ${BENCH/mlx,torch/mlx} --runs 6 --warmup 2 --arch ViT-B-32 --out $OUT/s26b 2>&1 | grep "items/s" | sed "s/^/[$v] /"
      done | tee $OUT/s26b.txt ;;
    s26h) # session 22: the fold (MLXCLIP_GPU_FOLD_CLIP) now the GPU default after s26b; ViT-B-32 against torch.compile
          # with it, then the norm kernel's extra peak (+1.9 GiB ViT-B-32, +4.4 GiB ViT-B-16 in s26b/s26d): does MLX's
          # tape order (a BFS at most MLX_BFS_MAX_WIDTH=20 wide; the kernel reads 24 gradients a launch) make it?
      MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 330 $BENCH --arch ViT-B-32 --out $OUT/s26h-b32 2>&1 | grep "items/s\|MLX/torch" | tee $OUT/s26h.txt
      for v in "MLXCLIP_GPU_NORM_KERNEL=1" "MLXCLIP_GPU_NORM_KERNEL=1 MLX_BFS_MAX_WIDTH=64"; do
        env $v MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 80 ${BENCH/mlx,torch/mlx} --runs 6 --warmup 2 --arch ViT-B-32 --out $OUT/s26h 2>&1 | grep "items/s" | sed "s/^/[$v] /"
      done | tee -a $OUT/s26h.txt ;;
    s27) # prepared in session 22: MLX commits a command buffer at 100 ops or 1,000 MB of inputs (cuda/device.cpp
         # get_graph_limits), 10 in flight. The backward's buffers are bound by bytes (its activations), the clip
         # norm's ~1,200 small reductions by ops: the last 10 buffers when the host starts tracing the next step are
         # mostly the norm's and the updates' (~8 ms). More ops a buffer with the byte bound kept should deepen the
         # queue at the step's end without the 44.9 GiB of raising both (s25e). And the other way for the peak: each
         # op's inputs live until its buffer completes (cuda/eval.cpp), so 10 buffers of up to 1,000 MB can hold GBs
         # of freed activations; fewer MB a buffer bounds that (with more ops, so the norm's buffers stay deep).
         # Last, the queued step under MLX's memory limit with the default buffers (session 11, one step at a time:
         # torch's peak for +1% time; s25f measured it only with bigger buffers). MLX alone, ViT-B-16, alternating
      for v in "" MLX_MAX_OPS_PER_BUFFER=1000 MLX_MAX_OPS_PER_BUFFER=400 "" MLX_MAX_MB_PER_BUFFER=400 \
               "MLX_MAX_OPS_PER_BUFFER=1000 MLX_MAX_MB_PER_BUFFER=400" MLX_MAX_OPS_PER_BUFFER=1000 "--memory-limit 19GiB"; do
        split_row "$v"
        env $e MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 200 ${BENCH/mlx,torch/mlx} --runs 6 --warmup 2 --arch ViT-B-16 $a --out $OUT/s27 2>&1 | grep "items/s" | sed "s/^/[$v] /"
      done | tee $OUT/s27.txt ;;
    s27b) # the same for the host-bound ViT-B-32 (fewer commits: less host work a step?), then where the norm kernel's
          # extra peak comes from (s26b: +1.9-2.5 GiB): one step at a time (--steps-per-run 1), with and without it;
          # the same peak there says the queue's in-flight buffers hold it, not the step's own graph
      for v in "" MLX_MAX_OPS_PER_BUFFER=1000 "" "--steps-per-run 1" "MLXCLIP_GPU_NORM_KERNEL=1 --steps-per-run 1"; do
        split_row "$v"
        env $e MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 160 ${BENCH/mlx,torch/mlx} --runs 6 --warmup 2 --arch ViT-B-32 $a --out $OUT/s27b 2>&1 | grep "items/s" | sed "s/^/[$v] /"
      done | tee $OUT/s27b.txt ;;
    s27c) # prepared in session 22: MLXCLIP_GPU_INPLACE_UPDATE=1, the large parameters' AdamW as single-output kernels
          # writing over p, m and v (the one kernel of three outputs gets old buffers in input order only, so the new
          # bf16 weight, and with the fold a moment, are allocated anew: GPU-branch ViT-B-32 on the CPU, peak +654 ->
          # +381 MiB, for ~975 more graph nodes). MLX alone, alternating: ViT-B-16 (memory bar), then ViT-B-32
          # (host-bound: the nodes' cost)
      for a in ViT-B-16 ViT-B-32; do for v in "" MLXCLIP_GPU_INPLACE_UPDATE=1 "" MLXCLIP_GPU_INPLACE_UPDATE=1; do
        env $v MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 160 ${BENCH/mlx,torch/mlx} --runs 6 --warmup 2 --arch $a --out $OUT/s27c 2>&1 | grep "items/s" | sed "s/^/[$v] /"
      done; done | tee $OUT/s27c.txt ;;
    s28) # session 23 made 1,000 kernels a command buffer the CUDA default (gpu_buffers.py: ViT-B-32 alone 60-65 ->
         # 37.5 / 41.3 ms on a slow-host machine). Paired against torch.compile with it, both archs, then ViT-B-32
         # under its 8 GiB limit (the memory bar) and ViT-B-16 with the element bound at 400 (peak 18.3 GiB alone).
         # One arch a call (S28_ARCHS=ViT-B-32, then ViT-B-16): on a bare machine the first MLX process compiles its NVRTC
         # kernels first (session 23: three ViT-B-16 rows ran into 110 s timeouts before one finished, so what was
         # compiled seems kept on disk between processes), hence 450 s a row
      for a in ${S28_ARCHS:-ViT-B-32 ViT-B-16}; do MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout ${S28_TIMEOUT:-450} $BENCH --arch $a --out $OUT/s28-${a#ViT-} 2>&1 | grep "items/s\|MLX/torch"; done | tee $OUT/s28.txt ;;
    s28b) MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 280 $BENCH --arch ViT-B-32 --memory-limit 8GiB --out $OUT/s28-B-32-limit8 2>&1 | grep "items/s\|MLX/torch" | tee $OUT/s28b.txt
      MLX_MAX_MB_PER_BUFFER=400 MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 280 $BENCH --arch ViT-B-16 --out $OUT/s28-B-16-mb400 2>&1 | grep "items/s\|MLX/torch" | tee -a $OUT/s28b.txt ;;
    s28c) # ViT-B-16 at 100 / 1,000 kernels a buffer, alternating (1,000 alone never measured on it), then ViT-B-32's
          # six runs' times at each (does the default's "fast, then slow" within a process go with 1,000?)
      for a in ViT-B-16 ViT-B-32; do for v in 100 1000 100 1000; do
        MLX_MAX_OPS_PER_BUFFER=$v MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 120 ${BENCH/mlx,torch/mlx} --runs 6 --warmup 2 --arch $a --out $OUT/s28c-$a-$v 2>&1 | grep "items/s" | sed "s/^/[ops $v] /"
        python3 -c "import json,sys; r=json.loads(open(sys.argv[1]).readline()); print(' runs ms:', ' '.join(f'{1e3*t:.1f}' for t in r['times_s']))" $OUT/s28c-$a-$v/*.jsonl
      done; done | tee $OUT/s28c.txt ;;
    s28d) # session 23's graph-node cuts (changes 46-47: GPU-branch ViT-B-32 6,457 -> 5,561 nodes, bit-identical), timed:
          # the tree before them against this one, MLX alone, alternating processes (make ab_old first, here:
          # mkdir ab_old && git archive 966b773 mlx_clip benchmarks converters | tar -x -C ab_old; both at 1,000 kernels a buffer,
          # the old tree predating that default); then the weight gradients
          # row-major on the GPU (MLXCLIP_ROW_MAJOR_GRADS_GPU=1: one Transpose node a dense layer fewer, and the clip
          # norm's flat reshape no longer copies 98 transposed gradients; opt-in since session 10's H100 A/B, when
          # the step was not host-bound)
      for r in 1 2; do for t in ab_old .; do
        (cd $t && PYTHONPATH=/tmp/site:$PWD MLX_MAX_OPS_PER_BUFFER=1000 MLXCLIP_MALLOC=$OLDPWD/.whlP/libmimalloc.so.2 timeout 120 ${BENCH/mlx,torch/mlx} --runs 6 --warmup 2 --arch ViT-B-32 --out $OUT/s28d-$r-${t%.} 2>&1 | grep "items/s" | sed "s|^|[tree $t] |")
      done; done | tee $OUT/s28d.txt
      # each row its own --out (a bench writes its file anew: rows sharing one would keep only the last's run times)
      i=0; for v in 0 1 0 1; do i=$((i + 1)); MLXCLIP_ROW_MAJOR_GRADS_GPU=$v MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 120 ${BENCH/mlx,torch/mlx} --runs 6 --warmup 2 --arch ViT-B-32 --out $OUT/s28d-rm$i 2>&1 | grep "items/s" | sed "s/^/[row-major $v] /"; done | tee -a $OUT/s28d.txt ;;
    s29) # session 25: the within-process regime change (ViT-B-32 ~42 ms for a few steps, then ~55, host-bound; sessions
         # 13-15, 23-24), every step with the host's counters beside it (benchmarks/gpu_regime.py: system / user CPU,
         # page faults, context switches, the core each busy thread ran on, GC, MLX's cache). The machine's
         # topology first: a move of the main thread to another NUMA node or onto a busy thread's sibling would show
      { nproc; lscpu | grep -i "model name\|socket\|numa\|thread\|mhz"; lscpu -e 2>/dev/null | head -40
        cat /proc/sys/kernel/numa_balancing /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null; } | tee $OUT/s29-machine.txt
      LD_PRELOAD=$PWD/.whlP/libmimalloc.so.2 timeout ${S29_TIMEOUT:-450} python3 -m benchmarks.gpu_regime ${S29_ARGS:---arch ViT-B-32} --steps ${S29_STEPS:-80} --out $OUT/s29-default.jsonl > $OUT/s29-default.txt 2>&1
      grep -v "^step" $OUT/s29-default.txt | tail -30; grep "^step" $OUT/s29-default.txt | awk '{print $3}' | tr '\n' ' '; echo ;;
    s29b) # each variant its own process (S29_VARIANTS: command prefixes separated by ';', e.g. "taskset -c 0-3 env")
      i=0; IFS=';' read -ra vs <<< "${S29_VARIANTS:-env;taskset -c 0-3 env}"; for v in "${vs[@]}"; do i=$((i + 1))
        echo "[$v]"; $v LD_PRELOAD=${S29_MALLOC-$PWD/.whlP/libmimalloc.so.2} timeout 150 python3 -m benchmarks.gpu_regime ${S29_ARGS:---arch ViT-B-32} --steps ${S29_STEPS:-60} --out $OUT/s29b-$i.jsonl > $OUT/s29b-$i.txt 2>&1
        grep -v "^step" $OUT/s29b-$i.txt | grep " ms\|cpu\|flt\|csw\|time\|steps\|probe\|steal"; grep "^step" $OUT/s29b-$i.txt | awk '{print $3}' | tr '\n' ' '; echo
      done ;;
    s30) # session 25 found the host-bound ViT-B-32 step following the host core's pace (up to 2x within minutes) while
         # torch.compile's holds: the bars' rows with the backends taking turns (--rounds), each row's pace printed
         # (bench's "pace": benchmarks/host_pace.py around each row's timed runs). One arch a call (S30_ARCHS), ~240 s a ViT-B-32 row
      for a in ${S30_ARCHS:-ViT-B-32}; do MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout ${S30_TIMEOUT:-540} $BENCH --arch $a --rounds ${S30_ROUNDS:-3} --out $OUT/s30-${a#ViT-} 2>&1 | grep "items/s\|MLX/torch"; done | tee $OUT/s30.txt ;;
    s31) # session 26: q, k, v as one product (mlx_clip/fused_qkv.py; 6 of a block's 18 cuBLAS calls fewer, ~28 us of
         # host each, on the host-bound ViT-B-32 step): the joint kernels' tests, then the step with it on and off
         # in turns in one process (the host's pace moves both alike), each variant's main-thread time printed
      MLX_ENABLE_TF32=0 timeout ${S31_TEST_TIMEOUT:-300} python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_gpu_attention.py -k "joint or one_qkv or model_attention" --tb=line 2>&1 | tail -25 | tee $OUT/s31-tests.txt
      LD_PRELOAD=$PWD/.whlP/libmimalloc.so.2 timeout ${S31_TIMEOUT:-300} python3 -m benchmarks.gpu_ab --arch ${S31_ARCH:-ViT-B-32} --variants default,fusedqkv=off --rounds ${S31_ROUNDS:-40} 2>&1 | tee $OUT/s31-ab.txt ;;
    s32) # session 26, prepared: off the CPU each dense layer's dx now waits for its weight gradients (linear.py
         # ORDERED_WEIGHT_GRADS): on the CPU's GPU-branch graph the strided norm kernel's shape raised ViT-B-32 b64's
         # step peak 2.30 -> 3.39 GiB and ordering took it back to 2.31 (the default norm 2.30 -> 2.08). On the card:
         # MLX alone, separate processes, ordering off / on, with and without the norm kernel (peak and host time),
         # then (s32p, its own call: ~240 s) the norm kernel paired in rounds: if its peak is now the default's, it
         # can be the CUDA default. Four rows ~60 s each once the first process has compiled its NVRTC kernels
      for v in "MLXCLIP_ORDERED_WEIGHT_GRADS=0" "" "MLXCLIP_ORDERED_WEIGHT_GRADS=0 MLXCLIP_GPU_NORM_KERNEL=1" "MLXCLIP_GPU_NORM_KERNEL=1"; do
        env $v MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout 130 ${BENCH/mlx,torch/mlx} --arch ${S32_ARCH:-ViT-B-32} --out $OUT/s32-alone 2>&1 | grep items/s | sed "s/^/[$v] /"
      done | tee $OUT/s32-alone.txt ;;
    s32p) MLXCLIP_GPU_NORM_KERNEL=1 MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout ${S32_TIMEOUT:-330} $BENCH --arch ${S32_ARCH:-ViT-B-32} --rounds 3 --out $OUT/s32-paired-normkernel 2>&1 | grep "items/s\|MLX/torch" | tee $OUT/s32-paired.txt ;;
    s33) # session 27: the norm kernel (speed and MFU met in s30's row) with ordering (change 51) under a memory limit
         # below torch.compile's 8.6 GiB peak, which holds back the queued step's buffers: all three ViT-B-32 bars in one row?
      MLXCLIP_GPU_NORM_KERNEL=1 MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout ${S33_TIMEOUT:-330} $BENCH --arch ViT-B-32 --rounds ${S33_ROUNDS:-3} --memory-limit ${S33_LIMIT:-8GiB} --out $OUT/s33-normkernel-limit 2>&1 | grep "items/s\|MLX/torch" | tee $OUT/s33.txt ;;
    s33b) # the same for ViT-B-16 (torch.compile's peak 18.9 GiB), one round (~140 s)
      MLXCLIP_GPU_NORM_KERNEL=1 MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout ${S33_TIMEOUT:-330} $BENCH --arch ViT-B-16 --memory-limit ${S33B_LIMIT:-18GiB} --out $OUT/s33-B-16-normkernel-limit 2>&1 | grep "items/s\|MLX/torch" | tee $OUT/s33b.txt ;;
    # s34, session 27, prepared: is ViT-B-32's queued peak the run-ahead or one step's? MLX alone, the norm kernel (the
         # CUDA default since change 52) and the per-gradient sums: one step a run (no queue) against four queued,
         # then limits just above one step's need (auto: one step's peak +10%, and 10 GiB; s33's 8 GiB sat below it and
         # the host waited, 0.91x). Then s34p: the auto limit paired with torch.compile
         # Rows "environment|flags", ~50 s each once NVRTC has compiled its kernels (a bare machine's first rows: >130 s, s32)
         # s34a / s34b: its first three rows / last three, one call each (a bare machine's first call runs past 600 s with all six)
    s34|s34a|s34b)
      rows=("MLXCLIP_GPU_NORM_KERNEL=1|--steps-per-run 1" "MLXCLIP_GPU_NORM_KERNEL=1|"
            "MLXCLIP_GPU_NORM_KERNEL=0|--steps-per-run 1" "MLXCLIP_GPU_NORM_KERNEL=0|"
            "MLXCLIP_GPU_NORM_KERNEL=1|--memory-limit auto" "MLXCLIP_GPU_NORM_KERNEL=1|--memory-limit 10GiB")
      case $step in s34a) rows=("${rows[@]:0:3}") ;; s34b) rows=("${rows[@]:3}") ;; esac
      for row in "${rows[@]}"; do
        env ${row%%|*} MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout ${S34_TIMEOUT:-240} ${BENCH/mlx,torch/mlx} --arch ViT-B-32 ${row#*|} --out $OUT/s34-alone 2>&1 | grep items/s | sed "s/^/[$row] /"
      done | tee -a $OUT/s34-alone.txt ;;
    s34p) MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout ${S34_TIMEOUT:-400} $BENCH --arch ViT-B-32 --rounds 3 --memory-limit auto --out $OUT/s34-paired-auto 2>&1 | grep "items/s\|MLX/torch" | tee $OUT/s34-paired.txt ;;
    # s35, session 28, prepared. (1) Where a row's peak is: the bench now splits the allocator's peak by phase
    # ("(first run X, timed runs Y)"; s34's un-queued kernel step: 11.7 GiB over its row, 8.4 GiB in auto's one probe
    # run). (2) AdamW's first moment bf16 for bf16 weights (change 53, the default; MLXCLIP_BF16_MOMENTS=0 the old
    # fp32): -0.28 GiB predicted for ViT-B, the same graph. (3) Does a command buffer's retention set one step's peak
    # (MLX_MAX_MB_PER_BUFFER=200)? (4) The bench's queued runs now read each step's loss once the next is queued, as
    # the training loop does (before: up to 3 steps ahead, MLX's 10 buffers in flight the bound): a lower peak
    # predicted where the device is the bound (ViT-B-16, s35p), none for host-bound ViT-B-32.
    # Rows "environment|flags", MLX alone, ViT-B-32
    s35|s35a|s35b)
      rows=("|--steps-per-run 1" "|" "MLXCLIP_BF16_MOMENTS=0|--steps-per-run 1"
            "MLXCLIP_BF16_MOMENTS=0|" "MLXCLIP_GPU_NORM_KERNEL=0|--steps-per-run 1" "MLX_MAX_MB_PER_BUFFER=200|--steps-per-run 1")
      case $step in s35a) rows=("${rows[@]:0:3}") ;; s35b) rows=("${rows[@]:3}") ;; esac
      # the call's first row gets longer: on a bare machine NVRTC compiles every kernel in it (s34a's first row ran
      # past 185 s and printed nothing)
      t=${S35_FIRST_TIMEOUT:-320}
      for row in "${rows[@]}"; do
        env ${row%%|*} MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout $t ${BENCH/mlx,torch/mlx} --arch ViT-B-32 ${row#*|} --out $OUT/s35-alone 2>&1 | grep items/s | sed "s/^/[$row] /"
        t=${S35_TIMEOUT:-140}
      done | tee -a $OUT/s35-alone.txt ;;
    s35ab) timeout ${S35_TIMEOUT:-400} python3 -m benchmarks.gpu_ab --arch ViT-B-32 --variants moments=bf16,moments=fp32 --rounds 8 2>&1 | tee $OUT/s35-moments-ab32.txt ;;
    s35p) for a in ViT-B-32 ViT-B-16; do MLXCLIP_MALLOC=$PWD/.whlP/libmimalloc.so.2 timeout ${S35_TIMEOUT:-420} $BENCH --arch $a --rounds ${S35_ROUNDS:-3} --out $OUT/s35-paired-$a 2>&1 | grep "items/s\|MLX/torch"; done | tee $OUT/s35-paired.txt ;;
    s35t) # the card's tests of this session's changes; then the two CPU-scale memory tests (xfail on CUDA) with
          # command buffers of a few kernels: do they pass when MLX frees inputs early (the xfail's reason)?
      MLX_ENABLE_TF32=0 timeout 300 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_optim.py tests/test_memory.py tests/test_multi_tensor.py 2>&1 | tail -15 | tee $OUT/s35-tests.txt
      MLX_MAX_OPS_PER_BUFFER=4 MLX_MAX_MB_PER_BUFFER=1 timeout 120 python3 -m pytest -q -p no:cacheprovider --runxfail tests/test_memory.py -k "never_holds or saves_activation" 2>&1 | tail -8 | tee -a $OUT/s35-tests.txt ;;
    *) echo "unknown step $step" ;;
  esac
done
