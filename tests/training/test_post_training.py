"""Stage refine-post: the update on the prompts touches prompt tokens only, the SFT step answer tokens only, two
optimizer steps a batch (one with the plain-SFT baseline), DP=2 and TP=2 equal one rank; the CLI runs it."""

import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from prompt_data import pretrain_tiny, write_qa

from megatron_refine.runtime import spawn
from megatron_refine.training import load_config, setup

SEQ = 96
# Draws that do not depend on how prompts are split over ranks: argmax positions, greedy rollouts.
GREEDY = ["refine.selection=argmax", "refine.temperature=0"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrain_tiny(tmp_path_factory.mktemp("pretrained"), tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def pretrained_hybrid(tmp_path_factory):
    """A tiny Gated DeltaNet + attention hybrid."""
    return pretrain_tiny(tmp_path_factory.mktemp("hybrid"), tmp_path_factory.mktemp("corpus"), "hybrid_tiny")


def post_config(load, data, *extra):
    return load_config(None, [
        "stage=refine-post", "data.layout=prompt_answer", f"data.path={data}", f"data.seq_length={SEQ}",
        "data.max_answer_tokens=8", "data.micro_batch_size=4", "data.global_batch_size=4", f"checkpoint.load={load}",
        "checkpoint.finetune=true", "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "device=cpu",
        "refine.n_chunks=2", "refine.margin=5", "refine.k=3", "refine.reward=hybrid", "logging.log_interval=100",
        "model.config=deltanet_tiny", *extra])


def _masked_tokens_do_not_matter(load, data):
    from megatron_refine.refine import select
    from megatron_refine.training.trainer import _count_tokens, _ntp_forward_step, _refine_forward_step

    trainer = setup(post_config(load, data))
    batch = trainer.loader.next_batch()
    _count_tokens([batch], torch.device("cpu"))  # the step's token counts, as train_step takes them
    prompt, answer = batch.update_mask.bool(), batch.loss_mask.bool()
    rand = lambda shape: torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(7))  # noqa: E731
    past_prompt = torch.cat([torch.zeros_like(prompt[:, :1]), prompt[:, :-1]], 1) | prompt  # inputs of the prompt
    changed = {
        # everything after the prompt (answer, padding) rewritten: inputs past the prompt, labels past its labels
        "prompt": replace(batch, tokens=torch.where(past_prompt, batch.tokens, rand(prompt.shape)),
                          labels=torch.where(prompt, batch.labels, rand(prompt.shape))),
        # labels outside the answer rewritten (the SFT step's inputs stay: the answer is given the prompt)
        "answer": replace(batch, labels=torch.where(answer, batch.labels, rand(prompt.shape))),
    }

    def loss_and_grads(step, b):
        trainer.model.zero_grad_buffer()
        output, loss_func = step(iter([b]), trainer.model)
        loss = loss_func(output)[0]
        loss.backward()
        return loss.detach(), [p.main_grad.clone() for p in trainer.model.parameters()]

    out = {}
    for name, step in (("prompt", lambda: _refine_forward_step(trainer, torch.Generator().manual_seed(0))),
                       ("answer", lambda: _ntp_forward_step(trainer, answers=True))):
        out[name] = loss_and_grads(step(), batch), loss_and_grads(step(), changed[name])
    with torch.no_grad():
        logits = trainer.module(batch.tokens, None, None)
    positions, _, valid = select(logits, trainer.cfg.refine, torch.Generator().manual_seed(0),
                                 lengths=batch.branch_lengths)
    return out, positions, valid, batch.branch_lengths


def test_prompt_update_reads_prompt_tokens_only_and_sft_answer_tokens_only(pretrained, tmp_path):
    out, positions, valid, lengths = spawn(_masked_tokens_do_not_matter, 1, pretrained, write_qa(tmp_path / "qa.jsonl"))[0]
    for name in ("prompt", "answer"):
        (loss, grads), (changed_loss, changed_grads) = out[name]
        torch.testing.assert_close(changed_loss, loss, rtol=1e-6, atol=1e-7)
        for g, h in zip(grads, changed_grads):
            torch.testing.assert_close(h, g, rtol=1e-5, atol=1e-7)
    margin = 5  # every counted rollout and its 3-token truth (and the margin) lie inside the prompt
    assert valid.all() and (positions >= margin).all() and (positions < lengths[:, None] - margin).all()


def _post_steps(load, data, *extra):
    from megatron_refine.evaluation.ttt import _torch_optimizers
    from megatron_refine.training.trainer import train_step

    trainer = setup(post_config(load, data, *extra))
    results = [train_step(trainer, [trainer.loader.next_batch()], step) for step in (1, 2)]
    adam_steps = {int(s["step"]) for o in _torch_optimizers(trainer.optimizer) for s in o.state.values()}
    return ([(r.loss, r.grad_norm, r.prompt_loss, r.prompt_grad_norm, r.refine.get("reward_mean")) for r in results],
            adam_steps, trainer.scheduler.num_steps)


@pytest.mark.parametrize("update, adam_steps", [("refine", 4), ("ntp", 4), ("none", 2)])
def test_each_batch_takes_the_prompt_update_then_the_sft_step(pretrained, tmp_path, update, adam_steps):
    steps, adam, scheduled = spawn(_post_steps, 1, pretrained, write_qa(tmp_path / "qa.jsonl"),
                                   f"prompt_update={update}")[0]
    assert adam == {adam_steps} and scheduled == 2  # two optimizer steps a batch (one for plain SFT), one schedule
    for loss, norm, prompt_loss, prompt_norm, reward in steps:
        assert math.isfinite(loss) and norm > 0
        assert (prompt_loss is None) == (update == "none") and (reward is None) == (update != "refine")


@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=1"],
                                    ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]],
                         ids=["dp2", "tp2-sp"])
