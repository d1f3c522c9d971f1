#!/usr/bin/env bash
# One-command GPU check (issue 9, section 4), sized for under 8 minutes on one GPU:
#   1. the CUDA-marked tests (tests/test_cuda.py and the CUDA cases of the lifecycle and HyPS suites),
#   2. PEFT's generic suite (tests/test_peft_suite.py) on CUDA (PEFT's tests pick the accelerator themselves),
#   3. the GPU efficiency benchmark (benchmarks/configs/efficiency_gpu.yaml), shortened,
#   4. the ViT-blocks micro-benchmark (benchmarks/configs/vit_blocks_gpu.yaml: UNETR-B's 12 blocks, 512 x 1 and
#      1024 x 2 tokens, floor / LoRA / tCURLoRA / LoRA-PT factored, dense and frozen_term=dense, CUDA time and
#      per-step peak memory) -- the numbers delta_mode='auto' on CUDA is calibrated from (TensorGroup.prefers_dense).
# Results go to $OUT (the device tool's folder) or benchmarks/results/gpu_check/.
#
# On a machine without internet (the lent GPU machines), carry wheels of what its image lacks in .whl/
# (monai, peft==<our pin>, nibabel) and the PEFT suite's cache .cache/peft-suite/ (fetched here by one CPU run
# of tests/test_peft_suite.py):  run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".cache/peft-suite"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# the package itself, installed (the recipes ship as peft_tensor.recipes only through the install's package-dir)
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . >/dev/null \
  && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
"$PY" - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, peft, monai, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
print("peft", peft.__version__, "monai", monai.__version__, "transformers", transformers.__version__)
PY
status=0
echo "== CUDA tests" | tee "$OUT/cuda_tests.txt"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_cuda.py tests/tuners/test_lifecycle.py \
  tests/tuners/hyps/test_hyps.py 2>&1 | tee -a "$OUT/cuda_tests.txt" || status=1
echo "== PEFT suite on CUDA" | tee "$OUT/peft_suite_cuda.txt"
xdist=""; "$PY" -c "import xdist" 2>/dev/null && xdist="-n 8"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider $xdist tests/test_peft_suite.py 2>&1 | tail -40 \
  | tee -a "$OUT/peft_suite_cuda.txt" || status=1
echo "== GPU efficiency benchmark" | tee "$OUT/efficiency_gpu.txt"
timeout 240 "$PY" benchmarks/efficiency.py --config efficiency_gpu run.steps=8 run.infer_reps=8 \
  "output_dir=$OUT" stem=efficiency_gpu 2>&1 | tail -60 | tee -a "$OUT/efficiency_gpu.txt" || status=1
echo "== ViT-blocks micro-benchmark" | tee "$OUT/vit_blocks_gpu.txt"
timeout 200 "$PY" benchmarks/vit_blocks.py --config vit_blocks_gpu "output_dir=$OUT" \
  2>&1 | tail -60 | tee -a "$OUT/vit_blocks_gpu.txt" || status=1
exit $status
