"""lm-evaluation-harness backend for megatron-refine checkpoints: `--model megatron-refine`.

lm_eval 0.4.13 finds a model only in its registry, which holds its own `lm_eval.models` table and whatever
modules already imported registered with `@register_model`: it reads no entry points, and `--include_path`
adds tasks, not models. The `lm_eval` console script therefore cannot see this backend; run lm_eval's own
command line through this module, which registers it first (every `lm_eval` argument works unchanged):

    python -m megatron_refine.evaluation.lm_eval_adapter --model megatron-refine \\
        --model_args load=ckpts/run,tokenizer=byte,max_length=4096 --tasks hellaswag --batch_size 8 --device cpu

`--model_args`: `load` is the checkpoint folder; `tokenizer` ("byte" or a tokenizer.json) defaults to the one
its training data recorded; `max_length` (the tokens one request's forward sees) to the model's
max_position_embeddings; `max_gen_toks` (generate_until's budget when a task sets none) to 256. Batch size and
device are lm_eval's own `--batch_size` (requests packed in one forward) and `--device` (its default cuda:0
means the GPU, or the CPU on a host without one); lm_eval always passes both, so putting them in
`--model_args` clashes. From Python: import this module, then `lm_eval.simple_evaluate(model="megatron-refine",
model_args="load=ckpts/run", ...)`.

Requests run on the packed path of `megatron-refine eval` (evaluation/runner.py): a batch is one row whose
documents restart the fast-weight state, so every request scores as it would alone, with no padding.
- loglikelihood: log p(continuation | context), context and continuation tokenized as lm_eval's HFLM does
  (TemplateLM), cut from the left to `max_length` + 1 tokens, and whether greedy decoding picks every token.
- loglikelihood_rolling: the whole text in `max_length` windows (lm_eval's rolling windows, as HFLM).
- generate_until: greedy decoding with the cached decoder up to `max_gen_toks` tokens or EOS, cut at the
  first `until` string. Sampling (`do_sample`) is not supported: such tasks decode greedily, with a warning.
One process, TP=1: data- or tensor-parallel launches are refused.
"""

from __future__ import annotations

import logging

import lm_eval.models  # noqa: F401 - fills the built-in table first: lm_eval skips it once a registry holds any model
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

logger = logging.getLogger(__name__)


@register_model("megatron-refine")
class MegatronRefineLM(TemplateLM):
    """`--model_args` are load, tokenizer, max_length and max_gen_toks; lm_eval itself passes batch_size, device and
    max_batch_size (which only `--batch_size auto` uses: not supported here)."""

    def __init__(self, load: str, tokenizer: str | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, batch_size: int | str = 8, max_batch_size: int | None = None,
                 device: str | None = None):
        super().__init__()
        from megatron.core import parallel_state

        from megatron_refine.training.model_loading import load_model
        from megatron_refine.runtime import initialize

        if not torch.distributed.is_initialized():
            if device and device != "cpu" and not torch.cuda.is_available():  # lm_eval's default is cuda:0
                logger.warning(f"device {device} asked for, but this host has no CUDA: running on the CPU")
            initialize(device="cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
        if torch.distributed.get_world_size() > 1 or parallel_state.get_tensor_model_parallel_world_size() > 1:
            raise ValueError("the megatron-refine lm_eval backend runs in one process (TP=1): launch it with python, "
                             "not torchrun")
        if str(batch_size).startswith("auto"):
            raise ValueError("--batch_size auto is not supported by megatron-refine: give a number (requests per "
                             "forward, packed in one row)")
        self.model, self.tokenizer = load_model(str(load), None if tokenizer is None else str(tokenizer))
        self.model.eval()
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = int(batch_size)
        self._device = next(self.model.parameters()).device
        self._warned_sampling = False

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.hash

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(inputs, targets) rows, targets being what the inputs' last len(targets) positions predict -> (sum of
        the targets' log-probs, whether each target is the argmax), all rows packed in one forward."""
        from megatron_refine.models import packed_seq_params, sampling_logits
        from megatron_refine.models.losses import vocab_parallel_log_probs

        ends = torch.cumsum(torch.tensor([len(inputs) for inputs, _ in rows], device=self._device), 0)
        tokens = torch.tensor([[t for inputs, _ in rows for t in inputs]], device=self._device)  # [1, T]
        cu_seqlens = torch.cat([ends.new_zeros(1), ends])
        logits = self.model(tokens, None, None, packed_seq_params=packed_seq_params(cu_seqlens))[0]  # [T, V/t]
        results = []
        for end, (_, targets) in zip(ends.tolist(), rows):
            picked = logits[end - len(targets): end]  # [n, V/t]
            target = torch.tensor(targets, device=self._device)
            log_prob = float(vocab_parallel_log_probs(picked, target).sum())
            greedy = bool((sampling_logits(picked, self.model.tokenizer_vocab_size).argmax(-1) == target).all())
            results.append((log_prob, greedy))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        for start in tqdm(range(0, len(requests), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            batch, rows = requests[start: start + self.batch_size], []
            for _, context, continuation in batch:
                if len(continuation) > self.max_length:
                    raise ValueError(f"a continuation of {len(continuation)} tokens is longer than max_length "
                                     f"{self.max_length}: raise max_length in --model_args")
                whole = (context + continuation)[-(self.max_length + 1):]  # cut from the left, as HFLM
                rows.append((whole[:-1], continuation))
            for (request, _, _), answer in zip(batch, self._score(rows)):
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                results.append(answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, counts = [], []
        for (text,) in (req.args for req in requests):
            pairs = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            windows += [(None, context, continuation) for context, continuation in pairs]
            counts.append(len(pairs))
        scores, results, start = self._loglikelihood_tokens(windows, disable_tqdm), [], 0
        for req, n in zip(requests, counts):
            results.append(sum(log_prob for log_prob, _ in scores[start: start + n]))
            start += n
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, results[-1])
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from megatron_refine.evaluation.scoring import generate_packed

        results = []
        for start in tqdm(range(0, len(requests), self.batch_size), disable=disable_tqdm, desc="generate_until"):
            batch = [req.args for req in requests[start: start + self.batch_size]]
            prompts, budgets, stops = [], [], []
            for context, gen_kwargs in batch:
                kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                if kwargs["do_sample"] and not self._warned_sampling:
                    logger.warning("megatron-refine decodes greedily: do_sample / temperature are ignored")
                    self._warned_sampling = True
                budget = kwargs["max_gen_toks"]
                if budget >= self.max_length:
                    raise ValueError(f"max_gen_toks {budget} leaves no room for the prompt in max_length "
                                     f"{self.max_length}: raise max_length in --model_args")
                prompts.append(self.tok_encode(context)[-(self.max_length - budget):] or [self.eot_token_id])
                budgets.append(budget)
                stops.append(handle_stop_sequences(kwargs.get("until"), eos=None))
            outputs = generate_packed(self.model, prompts, budgets, self.eot_token_id)
            for (context, gen_kwargs), out, until in zip(batch, outputs, stops):
                text = self.tokenizer.decode([t for t in out if t != self.eot_token_id])
                text = postprocess_generated_text(text, until, think_end_token=None)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                results.append(text)
        return results


def main() -> None:
    """lm_eval's command line (`lm_eval ...` arguments) with the megatron-refine backend registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
