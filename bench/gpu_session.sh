#!/usr/bin/env bash
# One device session of GPU measurements on a 2-GPU host (nvidia-h200-x2), results under $OUT:
#   issue 2: the tiny-model job on 1 and on 2 GPUs (job.json shows the workers used);
#   issue 5: forward floor, P1 + P2 (the 2048 -> 4096 phase on 1 and 2 GPUs), P3 (progressive and
#   the direct 4096 px job), the OOM fallback last (it frees the benchmark pool's GPUs).
# Needs the package bundle of ../shared/gpu in .gpu (make-bundle.sh) carried with the call.
set -u
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
  test -d /tmp/site/ray || bash .gpu/install.sh
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "from PIL import Image; Image.effect_mandelbrot((256, 192), (-2, -1.2, 1, 1.2), 64).convert('RGB').save('/tmp/in.png')"
  for n in 1 2; do
    python3 -m runner run clusters/examples/tiny_tiled_img2img.yaml image=/tmp/in.png output=/tmp/tiny-w$n \
      pool.name=tiny$n pool.workers=$n pool.gpus_per_worker=1 tiling.tile=64 tiling.overlap=16 && cp /tmp/tiny-w$n/job.json "$OUT/tiny_job_w$n.json"
  done
  python3 bench/upscale_bench.py floor phase whole direct oom --workers 1,2
} 2>&1 | tee "$OUT/log.txt"
