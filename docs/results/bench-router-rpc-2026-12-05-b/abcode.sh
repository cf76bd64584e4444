#!/bin/bash
# interleaved A/B: base checkout vs working tree, 256 workers at 5000/s
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
TAG=$1; W=${2:-256}; N=${3:-2}
for i in $(seq 1 $N); do
 for side in base new; do
  if [ $side = base ]; then D=/tmp/rb/base; else D=/work/main; fi
  (cd $D && PYTHONPATH=$D /work/main/.venv/bin/python -m kvmesh.cli bench router --rpc --blocks 1000000 --workers $W --transports stream --rate 5000 --rounds 1 --out /tmp/rb/$TAG-$side-$i > /tmp/rb/$TAG-$side-$i.log 2>&1)
 done
done
