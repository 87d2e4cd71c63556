#!/usr/bin/env bash
# Issue 4's GPU checks in one device call, after `bash benchmarks/gpu_stage.sh`
# and its staging calls (the pieces hold site.tar.xz: FAISS-GPU, SQLAlchemy,
# the image-tower code and MiniLM installed for Python 3.12; flickr8k-sub:
# 1,000 of the 224-pixel copies; flickr8k-mini: 32 full-size photos).
# Writes into $OUT: gpu.txt (the card), pytest_gpu.txt, and one JSON line per
# benchmark in gpu.jsonl. Steps run most important first, each under its own
# time limit, so a slow one cannot eat the others' time and whatever finished
# comes back even if the call runs out.
#
#   device run, timeout_s 480: bash benchmarks/gpu_checks.sh
#
# A session's device time is 15 minutes, cold start and staging included:
# the limits below add up to about 7 minutes.
set -u
source /root/stage/device-setup.sh
set +e  # device-setup.sh turns -e on; a failed step must not end the others
if [ -e /root/stage/site.tar.xz ] && [ ! -e /tmp/site/.done ]; then
  mkdir -p /tmp/site
  if command -v xz >/dev/null; then
    xz -dc -T0 /root/stage/site.tar.xz | tar xf - -C /tmp/site
  else
    python3 -c "import tarfile; tarfile.open('/root/stage/site.tar.xz').extractall('/tmp/site')"
  fi
fi
OUT=${OUT:-/tmp/xmr-gpu}
mkdir -p "$OUT"
STAGE=/root/stage
COPIES=$STAGE/flickr8k-sub/Flicker8k_Dataset
MINI=$STAGE/flickr8k-mini/Flicker8k_Dataset
CORES=$(nproc)
export XMR_DATASETS=$STAGE   # tests/conftest.py finds flickr8k-mini there
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; echo "cores $CORES"; date -u; } > "$OUT/gpu.txt"
python3 -c "import faiss, torch; print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus(), 'torch', torch.__version__)" \
  >> "$OUT/gpu.txt" 2>&1

timeout 110 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_vectors.py \
  > "$OUT/pytest_gpu.txt" 2>&1

bench() {  # bench NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS result
  result=$(timeout "$limit" "$@" 2>>"$OUT/stderr.txt") || result=null
  echo "{\"run\": \"$name\", \"wall_s\": $((SECONDS - t0)), \"result\": ${result:-null}}" >> "$OUT/gpu.jsonl"
}
# end-to-end indexing of 8,000 224-pixel copies (1,000 files linked 8 times), decoding threads
bench index-copies-threads 60 python3 benchmarks/bench_index.py --images "$COPIES" --repeat 8 --device cuda \
  --batch-size 256 --json
# text -> image at 1M vectors with reranking of the top 50 (the GPU latency target)
bench query-1000000-rerank50 110 python3 benchmarks/bench_query.py --vectors 1000000 --device cuda --rerank-k 50 --json
# full-size photos: the 32 originals of flickr8k-mini linked 64 times, decoding processes
bench index-originals-procs 45 python3 benchmarks/bench_index.py --images "$MINI" --repeat 64 --device cuda \
  --batch-size 256 --processes $((CORES - 2)) --json
bench index-copies-procs 50 python3 benchmarks/bench_index.py --images "$COPIES" --repeat 8 --device cuda \
  --batch-size 256 --processes $((CORES - 2)) --json
bench query-100000-rerank50 45 python3 benchmarks/bench_query.py --vectors 100000 --device cuda --rerank-k 50 --json
bench query-10000-rerank50 30 python3 benchmarks/bench_query.py --vectors 10000 --device cuda --rerank-k 50 --json
echo "done in $SECONDS s" >> "$OUT/gpu.txt"
