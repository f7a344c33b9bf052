"""The gated_deltanet mixer is megatron-core's GatedDeltaNet: with the same weights, the same outputs and gradients
as its deterministic path (`torch_chunk_gated_delta_rule`) at TP=1 and TP=2 + SP; the same sharded checkpoint keys
and shapes, each loading the other's checkpoints at either TP size; a training step of a whole model; its table
entry counts the parameters it builds. What every mixer does (cached decoding, branch states, packed documents, TP,
SP, PP, checkpoints) is tested for it by test_decoding.py, test_packed_documents.py and test_parallel_models.py,
which run every mixer of the table."""

import sys

import pytest
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import apply_factories
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import build_module
from megatron_modules import tiny_fast_weight_model, token_batch


from megatron_refine.models import PUBLISHED_VOCAB_SIZE, build_model, get_config, get_mixer
from megatron_refine.models.specs import backend
from megatron_refine.runtime import initialize, spawn
from megatron_refine.training.checkpointing import start_write_results_queue

TINY = "gated_deltanet_tiny"  # chunk 16; 4 value heads reading 2 key heads
T, B = 40, 2  # two chunks and a part


def _fla_l2norm(x):
    """fla's l2norm (a Triton kernel, which megatron-core calls) by its definition, in PyTorch."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _layers(tp, sequence_parallel=False):
    """(megatron-core's GatedDeltaNet, ours) on the current parallel state, with the same random weights."""
    # megatron-core's GatedDeltaNet: ssm/gated_delta_net.py in 0.16.1, a package of that name in 0.19 (the class
    # in gdn.py, the helpers in common.py); both versions export it here, with the same constructor.
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules

    from megatron_refine.models.norm import RMSNorm

    torch._dynamo.config.disable = True  # its jit_fuser methods (torch.compile) run as written on a CPU
    for cls in GatedDeltaNet.__mro__:  # the module whose forward calls fla's l2norm (0.19: common.py)
        module = sys.modules[cls.__module__]
        if hasattr(module, "l2norm"):
            module.l2norm = _fla_l2norm
    config = get_config(TINY, tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
                        use_cpu_initialization=True, deterministic_mode=True)
    # Its out_norm: our residual RMSNorm (megatron-core's local WrappedTorchNorm refuses sequence parallelism),
    # whose weight is marked sequence_parallel, as TENorm's is in its TE spec.
    submodules = GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=RMSNorm, out_proj=RowParallelLinear)
    reference = GatedDeltaNet(config, submodules, layer_number=1,
                              pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    ours = build_module(get_mixer("gated_deltanet").module_spec(backend(use_te=False)),
                        config=config, layer_number=1)
    _randomise(reference, seed=0)
    ours.load_state_dict(reference.state_dict())  # the same names and local shapes
    return reference, ours


def _randomise(module, seed):
    """Every weight random (norms start at ones, dt_bias too), the same on every TP rank."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def _outputs_and_gradients(tp, sequence_parallel):
    initialize(tp=tp, seed=1, device="cpu")
    layers = _layers(tp, sequence_parallel)
    generator = torch.Generator().manual_seed(1)
    x, weights = (torch.randn(T, B, 64, generator=generator) for _ in range(2))  # [s, b, h]
    if sequence_parallel:  # this rank's part of the sequence
        rank = parallel_state.get_tensor_model_parallel_rank()
        x, weights = x.chunk(tp)[rank], weights.chunk(tp)[rank]
    results = []
    for layer in layers:
        inputs = x.clone().requires_grad_()
        out, bias = layer(inputs, None)
        assert bias is None
        (out * weights).sum().backward()
        grads = {name: p.grad for name, p in layer.named_parameters()}
        results.append((out.detach(), inputs.grad, grads))
    if sequence_parallel:  # what finalize_model_grads does for megatron-core's sequence-parallel out_norm weight
        group = parallel_state.get_tensor_model_parallel_group()
        torch.distributed.all_reduce(results[0][2]["out_norm.weight"], group=group)
    return results


@pytest.mark.parametrize("tp, sequence_parallel", [(1, False), (2, True)], ids=["tp1", "tp2-sp"])
def test_same_outputs_and_gradients_as_megatron_cores_gated_deltanet(tp, sequence_parallel):
    """megatron-core computes the gated delta rule in fp32 (and chunks of 64, ours 16): fp32 agreement."""
    for (out, grad_in, grads), (our_out, our_grad_in, our_grads) in spawn(_outputs_and_gradients, tp, tp, sequence_parallel):
        assert list(our_grads) == list(grads)  # the same parameters, in the same order
        for name, expected, got in [("output", out, our_out), ("input grad", grad_in, our_grad_in),
                                    *((f"grad {n}", grads[n], our_grads[n]) for n in grads)]:
            torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max(), rtol=1e-4,
                                       msg=lambda m: f"{name}: {m}")


def _layout(module) -> dict:
    """Checkpoint key -> (kind, global shape, offset, local shape, replica id) of a module's sharded state dict."""
    state = module.sharded_state_dict()
    apply_factories(state)
    return {t.key: (type(t).__name__, t.global_shape, t.global_offset, getattr(t, "local_shape", None), t.replica_id)
            for t in nested_values(state)}


def _save(module, path):
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True)
    torch.distributed.barrier()
    start_write_results_queue()
    dist_checkpointing.save(module.sharded_state_dict(), str(path))


