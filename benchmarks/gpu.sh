#!/usr/bin/env bash
# GPU checks and benchmark in one go (target: at most 10 minutes on one H100):
#   1. installs what it needs: a CUDA build of torch already importable by $PYTHON (default python3) is used
#      as it is; otherwise a virtual environment .venv-gpu gets one from PyPI;
#   2. runs the GPU tests (tests/test_gpu.py, and one tiny training epoch through `monai.bundle run`, which
#      picks the GPU and AMP by itself);
#   3. with DODNET_GPU_PROFILE=1, profiles the forward's precision x layout variants (profile_forward.py);
#   4. prints the benchmark table of benchmarks/run.py on the GPU (patch forward with the compiled network,
#      efficiency, training, the sliding-window sw_batch_size/stitching sweep, whole-volume inference on the
#      GPU-resident pipeline), then the whole CT once more on the host pipeline (CPU pre- and post-processing).
# Time budget: set-up about 40 s, tests at most 120 s, benchmark at most 330 s, host-pipeline run at most 120 s
# (10 minutes in all). On one H100 (bundle 0.1.3, 2026-11-28) the run with "--skip efficiency,sliding" and the
# profile took 419 s; the compiled network's first forwards take most of the benchmark (139 s for the 1-task
# and all-task graphs).
#
#   bash benchmarks/gpu.sh [extra args for run.py]
#
# Offline GPU machines: fetch the pure-Python dependencies a CUDA image usually lacks where pip works,
#   pip download --no-deps -d wheels monai==1.6.1 nibabel pytorch-ignite fire termcolor
# copy them over and run with DODNET_WHEELS=wheels: they are installed into .gpu-site (on PYTHONPATH) without
# touching the environment; scipy, scikit-image, einops, tqdm, tensorboard and pillow must be there already.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

if ! has_cuda_torch "$PY"; then
  if [ -n "${DODNET_WHEELS:-}" ]; then
    echo "gpu.sh: $PY has no CUDA build of torch that sees a GPU, and DODNET_WHEELS means no package index" >&2
    exit 1
  fi
  VENV="${DODNET_GPU_VENV:-.venv-gpu}"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PY="$VENV/bin/python"
  has_cuda_torch "$PY" || "$PY" -m pip install --quiet "torch>=2.4,<3"
fi
if [ -n "${DODNET_WHEELS:-}" ]; then
  SITE="$PWD/.gpu-site"
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$SITE" "$DODNET_WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  "$PY" -m pip install --quiet -e ".[bench]"
fi
"$PY" -c "import monai, nibabel, ignite, fire, scipy, skimage, einops, tqdm, PIL, torch; print('torch', torch.__version__, \
'monai', monai.__version__, 'device', torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

READER=()
VOLUME_READER=()
TRAIN_TEST=("tests/test_train_workflow.py::test_one_tiny_epoch_through_bundle_run")
if ! "$PY" -c "import itk" 2>/dev/null; then  # ITK's wheels are large: GPU images often lack it
  echo "gpu.sh: no itk here: the whole-volume run reads its NIfTI with NibabelReader; training test left out"
  READER=(--volume-reader NibabelReader)
  VOLUME_READER=(--reader NibabelReader)
  TRAIN_TEST=()
fi

echo "== GPU tests (set-up took ${SECONDS} s)"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py "${TRAIN_TEST[@]}" || echo "gpu.sh: GPU TESTS FAILED"

if [ -n "${DODNET_GPU_PROFILE:-}" ]; then
  echo "== where the forward's time goes (${SECONDS} s in)"
  timeout 90 "$PY" benchmarks/profile_forward.py --device cuda --variants fp32,fp32-cl,bf16,bf16-cl,fp16,fp16-cl \
    --top 10 || echo "gpu.sh: profile_forward failed or timed out"
fi

echo "== benchmark (${SECONDS} s in)"
timeout 330 "$PY" benchmarks/run.py --device cuda --precision bf16 --repeats 5 --volume-precision bf16 --compile-network \
  --no-compile-head --sliding-batches 2,4 "${READER[@]}" "$@"

echo "== whole CT on the host pipeline, for comparison with the GPU-resident default above (${SECONDS} s in)"
timeout 120 "$PY" benchmarks/bench_inference_memory.py --device cuda --precision bf16 --sw_batch_size 2 \
  --gpu_pipeline off "${VOLUME_READER[@]}" || echo "gpu.sh: host-pipeline whole-CT run failed or timed out"
echo "gpu.sh: done in ${SECONDS} s"
