"""Megatron's tensor- and sequence-parallel layers on 2 gloo ranks equal a single-process computation."""

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    scatter_to_sequence_parallel_region,
)
from megatron_modules import FFN, HIDDEN, tiny_config

from megatron_refine.runtime import initialize, spawn

SEQ, BATCH = 8, 3


def _gather_shards(shard: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate a TP-sharded tensor along `dim` (every rank gets the whole)."""
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _column_row(sequence_parallel: bool):
    config = tiny_config(tp=2, sequence_parallel=sequence_parallel)
    init = torch.nn.init.xavier_normal_
    fc1 = ColumnParallelLinear(
        HIDDEN, FFN, config=config, init_method=init, bias=True, gather_output=False
    )
    fc2 = RowParallelLinear(
        FFN, HIDDEN, config=config, init_method=init, bias=True, input_is_parallel=True,
        skip_bias_add=False,
    )
    return fc1, fc2


def _tp_column_row_matches_reference():
    initialize(tp=2, seed=7, device="cpu")
    fc1, fc2 = _column_row(sequence_parallel=False)
    torch.manual_seed(0)  # same input on both ranks
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)  # [s, b, h]

    h, _ = fc1(x)  # [s, b, ffn/tp]
    y, _ = fc2(F.gelu(h))  # [s, b, h]
    y.square().sum().backward()

    w1 = _gather_shards(fc1.weight.detach(), 0).requires_grad_()
    b1 = _gather_shards(fc1.bias.detach(), 0).requires_grad_()
    w2 = _gather_shards(fc2.weight.detach(), 1).requires_grad_()
    b2 = fc2.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(F.gelu(F.linear(x_ref, w1, b1)), w2, b2)
    y_ref.square().sum().backward()

    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(_gather_shards(fc1.weight.grad, 0), w1.grad)
    torch.testing.assert_close(_gather_shards(fc1.bias.grad, 0), b1.grad)
    torch.testing.assert_close(_gather_shards(fc2.weight.grad, 1), w2.grad)
    torch.testing.assert_close(fc2.bias.grad, b2.grad)
    # The ranks hold different slices: TP=2 is not two copies of the model.
    assert not torch.equal(w1[: FFN // 2], w1[FFN // 2 :])


def test_tp2_column_row_parallel_equals_single_process_reference():
    spawn(_tp_column_row_matches_reference, 2)


def _run(fc1, fc2, x, sequence_parallel):
    x = x.detach().clone().requires_grad_()
    x_in = scatter_to_sequence_parallel_region(x) if sequence_parallel else x  # [s/tp, b, h]
    h, _ = fc1(x_in)
    y, _ = fc2(F.gelu(h))
    y.square().sum().backward()
    if sequence_parallel:  # reassemble the sequence to compare
        y = _gather_shards(y.detach(), 0)
    grads = [p.grad.clone() for p in (*fc1.parameters(), *fc2.parameters())]
    for p in (*fc1.parameters(), *fc2.parameters()):
        p.grad = None
    return y.detach(), x.grad, grads


def _sp_on_equals_sp_off():
    initialize(tp=2, seed=11, device="cpu")
    torch.manual_seed(3)
    x = torch.randn(SEQ, BATCH, HIDDEN)
    fc1, fc2 = _column_row(sequence_parallel=False)
    fc1_sp, fc2_sp = _column_row(sequence_parallel=True)
    fc1_sp.load_state_dict(fc1.state_dict())
    fc2_sp.load_state_dict(fc2.state_dict())

    y, dx, grads = _run(fc1, fc2, x, sequence_parallel=False)
    y_sp, dx_sp, grads_sp = _run(fc1_sp, fc2_sp, x, sequence_parallel=True)

    torch.testing.assert_close(y_sp, y)
    # With SP the input gradient of the scatter is gathered back, so it is the full-sequence gradient.
    torch.testing.assert_close(dx_sp, dx)
    # fc2's bias sees only this rank's sequence slice under SP: Megatron marks it sequence_parallel and
    # all-reduces it over TP in finish_grad_sync; do the same here.
    assert getattr(fc2_sp.bias, "sequence_parallel", False)
    torch.distributed.all_reduce(grads_sp[-1], group=parallel_state.get_tensor_model_parallel_group())
    for g_sp, g in zip(grads_sp, grads):
        torch.testing.assert_close(g_sp, g)


def test_sequence_parallel_equals_no_sequence_parallel():
    spawn(_sp_on_equals_sp_off, 2)
