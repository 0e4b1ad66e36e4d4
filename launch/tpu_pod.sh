#!/usr/bin/env bash
# Runs dig-jax on every worker of a Cloud TPU VM pod slice (one process per host; jax.distributed.initialize()
# auto-detects the TPU topology). The repo is copied to each worker, the pinned stack is installed with the TPU
# jaxlib, and training starts with --multihost. Checkpoints and metrics must go to storage every worker can
# reach (a gs:// bucket or a shared filesystem).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://bucket/dig-xl2 launch/tpu_pod.sh configs/xl2.py [--config.x=y ...]
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the pod slice name}"
: "${ZONE:?set ZONE to its zone}"
: "${WORKDIR:?set WORKDIR to a gs:// path or shared directory}"
CONFIG=${1:?usage: launch/tpu_pod.sh CONFIG [overrides...]}; shift
REMOTE_DIR=${REMOTE_DIR:-dig_jax_run}
cd "$(dirname "$0")/.."

tar czf /tmp/dig_jax_src.tgz --exclude=.venv --exclude=.git --exclude=workdir .
gcloud compute tpus tpu-vm scp /tmp/dig_jax_src.tgz "$TPU_NAME:/tmp/" --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && tar xzf /tmp/dig_jax_src.tgz
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.11.2'
  DIG_JAX_DISTRIBUTED=1 .venv/bin/python -m dig_jax.main --config=$CONFIG --workdir=$WORKDIR $* \
    2>&1 | tee -a ~/$REMOTE_DIR/train_\$(hostname).log"
