"""Prompt / answer data for post-training and test-time training (`data.layout: prompt_answer`).

A jsonl file, one {"prompt": str, "answer": str | "answers": [str, ...]} a line; other fields (an evaluation task
file's `task`, `metric`, ...) are ignored, so a task file trains as it is; the first answer is the target. Text is
tokenized with the model's tokenizer, no special tokens added (as released); the answer ends with EOS, where the
SFT target stops (as verl's SFT data does). A prompt longer than seq_length - max_answer_tokens is cut from the
left (its end kept: the question) or the right, an answer (EOS included) to max_answer_tokens (a cut answer then
has no EOS: it goes on past the cut); both are counted.

Rows are [prompt][answer EOS][EOS padding] of seq_length + 1 tokens, labels shifted by one, so prompts of any
lengths share a batch (`Batch`, data/batch.py): `update_mask` marks the labels inside the prompt (the update on the
prompt: REFINE or NTP), `loss_mask` the answer's labels (the SFT step), and `branch_lengths` [B] counts each row's
prompt labels, which bound where REFINE branches (`refine.step.select`); both losses are means over the step.
The loader shards a global order over data-parallel ranks as Megatron's sampler does (rank r takes the r-th
micro-batch of every mini-batch), shuffled each epoch or in file order (test-time training reads the test stream
as it comes), and wraps around; its position is one integer.
`parquet_to_jsonl` converts the REFINE release's RULER parquet files (columns `prompt`, `answer`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_refine.data.batch import Batch
from megatron_refine.data.jsonl import jsonl_rows
from megatron_refine.data.shards import DataError
from megatron_refine.data.tokenizers import Tokenizer

TRUNCATIONS = ("left", "right")


@dataclass
class PromptAnswerDataset:
    """Tokenized examples: (prompt ids, answer ids ending with EOS, empty for a prompt without an answer)."""

    path: str  # the jsonl file, or a name for examples given in memory
    tokenizer: Tokenizer
    examples: list[tuple[list[int], list[int]]]
    truncated_prompts: int = 0
    truncated_answers: int = 0
    empty_answers: int = 0  # blank answers: their SFT target is EOS alone

    @classmethod
    def from_texts(cls, prompts: list[str], answers: list[str | None], tokenizer: Tokenizer, seq_length: int,
                   max_answer_tokens: int = 32, truncation: str = "left", path: str = "<memory>"
                   ) -> "PromptAnswerDataset":
        if truncation not in TRUNCATIONS:
            raise ValueError(f"data.prompt_truncation must be one of {TRUNCATIONS}, got {truncation!r}: left keeps a "
                             "long prompt's end (where the question is), right its start")
        budget = seq_length - max_answer_tokens
        if budget < 2 or max_answer_tokens < 1:
            raise ValueError(f"data.seq_length ({seq_length}) minus data.max_answer_tokens ({max_answer_tokens}) "
                             "leaves no room for a prompt: raise data.seq_length (max_answer_tokens >= 1)")
        data = cls(path, tokenizer, [])
        for prompt, answer in zip(prompts, answers):
            ids = tokenizer.encode(prompt)
            if len(ids) > budget:
                ids = ids[-budget:] if truncation == "left" else ids[:budget]
                data.truncated_prompts += 1
            target = [] if answer is None else tokenizer.encode(answer) + [tokenizer.eos_id]
            data.empty_answers += answer is not None and not answer.strip()
            if len(target) > max_answer_tokens:
                target = target[:max_answer_tokens]
                data.truncated_answers += 1
            if len(ids) < 2:
                raise DataError(f"{path}: example {len(data.examples) + 1} has a prompt of {len(ids)} token(s): a "
                                "prompt needs at least 2 (an input and its label)")
            data.examples.append((ids, target))
        if not data.examples:
            raise DataError(f"{path} holds no examples: write one JSON object a line")
        return data

    @classmethod
    def open(cls, path: str | Path, tokenizer: Tokenizer, seq_length: int, max_answer_tokens: int = 32,
             truncation: str = "left", require_answers: bool = True) -> "PromptAnswerDataset":
        prompts, answers = read_prompt_answer_file(path, require_answers)
        data = cls.from_texts(prompts, answers, tokenizer, seq_length, max_answer_tokens, truncation, str(path))
        if require_answers and data.empty_answers == len(data.examples):
            raise DataError(f"{path}: every answer is empty, so the SFT step would only teach the model to stop (EOS): "
                            "fill in the 'answer' fields (or train with --stage ttt, which reads no answers)")
        return data

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokenizer_hash(self) -> str:
        return self.tokenizer.hash

    @property
    def tokenizer_description(self) -> dict:
        return self.tokenizer.describe()

    @property
    def content_hash(self) -> str:
        """sha256 of the tokenized examples: what a data position indexes."""
        return hashlib.sha256(json.dumps(self.examples).encode()).hexdigest()

    def without_refine_positions(self, margin: int) -> int:
        """Prompts too short for REFINE: no label lies `margin` tokens from both ends (refine.step.select), so they
        get no rollout and their prompt update is NTP alone."""
        return sum(len(prompt) - 1 <= 2 * margin for prompt, _ in self.examples)

    def summary(self, refine_margin: int | None = None) -> str:
        """One line; with `refine_margin` (the stage branches REFINE in the prompts) the prompts too short for it."""
        prompt_tokens = [len(p) for p, _ in self.examples]
        short = self.without_refine_positions(refine_margin) if refine_margin is not None else 0
        return (f"data.layout=prompt_answer: {len(self.examples)} examples from {self.path}, prompts of "
                f"{min(prompt_tokens)}-{max(prompt_tokens)} tokens; cut to fit: {self.truncated_prompts} prompts, "
                f"{self.truncated_answers} answers"
                + (f"; {self.empty_answers} empty answers (EOS only)" if self.empty_answers else "")
                + (f"; {short} prompts of <= {2 * refine_margin + 1} tokens, too short for REFINE (refine.margin "
                   f"{refine_margin} at both ends): NTP only" if short else ""))


def read_prompt_answer_file(path: str | Path, require_answers: bool = True) -> tuple[list[str], list[str | None]]:
    """The prompts and first answers of a jsonl file; every message names the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt/answer file {path} not found: data.path must be a .jsonl file of "
                                '{"prompt", "answer"} lines (tools/parquet_to_jsonl.py converts RULER parquet)')
    prompts, answers = [], []
    for row, where in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DataError(f"{where}: missing field 'prompt' (a string, the whole model input)")
        answer = row.get("answers", row.get("answer"))
        if isinstance(answer, list):
            answer = answer[0] if answer else None
        if answer is not None and not isinstance(answer, str):
            raise DataError(f"{where}: 'answer' must be a string or a list of strings, got {type(answer).__name__}")
        if answer is None and require_answers:
            raise DataError(f"{where}: missing field 'answer' (or 'answers', a list: the first is the target); "
                            "post-training learns the answer given the prompt")
        prompts.append(row["prompt"])
        answers.append(answer)
    return prompts, answers


