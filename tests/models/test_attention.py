"""LaCT's sliding-window attention, and a context-parallel piece's causal attention over gathered keys: the
FlexAttention paths against the dense references.

On CPU FlexAttention runs eagerly and forward only (no CPU backward), so the CPU tests compare outputs in
fp32; the compiled kernel, bf16, gradients and memory are checked on CUDA.
"""

import warnings

import pytest
import torch

from megatron_refine.models.attention import (
    causal_attention,
    causal_attention_after,
    causal_attention_after_dense,
    causal_attention_after_flex,
    sliding_window_attention,
    sliding_window_attention_dense,
    sliding_window_attention_flex,
    sliding_window_block_mask,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    # Eager flex_attention warns that it is unfused; that is what the CPU tests mean to run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def _qkv(B, T, H=3, D=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g).to(device, dtype) for _ in range(3)]  # [B, T, H, D]


def _sequence_ids(lengths_per_row, device="cpu"):
    """[B, T] document ids from each row's document lengths (ids unique over the batch, as Packing's)."""
    rows, start = [], 0
    for lengths in lengths_per_row:
        rows.append(torch.repeat_interleave(torch.arange(start, start + len(lengths)), torch.tensor(lengths)))
        start += len(lengths)
    return torch.stack(rows).to(device)


@pytest.mark.parametrize(
    "T, window",
    [(300, 64), (128, 32), (77, 200), (1, 4)],  # T off the 128-row block, on it, window > T, one token
)
def test_flex_matches_dense(T, window):
    q, k, v = _qkv(2, T)
    torch.testing.assert_close(
        sliding_window_attention_flex(q, k, v, window), sliding_window_attention_dense(q, k, v, window),
        atol=1e-5, rtol=1e-5,
    )


@pytest.mark.parametrize("window", [16, 500])
def test_flex_matches_dense_with_packed_documents(window):
    lengths = [[100, 1, 37, 162], [1, 299], [300]]  # incl. length-1 documents, at a row start and inside
    sequence_ids = _sequence_ids(lengths)  # [3, 300]
    q, k, v = _qkv(3, 300, seed=1)
    torch.testing.assert_close(
        sliding_window_attention_flex(q, k, v, window, sequence_ids),
        sliding_window_attention_dense(q, k, v, window, sequence_ids),
        atol=1e-5, rtol=1e-5,
    )


def test_block_mask_is_built_once_per_sequence_ids_tensor():
    sequence_ids = _sequence_ids([[50, 14], [64]])
    device = sequence_ids.device
    first = sliding_window_block_mask(8, sequence_ids, 2, 64, device)
    assert sliding_window_block_mask(8, sequence_ids, 2, 64, device) is first  # every layer of one forward
    assert sliding_window_block_mask(8, sequence_ids.clone(), 2, 64, device) is not first  # the next forward
    assert sliding_window_block_mask(16, sequence_ids, 2, 64, device) is not first
    plain = sliding_window_block_mask(8, None, 2, 64, device)
    assert sliding_window_block_mask(8, None, 5, 64, device) is plain  # broadcast over the batch


def test_cpu_dispatch_runs_dense_and_past_with_documents_is_refused():
    q, k, v = _qkv(1, 10)
    torch.testing.assert_close(sliding_window_attention(q, k, v, 4), sliding_window_attention_dense(q, k, v, 4))
    past = (k[:, :3], v[:, :3], torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot be combined"):
        sliding_window_attention(q, k, v, 4, torch.zeros(1, 10, dtype=torch.long), past)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True])
def test_flex_matches_dense_on_cuda_in_bf16(packed):
    T, window = 4096, 2048
    q, k, v = (x.requires_grad_() for x in _qkv(2, T, H=4, D=64, dtype=torch.bfloat16, device="cuda"))
    sequence_ids = _sequence_ids([[1000, 1, 3095], [4096]], "cuda") if packed else None
    o = sliding_window_attention(q, k, v, window, sequence_ids)  # dispatches to the compiled flex path
    _assert_bf16_close(o, sliding_window_attention(q, k, v, window, sequence_ids, use_reference=True), (q, k, v))


def _assert_bf16_close(o, o_ref, inputs):
    """bf16 outputs and their gradients w.r.t. inputs (q, k, v) equal to bf16's tolerance."""
    torch.testing.assert_close(o.float(), o_ref.float(), atol=2e-2, rtol=2e-2)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, inputs, do)
    grads_ref = torch.autograd.grad(o_ref, inputs, do)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref.float(), atol=5e-2, rtol=5e-2, msg=lambda m: f"d{name}: {m}")


