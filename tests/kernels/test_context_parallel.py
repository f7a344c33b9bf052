"""`context_parallel_delta_rule` on 2 and 4 gloo ranks equals the chunked op over the whole sequence on one rank
(fp64): outputs, final states, states after positions and the gradients of q, k, v, beta (and g), for batches
and for packed documents that start inside a piece, at a piece's first token, or span pieces."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_refine.kernels import context_parallel_bytes, context_parallel_delta_rule, delta_rule, gated_delta_rule
from megatron_refine.kernels.varlen import cut_cu_seqlens
from megatron_refine.runtime import spawn

H, K, V, CHUNK = 2, 8, 8, 8


def _inputs(B: int, T: int, gated: bool, seed: int):
    """Leaves over the whole sequence: q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H], g [B, T, H] or None."""
    torch.manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    beta = torch.rand(B, T, H, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, dtype=torch.float64) + 2) if gated else None
    return [x if x is None else x.requires_grad_() for x in (q, k, v, beta, g)]


def _check_case(B: int, T: int, gated: bool, cu_seqlens: list[int] | None, seed: int) -> int:
    """One case on this rank: the reference on the whole sequence, then this rank's piece under CP. cu_seqlens:
    packed documents over the B x T flattened tokens, row starts included. Returns the bytes the forward's all-gather
    received."""
    group = dist.group.WORLD
    c, r = dist.get_world_size(), dist.get_rank()
    L = T // c
    lo, hi = r * L, (r + 1) * L
    full = _inputs(B, T, gated, seed)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    torch.manual_seed(seed + 1)
    w_o = torch.randn(B, T, H, V, dtype=torch.float64)
    positions = torch.randint(0, L, (c, B, 3))  # [c, B, P]: each rank's positions in its own piece
    w_states = torch.randn(c, B, 3, H, K, V, dtype=torch.float64)
    rows = torch.arange(B)[:, None]
    # packed: the kernels take [1, B x T] (reference) or [1, B x L] (a piece), the readers flat positions [1, B P]
    flat = (lambda x: x) if cu is None else (lambda x: x.reshape(1, -1, *x.shape[2:]))  # noqa: E731

    # the reference: one rank, the whole sequence
    q, k, v, beta, g = (None if x is None else flat(x) for x in full)
    kwargs = dict(output_final_state=True, chunk_size=CHUNK, output_states_after=True, cu_seqlens=cu)
    if gated:
        o_ref, final_ref, reader_ref = gated_delta_rule(q, k, v, g, beta, **kwargs)
    else:
        o_ref, final_ref, reader_ref = delta_rule(q, k, v, beta, **kwargs)
    o_ref = o_ref.view(B, T, H, V)
    w_final = torch.randn_like(final_ref)
    states_ref = torch.stack([reader_ref(flat(positions[j] + j * L + rows * (T if cu is not None else 0)))
                              .view(B, 3, H, K, V) for j in range(c)])  # [c, B, P, H, K, V]
    # the losses of all ranks: fixed random weights on every output
    loss = (o_ref * w_o).sum() + (final_ref * w_final).sum() + (states_ref * w_states).sum()
    grads_ref = torch.autograd.grad(loss, [x for x in full if x is not None])

    # this rank's piece under CP
    piece = [None if x is None else x.detach()[:, lo:hi].clone().requires_grad_() for x in full]
    q, k, v, beta, g = piece
    local_cu, first = (None, None) if cu is None else cut_cu_seqlens(cu, B, L, c, r)
    gathered = []
    all_gather = dist.all_gather

    def counting(parts, inp, group=None):  # records what the forward's all-gather receives
        gathered.append(sum(x.numel() * x.element_size() for x in parts))
        return all_gather(parts, inp, group=group)

    dist.all_gather = counting
    try:
        o, final, reader = context_parallel_delta_rule(
            q, k, v, beta, g=g, group=group, cu_seqlens=local_cu, continues=None if first is None else first > 0,
            chunk_size=CHUNK, output_final_state=True, output_states_after=True,
        )
    finally:
        dist.all_gather = all_gather
    states = reader(flat(positions[r] + rows * (L if cu is not None else 0))).view(B, 3, H, K, V)
    torch.testing.assert_close(o, o_ref[:, lo:hi])
    torch.testing.assert_close(states, states_ref[r])

    # the final states of the sequences that end in this piece are the whole run's; only those enter the loss
    if cu is None:
        ends, ends_ref = (list(range(B)), list(range(B))) if r == c - 1 else ([], [])
    else:
        ends, ends_ref = [], []
        for i, end in enumerate(local_cu.tolist()[1:]):  # segment i of the piece ends at `end` (flat over B x L)
            b = (end - 1) // L
            whole = b * T + lo + end - b * L  # where it ends in the B x T flattened tokens
            if whole in cu_seqlens:
                ends.append(i)
                ends_ref.append(cu_seqlens.index(whole) - 1)
    torch.testing.assert_close(final[ends], final_ref[ends_ref])
    loss = (o * w_o[:, lo:hi]).sum() + (final[ends] * w_final[ends_ref]).sum() + (states * w_states[r]).sum()
    loss.backward()
    for x, grad_ref in zip([x for x in piece if x is not None], grads_ref):
        torch.testing.assert_close(x.grad, grad_ref[:, lo:hi])
    return gathered[0]


def _cases(cases):
    dist.init_process_group("gloo")
    return [_check_case(*case) for case in cases]


def test_cp2_equals_one_rank():
    """Rule x layout: a batch of 2 rows of 48 tokens; packed documents [0, 10) (ends inside piece 0), [10, 30)
    (spans the boundary at 24), [30, 48) (starts inside piece 1); and two packed rows, the second's documents
    [48, 72) (ends at its boundary), [72, 80), [80, 96)."""
    packed = [0, 10, 30, 48]
    cases = [(2, 48, gated, None, 0) for gated in (False, True)]
    cases += [(1, 48, gated, packed, 1) for gated in (False, True)]
    cases += [(2, 48, True, packed + [72, 80, 96], 4)]
    ranks = spawn(_cases, 2, cases)
    # the bytes the forward's all-gather received: c x rows x H x K x (K + V) values, fp64 here
    for bytes_per_case in ranks:
        assert bytes_per_case == [context_parallel_bytes(2, rows, H, K, V, element_size=8)
                                  for rows in (2, 2, 1, 1, 2)]
    assert context_parallel_bytes(2, 1, H, K, V) == 2 * H * K * (K + V) * 4  # fp32, the default


def test_cp4_folds_in_order():
    """4 pieces of 16 tokens: a batch of 2 rows (three incoming states folded on the last rank), and packed
    documents [0, 5), [5, 16) (ends at piece 1's start), [16, 40) (spans piece 2 whole), [40, 64)."""
    ranks = spawn(_cases, 4, [(2, 64, True, None, 2), (1, 64, False, [0, 5, 16, 40, 64], 3)])
    assert ranks == [[context_parallel_bytes(4, rows, H, K, V, element_size=8) for rows in (2, 1)]] * 4
