#!/usr/bin/env bash
# Downloads, on a machine WITH network, the wheels that an offline GPU/TPU image lacks, into ./.whl (git-ignored).
# The core stack (jax, flax, optax, orbax, numpy, ...) must already be installed there at the pinned versions;
# these are the pure-Python/config/data packages dig-jax adds on top (about 12 MB).
# On the offline machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  array-record==0.8.6 clu==0.0.12 dm-tree==0.1.10 docstring-parser==0.18.0 googleapis-common-protos==1.76.0 \
  grain==0.2.18 immutabledict==4.3.1 ml-collections==1.1.0 mlxtend==0.25.0 portpicker==1.6.0 \
  simple-parsing==0.1.9 tensorboardX==2.6.5 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 \
  termcolor==3.3.0 toml==0.10.2
# promise 2.3 is published as an sdist only: build its (pure-Python) wheel here.
"$PY" -m pip wheel -q --no-deps promise==2.3 -w .whl
ls -1 .whl
