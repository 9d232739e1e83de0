"""Workers of tests/test_distributed.py (spawned processes import this module)."""

from __future__ import annotations

import torch


def make_data(n: int = 512, d: int = 20, classes: int = 3, seed: int = 0):
    """A fixed synthetic classification set (a random linear teacher)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(-1)
    return x, y


def make_model(noise: str):
    """A small MLP 20-16-16-3 whose initial weights depend only on the seed."""
    import pyro
    from bmrs_pyro import AutoTruncatedLogNormal
    from bmrs_pyro.models import build

    pyro.clear_param_store()
    torch.manual_seed(0)
    model = build("mlp", (20,), 3, hidden=(16, 16), noise=noise)
    guide = AutoTruncatedLogNormal(model)
    return model, guide


#: 512 examples / global batch 128 = 4 steps an epoch; 5 epochs = 20 steps, then one reduction
#: (e_theta removing a quarter of the units: a decision that always removes something).
FIT = dict(epochs=5, batch_size=128, lr=1e-2, guide_lr=0.05, seed=3, progress=False,
           prune_every=1, prune_start=5, prune_method="e_theta", prune_options={"fraction": 0.25})


def train(noise: str, distributed):
    """Fit on the synthetic set; returns the final state (parameters, masks) on CPU."""
    from bmrs_pyro import fit
    from bmrs_pyro.nn import noise_modules

    model, guide = make_model(noise)
    history = fit(model, guide, make_data(), distributed=distributed, **FIT)
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    state.update({f"guide.{k}": v.detach().clone() for k, v in guide.named_parameters()})
    state["masks"] = {s: layer.mask.clone() for s, layer in noise_modules(model).items()}
    state["loss"] = list(history.loss)
    return state


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: the exact comparison run (shared noise stream, global noise) and the default
    run (independent per-example noise), each saved to ``out_dir/<run>-<rank>.pt``."""
    import torch.distributed as dist

    from bmrs_pyro.distributed import DataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(train("global", DataParallel(independent_noise=False)), f"{out_dir}/exact-{rank}.pt")
        torch.save(train("example", None), f"{out_dir}/default-{rank}.pt")  # None: detects the group
    finally:
        dist.destroy_process_group()


def nccl_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of the NCCL check (2 GPUs): the default run on ``cuda:<rank>``, saved on the CPU."""
    import torch.distributed as dist

    from bmrs_pyro import fit
    from bmrs_pyro.nn import noise_modules

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, guide = make_model("example")
        x, y = make_data()
        fit(model, guide, (x, y), device=f"cuda:{rank}", **FIT)
        state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
        state.update({f"guide.{k}": v.detach().cpu() for k, v in guide.named_parameters()})
        state["masks"] = {s: layer.mask.cpu() for s, layer in noise_modules(model).items()}
        torch.save(state, f"{out_dir}/nccl-{rank}.pt")
    finally:
        dist.destroy_process_group()
