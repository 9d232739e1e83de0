"""The CUDA path (issue 14): fit, reduce, compact and ``bmrs run`` with everything on the GPU.

Every test here needs a CUDA GPU and skips, saying so, where torch sees none;
``scripts/gpu_check.sh`` runs them (plus a timing) on a machine that has one.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from _low_precision_helpers import assert_losses_agree, float64_ops_in_one_fit_step, loss_and_grads

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False here "
                                                 "(scripts/gpu_check.sh runs these tests on a GPU machine)")


def _trained_lenet(device: str):
    import pyro

    from bmrs_pyro import AutoTruncatedLogNormal, fit
    from bmrs_pyro.data import load
    from bmrs_pyro.models import build

    data = load("digits")
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = build("lenet5", data.input_shape, data.num_classes)
    guide = AutoTruncatedLogNormal(model)
    fit(model, guide, data.train, epochs=6, batch_size=64, lr=1e-2, guide_lr=0.05, seed=0, device=device,
        warm_start_epochs=3, prune_every=1, prune_method="e_theta", prune_options={"fraction": 0.2},
        progress=False)
    return model, guide, data


def test_fit_reduce_compact_stay_on_the_gpu():
    from bmrs_pyro import compact, reduce
    from bmrs_pyro.nn import noise_mode, noise_modules

    model, guide, data = _trained_lenet("cuda")
    tensors = list(model.parameters()) + list(model.buffers()) + list(guide.parameters())
    assert tensors and all(t.is_cuda for t in tensors)  # weights, masks and posteriors on the device
    masks = {s: layer.mask for s, layer in noise_modules(model).items()}
    assert all(m.is_cuda for m in masks.values()) and sum(int((m == 0).sum()) for m in masks.values()) > 0

    # dF in float64 from the GPU posteriors equals dF computed from a CPU copy of the same posteriors.
    result = reduce(model, guide, "bmrs_n")
    cpu_model, cpu_guide = copy.deepcopy(model).cpu(), copy.deepcopy(guide).cpu()
    expected = reduce(cpu_model, cpu_guide, "bmrs_n")
    for site, scores in result.scores.items():
        assert scores.dtype == torch.float64
        assert torch.allclose(scores.cpu(), expected.scores[site].cpu(), rtol=1e-9, atol=1e-9), site

    # The compacted network on the GPU computes the masked model's mean-mode output.
    x = data.test[0][:64].cuda()
    small = compact(model, guide, example_input=x[:8])
    with noise_mode(model, "mean"), torch.no_grad():
        reference = model.net(x)
    with torch.no_grad():
        out = small(x)
    assert out.is_cuda and torch.allclose(out, reference, atol=1e-4, rtol=1e-4)


def test_bmrs_run_on_cuda_end_to_end(tmp_path):
    from bmrs_pyro.cli import main

    out = tmp_path / "runs"
    assert main(["run", "--device", "cuda", "--epochs", "4", "--finetune-epochs", "1", "--output", str(out),
                 "--name", "gpu", "--quiet"]) == 0
    run = out / "gpu"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["latency_ms"]["device"].startswith("cuda")
    assert 0.5 < metrics["accuracy_after"] <= 1.0
    assert (run / "report.html").is_file()
    small = torch.load(run / "compacted.pt", weights_only=False)  # saved on the CPU
    assert all(not p.is_cuda for p in small.parameters())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="data-parallel NCCL needs 2 GPUs")
def test_two_gpus_nccl_match_one_process(tmp_path):
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    import _ddp_worker

    mp.spawn(_ddp_worker.nccl_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"nccl-{r}.pt") for r in range(2))
    for k, v in a.items():
        if k.startswith(("model.", "guide.")):
            assert torch.equal(v, b[k]), k
    for s in a["masks"]:
        assert torch.equal(a["masks"][s], b["masks"][s])


# ---------------------------------------------------------------- the hot path in the model's dtype (issue 15)


@pytest.mark.parametrize("init_loc", [0.0, 3.0])
def test_a_cuda_training_step_makes_no_float64_tensor(init_loc):
    """On the GPU one training step (sampler, KL, likelihood, Adam) stays in float32 (init_loc 3:
    every structure in the tail sampler and the offset-form KL); the CPU step does use float64.
    tests/test_low_precision.py checks the same path on the CPU through _forced_low_precision()."""
    assert float64_ops_in_one_fit_step(init_loc)
    assert float64_ops_in_one_fit_step(init_loc, device="cuda") == {}


def test_cuda_loss_matches_the_cpu_float64_loss():
    """The GPU loss (float32 throughout) equals the CPU loss (float64 KL and constants) at the
    same uniforms, value and gradients."""
    assert_losses_agree(loss_and_grads("cuda"), loss_and_grads("cpu"))
