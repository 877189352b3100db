#!/usr/bin/env bash
# Issue 17 on one GPU (nvidia-h200), results under $OUT: the student kernels' GPU tests, the
# per-layer and end-to-end kernel bench, and distillation throughput at Flux scale through `tessera run`:
# generation without capture vs distillation (sampling with capture, then training) at 1024 and
# 2048 px, summarised by bench/distill_flux.py into $OUT/distill_flux.json.
# Needs the package bundle of ../shared/gpu in .gpu (make-bundle.sh) carried with the call.
set -u
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
  test -d /tmp/site/ray || bash .gpu/install.sh
  export PYTHONPATH=/tmp/site:$PWD
  python3 -m pytest -q -m gpu tests/test_attention_kernels.py tests/test_capture_writer.py -p no:cacheprovider
  python3 bench/attention_bench.py --e2e --out "$OUT/attention_bench.json"
  for px in 1024 2048; do
    python3 -m runner run bench/jobs/flux_generate.yaml "size=[$px,$px]" output=/tmp/flux-generate-$px
    python3 -m runner run bench/jobs/flux_distill.yaml "teacher.sizes=[$px]" output=/tmp/flux-distill-$px
  done
  python3 bench/distill_flux.py /tmp/flux-generate-1024 /tmp/flux-distill-1024 \
    /tmp/flux-generate-2048 /tmp/flux-distill-2048 --out "$OUT/distill_flux.json"
  for px in 1024 2048; do cp /tmp/flux-distill-$px/job.json "$OUT/distill_job_$px.json"; done
} 2>&1 | tee "$OUT/log.txt"