def test_post_training_on_two_ranks_equals_one(pretrained, tmp_path, layout):
    data = write_qa(tmp_path / "qa.jsonl")
    (reference,) = spawn(_post_steps, 1, pretrained, data, *GREEDY)
    dp = "tensor_model_parallel_size=1" in layout[0]
    for steps, _, _ in spawn(_post_steps, 2, pretrained, data, *GREEDY, *layout,
                             *(["data.micro_batch_size=2"] if dp else [])):
        for got, want in zip(steps, reference[0]):
            for a, b in zip(got, want):
                assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-4), (steps, reference)


@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=1", "data.micro_batch_size=2"],
                                    ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]],
                         ids=["dp2", "tp2-sp"])
def test_post_training_a_hybrid_on_two_ranks_equals_one(pretrained_hybrid, tmp_path, layout):
    """Nested REFINE post-training on a hybrid: the prompt update's rollouts branch from its attention layers'
    keys and values and its Gated DeltaNet states."""
    data, hybrid = write_qa(tmp_path / "qa.jsonl"), "model.config=hybrid_tiny"
    (reference,) = spawn(_post_steps, 1, pretrained_hybrid, data, *GREEDY, hybrid)
    assert all(reward is not None for *_, reward in reference[0])
    for steps, _, _ in spawn(_post_steps, 2, pretrained_hybrid, data, *GREEDY, hybrid, *layout):
        for got, want in zip(steps, reference[0]):
            for a, b in zip(got, want):
                assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-4), (steps, reference)


def test_cli_post_trains_on_a_user_jsonl(pretrained, tmp_path):
    data = write_qa(tmp_path / "qa.jsonl")
    run = subprocess.run(
        [sys.executable, "-m", "megatron_refine.cli", "train", "--config", "refine-post-deltanet-1p3b", "--load",
         pretrained, "--finetune", "--set", "model.config=deltanet_tiny", "--set", f"data.path={data}",
         "--set", f"data.seq_length={SEQ}", "--set", "data.global_batch_size=4", "--set", "data.micro_batch_size=2",
         "--set", "bf16=false", "--set", "train_steps=2", "--set", "logging.log_interval=1", "--set", "device=cpu",
         "--set", "refine.n_chunks=2", "--set", "refine.margin=5", "--set", f"checkpoint.save={tmp_path / 'post'}",
         "--nproc", "2"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "data.layout=prompt_answer: 16 examples" in run.stdout and "prompt loss" in run.stdout
    assert "REFINE reward" in run.stdout and (tmp_path / "post" / "iter_0000002").is_dir()
