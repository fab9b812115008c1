#!/usr/bin/env bash
# Device suite: runs named lanes side by side, each on its own GPUs, so one lease measures several
# things; every lane's console and JSON files end up in one archive per lane under $OUT (the device
# returns at most 8 files).
#
#   bash bench/suite.sh LANE[:GPUS] ...     e.g.  bash bench/suite.sh e2e:0 fp8:1 mgpu2:2,3
#
# Lanes (each compares against stock diffusers from .gpu/ on the same GPUs, in the same lease):
#   e2e     the whole stack end to end (python -m bench.e2e), stock one-GPU at the end
#   fp8     bench.pipeline's compiled bf16 and fp8 variants, stock one-GPU before them
#   mgpu2   stock Ulysses-2 (torchrun), then Fluxgate groups Ulysses-2 (profiled; 1008x1008 too), Ring-2
#           (profiled), an inductor overlap experiment, Ulysses-2 with the T5 encoder sharded (eager)
#   fp8u2   Ulysses-2 with --quantize fp8
#   restart fp8 compiled engine started twice on one compile cache (cold, then warm)
#   mgpu4   Fluxgate groups Ulysses-4 and Ulysses-2 x Ring-2
#   dp      one compiled one-GPU engine per GPU of the lane at once (N independent workers)
#   batch   the whole stack at c=20, 28 steps, 1024x1024, once per --max-batch-size in BATCH_SIZES
#           (default "1 2 4"), one after the other on the lane's GPU, each with a fresh compiled worker
#           (one compile cache for all); BATCH_FLAGS (default --compile) are the worker's other flags
#   flux2u2  FLUX.2-dev at full size on 2 GPUs: a group with Ulysses-2, fp8 transformer and the Mistral
#            sharded (0, 1 and 4 references, 50 steps), then stock's transformer step on the first GPU
#   offload  the streamed transformer (budget 24 GB) with 1, 2 (the default) and 4 blocks per copy group
#   flux2tp2 FLUX.2-dev on 2 GPUs lossless: bf16 transformer and Mistral both tensor parallel
#   flux2u4  the same as flux2u2 on 4 GPUs: Ulysses-4, fp8 transformer, the Mistral sharded four ways
#   flux2u2r2  the same as flux2u4 with Ulysses-2 x Ring-2
#   flux2one FLUX.2-dev on one GPU, Mistral streamed from pinned memory: fp8, then bf16
#   engine   one-GPU engine experiments (ENGINE_VARIANTS, default: compiled without the MLPs' GELU in the
#            GEMMs' epilogues, compiled (with them), and the whole transformer as CUDA graphs with them), each
#            profiled and compared with the eager image; stock one-GPU first
#   enginefp8  the same for fp8 and inductor's coordinate-descent tuning (ENGINE_FP8_VARIANTS)
#   attn     which SDPA kernel the engine runs: the attention probe, compiled bf16 and fp8 with torch's
#            SDPA order and with cuDNN first (profiled; cache `fast` too), then the offload lane; stock first
#   u2best   FLUX.1-dev Ulysses-2 lossless at its fastest: cache-dit's async Ulysses and the split decode
#   mgpu4a   Ulysses-4 the same way, then Ulysses-2 x Ring-2 on cache-dit's runtime
#   hostbound  Ulysses-4 (async, split decode) with a host+kernel profile, then with guard evaluation
#            skipped after the warm-up (the group measured host-bound: kernels 1.34 s of a 2.60 s image)
#   sp2      FLUX.1-dev Ulysses-2 on each sequence runtime (diffusers, cache-dit, cache-dit async), then
#            async with a split decode and the `fast` preset; stock Ulysses-2 (torchrun) first
#   graphs2  FLUX.1-dev Ulysses-2 (async, split decode): the worker's regional compile, then the whole
#            transformer compiled as one program replayed as CUDA graphs (--whole reduce-overhead), both profiled
#            (its time embedder eager: a fused one skips eager's bf16 rounding of timestep x 1000 and draws
#            another image, 21.5 dB; bench.whole, docs/performance.md)
#   graphs2b stock Ulysses-2 (torchrun), then graphs2's whole transformer as one program without CUDA graphs
#   graphs4  Ulysses-4 (async, split decode): whole-transformer CUDA graphs, then the regional compile
#   speed    the compiled defaults (fused query/key norm + rotary kernel, compiled VAE decoder) against the
#            compile without them, bf16 and fp8, against eager's image; stock first. Run it alone on the machine
#   speedcache  the cache-dit presets (fast, medium, ultra; fp8 + fast) on the compiled defaults
#   widerows  the compiled defaults with inductor's one-pass row reductions widened to 16,384 elements
#            (--one-pass-rows 16384), bf16 and fp8, profiled, against eager's image
#   fp8mlp   the fp8 MLP quantization kernels: their check at FLUX's shapes (bench.fp8_mlp_check), then fp8
#            compiled without and with them, with inductor's one-pass rows up to 4,096 (bf16 too), profiled,
#            and fp8 + cache `fast`
#   qkrope2  Ulysses-2 (split decode) with the fused query/key processor (synchronous exchange: it replaces the
#            processor async Ulysses patches) against without it and against async Ulysses; stock U2 first
#   epi2     stock Ulysses-2 (torchrun), then Ulysses-2 (async, split decode) regional without the MLPs' GELU
#            in the GEMMs' epilogues (--no-epilogues), with them (the worker's default), and the whole
#            transformer as CUDA graphs with them (its time embedder eager: bench.whole), all profiled
#   fp8attn  cuDNN's fp8 attention (--attention-fp8): bench.fp8_attention_check at FLUX's shape, then fp8
#            compiled without and with it (and with the fp8 MLP kernels), bf16 linears with it, profiled,
#            against eager's image; stock first. Alone on the machine
#   fp8attn2 fp8 attention's candidate plans timed (bench.fp8_attention_check), fp8 compiled without and with
#            it, then the whole stack with it: fp8, c=20, 50 steps (bench.e2e). Alone on the machine
#   fp8attn3 fp8 compiled, with fp8 attention (its e4m3 output into the double blocks' fp8 projections), and
#            with that output dequantized first; the whole stack with it (c=20, 50 steps); fp8 + cache `fast`
#            without and with it. Alone on the machine
#   fp8attn4 fp8 compiled without and with fp8 attention, then the whole stack with it (c=20, 50 steps)
#   fp8attnfast  fp8 + cache `fast` without and with fp8 attention
#   u2ring2  stock Ulysses-2, then in one lease Ulysses-2 as the worker runs it (async, split decode), Ring-2 and
#            Ulysses-2 on diffusers' runtime (compiled whole, cuDNN), all with the steps' CUDA graphs
#   graphs   stock one GPU, then compiled bf16 and fp8 with and without the steps' CUDA graphs, profiled. Alone
#            on the machine
#   graphsu2 stock Ulysses-2 (torchrun), then Ulysses-2 (async, split decode) with and without the CUDA graphs,
#            Ring-2 with them, and sync Ulysses-2 with the fused query/key kernel
#   ring2d   stock Ulysses-2 (torchrun), then Ring-2 on diffusers' runtime, with and without the CUDA graphs
#   e2egraphs the whole stack with --compile's CUDA graphs: fp8 at c=20, 50 steps (stock beside), then bf16 at
#            c=1 and c=20, 28 steps
#   modtab   the adaLN modulation precomputed per job (the default) against projected at every step: compiled
#            bf16, fp8 + fp8 attention, cache `fast`; then the whole stack fp8 + fp8 attention (c=20, 50 steps).
#            Stock first. Alone on the machine
#   modtabb1 the whole stack lossless (--compile) with the modulation precomputed: c=1 JPEG, c=20 at 28 and
#            50 steps; stock first
#   modtabb4 the same c=20 runs with --max-batch-size 4; stock first. Side by side with modtabb1 on a second GPU
#   topil    the whole stack lossless with batches of up to 4 and the images converted on the GPU: c=1 JPEG, c=20
#            at 28 steps; stock first
#   modtabprof  compiled bf16 and fp8 + fp8 attention with the modulation precomputed, profiled; stock first
#   modtabu2 stock Ulysses-2, then Ulysses-2 on diffusers' runtime with and without the precompute
#   tokmaj   the fused query/key kernel token-major (the default since lease 48) against head-major: its check at
#            FLUX's shapes, then compiled bf16 both ways, profiled, against eager's image; stock first
#   rows     inductor's one-pass rows at 4,096 (--one-pass-rows, the default) against its own 1,024: compiled bf16
#            and fp8 + fp8 attention, profiled, against eager's image; stock first. Alone on the machine
#   fusedqkv compiled bf16 with diffusers' fused q/k/v projections (one GEMM for each stream's q, k and v) against
#            without, profiled, against eager's image; stock first. Alone on the machine
#   qktokens the fused query/key kernel with 1, 2, 4 and 8 tokens a program timed from CUDA graphs
#            (bench.qk_rope_check), then compiled bf16 with 4 (the default since lease 53), 1 and 2, profiled;
#            stock first
#   workspace  cuBLAS/cuBLASLt with no workspace (CUBLASLT_WORKSPACE_SIZE=0, CUBLAS_WORKSPACE_CONFIG=:0:0): FLUX's
#            GEMM shapes (bench.gemm_check, its default setting) with and without, then compiled bf16 with and
#            without, profiled, against eager's image; stock first
#   fastprof bf16 `fast` (Cache-DiT, 11 of 28 steps computed, no CUDA graphs) and compiled bf16, both profiled:
#            where the cached image's time goes; stock first
#   u2qk     stock Ulysses-2 (torchrun), then Ulysses-2 on diffusers' runtime as the worker runs it, and with the
#            fused query/key kernel (--qk-rope: four tokens a program since lease 53)
#   u2qk2    stock Ulysses-2 (torchrun), then the worker's Ulysses-2 (the fused query/key kernel in the group since
#            lease 57) and the same with --no-fused-qk-norm-rope
#   tok4     with the query/key kernel's 4 tokens a program: fp8 + fp8 attention against eager's image and bf16
#            `fast`, then the whole stack lossless at c=20, 50 steps, batches of up to 4; stock first
#   confirm49 modtabb4's whole-stack runs (lossless, batches of up to 4, c=20 at 28 and 50 steps), then bf16
#            `fast` with the query/key token-major; stock first (lease 49's `confirm`)
#   diag     the card's clock and power sampled throughout (smi.csv): a GEMM and the attention sustained for a
#            while (bench.sustained), compiled bf16 profiled (kernels, idle gaps), then the precomputed
#            modulation against the per-step one on true CFG, two images a job, tables in chunks
#   blas     FLUX's GEMM shapes under each cuBLAS library and split-K setting (bench.gemm_check), then compiled
#            bf16 with cuBLASLt and its split-K reduced in place (torch's default), in fp32 apart, or not at all,
#            profiled, against eager's image; stock first. Alone on the machine
#   cachegraphs  Cache-DiT's block runs replayed as CUDA graphs (the default since lease 59): bf16 `fast` with and
#            without them, then compiled bf16, all profiled (idle gaps by neighbouring kernels), against eager's
#            image; stock first
#   cachepresets  the other presets with the block graphs: `medium`, `ultra`, fp8 + fp8 attention + `fast`
#   idle     with the noise drawn on a thread and the images copied contiguous: bf16 `fast` and compiled bf16
#            profiled against eager's image; stock first
#   u2pack   stock Ulysses-2 (torchrun), then the worker's Ulysses-2 with the query, key and value in one
#            all-to-all (the default since lease 68) and as diffusers sends them (three), both profiled
#   u2overlap stock Ulysses-2 (torchrun), then the worker's Ulysses-2 (one exchange for q, k, v) as it is
#            and with inductor's compute/communication reordering (--overlap: the exchange beside the MLP)
#   symm     Ulysses' exchanges through symmetric memory (copy engines, one barrier each; the default since
#            lease 74): the round trip alone against NCCL's packed one (bench.exchange, checked to the bit),
#            stock Ulysses-2 (torchrun), then the worker's Ulysses-2 with the symmetric exchange (profiled)
#            and with NCCL's packed one
#   beside   stock Ulysses-2 (torchrun), then the worker's Ulysses-2 with the single blocks' symmetric exchanges
#            beside their MLP GEMMs (the default; profiled) and one after the other (--no-overlap)
#   u2now    stock Ulysses-2 (torchrun), then the worker's Ulysses-2 as it is now (graphs of the encoders and the
#            modulation projection, the noise drawn on a thread): issue 10's figure on the lease's cards
#   accum    the single blocks' proj_out partial sums added in the second GEMM (the default since lease 64) against
#            both added by the gating kernel (-no-accumulate), lossless and `fast`, against eager's image; stock first
#   jointv   the double blocks' joint value written in place by its projections (compiled-joint-value) against the
#            default, lossless and `fast`, against eager's image; stock first
#   biascost each biased GEMM shape against a plain mm of its size (bench.gemm_check --epilogue-cost), then
#            compiled bf16 and `fast` profiled (which GEMMs carry an epilogue; the decode's kernels). No stock
#   settled  the pipeline's execution-device lookups answered once (worker.optimizations.settled_devices),
#            their host time on this machine's CPU (bench.host_lookups), the GEMMs' bias epilogues' cost,
#            then `fast` and lossless profiled (the call's host gaps), against eager's image; stock first
#   confirm  `fast` and lossless as the worker runs them, profiled (the call's end with the image copied into
#            page-locked memory); stock first
#   xchg     Ulysses' all-to-all alone (bench.exchange) under NCCL's defaults and three settings, then stock
#            Ulysses-2 (torchrun) and the worker's Ulysses-2, profiled: where a group's time goes now
#   serve50  the whole stack lossless at c=20, 50 steps, batches of up to 4 (the issue-9 target); stock first
#   u4first  Ulysses-4 through symmetric memory (the default) and through NCCL (--nccl-exchange), four timed
#            images each with their host phases and dynamo's recompiles logged: lease 80's first symmetric
#            image took 24.6 s. Four GPUs
#   u4prof   Ulysses-4 through symmetric memory, its first image after the warm-up profiled on rank 0 (host
#            operations and the GPU's idle gaps: lease 81's first image waited 2.55 s before its first step)
#   fa4      FlashAttention-4's attention (the default where flash-attn-4 runs) against SDPA's cuDNN kernel:
#            the kernels alone at FLUX.1's shapes (bench.fa4_check), then lossless and `fast` with and without
#            it, against eager's image; stock first. Needs bench/fa4_site.sh's two calls
#   h100u2   issue 10 on its card: stock Ulysses-2, ours profiled, Ring-2, then one GPU of the pair (scaling)
#   gemmalgos  cuBLASLt's ranked candidates for each FLUX.1 GEMM against torch's call, sustained (bench.gemm_algos)
#   fa4first Ulysses-2's first image after the warm-up: without FA4 on a cold compile cache, then with it
#   quack    quack's GEMMs against cuBLAS at FLUX.1's shapes, and the gating in their epilogue (bench.quack_check)
#   gelu     the feed-forwards' input projections with their tanh GELU in quack's epilogue against cuBLAS's
#            gelubias and bias-only GEMMs, per tile; FA4 with the value strided as the fused projections leave it
#   quackgelu  lossless with --quack-gelu, without, and with --quack-gating beside it (profiled); stock first
#   quackab  lossless: the default, all three quack epilogues, --quack-gelu with --quack-gating, twice in turn
#   quackfast  `fast` with and without --quack-gelu --quack-gating, twice in turn; their engine's restarts
#   quacktargets  lossless with the quack epilogues (the default) and without, twice in turn; the presets
#   quackqkv  the fused query/key/value projection (9,216 outputs): quack's biased GEMM against cuBLAS, per tile
#   quackproj  lossless: the default, the double blocks' image q/k/v through quack, combo kernels; twice in turn
#   headcheck  lossless at HEAD twice (profiled), the default before the quack epilogues between; stock first
#   wavecheck  --fa4-waves: FA4's split calls alone (bench.fa4_check --waves), no stock
#   waves    lossless with --fa4-waves and --image-rows-last (the defaults), with each alone and with neither,
#            in turn; then `fast` with both and neither; stock first
#   vaelayout  the decode (bench.vae_check, profiled) as the worker compiles it, without inductor's layout
#            optimisation and from channels-last; then the lossless image at HEAD profiled. No stock
#   restart1 the lossless engine's restart at HEAD: two fresh processes on one compile cache (cold, warm)
#   targets22  the one-GPU targets at HEAD: lossless with --fa4-waves and --image-rows-last (the defaults) and
#            without them in turn, then `fast`, `medium` and `ultra`; stock first
#   deferred  lossless with --deferred-gating (the default) and without, in turn, then `fast`; stock first
#   deferredprof  the same two profiled, then the engine's restart at HEAD (cold, warm); no stock
#   final23  the decode with --vae-group-stats and without (bench.vae_check, profiled), then lossless with
#            --deferred-gating and without in turn, and `fast`; stock first
#   vaeattn  the decode with --vae-gemm-attention and without, in turn (bench.vae_check, profiled), no stock
#   imagecheck  the lossless image at HEAD against eager's (no stock: a check of the image)
#   quackrope  the query/key projections with their per-head RMSNorm and RoPE in quack's epilogue (bench.quack_check)
#   quackqk  lossless with --quack-qk, with both quack epilogues, and without
#   qkvviews lossless with each stream's q/k/v in one GEMM over their weights' buffer (the default) and with
#            three (the default before), profiled; stock first
#   qkvquack the same default with --quack-gating, with both quack epilogues, and alone again; then `fast`
#   vae      the VAE's decode alone: eager and compiled, NCHW and channels-last (bench.vae_check); then the
#            default engine started twice on one compile cache (cold, warm). No stock
#   vaenorm  the compiled decode profiled, and with inductor's reductions configured otherwise. No stock
#   defaults lossless and `fast` as the worker runs them, then its cold and warm restart; stock first
#   textbeside  a double block's text-stream GEMMs beside its image-stream GEMMs on a second stream
#            (bench.text_beside, a diagnosis). No stock
#   qkpair   the query and key normed and rotated in one launch or two: the kernels alone
#            (bench.qk_rope_check --pair-only), then stock, then lossless both ways, profiled
#   combo    lossless with inductor's combo kernels and without, profiled; then `fast`
#   targets  issue 4's one-GPU targets at HEAD in one lease: lossless, the `fast`, `medium` and `ultra`
#            masks, fp8 with fp8 attention and fp8 alone, each against eager's image; stock first
#            (--attention-fp8 needs .whl-cudnn carried: nvidia-cudnn-frontend)
#   fp8targets  the fp8 targets alone: fp8 with fp8 attention, fp8 alone; stock first (.whl-cudnn carried)
#   pdl      lossless with inductor's Programmatic Dependent Launch, alone and with both quack epilogues
#   quackgate  lossless with --quack-gating (the double blocks' feed-forward gated in quack's epilogue) and without
#   quackrestart  --quack-gating's engine in two fresh processes on one compile cache (cold, then warm)
#   fa4u2    stock Ulysses-2 (torchrun), then the worker's Ulysses-2 with FA4 (the default) and without it
#   fa4u4    the same at Ulysses-4: stock Ulysses-4 (torchrun), then the worker's with FA4 and without it
#   fa4fp8   fp8 (--quantize fp8) with FA4's bf16 attention and without, against eager's image; then lossless
#            started twice on one compile cache (cold, warm); stock first
#   concur   whether an attention's last partial wave fills with a single block's MLP GEMM beside it
#            (bench.concurrency), at one GPU's shapes and a Ulysses-2 rank's. No stock
# NO_STOCK=1 leaves out the stock run of lanes that start with one (a later call on the same warm machine).
# LANE_TIMEOUT_S (default 560) bounds each lane, so the archives are always written.
set -u
OUT=${OUT:?set OUT}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl $(ls .whl-serve/*.whl .whl-cudnn/*.whl 2>/dev/null) >"$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ -d .whl-fa4 ]; then bash bench/fa4_site.sh unpack >"$OUT/fa4_site.log" 2>&1; fi
if [ -d /tmp/fa4site/nvidia_cutlass_dsl/dsl_packages ]; then  # flash-attn-4 (bench/fa4_site.sh)
  export PYTHONPATH=$PYTHONPATH:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
fi
export LANE_TIMEOUT_S=${LANE_TIMEOUT_S:-560} FP8_VARIANTS=${FP8_VARIANTS:-compiled,fp8-compiled}

lane_e2e() {
  python3 -m bench.e2e --out "$1" --budget-s $((LANE_TIMEOUT_S - 20))
}

lane_fp8() {
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.pipeline --variants "$FP8_VARIANTS" --repeats 2 \
    --output-file "$1/fp8.json"
}

lane_mgpu2() {  # SKIP="stock overlap ..." leaves out runs measured earlier in the lease
  skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }
  skip stock || torchrun --nproc-per-node 2 --master-port 29611 .gpu/stock_diffusers_flux1_dev_cp.py \
    >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --compile"
  skip ulysses || $P --ulysses-degree 2 --profile --output-file "$1/ulysses2.json"
  skip uneven || $P --ulysses-degree 2 --extra-res 1008 --repeats 2 --output-file "$1/ulysses2_1008.json"
  skip ring || $P --ring-degree 2 --profile --output-file "$1/ring2.json"
  skip overlap || $P --overlap --output-file "$1/ulysses2_overlap.json"
  skip tp || python3 -m bench.parallel --num-gpus 2 --tp-size 2 --repeats 1 --output-file "$1/ulysses2_tp2_eager.json"
}

lane_fp8u2() {  # fp8 weights under Ulysses-2 (the image is compared with the one-GPU bf16 image)
  python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --quantize fp8 --output-file "$1/fp8_ulysses2.json"
}

restarts() {  # DIR VARIANT NAME: the variant's engine in two fresh processes on one cache dir (cold, warm)
  export FLUXGATE_COMPILE_CACHE_DIR=/tmp/restart-cache
  local run
  for run in cold warm; do
    python3 -m bench.pipeline --variants "$2" --repeats 1 --reference none --output-file "$1/$3_$run.json"
  done
}

lane_restart() {  # worker restart: the same fp8 compiled engine in two fresh processes, one cache dir
  restarts "$1" fp8-compiled fp8
}

lane_mgpu4() {
  python3 -m bench.parallel --num-gpus 4 --ulysses-degree 4 --compile --profile --output-file "$1/ulysses4.json"
  python3 -m bench.parallel --num-gpus 4 --ulysses-degree 2 --ring-degree 2 --compile \
    --output-file "$1/u2r2.json"
}

lane_dp() {  # one independent compiled worker engine per GPU of the lane, all at once (throughput)
  local gpu pids=()
  for gpu in ${CUDA_VISIBLE_DEVICES//,/ }; do
    CUDA_VISIBLE_DEVICES=$gpu python3 -m bench.pipeline --variants compiled --repeats 4 \
      --output-file "$1/gpu$gpu.json" >"$1/gpu$gpu.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
}

lane_batch() {  # one e2e run per batch size; each gets the lane's remaining time as its budget
  export FLUXGATE_COMPILE_CACHE_DIR=/tmp/batch-cache
  local size end=$((SECONDS + LANE_TIMEOUT_S - 20))
  for size in ${BATCH_SIZES:-1 2 4}; do
    python3 -m bench.e2e --out "$1/batch$size" --only c20-28steps --no-stock --budget-s $((end - SECONDS)) \
      --worker-flags "${BATCH_FLAGS:---compile} --max-batch-size $size"
  done
}

lane_flux2u2() {
  python3 -m bench.flux2 --num-gpus 2 --ulysses-degree 2 --tp-size 2 --quantize fp8 --compile \
    --references "${FLUX2_REFERENCES:-0,1,4}" --tag u2fp8 --image-dir "$1" --output-file "$1/u2fp8.json"
  (cd .gpu && CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES%%,*} python3 stock_flux2_dev_transformer.py) \
    >"$1/stock_flux2.log" 2>&1
}

lane_offload() {
  python3 -m bench.pipeline --variants offload-budget-24-g1,offload-budget-24,offload-budget-24-g4 --repeats 1 \
    --output-file "$1/offload.json"
}

lane_flux2tp2() {
  python3 -m bench.flux2 --num-gpus 2 --dit-tp-size 2 --tp-size 2 --compile \
    --references "${FLUX2_REFERENCES:-0,1}" --tag tp2bf16 --image-dir "$1" --output-file "$1/tp2bf16.json"
}

lane_flux2u4() {
  python3 -m bench.flux2 --num-gpus 4 --ulysses-degree 4 --tp-size 4 --quantize fp8 --compile \
    --references "${FLUX2_REFERENCES:-0,1,4}" --tag u4fp8 --image-dir "$1" --output-file "$1/u4fp8.json"
}

lane_flux2u2r2() {
  python3 -m bench.flux2 --num-gpus 4 --ulysses-degree 2 --ring-degree 2 --tp-size 4 --quantize fp8 --compile \
    --references "${FLUX2_REFERENCES:-0,1}" --tag u2r2fp8 --image-dir "$1" --output-file "$1/u2r2fp8.json"
}

lane_flux2one() {
  local B="python3 -m bench.flux2 --compile --text-encoder-cpu-offload --pin-cpu-memory --image-dir $1"
  $B --quantize fp8 --references 0,1 --tag one_fp8 --output-file "$1/one_fp8.json"
  $B --references 0 --tag one_bf16 --output-file "$1/one_bf16.json"
}

lane_engine() {
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.pipeline --variants "${ENGINE_VARIANTS:-compiled-no-epilogues,compiled,whole-graphs-epilogues}" \
    --repeats 2 --profile --reference all --output-file "$1/engine.json"
}

lane_enginefp8() {
  python3 -m bench.pipeline --variants "${ENGINE_FP8_VARIANTS:-fp8-compiled,fp8-whole-graphs,compiled-cd}" \
    --repeats 2 --profile --output-file "$1/enginefp8.json"
}

lane_attn() {
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.attention_probe >"$1/probe.log" 2>&1
  local P="python3 -m bench.pipeline --repeats 2 --profile"
  $P --variants compiled,fp8-compiled --output-file "$1/sdpa_default.json"
  $P --variants compiled,fp8-compiled,cache-fast --sdpa-first CUDNN_ATTENTION --output-file "$1/sdpa_cudnn.json"
  lane_offload "$1"
}

lane_u2best() {
  python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --repeats 3 --ulysses-async \
    --parallel-vae --profile --output-file "$1/u2_async_vae.json"
}

lane_mgpu4a() {
  python3 -m bench.parallel --num-gpus 4 --ulysses-degree 4 --compile --repeats 3 --ulysses-async \
    --parallel-vae --profile --output-file "$1/u4_async_vae.json"
  python3 -m bench.parallel --num-gpus 4 --ulysses-degree 2 --ring-degree 2 --compile --repeats 2 \
    --parallel-vae --output-file "$1/u2r2_vae.json"
}

lane_hostbound() {
  local P="python3 -m bench.parallel --num-gpus 4 --ulysses-degree 4 --compile --repeats 3 --ulysses-async"
  $P --parallel-vae --profile --output-file "$1/u4.json"
  $P --parallel-vae --skip-guards --output-file "$1/u4_skip_guards.json"
}

lane_sp2() {
  export FLUXGATE_COMPILE_CACHE_DIR=/tmp/sp2-cache
  torchrun --nproc-per-node 2 --master-port 29612 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --repeats 3"
  $P --sp-runtime diffusers --output-file "$1/u2_diffusers.json"
  $P --output-file "$1/u2_cachedit.json"
  $P --ulysses-async --output-file "$1/u2_async.json"
  $P --ulysses-async --parallel-vae --cache fast --output-file "$1/u2_async_vae_fast.json"
}

lane_graphs2() {
  local P="python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --repeats 3 --ulysses-async --parallel-vae"
  $P --compile --profile --output-file "$1/u2_regional.json"
  $P --whole reduce-overhead --profile --output-file "$1/u2_graphs.json"
}

lane_graphs2b() {
  torchrun --nproc-per-node 2 --master-port 29613 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --repeats 3 --ulysses-async --parallel-vae \
    --whole default --output-file "$1/u2_whole.json"
}

lane_graphs4() {
  local P="python3 -m bench.parallel --num-gpus 4 --ulysses-degree 4 --repeats 3 --ulysses-async --parallel-vae"
  $P --whole reduce-overhead --profile --output-file "$1/u4_graphs.json"
  $P --compile --profile --output-file "$1/u4_regional.json"
}

lane_epi2() {
  torchrun --nproc-per-node 2 --master-port 29614 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --repeats 3 --ulysses-async --parallel-vae"
  $P --compile --no-epilogues --profile --output-file "$1/u2_regional.json"
  $P --compile --profile --output-file "$1/u2_epilogues.json"
  $P --whole reduce-overhead --profile --output-file "$1/u2_graphs_epilogues.json"
}

lane_speed() {  # alone on its machine: a lane compiling beside it slows the host-bound fp8 steps (lease 24)
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.pipeline --variants compiled-neither,compiled,fp8-compiled-neither,fp8-compiled \
    --repeats 3 --reference all --output-file "$1/speed.json"
}

lane_speedcache() {
  python3 -m bench.pipeline --variants cache-fast,fp8-cache-fast,cache-medium,cache-ultra \
    --repeats 2 --output-file "$1/speedcache.json"
}

lane_widerows() {  # alone on its machine, as lane_speed
  python3 -m bench.pipeline --variants fp8-compiled,fp8-compiled-wide-rows,compiled,compiled-wide-rows \
    --repeats 3 --profile --reference all --output-file "$1/widerows.json"
}

lane_fp8mlp() {  # alone on its machine, as lane_speed
  python3 -m bench.fp8_mlp_check --output-file "$1/check.json"
  python3 -m bench.pipeline \
    --variants "${FP8MLP_VARIANTS:-fp8-compiled,fp8-compiled-mlp-kernel,fp8-compiled-wide-rows-4k,compiled-wide-rows-4k}" \
    --repeats 3 --profile --reference all --output-file "$1/fp8mlp.json"
  python3 -m bench.pipeline --variants fp8-cache-fast --repeats 2 --output-file "$1/fp8fast.json"
}

lane_graphs() {  # alone on its machine, as lane_speed
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.pipeline --variants compiled-no-graphs,compiled,fp8-compiled-no-graphs,fp8-compiled,fp8-compiled-mlp-kernel \
    --repeats 3 --reference all --profile --output-file "$1/graphs.json"
}

lane_graphsu2() {  # Ulysses-2 with the worker's CUDA graphs (the default now) and without; Ring-2 with them
  torchrun --nproc-per-node 2 --master-port 29616 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --compile --repeats 3 --parallel-vae"
  $P --ulysses-degree 2 --ulysses-async --profile --output-file "$1/u2_async.json"
  $P --ulysses-degree 2 --ulysses-async --no-cuda-graphs --output-file "$1/u2_async_no_graphs.json"
  $P --ring-degree 2 --output-file "$1/ring2_graphs.json"
  $P --ulysses-degree 2 --qk-rope --output-file "$1/u2_sync_qkrope.json"
}

lane_ring2d() {  # Ring-2 on diffusers' runtime (no cache-dit feature: compiled whole, cuDNN), with and without graphs
  torchrun --nproc-per-node 2 --master-port 29617 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --ring-degree 2 --compile --repeats 3"
  $P --profile --output-file "$1/ring2_diffusers.json"
  $P --no-cuda-graphs --output-file "$1/ring2_diffusers_no_graphs.json"
}

lane_fp8attn() {  # alone on its machine: cuDNN's fp8 attention checked, then the fp8 engine without and with it
  python3 -m bench.fp8_attention_check --output-file "$1/check.json"
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.pipeline --variants fp8-compiled,fp8-compiled-fp8-attention,fp8-compiled-fp8-attention-mlp-kernel,compiled-fp8-attention \
    --repeats 3 --reference all --profile --output-file "$1/fp8attn.json"
}

lane_fp8attn2() {  # alone: fp8 attention's plans timed, fp8 without and with it, then the whole stack with it
  python3 -m bench.fp8_attention_check --output-file "$1/check.json"
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.pipeline --variants fp8-compiled,fp8-compiled-fp8-attention --repeats 3 --reference all \
    --output-file "$1/fp8attn.json"
  python3 -m bench.e2e --out "$1/e2e" --worker-flags "--compile --quantize fp8 --attention-fp8" \
    --only c20-50steps --no-stock --budget-s $((LANE_TIMEOUT_S - 330))
}

lane_fp8attn3() {  # alone: fp8 attention's e4m3 output straight into the fp8 projections, against dequantized
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.pipeline --variants fp8-compiled,fp8-compiled-fp8-attention,fp8-compiled-fp8-attention-dequant \
    --repeats 3 --reference all --profile --output-file "$1/fp8attn.json"
  python3 -m bench.e2e --out "$1/e2e" --worker-flags "--compile --quantize fp8 --attention-fp8" \
    --only c20-50steps --no-stock --budget-s 200
  python3 -m bench.pipeline --variants fp8-cache-fast,fp8-cache-fast-fp8-attention --repeats 2 --reference all \
    --output-file "$1/fast.json"
}

lane_fp8attn4() {  # alone: fp8 without and with fp8 attention (the worker's path), then the whole stack with it
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.pipeline --variants fp8-compiled,fp8-compiled-fp8-attention --repeats 3 --reference all \
    --output-file "$1/fp8attn.json"
  python3 -m bench.e2e --out "$1/e2e" --worker-flags "--compile --quantize fp8 --attention-fp8" \
    --only c20-50steps --no-stock --budget-s 170
}

lane_fp8attnfast() {  # fp8 + cache `fast` without and with fp8 attention
  python3 -m bench.pipeline --variants fp8-cache-fast,fp8-cache-fast-fp8-attention --repeats 2 --reference all \
    --output-file "$1/fast.json"
}

lane_u2ring2() {  # one lease: Ulysses-2 as the worker runs it against Ring-2 and Ulysses-2 on diffusers' runtime
  torchrun --nproc-per-node 2 --master-port 29618 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --compile --repeats 3"
  $P --ulysses-degree 2 --ulysses-async --parallel-vae --output-file "$1/u2_async.json"
  $P --ring-degree 2 --output-file "$1/ring2_diffusers.json"
  $P --ulysses-degree 2 --sp-runtime diffusers --output-file "$1/u2_diffusers.json"
}

lane_e2egraphs() {  # the whole stack with --compile's CUDA graphs: fp8 at 50 steps (and stock), then bf16
  python3 -m bench.e2e --out "$1/fp8" --worker-flags "--compile --quantize fp8" --only c20-50steps --budget-s 300
  python3 -m bench.e2e --out "$1/bf16" --no-stock --only c1-jpeg,c20-28steps --budget-s $((LANE_TIMEOUT_S - 330))
}

lane_qkrope2() {  # Ulysses-2 as the worker runs it, with CUDA graphs, Ring-2, the fused kernel under sync Ulysses
  torchrun --nproc-per-node 2 --master-port 29615 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --compile --repeats 3 --parallel-vae"
  $P --ulysses-degree 2 --ulysses-async --no-cuda-graphs --output-file "$1/u2_async.json"
  $P --ulysses-degree 2 --ulysses-async --profile --output-file "$1/u2_async_graphs.json"
  $P --ring-degree 2 --no-cuda-graphs --profile --output-file "$1/ring2.json"
  $P --ulysses-degree 2 --qk-rope --output-file "$1/u2_sync_qkrope.json"
}

lane_modtab() {  # alone: the modulation precomputed per job against projected per step, then the whole stack
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.pipeline --repeats 3 --reference all --output-file "$1/modtab.json" --variants \
    compiled-per-step-modulation,compiled,fp8-compiled-fp8-attention-per-step-modulation,fp8-compiled-fp8-attention
  python3 -m bench.pipeline --variants cache-fast-per-step-modulation,cache-fast --repeats 2 --reference all \
    --output-file "$1/fast.json"
  python3 -m bench.e2e --out "$1/e2e" --worker-flags "--compile --quantize fp8 --attention-fp8" \
    --only c20-50steps --no-stock --budget-s $((LANE_TIMEOUT_S - 390))
}

lane_modtabb1() {  # the whole stack lossless (bf16, --compile) with the modulation precomputed
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.e2e --out "$1/e2e" --no-stock --only c1-jpeg,c20-28steps,c20-50steps \
    --budget-s $((LANE_TIMEOUT_S - 110))
}

lane_modtabb4() {  # the same at c=20 with batches of up to 4 compatible jobs (B4_ONLY: the scenarios)
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.e2e --out "$1/e2e" --no-stock --only "${B4_ONLY:-c20-28steps,c20-50steps}" \
    --worker-flags "--compile --max-batch-size 4" --budget-s $((LANE_TIMEOUT_S - 110))
}

lane_topil() {  # the whole stack lossless, batches of up to 4, images converted to 8 bits on the GPU
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.e2e --out "$1/e2e" --no-stock --only c1-jpeg,c20-28steps \
    --worker-flags "--compile --max-batch-size 4" --budget-s $((LANE_TIMEOUT_S - 110))
}

lane_modtabprof() {  # where the time goes with the modulation precomputed
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.pipeline --variants compiled,fp8-compiled-fp8-attention --repeats 2 --reference all --profile \
    --output-file "$1/prof.json"
}

lane_modtabu2() {  # Ulysses-2 and Ring-2 on diffusers' runtime, the modulation precomputed or per step
  torchrun --nproc-per-node 2 --master-port 29619 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --compile --repeats 3"
  $P --ulysses-degree 2 --output-file "$1/u2.json"
  $P --ulysses-degree 2 --no-precompute-modulation --output-file "$1/u2_per_step.json"
}

lane_tokmaj() {  # the query and key token-major: cuDNN's output needs no copy before its projection
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.qk_rope_check --output-file "$1/qk_rope_check.json"
  python3 -m bench.pipeline --variants compiled-head-major-qk,compiled --repeats 3 --reference all --profile \
    --output-file "$1/tokmaj.json"
}

lane_rows() {  # the LayerNorms' 3,072-wide rows in one pass
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.pipeline --variants compiled-inductor-rows,compiled,fp8-compiled-fp8-attention-inductor-rows,fp8-compiled-fp8-attention \
    --repeats 3 --reference all --profile --output-file "$1/rows.json"
}

lane_fusedqkv() {  # the q, k and v projections as one GEMM per stream
  (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
  python3 -m bench.pipeline --variants compiled,compiled-fused-qkv --repeats 3 --reference all --profile \
    --output-file "$1/fusedqkv.json"
}

stock() {  # stock diffusers on one GPU, the lease's baseline (unless NO_STOCK=1)
  [ "${NO_STOCK:-0}" = 1 ] || (cd .gpu && python3 stock_diffusers_flux1_dev.py) >"$1/stock.log" 2>&1
}

lane_blas() {  # the GEMMs without the zeroed split-K counters before them
  stock "$1"
  python3 -m bench.gemm_check --output-file "$1/gemm_check.json"
  python3 -m bench.pipeline --variants compiled,compiled-no-split-k,compiled-fp32-split-k,compiled-cublaslt \
    --repeats 3 --reference all --profile --output-file "$1/blas.json"
}

lane_qktokens() {  # more bytes in flight per program of the query/key kernel
  stock "$1"
  python3 -m bench.qk_rope_check --output-file "$1/qk_rope_check.json"
  python3 -m bench.pipeline --variants compiled,compiled-qk-tokens-1,compiled-qk-tokens-2 --repeats 3 \
    --reference all --profile --output-file "$1/qktokens.json"
}

lane_workspace() {  # do the memsets before cuBLAS's cooperative kernels clear its workspace?
  stock "$1"
  local none="CUBLASLT_WORKSPACE_SIZE=0 CUBLAS_WORKSPACE_CONFIG=:0:0"
  python3 -m bench.gemm_check --settings "cublas (default)" --output-file "$1/gemm_default.json"
  env $none python3 -m bench.gemm_check --settings "cublas (default)" --output-file "$1/gemm_no_workspace.json"
  python3 -m bench.pipeline --variants compiled --repeats 3 --reference all --profile \
    --output-file "$1/compiled.json"
  env $none python3 -m bench.pipeline --variants compiled --repeats 3 --reference all --profile \
    --output-file "$1/no_workspace.json"
}

lane_fastprof() {  # is the cached image, whose computed steps run without the CUDA graphs, host-bound?
  stock "$1"
  python3 -m bench.pipeline --variants cache-fast,compiled --repeats 2 --profile --output-file "$1/fastprof.json"
}

lane_cachegraphs() {  # do Cache-DiT's computed steps, replayed as graphs, still wait on the host?
  stock "$1"
  python3 -m bench.pipeline --variants cache-fast,cache-fast-no-graphs,compiled --repeats 3 --reference all \
    --profile --output-file "$1/cachegraphs.json"
}

lane_cachepresets() {  # the other presets on the block graphs
  stock "$1"
  python3 -m bench.pipeline --variants cache-medium,cache-ultra,fp8-cache-fast-fp8-attention --repeats 3 \
    --reference all --output-file "$1/cachepresets.json"
}

lane_idle() {  # the host's waits at a call's start (the noise) and end (the image's copy) taken out
  stock "$1"
  python3 -m bench.pipeline --variants cache-fast,compiled --repeats 3 --reference all --profile \
    --output-file "$1/idle.json"
}

lane_serve50() {  # the serving target the engine's idle time decides
  stock "$1"
  python3 -m bench.e2e --out "$1/e2e" --no-stock --only c20-50steps \
    --worker-flags "--compile --max-batch-size 4" --budget-s $((LANE_TIMEOUT_S - SECONDS - 20))
}

lane_u2qk() {  # the fused query/key kernel in a group on diffusers' runtime (its exchange is synchronous there)
  torchrun --nproc-per-node 2 --master-port 29619 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --repeats 3"
  $P --output-file "$1/u2.json"
  $P --qk-rope --output-file "$1/u2_qk.json"
}

lane_u2qk2() {  # the group's default with the fused query/key kernel, against without it
  torchrun --nproc-per-node 2 --master-port 29619 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --repeats 3"
  $P --output-file "$1/u2.json"
  $P --no-fused-qk-norm-rope --output-file "$1/u2_inductor_qk.json"
}

lane_accum() {  # one partial sum fewer read by the single blocks' gating kernel
  stock "$1"
  python3 -m bench.pipeline --variants compiled,compiled-no-accumulate,cache-fast,cache-fast-no-accumulate --repeats 3 \
    --reference all --output-file "$1/accum.json"
}

lane_jointv() {  # no concatenation of the double blocks' value projections
  stock "$1"
  python3 -m bench.pipeline --variants compiled-joint-value,compiled,cache-fast-joint-value,cache-fast --repeats 3 \
    --reference all --output-file "$1/jointv.json"
}

lane_biascost() {  # what the GEMMs' bias epilogues cost, and which of a step's GEMMs carry one (a diagnosis)
  python3 -m bench.gemm_check --epilogue-cost --output-file "$1/epilogue_cost.json"
  python3 -m bench.pipeline --variants compiled,cache-fast --repeats 1 --profile --output-file "$1/prof.json"
}

lane_settled() {  # diffusers' device lookups answered once (settle_devices): `fast` and lossless, profiled; stock first
  stock "$1"
  python3 -m bench.host_lookups >"$1/host_lookups.json"
  python3 -m bench.gemm_check --epilogue-cost --output-file "$1/epilogue_cost.json"
  python3 -m bench.pipeline --variants cache-fast,compiled --repeats 3 --reference all --profile \
    --output-file "$1/settled.json"
}

lane_confirm() {  # `fast` and lossless as the worker runs them, profiled; stock first
  stock "$1"
  python3 -m bench.pipeline --variants cache-fast,compiled --repeats 3 --reference all --profile \
    --output-file "$1/confirm.json"
}

lane_xchg() {  # Ulysses' exchange alone under NCCL's settings, then stock Ulysses-2 and ours, profiled
  local X="torchrun --nproc-per-node 2 --master-port 29621 -m bench.exchange"
  $X --output-file "$1/x_default.json"
  NCCL_MIN_P2P_NCHANNELS=16 $X --label min-p2p-16 --output-file "$1/x_p2p16.json"
  NCCL_MIN_P2P_NCHANNELS=32 $X --label min-p2p-32 --output-file "$1/x_p2p32.json"
  NCCL_P2P_NVL_CHUNKSIZE=2097152 $X --label nvl-chunk-2m --output-file "$1/x_chunk2m.json"
  torchrun --nproc-per-node 2 --master-port 29619 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --repeats 3 --profile \
    --output-file "$1/u2.json"
}

lane_u2pack() {  # Ulysses' query, key and value in one exchange against diffusers' three; stock Ulysses-2 first
  torchrun --nproc-per-node 2 --master-port 29619 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --repeats 3 --profile"
  $P --output-file "$1/u2_packed.json"
  $P --unpacked-exchange --output-file "$1/u2.json"
}

lane_u2overlap() {  # the packed exchange with inductor's compute/communication reordering; stock Ulysses-2 first
  torchrun --nproc-per-node 2 --master-port 29619 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --repeats 3"
  $P --output-file "$1/u2.json"
  $P --overlap --profile --output-file "$1/u2_overlap.json"
}

lane_symm() {  # the symmetric exchange alone, then in the group; stock Ulysses-2 before the group's runs
  torchrun --nproc-per-node 2 --master-port 29621 -m bench.exchange --output-file "$1/exchange.json" \
    >"$1/exchange.log" 2>&1
  tail -3 "$1/exchange.log"
  torchrun --nproc-per-node 2 --master-port 29619 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --repeats 3"
  $P --profile --output-file "$1/u2_symmetric.json"
  $P --nccl-exchange --output-file "$1/u2_nccl.json"
}

lane_u4first() {  # Ulysses-4's first images, symmetric and NCCL, with recompiles logged
  local P="python3 -m bench.parallel --num-gpus 4 --ulysses-degree 4 --compile --repeats 4"
  TORCH_LOGS=recompiles $P --output-file "$1/u4_symmetric.json" >"$1/u4_symmetric.log" 2>&1
  grep -E "Recompiling|recompil|median_s" "$1/u4_symmetric.log" | tail -20
  TORCH_LOGS=recompiles $P --nccl-exchange --output-file "$1/u4_nccl.json" >"$1/u4_nccl.log" 2>&1
  grep -E "Recompiling|recompil|median_s" "$1/u4_nccl.log" | tail -20
}

lane_u4prof() {  # Ulysses-4's first image after the warm-up profiled on rank 0, symmetric
  python3 -m bench.parallel --num-gpus 4 --ulysses-degree 4 --compile --repeats 3 --profile-first \
    --output-file "$1/u4_first.json"
}

lane_fa4() {  # FlashAttention-4 against cuDNN: the kernels, then lossless and `fast`; stock first
  python3 -m bench.fa4_check --heads 24 --tiles "" --output-file "$1/fa4_check.json"
  stock "$1"
  python3 -m bench.pipeline --variants compiled,compiled-no-fa4,cache-fast,cache-fast-no-fa4 --repeats 3 \
    --reference all --output-file "$1/fa4.json"
}

fa4_group() {  # DIR N: Ulysses-N with FlashAttention-4 and without; stock Ulysses-N (torchrun) first
  torchrun --nproc-per-node "$2" --master-port 29619 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus $2 --ulysses-degree $2 --compile --repeats 3"
  $P --output-file "$1/u$2_fa4.json"
  $P --no-fa4-attention --output-file "$1/u$2_cudnn.json"
}

lane_fa4u2() {  # Ulysses-2 with FlashAttention-4 and without; stock Ulysses-2 first
  fa4_group "$1" 2
}

lane_fa4u4() {  # Ulysses-4 with FlashAttention-4 and without; stock Ulysses-4 first
  fa4_group "$1" 4
}

lane_fa4fp8() {  # fp8 with FlashAttention-4 and without, then a cold and a warm restart on one cache; stock first
  stock "$1"
  python3 -m bench.pipeline --variants fp8-compiled,fp8-compiled-no-fa4 --repeats 2 --reference all \
    --output-file "$1/fp8.json"
  restarts "$1" compiled restart
}

lane_h100u2() {  # issue 10's card: stock Ulysses-2, ours (profiled), Ring-2, then one GPU of the pair for the scaling
  torchrun --nproc-per-node 2 --master-port 29619 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --compile --repeats 3"
  $P --ulysses-degree 2 --profile --output-file "$1/u2.json"
  $P --ring-degree 2 --output-file "$1/ring2.json"
  CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES%%,*} python3 -m bench.pipeline --variants compiled --repeats 2 \
    --reference none --output-file "$1/one_gpu.json"
}

lane_gemmalgos() {  # cuBLASLt's other candidates for each GEMM shape, timed at the power cap (a diagnosis)
  python3 -m bench.gemm_algos --candidates 8 --seconds 0.3 --sequence-parallel 1 --sequence-parallel 2 \
    --output-file "$1/gemm_algos.json"
}

lane_fa4first() {  # the group's first image after its warm-up: cuDNN first (cold compile cache), then FA4 (warm)
  local P="python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --repeats 3"
  $P --no-fa4-attention --output-file "$1/u2_cudnn_cold.json"
  $P --output-file "$1/u2_fa4_warm.json"
}

lane_quack() {  # quack's CuTe DSL GEMMs against cuBLAS at FLUX.1's shapes, and with the gating in their epilogue
  python3 -m bench.quack_check --output-file "$1/quack.json"
}

lane_gelu() {  # the feed-forwards' GELU in quack's epilogue against cuBLAS's, per tile; FA4 with the worker's value
  python3 -m bench.quack_check --parts gelu --seconds 0.4 --output-file "$1/gelu.json"
  python3 -m bench.fa4_check --heads 24 --tiles "" --output-file "$1/fa4_value.json"
}

lane_quackqkv() {  # a stream's fused q/k/v projection: quack's GEMM with the bias against cuBLAS's, per tile
  python3 -m bench.quack_check --parts qkv --seconds 0.4 --output-file "$1/quackqkv.json"
}

lane_quackrope() {  # a query's projections with their norm and RoPE in quack's epilogue, against the worker's
  python3 -m bench.quack_check --parts rope --output-file "$1/quackrope.json"
}

lane_quackgate() {  # the double blocks' feed-forward gated in quack's GEMM epilogue, against cuBLAS + gating kernel
  stock "$1"
  python3 -m bench.pipeline --variants compiled-quack-gating,compiled --repeats 3 --reference all \
    --output-file "$1/quackgate.json"
}

lane_quackqk() {  # the query/key projections normed and rotated in quack's epilogue, with and without its gating
  stock "$1"
  python3 -m bench.pipeline --variants compiled-quack-qk,compiled-quack,compiled --repeats 3 --reference all \
    --output-file "$1/quackqk.json"
}

lane_pdl() {  # inductor's kernels with Programmatic Dependent Launch, alone and with both quack epilogues
  stock "$1"
  python3 -m bench.pipeline --variants compiled-pdl,compiled,compiled-quack-pdl --repeats 3 --reference all \
    --output-file "$1/pdl.json"
}

lane_qkvviews() {  # one GEMM per stream for the query, key and value (worker.optimizations.fused_qkv)
  stock "$1"
  python3 -m bench.pipeline --variants compiled,compiled-unfused-qkv --repeats 5 --reference all --profile \
    --output-file "$1/qkvviews.json"
}

lane_qkvquack() {  # the quack epilogues on top of the fused projections (a later call: NO_STOCK=1)
  stock "$1"
  python3 -m bench.pipeline --variants compiled-quack-gating,compiled-quack,compiled,cache-fast --repeats 5 \
    --reference all --output-file "$1/qkvquack.json"
}

lane_vae() {  # the decode's layouts, then the worker's restart with the fused projections
  python3 -m bench.vae_check --output-file "$1/vae_check.json"
  restarts "$1" compiled restart
}

lane_vaenorm() {  # the compiled decode profiled, with inductor's reductions configured three other ways
  python3 -m bench.vae_check --variants compiled,compiled-no-persistent,compiled-tuned,compiled-cd --profile \
    --output-file "$1/vae_norm.json"
}

lane_defaults() {  # the worker's defaults: lossless and `fast`, then two fresh starts on one compile cache
  stock "$1"
  python3 -m bench.pipeline --variants compiled,cache-fast --repeats 5 --reference all \
    --output-file "$1/defaults.json"
  restarts "$1" compiled restart
}

lane_textbeside() {  # do the double blocks' text GEMMs hide beside their image GEMMs?
  python3 -m bench.text_beside --output-file "$1/text_beside.json"
}

lane_qkpair() {  # the fused projections' query and key in one norm-and-rotate launch (the default) or two
  python3 -m bench.qk_rope_check --pair-only --output-file "$1/qk_pair_check.json"
  stock "$1"
  python3 -m bench.pipeline --variants compiled,compiled-unpaired-qk --repeats 5 --reference all --profile \
    --output-file "$1/qkpair.json"
}

lane_combo() {  # inductor's combo kernels: a graph's independent kernels launched as one
  stock "$1"
  python3 -m bench.pipeline --variants compiled-combo,compiled,cache-fast --repeats 5 --reference all --profile \
    --output-file "$1/combo.json"
}

lane_targets() {  # the one-GPU targets at HEAD, one lease, one card
  stock "$1"
  python3 -m bench.pipeline --variants compiled,cache-fast,cache-medium,cache-ultra,fp8-compiled-fp8-attention,fp8-compiled \
    --repeats 3 --reference all --output-file "$1/targets.json"
}

lane_quackgelu() {  # the feed-forwards' GELU in quack's epilogue (--quack-gelu), alone and with --quack-gating
  stock "$1"
  python3 -m bench.pipeline --variants compiled-quack-gelu,compiled,compiled-quack-gelu-gating --repeats 5 \
    --reference all --profile --output-file "$1/quackgelu.json"
}

lane_quackab() {  # the quack epilogues against the default, alternating (A B C A B C) on one card
  stock "$1"
  local V=compiled,compiled-quack-all,compiled-quack-gelu-gating
  python3 -m bench.pipeline --variants $V,$V --repeats 4 --reference all --output-file "$1/quackab.json"
}

lane_quackfast() {  # `fast` with and without --quack-gelu --quack-gating in turn, then their restarts (cold, warm)
  stock "$1"
  local V=cache-fast,cache-fast-quack-gelu-gating
  python3 -m bench.pipeline --variants $V,$V --repeats 4 --reference all --output-file "$1/quackfast.json"
  restarts "$1" compiled-quack-gelu-gating restart
}

lane_quacktargets() {  # the one-GPU targets with the quack epilogues the default, the old default in turn
  stock "$1"
  local V=compiled,compiled-no-quack
  python3 -m bench.pipeline --variants $V,$V,cache-fast,cache-fast-no-quack,cache-medium,cache-ultra --repeats 3 \
    --reference all --output-file "$1/quacktargets.json"
}

lane_quackproj() {  # the double blocks' image q/k/v projection through quack, and combo kernels, against the default
  stock "$1"
  local V=compiled,compiled-quack-projection,compiled-combo
  python3 -m bench.pipeline --variants $V,$V --repeats 3 --reference all --output-file "$1/quackproj.json"
}

lane_headcheck() {  # lossless at HEAD (profiled: T5's bias copies gone), the default before the quack epilogues between
  stock "$1"
  python3 -m bench.pipeline --variants compiled,compiled-no-quack,compiled --repeats 3 --reference all --profile \
    --output-file "$1/headcheck.json"
}

lane_wavecheck() {  # FA4's calls split to fill the last wave (--fa4-waves), the kernels alone
  python3 -m bench.fa4_check --waves --heads 24,12,6 --output-file "$1/fa4waves.json"
}

lane_waves() {  # FA4's calls split to fill the last wave (--fa4-waves, the default) against unsplit, in turn
  stock "$1"
  local V=compiled,compiled-no-waves-no-rows,compiled-no-fa4-waves,compiled-no-image-rows-last
  python3 -m bench.pipeline --variants $V,compiled,compiled-no-waves-no-rows,cache-fast,cache-fast-no-waves-no-rows \
    --repeats 3 --reference all --output-file "$1/waves.json"
}

lane_vaelayout() {  # the decode's kernels by layout, then the lossless image's (profiled), no stock
  python3 -m bench.vae_check --variants compiled-tuned,compiled-tuned-no-layout,compiled-tuned-channels-last \
    --profile --output-file "$1/vaelayout.json"
  python3 -m bench.pipeline --variants compiled --repeats 2 --reference none --profile --output-file "$1/profile.json"
}

lane_restart1() {  # the lossless engine at HEAD in two fresh processes on one compile cache (cold, warm)
  restarts "$1" compiled restart
}

lane_targets22() {  # the one-GPU targets at HEAD, the two new defaults against neither in turn
  stock "$1"
  local V=compiled,compiled-no-waves-no-rows
  python3 -m bench.pipeline --variants $V,$V,cache-fast,cache-medium,cache-ultra --repeats 3 --reference all \
    --output-file "$1/targets22.json"
}

lane_deferred() {  # lossless with --deferred-gating (the default) and without, in turn; `fast`; stock first
  stock "$1"
  local V=compiled,compiled-no-deferred-gating
  python3 -m bench.pipeline --variants $V,$V,cache-fast --repeats 3 --reference all --output-file "$1/deferred.json"
}

lane_deferredprof() {  # the same two profiled (the norm kernels' fusion), then restarts at HEAD (cold, warm)
  python3 -m bench.pipeline --variants compiled,compiled-no-deferred-gating --repeats 2 --reference none \
    --profile --output-file "$1/deferredprof.json"
  restarts "$1" compiled restart
}

lane_final23() {  # the decode with --vae-group-stats (its statistics checked first) and without, profiled; then
  # lossless with --deferred-gating and without in turn, and `fast`; stock first. Where the decode's check
  # fails, the lossless runs take inductor's statistics and `fast` is left out
  stock "$1"
  local V=compiled,compiled-no-deferred-gating F=,cache-fast
  python3 -m bench.vae_check --variants compiled-tuned-inductor-stats,compiled-tuned --profile \
    --output-file "$1/vaestats.json" >"$1/vaestats.log" 2>&1 ||
    { V=compiled-inductor-vae-stats,compiled-no-deferred-gating-inductor-vae-stats F=; }
  python3 -m bench.pipeline --variants $V,$V$F --repeats 3 --reference all --output-file "$1/final23.json"
}

lane_vaeattn() {  # the decode with its attention as two GEMMs (the default) and on SDPA's kernel, profiled; no stock
  python3 -m bench.vae_check --variants compiled-tuned-sdpa-attention,compiled-tuned,compiled-tuned-sdpa-attention \
    --profile --output-file "$1/vaeattn.json"
}

lane_imagecheck() {  # the lossless image at HEAD against eager's, no stock (a check of the image, not a speed)
  python3 -m bench.pipeline --variants compiled --repeats 2 --reference all --output-file "$1/imagecheck.json"
}

lane_fp8targets() {  # the fp8 targets at HEAD (the attention's fp8 kernel needs .whl-cudnn)
  stock "$1"
  python3 -m bench.pipeline --variants fp8-compiled-fp8-attention,fp8-compiled --repeats 3 --reference all \
    --output-file "$1/fp8targets.json"
}

lane_quackrestart() {  # --quack-gating's engine started twice on one compile cache (quack's tuning in it too)
  restarts "$1" compiled-quack-gating quack_restart
}

lane_concur() {  # the attention's last wave beside a GEMM (bench.concurrency)
  python3 -m bench.concurrency --output-file "$1/concurrency.json"
}

lane_beside() {  # the single blocks' exchanges beside their MLP GEMMs, against one after the other
  torchrun --nproc-per-node 2 --master-port 29619 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  local P="python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --repeats 3"
  $P --profile --output-file "$1/u2_beside.json"
  $P --no-overlap --output-file "$1/u2_serial.json"
}

lane_u2now() {  # the group's image with this session's engine
  torchrun --nproc-per-node 2 --master-port 29619 .gpu/stock_diffusers_flux1_dev_cp.py >"$1/stock_cp.log" 2>&1
  python3 -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --repeats 3 --output-file "$1/u2.json"
}

lane_tok4() {  # the other paths through the query/key kernel, then the serving target it was adopted for
  stock "$1"
  python3 -m bench.pipeline --variants fp8-compiled-fp8-attention,cache-fast --repeats 3 \
    --output-file "$1/tok4.json"
  python3 -m bench.e2e --out "$1/e2e" --no-stock --only c20-50steps \
    --worker-flags "--compile --max-batch-size 4" --budget-s $((LANE_TIMEOUT_S - SECONDS - 20))
}

lane_confirm49() {  # the lossless serving targets on another card, then `fast` with the token-major query/key
  lane_modtabb4 "$1"
  python3 -m bench.pipeline --variants cache-fast --repeats 2 --output-file "$1/fast.json"
}

lane_diag() {  # where the lossless image's time goes, and whether the card holds its clock
  local card=${CUDA_VISIBLE_DEVICES%%,*}
  nvidia-smi -i "$card" --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv -lms 250 >"$1/smi.csv" 2>&1 &
  local sampler=$!
  date +%T.%N >"$1/phases.log"
  python3 -m bench.sustained --seconds 15 --output-file "$1/sustained.json"
  date +%T.%N >>"$1/phases.log"
  python3 -m bench.pipeline --variants compiled --repeats 2 --profile --output-file "$1/prof.json"
  date +%T.%N >>"$1/phases.log"
  python3 -m bench.pipeline --variants compiled,compiled-per-step-modulation --reference all --repeats 1 \
    --true-cfg 4 --images 2 --table-bytes 8388608 --output-file "$1/cfg.json"
  date +%T.%N >>"$1/phases.log"
  kill "$sampler"
}

pids=()
for spec in "$@"; do
  name=${spec%%:*}
  gpus=${spec#*:}
  [ "$gpus" = "$spec" ] && gpus=0
  dir=/tmp/lanes/$name
  mkdir -p "$dir"
  (
    export CUDA_VISIBLE_DEVICES=$gpus
    timeout --signal=TERM --kill-after=15 "$LANE_TIMEOUT_S" bash -c "$(declare -f); lane_$name $dir" \
      >"$dir/console.log" 2>&1
    echo "exit $?" >>"$dir/console.log"
    tar czf "$OUT/$name.tgz" -C "$dir" .
  ) &
  pids+=($!)
done
wait "${pids[@]}"
for spec in "$@"; do
  name=${spec%%:*}
  echo "== $name"; grep -h "RESULT\|req/s\|^exit\|Error" "/tmp/lanes/$name/console.log" | tail -8
done
