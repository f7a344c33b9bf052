"""The lm-evaluation-harness backend (`--model megatron-refine`) on a trained tiny checkpoint, offline, over local
task files: each loglikelihood equals a forward of that request alone (cut to max_length from the left), the
rolling log-likelihood scores every token once in max_length windows, generate_until is the greedy decode cut at
`until`, and lm_eval's command line runs through `python -m megatron_refine.evaluation.lm_eval_adapter`.

lm_eval runs in subprocesses: Hugging Face libraries read their offline switches at import."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
MAX_LENGTH = 32  # below the longer prompts and texts: truncation and several rolling windows get exercised
GEN_TOKS = 12

CHOICE = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "A long question whose context is longer than max_length tokens, so it is cut from the left:",
     "choices": ["yes", "no"], "label": 1},
    {"question": "", "choices": ["cats", "dogs"], "label": 0},
]
GEN = [{"prompt": "Once upon a time", "answer": " there"}, {"prompt": "The quick brown fox", "answer": " jumps"},
       {"prompt": "A prompt longer than max_length minus the generation budget", "answer": "x"}]
TEXT = [{"text": "The quick brown fox jumps over the lazy dog, and the lazy dog sleeps on through the afternoon."},
        {"text": "short"}]
TASKS = {
    "mr_choice": ("choice", "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                            "doc_to_target: label\nmetric_list:\n  - metric: acc\n"),
    "mr_gen": ("gen", "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
                      f"generation_kwargs:\n  until: ['.']\n  max_gen_toks: {GEN_TOKS}\n  do_sample: false\n"
                      "metric_list:\n  - metric: exact_match\n"),
    "mr_text": ("text", "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                        "metric_list:\n  - metric: word_perplexity\n"),
}


def _write_tasks(folder: Path) -> None:
    folder.mkdir()
    for name, (data, body) in TASKS.items():
        rows = {"choice": CHOICE, "gen": GEN, "text": TEXT}[data]
        (folder / f"{data}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"    test: {folder / f'{data}.jsonl'}\ntest_split: test\n{body}")


def _offline_env(tmp: Path) -> dict:
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf")}


def _evaluate_and_recompute(load: str, tasks: str, out: str) -> None:
    """(In a subprocess.) lm_eval's answers over the three tasks, and each one computed directly with the model."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from megatron_refine.evaluation.lm_eval_adapter import MegatronRefineLM
    from megatron_refine.evaluation.scoring import generate_packed

    lm = MegatronRefineLM(load=load, max_length=MAX_LENGTH, batch_size=2, device="cpu")
    model, tok, vocab = lm.model, lm.tokenizer, lm.model.tokenizer_vocab_size

    def greedy(prompt: list[int], budget: int) -> list[int]:
        return [t for t in generate_packed(model, [prompt], [budget], tok.eos_id)[0] if t != tok.eos_id]

    @torch.no_grad()
    def alone(ids: list[int], n: int) -> list:
        """The last n tokens' summed log-probs given the rest, and whether each is the argmax: one unpacked forward."""
        logits = model(torch.tensor([ids[:-1]]), None, None)[0, -n:, :vocab].float()  # [n, V]
        target = torch.tensor(ids[-n:])
        return [float(logits.log_softmax(-1)[torch.arange(n), target].sum()), bool((logits.argmax(-1) == target).all())]

    first = greedy(tok.encode(GEN[0]["prompt"]), GEN_TOKS)
    text = tok.decode(first)
    until = text[len(text) // 2: len(text) // 2 + 2]  # a piece of the greedy answer: generate_until cuts there
    run = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), log_samples=True, gen_kwargs={"until": [until]},
                                  task_manager=TaskManager(include_path=tasks, include_defaults=False))
    checks = {"until": until, "full": text, "loglikelihood": [], "rolling": [], "generate_until": []}
    for sample in run["samples"]["mr_choice"]:
        for (context, continuation), (got,) in zip(sample["arguments"], sample["resps"]):
            ids = ((tok.encode(context) or [tok.eos_id]) + tok.encode(continuation))[-(MAX_LENGTH + 1):]
            checks["loglikelihood"].append((list(got), alone(ids, len(tok.encode(continuation)))))
    for sample in run["samples"]["mr_text"]:
        full = [tok.eos_id] + tok.encode(sample["arguments"][0][0])
        windows = []  # the text's tokens full[1:] in blocks of max_length, each given the max_length tokens before it
        for start in range(1, len(full), MAX_LENGTH):
            end = min(start + MAX_LENGTH, len(full))
            windows.append(alone(full[max(0, end - 1 - MAX_LENGTH): end], end - start)[0])
        checks["rolling"].append((sample["resps"][0][0], sum(windows), len(windows)))
    for sample in run["samples"]["mr_gen"]:
        (context, gen_kwargs), = sample["arguments"]
        budget = gen_kwargs["max_gen_toks"]
        want = tok.decode(greedy(tok.encode(context)[-(MAX_LENGTH - budget):], budget)).split(until)[0]
        checks["generate_until"].append((sample["resps"][0][0], want))
    # a continuation that is the greedy decode scores as greedy
    context = tok.encode(GEN[1]["prompt"])
    checks["greedy_is_greedy"] = lm._loglikelihood_tokens([(None, context, greedy(context, 6))])[0][1]
    checks["results"] = run["results"]
    Path(out).write_text(json.dumps(checks))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from megatron_refine.data import write_builtin_corpus

    tmp = tmp_path_factory.mktemp("lm_eval")
    write_builtin_corpus(tmp / "data", 40, seed=0, shard_size=20, progress=False)
    train = [sys.executable, "-m", "megatron_refine.cli", "train", "--config", "tiny-deltanet", "--set",
             f"data.path={tmp / 'data'}", "--set", "data.seq_length=64", "--set", "train_steps=1", "--set",
             "device=cpu", "--set", f"checkpoint.save={tmp / 'ckpt'}", "--set", "optimizer.warmup_steps=0"]
    run = subprocess.run(train, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    _write_tasks(tmp / "tasks")
    return tmp


@pytest.fixture(scope="module")
def checks(trained):
    out = trained / "checks.json"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_lm_eval_adapter as t; "
            f"t._evaluate_and_recompute({str(trained / 'ckpt')!r}, {str(trained / 'tasks')!r}, {str(out)!r})")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_offline_env(trained), capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_loglikelihoods_equal_each_request_alone(checks):
    assert len(checks["loglikelihood"]) == sum(len(d["choices"]) for d in CHOICE)
    for (got, got_greedy), (want, want_greedy) in checks["loglikelihood"]:
        assert got == pytest.approx(want, abs=1e-3) and got_greedy == want_greedy
    assert checks["greedy_is_greedy"] is True
    assert set(checks["results"]["mr_choice"]) >= {"acc,none"}


