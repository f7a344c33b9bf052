"""Megatron DDP + get_megatron_optimizer on 2 data-parallel ranks equal 1 rank on the same global batch."""

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron_modules import HIDDEN, swiglu_mlp, tiny_config

from megatron_refine.runtime import initialize, spawn

GLOBAL_BATCH, SEQ, STEPS = 4, 6, 3
CLIP_GRAD = 1e-3  # below the tiny model's grad norms (~3e-3), so every step clips


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(SEQ, GLOBAL_BATCH, HIDDEN, generator=g)  # [s, b, h]
    target = torch.randn(SEQ, GLOBAL_BATCH, HIDDEN, generator=g)
    return x, target


def _train_steps():
    rt = initialize(tp=1, seed=5, device="cpu")
    config = tiny_config()
    model = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, bucket_size=None),
        swiglu_mlp(config),
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=CLIP_GRAD, bf16=False),
        [model],
    )
    dp, rank = rt.layout.data_parallel_size, rt.rank
    local = GLOBAL_BATCH // dp
    losses, grad_norms = [], []
    for step in range(STEPS):
        x, target = _global_batch(step)
        x, target = x[:, rank * local : (rank + 1) * local], target[:, rank * local : (rank + 1) * local]
        model.zero_grad_buffer()
        optimizer.zero_grad()
        y, _ = model(x)
        loss = (y - target).square().mean()  # mean over this rank's share; DDP averages over DP
        loss.backward()
        model.finish_grad_sync()
        ok, grad_norm, _ = optimizer.step()
        assert ok
        torch.distributed.all_reduce(loss.detach(), op=torch.distributed.ReduceOp.AVG)
        losses.append(loss.item())
        grad_norms.append(grad_norm)
    params = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return losses, grad_norms, params


def test_ddp_optimizer_two_ranks_equal_one_rank():
    (ref_losses, ref_norms, ref_params), = spawn(_train_steps, 1)
    ranks = spawn(_train_steps, 2)
    for losses, norms, params in ranks:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses))
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms))
        for name, p in params.items():
            torch.testing.assert_close(p, ref_params[name], msg=lambda m: f"{name}: {m}")
    # The steps did something, and gradient clipping was exercised.
    assert ref_losses[-1] < ref_losses[0]
    assert min(ref_norms) > CLIP_GRAD
