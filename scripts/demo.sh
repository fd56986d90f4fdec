#!/usr/bin/env bash
# The main job end to end on a fresh machine, on built-in data (no downloads beyond PyPI):
#   generate a labelled corpus (EMT metals, GFN2-xTB molecules) -> pretrain a small two-head model with DeepSpeed
#   -> fine-tune it on held-out Cu-Au alloys -> distill a fast student -> save both with model cards
#   -> push them to a Hub server on 127.0.0.1 and pull them back with from_pretrained -> 1 ps of MD -> summary.
# Step counts can be lowered for a quick look: PRETRAIN_STEPS=100 FINETUNE_STEPS=50 DISTILL_STEPS=100 bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
F=.venv/bin/foundation
PY=.venv/bin/python
PRETRAIN_STEPS=${PRETRAIN_STEPS:-800}
FINETUNE_STEPS=${FINETUNE_STEPS:-300}
DISTILL_STEPS=${DISTILL_STEPS:-600}
PORT=${PORT:-8765}
mkdir -p runs
start=$(date +%s)

echo "== 1/7 data: demo corpus (EMT metals + Cu-Au held out, GFN2-xTB molecules)"
$F data generate --preset demo --out data/demo
$F data inspect data/demo/metals

echo "== 2/7 pretrain (DeepSpeed, 1 process, CPU)"
$F pretrain recipes/pretrain_small.yaml --set max_steps=$PRETRAIN_STEPS --set progress=false
$F evaluate runs/pretrain_small/model data/demo/heldout --head emt --json runs/pretrain_small/heldout_zero_shot.json

echo "== 3/7 fine-tune on the held-out Cu-Au alloys (new head, replay)"
$F finetune recipes/finetune_demo_cuau.yaml --set max_steps=$FINETUNE_STEPS --set progress=false

echo "== 4/7 distill a student of the pretrained model"
$F distill recipes/distill_own_model.yaml --set max_steps=$DISTILL_STEPS

echo "== 5/7 push both models to a Hub server on 127.0.0.1:$PORT and pull them back"
$PY -m foundation.hubserver --port "$PORT" --root runs/hub >runs/hubserver.log 2>&1 &
HUB_PID=$!
trap 'kill $HUB_PID 2>/dev/null || true' EXIT
export HF_ENDPOINT=http://127.0.0.1:$PORT HF_HOME=$PWD/runs/hf_home HF_TOKEN=${HF_TOKEN:-demo-token}
for i in $(seq 50); do $PY -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null && break; sleep 0.2; done
$F push runs/finetune_demo_cuau/model demo/foundation-cuau --message "demo: fine-tuned on Cu-Au"
$F push runs/distill_own_model/model demo/foundation-student-cu --message "demo: distilled student"
$PY - <<'PY'
from foundation import FoundationModel
for repo in ("demo/foundation-cuau", "demo/foundation-student-cu"):
    model = FoundationModel.from_pretrained(repo)
    print(f"pulled {repo}: {model.num_parameters():,} parameters, heads {model.config.heads}")
PY

echo "== 6/7 1 ps of NVT MD with FoundationCalculator (model pulled from the Hub)"
$PY -c "from ase.build import bulk; from ase.io import write; a = bulk('Cu', 'fcc', a=3.7, cubic=True).repeat((2, 2, 2)); a.symbols[::4] = 'Au'; write('runs/cu3au.xyz', a)"
$F md demo/foundation-cuau runs/cu3au.xyz --steps 1000 --temperature 600 --ensemble nvt --head cuau \
  --trajectory runs/md/cu3au.traj --log runs/md/cu3au.log | tee runs/md_summary.txt

echo "== 7/7 summary"
$PY scripts/demo_summary.py --elapsed $(( $(date +%s) - start ))