def test_rolling_loglikelihood_scores_every_token_in_windows(checks):
    assert [n for *_, n in checks["rolling"]] == [3, 1]  # 94 tokens in blocks of 32; "short" in one
    for got, want, _ in checks["rolling"]:
        assert got == pytest.approx(want, abs=1e-3)


def test_generate_until_is_the_greedy_decode_cut_at_until(checks):
    (first, want), *rest = checks["generate_until"]
    assert first == want == checks["full"].split(checks["until"])[0] and len(first) < len(checks["full"])
    for got, want in rest:
        assert got == want


def test_lm_eval_command_line(trained, checks):
    out = trained / "cli"
    command = [sys.executable, "-m", "megatron_refine.evaluation.lm_eval_adapter", "--model", "megatron-refine",
               "--model_args", f"load={trained / 'ckpt'},max_length={MAX_LENGTH}", "--tasks", "mr_choice,mr_text",
               "--include_path", str(trained / "tasks"), "--batch_size", "4", "--device", "cpu", "--output_path",
               str(out)]
    run = subprocess.run(command, cwd=ROOT, env=_offline_env(trained), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mr_choice" in run.stdout and "word_perplexity" in run.stdout
    (results,) = out.glob("**/results_*.json")
    results = json.loads(results.read_text())["results"]
    assert results["mr_choice"]["acc,none"] == checks["results"]["mr_choice"]["acc,none"]
    assert results["mr_text"]["word_perplexity,none"] == pytest.approx(
        checks["results"]["mr_text"]["word_perplexity,none"], rel=1e-4)
