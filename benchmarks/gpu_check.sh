#!/usr/bin/env bash
# moe-tui on one GPU, in one call: the GPU tests, where a training step's time goes, `moe-tui bench`,
# and the time to quality side by side with nanoGPT's shakespeare_char recipe.
# Run from the project root on the GPU machine, with .anchors/ and .whl/ next to it as
# ../shared/anchors/gpu_side_by_side.sh's header says (add pytest, pluggy, iniconfig, packaging,
# safetensors, click and shellingham to its wheel list; pytest runs there without pytest-xdist, hence
# -o addopts=). Results go to $OUT.
#   PARTS    which parts, in order (default: tests profile train nanogpt bench sample)
#   T        seconds each moe-tui training run gets (default 45); NANOGPT_T for nanoGPT (default 70)
#   SWEEP    extra moe-tui runs, one per line: NAME FLAGS... (each gets T seconds)
export PYTHONUNBUFFERED=1 NO_COLOR=1
root=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T=${T:-45}; NANOGPT_T=${NANOGPT_T:-70}
PARTS=${PARTS:-tests profile train nanogpt bench sample}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$root MOE_TUI_DATA=$root/.anchors/data MOE_TUI_RUNS=/tmp/runs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
echo "commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" | tee -a "$OUT/gpu.txt"

stamp() { python3 -c "
import sys,time
t0=time.time()
for l in sys.stdin: print(f'{time.time()-t0:8.2f} '+l,end='',flush=True)"; }

train() {  # NAME FLAGS...: a headless run timed from process start (first column)
    local name=$1; shift
    echo "== moe-tui train shakespeare $* (${T}s)"
    timeout -s INT "$T" python3 -m tui train shakespeare --device cuda --headless --run-name "$name" "$@" 2>&1 \
        | stamp > "$OUT/train-$name.log"
    grep -E '^ *[0-9.]+ (training run|eval|step +(100|500|1000) )|Traceback|Error' "$OUT/train-$name.log" | head -40
}

for part in $PARTS; do case $part in
tests)
    echo "== GPU tests"
    timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts= -m gpu tests/test_gpu_path.py 2>&1 | tail -25 | tee "$OUT/tests.txt" ;;
profile)
    echo "== where a step's time goes (gpu preset)"
    timeout 120 python3 benchmarks/step_profile.py --preset gpu --device cuda 2>&1 | tee "$OUT/profile.txt" | head -45 ;;
train)
    train default ;;
sweep)
    while read -r name flags; do
        [ -n "$name" ] && train "$name" $flags
    done <<< "$SWEEP" ;;
compile)
    T=${COMPILE_T:-90} train compiled --compile ;;
nanogpt)
    echo "== nanoGPT shakespeare_char, compile=${NANOGPT_COMPILE:-False} (${NANOGPT_T}s)"
    (cd "$root/.anchors/nanogpt" && cp ../data/tinyshakespeare.txt data/shakespeare_char/input.txt \
        && python3 data/shakespeare_char/prepare.py > /dev/null \
        && timeout "$NANOGPT_T" python3 train.py config/train_shakespeare_char.py --compile="${NANOGPT_COMPILE:-False}" 2>&1 \
        | stamp > "$OUT/nanogpt.log")
    grep -E 'step [0-9]+:' "$OUT/nanogpt.log" ;;
bench)
    echo "== moe-tui bench --preset gpu --device cuda"
    timeout 300 python3 -m tui bench --preset gpu --device cuda --json ${BENCH_FLAGS:-} > "$OUT/bench.json" 2> "$OUT/bench.err"
    cat "$OUT/bench.json"; tail -3 "$OUT/bench.err" ;;
sample)
    echo "== sampling speed, gpu preset (moe_core.bench.sample_speed: greedy, 500 characters, median of 3)"
    timeout 60 python3 -c "
from moe_core.bench import sample_speed; from moe_core.config import build_config
s = sample_speed(build_config('gpu', {}, {'device': 'cuda'}), device='cuda', reference_chars=20)
print(f'{s.cached_chars_per_sec:,.0f} chars/s, first char {s.first_char_ms:.2f} ms')" 2>&1 | tail -3
    echo "== moe-tui sample, 1 and 16 streams"
    for n in 1 16; do
        timeout 60 python3 -m tui sample default --device cuda --num-samples "$n" --max-new-tokens 400 \
            --prompt 'ROMEO:' > "$OUT/sample-$n.txt" 2> "$OUT/sample-$n.err"
        tail -2 "$OUT/sample-$n.err"
    done ;;
esac; done
ls /tmp/runs 2>/dev/null | head
