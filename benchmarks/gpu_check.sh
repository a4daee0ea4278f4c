#!/usr/bin/env bash
# The GPU checks of issue #4 in one run on a CUDA machine (figures in BENCHMARKS.md):
#   1. tests/test_cuda.py: the engine and the selection on the GPU equal the CPU's, bit for bit
#   2. benchmarks/selection.py --device cuda: exact selection against topk/kthvalue/sort/read pass
#   3. `dstcli train --device cuda` on the bundled sample, then apply and revert it
#   4. benchmarks/step_overhead.py --device cuda on a 1.3B model at 8x512 tokens
#
#     bash benchmarks/gpu_check.sh            # logs under $OUT (default /tmp/gpu-check)
#     PARTS="tests steps" SILOS="tensor" bash benchmarks/gpu_check.sh     # some parts, some silos
#
# Needs python3 with torch (CUDA), safetensors, numpy, xxhash, typer, rich and zstandard; wheels
# in .whl/ (e.g. zstandard's) are installed to /tmp/site first. Each part has its own time limit,
# so one that hangs or fails leaves the others' figures.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
fi

PARTS=${PARTS:-tests selection train steps bucket1 bucket4 bucket16 profile}
part() {  # part NAME SECONDS COMMAND...: log to $OUT/NAME.txt, print its tail
    local name=$1 limit=$2
    shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "rc=$? after $((SECONDS - t0))s" >> "$OUT/$name.txt"
    tail -n "${TAIL:-25}" "$OUT/$name.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)

TAIL=15 part tests "${T_TESTS:-100}" python3 -m pytest -q -p no:cacheprovider --maxfail=5 tests/test_cuda.py
TAIL=16 part selection "${T_SELECT:-70}" python3 benchmarks/selection.py --device cuda --sizes 1 16 64 256 \
    --epsilon 1e-6 1e-3 1e-1
TAIL=12 part train "${T_TRAIN:-80}" bash -c '
    rm -rf /tmp/gc && mkdir -p /tmp/gc &&
    python3 -m dstcli train --device cuda -o /tmp/gc/p.dst &&
    python3 -m dstcli inspect /tmp/gc/p.dst | tail -n 4 &&
    python3 -m dstcli apply samples/tiny-gpt /tmp/gc/p.dst -o /tmp/gc/tuned &&
    python3 -m dstcli apply /tmp/gc/tuned /tmp/gc/p.dst --revert -o /tmp/gc/back &&
    for f in samples/tiny-gpt/*; do cmp "$f" "/tmp/gc/back/$(basename "$f")" || exit 1; done && echo "revert: byte-exact"'
obvious=""
[ "${mem_mib:-0}" -lt 100000 ] && obvious="--no-obvious"  # three 1.3B runners at once need ~90 GB
[ -n "${NO_OBVIOUS:-}" ] && obvious="--no-obvious"
TAIL=20 part steps "${T_STEPS:-250}" python3 benchmarks/step_overhead.py --device cuda --models 1.3b --batch 8 \
    --seq 512 --steps 6 --silos ${SILOS:-tensor row global} --eps 1e-3 1e-6 1e-4 1e-2 1e-1 $obvious
for x in 1 4 16; do  # the batched step's bucket size against its launches and waits
    TAIL=4 part "bucket$x" 40 python3 benchmarks/step_overhead.py --device cuda --models 1.3b --batch 8 --seq 512 \
        --steps 3 --silos tensor --eps 1e-3 --no-obvious --bucket $x
done
TAIL=40 part profile "${T_PROFILE:-50}" python3 benchmarks/step_overhead.py --device cuda --models 1.3b --batch 8 \
    --seq 512 --steps 2 --silos tensor --eps 1e-3 --no-obvious --no-memory --profile
