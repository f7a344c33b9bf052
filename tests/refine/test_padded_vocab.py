"""Megatron's vocabulary padding is not part of the distribution: the NTP loss, the selection entropy and the
rollout log-probs equal the real vocabulary's softmax in plain PyTorch, at TP=1 and TP=2, and the padding rows
get no gradient."""

import pytest
import torch
import torch.nn.functional as F

from megatron_refine.refine import RefineConfig, roll_out, select
from megatron_refine.runtime import initialize, spawn

T = 48


def _real_vocab_parity(tp, vocab):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_refine.models import build_model, get_config

    initialize(tp=tp, seed=5, device="cpu")
    model = build_model(get_config("deltanet_tiny", use_cpu_initialization=True, tensor_model_parallel_size=tp,
                                   params_dtype=torch.float64), vocab)
    assert model.vocab_size == 128 and model.tokenizer_vocab_size == vocab
    ids = torch.randint(0, vocab, (2, T + 1), generator=torch.Generator().manual_seed(1))
    tokens, labels = ids[:, :-1], ids[:, 1:]

    def real(logits):  # the whole vocabulary on every rank, cut to the tokenizer's ids
        return gather_from_tensor_model_parallel_region(logits)[..., :vocab]

    # NTP: megatron-core's loss through GPTModel.forward, against cross-entropy over the real ids only.
    ntp = model(tokens, None, None, labels=labels)  # [B, T]
    logits = model(tokens, None, None)
    reference = F.cross_entropy(real(logits).flatten(0, 1), labels.flatten(), reduction="none").view_as(ntp)
    torch.testing.assert_close(ntp, reference.float(), atol=1e-4, rtol=1e-5)  # fp32 in megatron-core: 4.5e-5 seen 1 run in 12 at 2 threads
    # The padding would have counted: the output layer's own logits (forward without the model's hook, all
    # 128 columns) give a larger loss.
    with torch.no_grad():
        hidden = model.forward_with_branch_states(tokens).hidden
        padded = gather_from_tensor_model_parallel_region(model.output_layer.forward(hidden)[0])  # [B, T, 128]
    assert F.cross_entropy(padded.flatten(0, 1), labels.flatten()) > ntp.mean() + 0.1

    # The padding rows get no gradient (output layer and embedding), the real rows do.
    ntp.mean().backward()
    local = 128 // tp
    first_padded = min(max(vocab - parallel_state.get_tensor_model_parallel_rank() * local, 0), local)
    for weight in (model.output_layer.weight, model.embedding.word_embeddings.weight):
        assert weight.shape[0] == local and weight.grad[first_padded:].abs().sum() == 0
    if first_padded:
        assert model.output_layer.weight.grad[:first_padded].abs().min() > 0

    # Selection entropy: REFINE's `select` against the entropy of the real-vocabulary softmax.
    cfg = RefineConfig(n_chunks=2, margin=6, k=3, n=2)
    out = model.forward_with_branch_states(tokens)
    positions, selected, _ = select(out.logits, cfg, torch.Generator().manual_seed(2))
    log_p = F.log_softmax(real(logits.detach()), -1)
    entropy = -(log_p.exp() * log_p).sum(-1)  # [B, T]
    torch.testing.assert_close(selected, entropy.gather(1, positions).float(), atol=1e-5, rtol=1e-6)  # fp32, as above

    # Rollout log-probs, the decoder's (old) and the training forward's (new), against re-running each
    # prefix + rollout and taking log_softmax over the real ids.
    rollouts = roll_out(model, out, positions, cfg, torch.Generator().manual_seed(3))
    assert rollouts.tokens.max() < vocab
    rows = [(b, p) for b in range(2) for p in positions[b].tolist() for _ in range(cfg.n)]
    expected = []
    with torch.no_grad():
        for r, (b, p) in enumerate(rows):
            seq = torch.cat([tokens[b, : p + 1], rollouts.tokens[r, :-1]])[None]
            log_p = F.log_softmax(real(model(seq, None, None))[0, p:], -1)
            expected.append(log_p.gather(-1, rollouts.tokens[r, :, None])[:, 0])
    expected = torch.stack(expected)
    torch.testing.assert_close(rollouts.log_probs.detach(), expected.float(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(rollouts.sampler_log_probs, expected.float(), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("tp, vocab", [(1, 37), (2, 37), (2, 100)], ids=["tp1", "tp2-padding-rank", "tp2-split-rank"])
def test_ntp_loss_entropy_and_rollout_log_probs_are_the_real_vocabulary_softmax(tp, vocab):
    """vocab 37 -> 128: at TP=2 rank 1's slice is all padding; vocab 100 -> 128: rank 1 holds 36 real ids."""
    spawn(_real_vocab_parity, tp, tp, vocab)