def _load(module, path):
    module.load_state_dict(dist_checkpointing.load(module.sharded_state_dict(), str(path)))


def _assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


def _checkpoints(tp, root):
    """Same keys and shapes; megatron-core's checkpoint loads into ours and ours into megatron-core's."""
    initialize(tp=tp, seed=2, device="cpu")
    reference, ours = _layers(tp)
    layout = _layout(reference)
    assert _layout(ours) == layout
    _save(reference, root / f"megatron-tp{tp}")
    _randomise(ours, seed=1)
    _load(ours, root / f"megatron-tp{tp}")
    _assert_same_weights(ours, reference)
    _randomise(ours, seed=2)
    _save(ours, root / f"ours-tp{tp}")
    _load(reference, root / f"ours-tp{tp}")
    _assert_same_weights(reference, ours)
    return sorted(layout)


def _resharded(root):
    """A TP=2 checkpoint of either layer, loaded at TP=1 by both: the same weights."""
    initialize(seed=3, device="cpu")
    reference, ours = _layers(1)
    for saved in ("megatron-tp2", "ours-tp2"):
        _load(reference, root / saved)
        _load(ours, root / saved)
        _assert_same_weights(ours, reference)


def test_checkpoints_are_megatron_cores_at_tp1_and_tp2(tmp_path):
    (keys,) = spawn(_checkpoints, 1, 1, tmp_path)
    assert keys == sorted(["A_log", "dt_bias", "out_norm.weight", "out_proj.weight", "in_proj._extra_state",
                           "out_proj._extra_state"]
                          + [f"in_proj.weight.{p}" for p in ("query", "key", "value", "z", "beta", "alpha")]
                          + [f"conv1d.weight.{p}" for p in ("query", "key", "value")])
    assert spawn(_checkpoints, 2, 2, tmp_path) == [keys, keys]
    spawn(_resharded, 1, tmp_path)


def _training_step():
    initialize(seed=4, device="cpu")
    model = tiny_fast_weight_model(TINY)
    ids = token_batch(B, T + 1, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss = model(ids[:, :T], None, None, labels=ids[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_whole_model_trains_a_step():
    before, after = spawn(_training_step, 1)[0]
    assert after < before


def _published_size():
    initialize(device="cpu")
    config = get_config("gated_deltanet_1p3b", perform_initialization=False, use_cpu_initialization=True)
    with torch.device("meta"):
        model = build_model(config, PUBLISHED_VOCAB_SIZE, make_vocab_size_divisible_by=1)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.mixers[0].parameters())


def test_the_1p3b_preset_is_fla_gated_deltanet_1p3b_and_counted_as_built():
    total, mixer = spawn(_published_size, 1)[0]
    assert mixer == get_mixer("gated_deltanet").parameter_count(get_config("gated_deltanet_1p3b"))
    assert 1.3e9 < total < 1.45e9  # 21 layers, h 2048, 6 heads of 256 / 512, untied 32000-token embeddings


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(linear_num_key_heads=3), r"linear_num_value_heads \(4\) must be a multiple of linear_num_key_heads"),
        (dict(linear_num_key_heads=1, linear_num_value_heads=2, num_attention_heads=2, tensor_model_parallel_size=2),
         r"linear_num_key_heads \(1\) must be divisible by tensor_model_parallel_size \(2\)"),
        (dict(linear_key_head_dim=None), "Gated DeltaNet needs linear_key_head_dim set"),
    ],
)
def test_bad_layouts_say_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config(TINY, **overrides)