@cuda
@pytest.mark.cuda
def test_flex_memory_grows_linearly_in_length():
    def peak_extra(T):
        q, k, v = _qkv(1, T, H=4, D=64, dtype=torch.bfloat16, device="cuda")
        sequence_ids = _sequence_ids([[T // 3, T - T // 3]], "cuda")
        sliding_window_attention(q, k, v, 512, sequence_ids)  # compile and build the mask outside the count
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        sliding_window_attention(q, k, v, 512, sequence_ids.clone())  # a new forward: builds its block mask
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, large = peak_extra(4096), peak_extra(16384)
    assert large < 8 * small, (small, large)  # 4x the tokens: linear is ~4x, the dense [T, T] mask would be 16x


def _attention_by_definition(q, k, v, window, sequence_ids=None, past=None):
    """Each query's softmax over exactly the keys it may see, one query at a time (no mask, no blocks)."""
    B, T, H, D = q.shape
    P = 0 if past is None else past[0].shape[1]
    keys = k if past is None else torch.cat([past[0], k], dim=1)
    values = v if past is None else torch.cat([past[1], v], dim=1)
    valid = torch.ones(B, P + T, dtype=torch.bool) if past is None else torch.cat([past[2], torch.ones(B, T, dtype=torch.bool)], 1)
    out = torch.empty_like(q)
    for b in range(B):
        for i in range(T):
            seen = [j for j in range(max(0, P + i - window + 1), P + i + 1) if valid[b, j]
                    and (sequence_ids is None or sequence_ids[b, j] == sequence_ids[b, i])]
            scores = torch.einsum("hd,shd->hs", q[b, i], keys[b, seen]) / D**0.5
            out[b, i] = torch.einsum("hs,shd->hd", scores.softmax(-1), values[b, seen])
    return out


@pytest.mark.parametrize("block", [5, 16, None])  # blocks shorter than, longer than the window; one block
def test_dense_reference_in_query_blocks_is_attention_by_definition(block):
    q, k, v = _qkv(2, 40, dtype=torch.float64)
    ids = _sequence_ids([[13, 27], [40]])
    for sequence_ids, past in ((None, None), (ids, None),
                               (None, (k[:, :7] + 1, v[:, :7] - 1, torch.tensor([[True] * 7, [False] * 3 + [True] * 4])))):
        expected = _attention_by_definition(q, k, v, 9, sequence_ids, past)
        got = sliding_window_attention_dense(q, k, v, 9, sequence_ids, past, block=block)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _piece(lengths_per_row, first, L):
    """Each token's position inside its document [B, T] from the rows' document lengths, and its piece
    [first, first + L)'s."""
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in lengths_per_row])
    return positions, positions[:, first:first + L]


@pytest.mark.parametrize("first", [0, 96, 200])
def test_causal_attention_after_equals_whole_row_attention(first):
    """The piece's queries over the whole rows' grouped keys: the rows' causal attention, packed documents (one
    running into the piece from before it, length-1 ones) included; FlexAttention's (eager, forward) too."""
    L, lengths = 100, [[120, 1, 179], [300]]
    sequence_ids = _sequence_ids(lengths)
    positions, since = _piece(lengths, first, L)
    q, _, _ = _qkv(2, 300, H=4, seed=2)
    _, k, v = _qkv(2, 300, H=2, seed=3)
    whole = causal_attention(q, k, v, sequence_ids)[:, first:first + L]
    dense = causal_attention_after_dense(q[:, first:first + L], k, v, first, since, block=64)
    torch.testing.assert_close(dense, whole, atol=1e-5, rtol=1e-5)
    flex = causal_attention_after_flex(q[:, first:first + L], k, v, first, since)
    torch.testing.assert_close(flex, whole, atol=1e-5, rtol=1e-5)


@cuda
@pytest.mark.cuda
def test_causal_attention_after_flex_matches_dense_on_cuda_in_bf16():
    first, L, lengths = 2048, 2048, [[1000, 1, 3095], [4096]]
    _, since = _piece(lengths, first, L)
    since = since.cuda()
    q = _qkv(2, L, H=4, D=64, dtype=torch.bfloat16, device="cuda")[0].requires_grad_()
    k, v = (x.requires_grad_() for x in _qkv(2, 4096, H=2, D=64, dtype=torch.bfloat16, device="cuda", seed=1)[1:])
    o = causal_attention_after(q, k, v, first, since)  # dispatches to the compiled flex path
    _assert_bf16_close(o, causal_attention_after(q, k, v, first, since, use_reference=True), (q, k, v))
