#!/usr/bin/env bash
# Check the CUDA path in one go (issue 14), in under 5 minutes on a machine with a GPU:
#   1. the CUDA tests (tests/test_cuda.py: fit/reduce/compact on the device, `bmrs run --device cuda`
#      end to end, and NCCL data parallelism when there are 2 GPUs);
#   2. the time of one SVI epoch of the zoo's ResNet-20 on CIFAR-sized random data
#      (10,000 images 3x32x32, batch 128, per-example noise, the one-pass loss).
# Prints one JSON line on stdout (the pytest log goes to stderr). Run from the repository root:
#   bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
LOG="$(mktemp)"
start=$(date +%s)
MPLBACKEND=Agg timeout 200 "$PY" -m pytest -q -rs tests/test_cuda.py >"$LOG" 2>&1
pytest_rc=$?
cat "$LOG" >&2
summary="$(tail -n 1 "$LOG")"
MPLBACKEND=Agg PYTEST_RC="$pytest_rc" PYTEST_SUMMARY="$summary" START="$start" timeout 90 "$PY" - <<'PYEOF'
import json, os, time

import torch

out = {"check": "gpu_check", "pytest_rc": int(os.environ["PYTEST_RC"]), "pytest": os.environ["PYTEST_SUMMARY"],
       "cuda": torch.cuda.is_available(), "torch": torch.__version__}
if torch.cuda.is_available():
    import pyro

    from bmrs_pyro import AutoTruncatedLogNormal, fit
    from bmrs_pyro.models import build

    out["gpu"] = torch.cuda.get_device_name(0)
    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.rand(10_000, 3, 32, 32)
    y = torch.randint(0, 10, (10_000,))
    model = build("resnet", (3, 32, 32), 10)
    guide = AutoTruncatedLogNormal(model)
    # Two epochs: the first pays for CUDA start-up and kernel selection, the second is timed.
    history = fit(model, guide, (x, y), epochs=2, batch_size=128, device="cuda", progress=False)
    torch.cuda.synchronize()
    out.update({"resnet20_svi_epoch_seconds": round(history.seconds[-1], 3), "first_epoch_seconds":
                round(history.seconds[0], 3), "images": 10_000, "batch_size": 128,
                "final_loss_finite": bool(torch.isfinite(torch.tensor(history.loss[-1])))})
out["total_seconds"] = round(time.time() - int(os.environ["START"]), 1)
print(json.dumps(out))
PYEOF
