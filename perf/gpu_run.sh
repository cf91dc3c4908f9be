#!/usr/bin/env bash
# A first look at a new NVIDIA GPU in one go, each step under its own time limit so
# that the whole run ends in a known time (at most 12 minutes with the defaults; a limit of 0 skips a step):
#   1. the device and versions;
#   2. the quick sweep (perf/sweep.py --quick): bntriton, torch, torch.compile, each case
#      checked against float64 before it is timed;
#   3. the error ratios against torch's CUDA batch norm (perf/numerics.py);
#   4. a ResNet-50 training step: time and peak memory, fused and plain layers, eager; then
#      compiled (convert_model, then torch.compile of the network) beside torch.compile
#      (RESNET_COMPILE_PROVIDERS adds fused_compile and the *_compile_graphs providers,
#      mode="reduce-overhead"; Inductor compiles the whole network for each); then eager, captured
#      whole as CUDA graphs (torch.cuda.make_graphed_callables) and replayed;
#   5. GPU time per kernel of a training forward and backward (perf/kernel_breakdown.py);
#   6. host time per call on a tiny tensor, ours and torch's (perf/host_profile.py);
#   7. host time of one launch: JITFunction.run, direct, bound, the launcher alone (perf/launch_host.py);
#   8. plan choices A/B'd on the warm machine (perf/plan_ab.py);
#   9. the test suite, natively (compiler problems show up only on the device).
#
#   bash perf/gpu_run.sh [OUT_DIR]        # default perf/results/gpu-run
#
# Step limits in seconds: TESTS_S, SWEEP_S, NUMERICS_S, RESNET_S, RESNET_COMPILE_S, RESNET_GRAPHED_S, BREAKDOWN_S, HOST_S,
# LAUNCH_S, PLAN_AB_S.  A step that runs out
# of time is stopped and the next one starts; its log says how far it got.  A limit of 0 skips the step.
# SWEEP_ARGS replaces the sweep's preset, e.g. SWEEP_ARGS="--max-minutes 4" for as much of the full sweep
# as fits (it starts with the quick cases, then takes the suites in turn).
set -u
cd "$(dirname "$0")/.."
out=${1:-perf/results/gpu-run}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_S COMMAND...: run, log to $out/NAME.log, record the time taken
    local name=$1 limit=$2 start rc
    shift 2
    [ "$limit" -gt 0 ] || { echo "$name: skipped" | tee -a "$out/steps.txt"; return; }
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$out/steps.txt"
}

{
    nvidia-smi
    python3 -c 'import sys, torch, triton; p = torch.cuda.get_device_properties(0)
print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print(p.name, p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")'
} >"$out/env.txt" 2>&1

step sweep "${SWEEP_S:-100}" python3 perf/sweep.py ${SWEEP_ARGS:---quick --max-minutes 1.3} --out "$out" --stem sweep
step numerics "${NUMERICS_S:-30}" python3 perf/numerics.py --device cuda --seeds 2
step resnet50_step "${RESNET_S:-70}" python3 perf/resnet50_step.py --reps 6 --out "$out/resnet50_step.csv"
step resnet50_compiled "${RESNET_COMPILE_S:-150}" python3 perf/resnet50_step.py --reps 6 \
    --providers "${RESNET_COMPILE_PROVIDERS:-torch_compile,bntriton_compile}" \
    --out "$out/resnet50_compiled.csv"
step resnet50_graphed "${RESNET_GRAPHED_S:-60}" python3 perf/resnet50_step.py --reps 6 \
    --providers torch_graphed,bntriton_graphed,fused_graphed --out "$out/resnet50_graphed.csv"
step breakdown "${BREAKDOWN_S:-40}" python3 perf/kernel_breakdown.py ${BREAKDOWN_ARGS:-}
step host_profile "${HOST_S:-30}" python3 perf/host_profile.py --calls 1000
step launch_host "${LAUNCH_S:-30}" python3 perf/launch_host.py
step plan_ab "${PLAN_AB_S:-40}" python3 perf/plan_ab.py
# The suite last: its worker processes can outlive a step stopped at its limit and would
# disturb the timings of the steps after it.  -n: one worker per core (pytest-xdist);
# --timeout stops a single hung test.  The hypothesis example count is CI's default.
step tests "${TESTS_S:-150}" python3 -m pytest -q -rfE -n "$(nproc)" --timeout 150 -p no:cacheprovider tests
cat "$out/steps.txt"
tail -n 25 "$out/sweep.log"
