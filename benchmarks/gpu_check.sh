#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one script that fits a short lease: the test suite on CUDA, MuScleLoRA's
# step cost (also without deterministic mode's tensor fill, and without deterministic mode), the host cost of a
# cuBLAS call with and without CUBLAS_WORKSPACE_CONFIG, the paper-budget sst2 BadNets cell (finetune vs
# muscle-lora, seed 42), same seed -> same metrics on the GPU, bf16/fp16 mixed precision through `accelerate
# launch`, and training throughput against the GPU's fp32 roofline. Needs cleantune importable (installed, or
# PYTHONPATH=src) and the benchmark data (benchmarks/gpu_pack.sh packs both, with the MiniLM weights, for a
# machine without network).
# Every stage has a time limit and writes its log to $OUT/<stage>.log (default ./gpu-check), so a run cut
# short still says how far it got; result stores go to a temporary folder (the logs hold their tables). The
# exit status is 1 if any stage failed or ran out of time.
#
#     OUT=gpu-check bash benchmarks/gpu_check.sh
#     STAGES="tests step_cost" TESTS="tests/test_btu.py" bash benchmarks/gpu_check.sh   # a subset
set -u
OUT=${OUT:-gpu-check}
STAGES=${STAGES:-tests step_cost cublas quality determinism amp throughput}
mkdir -p "$OUT"
stores=$(mktemp -d)
trap 'rm -rf "$stores"' EXIT
failed=0
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...: run it if NAME is in $STAGES, log to $OUT/NAME.log, print the tail
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    echo "== $name (limit ${limit}s)"
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || failed=1
    echo "== $name: exit $rc after $((SECONDS - start))s"
    tail -n "${TAIL:-12}" "$OUT/$name.log"
}

{ nvidia-smi -L; $py -c "import sys, torch, transformers, peft, accelerate
print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"; } \
    >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

TAIL=25 stage tests "${TESTS_S:-240}" $py -m pytest -p no:cacheprovider -p no:warnings -q -rf ${TESTS:-tests}
stage step_cost "${STEP_S:-180}" bash -c "$py benchmarks/muscle_step_cost.py --steps 60 --repeats 2 --with-ga &&
    $py benchmarks/muscle_step_cost.py --steps 60 --repeats 2 --no-fill &&
    $py benchmarks/muscle_step_cost.py --steps 60 --repeats 2 --no-deterministic"
stage cublas "${CUBLAS_S:-60}" $py benchmarks/cublas_overhead.py
stage quality "${QUALITY_S:-190}" $py benchmarks/muscle_quality.py --datasets sst2 --attacks badnets \
    --defenses finetune,muscle-lora --store "$stores/quality.sqlite" --no-progress
cell="--dataset sst2 --attack badnets --defense muscle-lora --train-size 1000 --epochs 1 --no-progress"
compare='import json, sys
a, b = (json.load(open(f))[0]["metrics"] for f in sys.argv[1:])
keys = ("cacc", "asr", "history")
print({k: a[k] for k in keys if k != "history"}, "identical" if all(a[k] == b[k] for k in keys) else "DIFFERENT")'
stage determinism "${DETERMINISM_S:-50}" bash -c "for i in 1 2; do $py -m cleantune run $cell \
    --store $stores/det\$i.sqlite --format json >$stores/det\$i.json || exit 1; done; $py -c '$compare' $stores/det1.json $stores/det2.json"
stage amp "${AMP_S:-80}" bash -c "for mp in bf16 fp16; do echo \"-- \$mp\"; $py -m accelerate.commands.launch \
    --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision \$mp -m cleantune run $cell \
    --format table --store $stores/amp.sqlite || exit 1; done"
stage throughput "${THROUGHPUT_S:-40}" $py benchmarks/throughput.py --samples 3200
exit $failed
