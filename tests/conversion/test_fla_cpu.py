"""megatron_refine.conversion.fla_cpu: fla's DeltaNetForCausalLM and GatedDeltaNetForCausalLM on the CPU decode with
their caches (short convs, recurrent states; Gated DeltaNet's V-first) exactly as without, a left-padded batch
included, and the short conv's cache carries its last W inputs. Each test patches fla in a rank of its own."""

import pytest
import torch

from megatron_refine.runtime import spawn


def _cached_conv_equals_uncached():
    from fla.modules import ShortConvolution

    from megatron_refine.conversion.fla_cpu import use_pytorch_references

    use_pytorch_references()
    torch.manual_seed(0)
    conv = ShortConvolution(hidden_size=6, kernel_size=4, bias=True)
    x, residual = torch.randn(2, 9, 6), torch.randn(2, 9, 6)  # [B, T, D]
    with torch.no_grad():  # as in generate, where fla's own module takes its single-token decode path
        full, state = conv(x, residual=residual, output_final_state=True)
        torch.testing.assert_close(state, x[:, -4:].transpose(1, 2))  # [B, D, W]: the last W inputs
        prefill, cache = conv(x[:, :2], output_final_state=True)
        torch.testing.assert_close(cache, torch.cat([torch.zeros(2, 6, 2), x[:, :2].transpose(1, 2)], -1))
        steps = [prefill + residual[:, :2]]
        for t in range(2, 9):
            y, cache = conv(x[:, t : t + 1], residual=residual[:, t : t + 1], cache=cache, output_final_state=True)
            steps.append(y)
        torch.testing.assert_close(torch.cat(steps, 1), full)
        torch.testing.assert_close(cache, state)

        # packed sequences (what an attention mask unpads to): each continues from its own cache row
        a, b = x[:1], x[1:]
        caches = torch.cat([conv(a[:, :4], output_final_state=True)[1], conv(b[:, :1], output_final_state=True)[1]])
        packed, packed_state = conv(torch.cat([a[:, 4:7], b[:, 1:6]], 1), cache=caches, output_final_state=True,
                                    cu_seqlens=torch.tensor([0, 3, 8]))
        whole_a, state_a = conv(a[:, :7], output_final_state=True)
        whole_b, state_b = conv(b[:, :6], output_final_state=True)
        torch.testing.assert_close(packed, torch.cat([whole_a[:, 4:], whole_b[:, 1:]], 1))
        torch.testing.assert_close(packed_state, torch.cat([state_a, state_b]))
        mask = torch.tensor([[0] * 3 + [1] * 6, [1] * 9])
        torch.testing.assert_close(conv(x, mask=mask)[0], conv(x * mask.unsqueeze(-1))[0])


def _delta_net():
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    return DeltaNetForCausalLM(DeltaNetConfig(vocab_size=64, hidden_size=32, num_heads=2, num_hidden_layers=2,
                                              intermediate_size=64, use_gate=True, eos_token_id=None))


def _gated_deltanet():  # two value heads per key head
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    return GatedDeltaNetForCausalLM(GatedDeltaNetConfig(
        vocab_size=64, hidden_size=32, num_heads=2, num_v_heads=4, head_dim=8, expand_v=2.0, num_hidden_layers=2,
        intermediate_size=64, eos_token_id=None))


MODELS = {"delta_net": _delta_net, "gated_deltanet": _gated_deltanet}


def _cached_generate_equals_uncached(name: str):
    from megatron_refine.conversion.fla_cpu import use_pytorch_references

    use_pytorch_references()
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    with torch.no_grad():
        for p in model.parameters():  # norms start at ones: randomise every weight so each one matters
            p.normal_(0, 0.3)
    prompts = torch.randint(1, 64, (2, 7))
    prompts[0, :3] = 0  # left padding: the attention mask unpads the batch to packed sequences
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()

    def greedy(ids, mask, use_cache):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, use_cache=use_cache,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)  # [B, new], [B, new, V]

    cached, cached_scores = greedy(prompts, mask, True)
    uncached, uncached_scores = greedy(prompts, mask, False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, atol=1e-4, rtol=1e-4)
    alone, _ = greedy(prompts[:1, 3:], mask[:1, 3:], True)  # the padded row, decoded by itself
    assert torch.equal(alone, cached[:1])


def test_short_conv_cache_carries_the_last_inputs():
    spawn(_cached_conv_equals_uncached, 1)


@pytest.mark.parametrize("name", MODELS)
def test_cached_generate_equals_uncached_generate(name):
    spawn(_cached_generate_equals_uncached, 1, name)
