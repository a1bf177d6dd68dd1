#!/usr/bin/env bash
# Every GPU check of the project in one run (the figures in the README's GPU sections come from it):
#   1. the CUDA tests (sync-debug over every task, fp16 with a GradScaler under precision="16-mixed", FSDP1);
#   2. benchmarks/gpu.py: MLP and GPT-like LM, bare / LossDiagnostics() / recipe / hand-over / compiled,
#      kernels per non-flush step at two depths, host time in each part's hooks;
#   3. the whole test suite with the machine's own versions, in parallel (pytest-xdist);
#   4. benchmarks/scale.py on CUDA (bf16-mixed), bare vs LossDiagnostics() with the predictions handed over.
# Results go to $OUT (default /tmp/lossdiag-gpu). Wheels missing on the machine (jsonargparse and its needs) are
# installed from .whl/ when that folder exists.
#
#     OUT=/tmp/gpu bash benchmarks/gpu_checks.sh [parts, default "tests bench suite scale"]
#
# All four parts take up to ~14 min; one device call may run 10. Run "tests bench scale" (~8 min) in one call and
# "suite" (~5 min) in the next.
set -u
OUT=${OUT:-/tmp/lossdiag-gpu}
mkdir -p "$OUT"
PARTS=${1:-tests bench suite scale}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=python3
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY -c "import torch, lightning, torchmetrics; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__)"
    nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }
stamp() { echo "== $(date +%T) $*"; }

if part tests; then
    stamp "CUDA tests"
    timeout 150 $PY -m pytest -q -p no:cacheprovider -rs -k cuda \
        tests/callbacks/test_host_reads.py tests/callbacks/test_host_reads_tasks.py tests/callbacks/test_amp_monitor.py \
        tests/callbacks/test_sharded.py \
        >"$OUT/cuda_tests.txt" 2>&1
    echo "rc=$?" >>"$OUT/cuda_tests.txt"
    tail -5 "$OUT/cuda_tests.txt"
fi
if part bench; then
    stamp "gpu.py"
    timeout 200 $PY benchmarks/gpu.py --repeats 3 --steps 80 --compile --kernels --hooks --json "$OUT/gpu.json" \
        >"$OUT/gpu.txt" 2>&1
    echo "rc=$?" >>"$OUT/gpu.txt"
    grep -v "^GPU\|^TPU\|Tip\|USDT\|stopped\|LOCAL_RANK\|^lightning-lossdiag\|^  " "$OUT/gpu.txt" | tail -30
fi
if part suite; then
    stamp "whole suite -n 14"
    # -v: each test's verdict is printed as it ends, so a run cut by the timeout still names its failures
    timeout 290 $PY -m pytest -v -p no:cacheprovider -n 14 --timeout 240 --maxfail 30 >"$OUT/suite.txt" 2>&1
    echo "rc=$?" >>"$OUT/suite.txt"
    grep -E "FAILED|ERROR|passed|failed|rc=" "$OUT/suite.txt" | tail -25
fi
if part scale; then
    stamp "update_ops.py cuda"
    # ops of each update and its host time (what the hand-over costs a step), the H200 LM's bf16 logits included
    timeout 90 $PY benchmarks/update_ops.py --device cuda --time --lm >"$OUT/update_ops.txt" 2>&1
    grep -v USDT "$OUT/update_ops.txt" | tail -16
    stamp "scale.py cuda"
    timeout 150 $PY benchmarks/scale.py --device cuda --precision bf16-mixed --repeats 1 --configs bare,diag \
        --workloads cls3_seq,cls1000,tag1000,seg21,lm32k_btv \
        --json "$OUT/scale.json" >"$OUT/scale.txt" 2>&1
    echo "rc=$?" >>"$OUT/scale.txt"
    tail -14 "$OUT/scale.txt"
fi
stamp done
