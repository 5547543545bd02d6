#!/usr/bin/env bash
# The first minutes on a GPU, as one script (.ci/gpu-bundle copies it into the
# bundle as run.sh): in order, each step bounded so that all fit in 10 minutes,
#   1. the GPU-against-CPU parity tests (cuda_parity),
#   2. the whole training steps of the four models and the 50-step memory
#      test on the real GPU against the CPU (emulated.rs, SACCADE_REAL_GPU=1),
#   3. `saccade bench` at 2528², batch 2 and batch 160 (the paper's),
#   4. one minute of `saccade train --preset paper` at 2528²,
#   5. the parity tests under compute-sanitizer memcheck and racecheck,
#      where present,
# writing each step's output to $OUT/gpu-logs/ and one JSON of results,
# $OUT/gpu-results.json (rewritten after each step): per step its command,
# exit code, seconds and, for the saccade commands, their --json figures.
# The steps' time limits add up to 570 s, under the device tool's 600 s.
#
# Without a GPU the same script runs as a dry run (tests/bundle.rs, in CI):
#   SACCADE_BUNDLE_DEVICE=cpu  run the saccade commands on the CPU
#   SACCADE_BUNDLE_QUICK=1     reduced sizes (bench at 200², one batch of
#                              training), so the whole script takes seconds
#   SACCADE_BUNDLE_BIN=DIR     where the binaries are (default: this folder);
#                              a test binary that is absent is a skipped step
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${SACCADE_BUNDLE_BIN:-$here}"
device="${SACCADE_BUNDLE_DEVICE:-cuda}"
quick="${SACCADE_BUNDLE_QUICK:-0}"
out="${OUT:-/tmp}"
logs="$out/gpu-logs"
work="$(mktemp -d)"
mkdir -p "$logs"

# NVRTC from a CUDA toolkit or PyTorch's wheel, wherever the machine has it.
[ "$device" = cuda ] && nvrtc="$(find / -name 'libnvrtc.so.13*' -not -path '/proc/*' 2>/dev/null | head -1)"
[ -n "${nvrtc:-}" ] && export LD_LIBRARY_PATH="$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ "$quick" = 1 ]; then
    size=200 big_batch=4 train_flags=(--dataset cluttered-mnist@200 --train-size 8 --valid-size 4 --test-size 4 --batch-size 4 --epochs 1)
else
    size=2528 big_batch=160 train_flags=(--dataset cluttered-mnist@2528 --minutes 1 --valid-size 200 --test-size 200)
fi

# One JSON string: backslashes and quotes escaped, control characters dropped.
json_string() {
    printf '"%s"' "$(printf '%s' "$1" | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g')"
}

steps=()
# The results so far, rewritten after every step: a run cut short keeps them.
write_results() {
    {
        printf '{"gpu":%s,"device":"%s","quick":%s,"date":"%s","steps":[' \
            "$(json_string "$gpu")" "$device" "$quick" "$(date -u +%FT%TZ)"
        (IFS=,; printf '%s' "${steps[*]}")
        printf ']}\n'
    } >"$out/gpu-results.json"
}

# step NAME SECONDS COMMAND...: run it under `timeout`, log it, record it.
step() {
    local name=$1 limit=$2
    shift 2
    if [ ! -x "$1" ] && ! command -v "$1" >/dev/null; then
        echo "== $name: skipped ($1 not found)"
        steps+=("{\"step\":\"$name\",\"skipped\":$(json_string "$1 not found")}")
        write_results
        return
    fi
    echo "== $name: $*"
    local t0 t1 rc figures
    t0=$(date +%s.%N)
    timeout "$limit" "$@" >"$logs/$name.out" 2>"$logs/$name.err"
    rc=$?
    t1=$(date +%s.%N)
    tail -n 3 "$logs/$name.out" "$logs/$name.err"
    figures=$(tail -n 1 "$logs/$name.out")
    case "$figures" in "{"*"}") ;; *) figures=null ;; esac
    steps+=("{\"step\":\"$name\",\"command\":$(json_string "$*"),\"rc\":$rc,\"seconds\":$(awk "BEGIN{print $t1-$t0}"),\"figures\":$figures}")
    write_results
}

gpu="none"
command -v nvidia-smi >/dev/null &&
    gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
echo "GPU: $gpu"

step device 30 "$bin/saccade" device
step cuda_parity 90 "$bin/cuda_parity" --test-threads=1
SACCADE_REAL_GPU=1 step whole_steps 90 "$bin/emulated" emulated_step_ emulated_memory --test-threads=1
step bench_batch2 45 "$bin/saccade" bench --size "$size" --batch-size 2 --device "$device" --json
step "bench_batch$big_batch" 75 "$bin/saccade" bench --size "$size" --batch-size "$big_batch" --device "$device" --json
step train_paper 120 "$bin/saccade" train --preset paper "${train_flags[@]}" --device "$device" --out "$work/paper" --json
if command -v compute-sanitizer >/dev/null; then
    step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 "$bin/cuda_parity" --test-threads=1
    step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 1 "$bin/cuda_parity" --test-threads=1
fi

rm -rf "$work"
echo "wrote $out/gpu-results.json"