@dataclass
class PromptAnswerLoaderState:
    consumed: int = 0  # examples of the global order (epochs laid end to end) taken by all ranks so far


@dataclass
class PromptAnswerLoader:
    """This DP rank's micro-batches of prompt / answer rows (module docstring)."""

    dataset: PromptAnswerDataset
    seq_length: int
    micro_batch_size: int
    dp_rank: int = 0
    dp_size: int = 1
    seed: int = 0
    shuffle: bool = True
    state: PromptAnswerLoaderState = field(default_factory=PromptAnswerLoaderState)
    _order: tuple[int, list[int]] = field(default=(-1, []), init=False, repr=False)  # (epoch, its permutation)
    layout = "prompt_answer"

    def _example(self, g: int) -> tuple[list[int], list[int]]:
        n = len(self.dataset.examples)
        epoch, i = divmod(g, n)
        if self.shuffle:
            if self._order[0] != epoch:  # one permutation an epoch, drawn when the epoch is first reached
                order = list(range(n))
                random.Random(self.seed * 100_003 + epoch).shuffle(order)
                self._order = (epoch, order)
            i = self._order[1][i]
        return self.dataset.examples[i]

    def next_batch(self) -> Batch:
        """One example a row (module docstring)."""
        B, T = self.micro_batch_size, self.seq_length
        first = self.state.consumed + self.dp_rank * B
        rows = np.full((B, T + 1), self.dataset.eos_id, dtype=np.int64)
        prompt_lengths, ends = torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int64)
        for b in range(B):
            prompt, answer = self._example(first + b)
            row = (prompt + answer)[: T + 1]
            rows[b, : len(row)] = row
            prompt_lengths[b], ends[b] = len(prompt) - 1, len(row) - 1  # labels inside the prompt, all real labels
        self.state.consumed += B * self.dp_size
        batch = torch.from_numpy(rows)
        label = torch.arange(T)[None]
        return Batch(batch[:, :-1].contiguous(), batch[:, 1:].contiguous(),
                     loss_mask=((label >= prompt_lengths[:, None]) & (label < ends[:, None])).float(),
                     update_mask=(label < prompt_lengths[:, None]).float(), branch_lengths=prompt_lengths,
                     mean_over_step=True)

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"consumed"}:
            raise ValueError(f"the checkpoint's data position ({sorted(state)}) is not one of data.layout=prompt_answer: "
                             "resume with the data.layout the checkpoint was trained with, or start this layout from "
                             "its weights with checkpoint.finetune=true")
        self.state = PromptAnswerLoaderState(**state)


