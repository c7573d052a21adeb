#!/usr/bin/env bash
# On the lent GPU machine, in the repository's root: install the wheels of every carry of `make gpu-wheels` found
# under .gpu-wheels/ into $GPU_SITE (default /tmp/site), each carry once (a marker file records it), and say what
# is there. Carries travel one per `run` call (bench/gpu_suite.py's docstring has the calls); the machine keeps
# /tmp between calls while it stays warm. Then: export PYTHONPATH=$GPU_SITE:$PWD.
set -u
site=${GPU_SITE:-/tmp/site}
mkdir -p "$site"
for carry in .gpu-wheels/*/; do
  name=$(basename "$carry")
  if [ -e "$site/.carry-$name" ]; then
    echo "carry $name: installed before"
  elif ls "$carry"*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$carry"*.whl && touch "$site/.carry-$name" && echo "carry $name: installed into $site"
  fi
done
ls "$site"/.carry-* 2>/dev/null || echo "no carry installed in $site: bench/gpu_suite.py will say what is missing"
