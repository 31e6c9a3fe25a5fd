#!/usr/bin/env bash
# gpu_check.py and bench_generation.py (CUDA fp32, CUDA bf16, then CPU) on a GPU machine without network.
# hivemind and the other missing packages come as wheels from .whl/ (see the device notes); swarmlm is
# imported from the repository (PYTHONPATH). Logs go to $OUT (default /tmp/swarmlm-gpu-out).
# Usage: bash benchmarks/run_on_gpu.sh [STAGE ...]   stages: check cuda32 cuda16 cpu (default: all)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/swarmlm-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export SWARMLM_HOME=${SWARMLM_HOME:-/tmp/swarmlm-home}
P2PD=$(python3 -c 'import hivemind, os; print(os.path.join(os.path.dirname(hivemind.__file__), "hivemind_cli", "p2pd"))')
[ -x "$P2PD" ] || { echo "p2pd was not executable: chmod +x"; chmod +x "$P2PD"; }
{
    nvidia-smi -L; nproc; ls -l "$P2PD"
    python3 -c 'import sys, torch, transformers, hivemind, swarmlm, google.protobuf as pb, pydantic
print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "hivemind",
      hivemind.__version__, "protobuf", pb.__version__, "pydantic", pydantic.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/env.log"

stages=${*:-check cuda32 cuda16 cpu}
status=0
for stage in $stages; do
    echo "===== $stage $(date +%T)"
    case $stage in
        check)  timeout 240 python3 benchmarks/gpu_check.py --log-dir "$OUT" 2>&1 | tee "$OUT/gpu_check.log" ;;
        cuda32) timeout 100 python3 benchmarks/bench_generation.py --device cuda --models tiny,large 2>&1 \
                    | tee "$OUT/bench_cuda_fp32.log" ;;
        cuda16) timeout 80 python3 benchmarks/bench_generation.py --device cuda --torch-dtype bfloat16 \
                    --models tiny,large 2>&1 | tee "$OUT/bench_cuda_bf16.log" ;;
        cpu)    timeout 120 python3 benchmarks/bench_generation.py --models tiny,large 2>&1 | tee "$OUT/bench_cpu.log" ;;
        *)      echo "unknown stage $stage"; status=2; continue ;;
    esac
    rc=${PIPESTATUS[0]}
    echo "===== $stage exit $rc $(date +%T)"
    [ "$rc" -eq 0 ] || status=1
done
exit $status
