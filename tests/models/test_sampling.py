"""Sampling without host reads: torch.multinomial checks its argument on the host (two syncs per draw on CUDA);
`sample_categorical` draws the same indices from the same generator without reading anything."""

import torch
from host_reads import HostReads

from megatron_refine.models.generation import sample_categorical, sample_tokens
from megatron_refine.refine import select_positions


def test_the_recorder_sees_multinomials_reads_inside_the_op():
    with HostReads() as seen:
        torch.multinomial(torch.rand(3, 5), 1)
    assert seen.calls, "torch.multinomial's argument checks read on the host"


def test_same_draws_as_multinomial_from_the_same_generator():
    weights = torch.rand(64, 1000) ** 4  # unnormalised, many near zero
    weights[3, :-1] = 0  # a row with one possible draw
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        assert torch.equal(sample_categorical(weights, g1), torch.multinomial(weights, 1, generator=g2)[:, 0])
    assert (sample_categorical(weights) < 1000).all() and sample_categorical(weights)[3] == 999


def test_frequencies_follow_the_weights():
    weights = torch.tensor([[1.0, 2.0, 0.0, 5.0]]).expand(20000, 4)
    draws = sample_categorical(weights, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([1, 2, 0, 5]) / 8.0, atol=0.01, rtol=0)


def test_sampling_and_selection_read_nothing_on_the_host():
    logits, entropy = torch.randn(6, 50), torch.rand(2, 200)
    with HostReads() as seen:
        sample_tokens(logits, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0))
        for mode in ("entropy", "uniform"):
            select_positions(entropy, n_chunks=4, mode=mode, generator=torch.Generator().manual_seed(1))
    assert not seen.calls, seen.calls