def _is_answer(value) -> bool:
    """A gold answer: a non-blank string (a blank one is a substring of every prediction) or an integer."""
    return (isinstance(value, str) and bool(value.strip())) or (isinstance(value, int) and not isinstance(value, bool))


def parquet_to_jsonl(parquet: str | Path, output: str | Path, task: str | None = None, metric: str | None = None,
                     max_new_tokens: int | None = None) -> int:
    """The REFINE release's RULER QA parquet (columns `prompt`: the text, or chat messages whose contents are joined
    with newlines; `answer`: a list of gold answers) -> a jsonl of {"prompt", "answers"} (+ task, metric,
    max_new_tokens when given, which makes it an `eval --data` task file too). Returns the number of lines."""
    import pyarrow.parquet as pq

    parquet, output = Path(parquet), Path(output)
    if not parquet.is_file():
        raise FileNotFoundError(f"parquet file {parquet} not found")
    table = pq.read_table(parquet)
    missing = [c for c in ("prompt", "answer") if c not in table.column_names]
    if missing:
        raise DataError(f"{parquet} has no column(s) {missing} (it has {table.column_names}): the converter reads the "
                        "release's RULER parquet, with a 'prompt' and an 'answer' (list) column")
    extra = {k: v for k, v in (("task", task), ("metric", metric), ("max_new_tokens", max_new_tokens)) if v is not None}
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for i, (prompt, answer) in enumerate(zip(table.column("prompt").to_pylist(), table.column("answer").to_pylist())):
            if isinstance(prompt, list):  # chat messages
                prompt = "\n".join(m["content"] if isinstance(m, dict) else str(m) for m in prompt)
            answers = [answer] if isinstance(answer, (str, int)) else answer
            if not isinstance(prompt, str):
                raise DataError(f"{parquet} row {i}: 'prompt' is {type(prompt).__name__}: give text or chat messages")
            if not isinstance(answers, list) or not answers or not all(_is_answer(a) for a in answers):
                raise DataError(f"{parquet} row {i}: column 'answer' holds {answer!r:.80}: it must be a non-empty "
                                "list of non-empty strings (or integers, written as text)")
            answers = [str(a) for a in answers]  # an integer answer (a count, a year) is scored as its digits
            f.write(json.dumps({"prompt": prompt, "answers": answers, **extra}) + "\n")
            count += 1
    tmp.replace(output)
    return count
