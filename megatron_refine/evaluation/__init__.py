"""Evaluations of trained models: RULER-style needle tasks (`niah.py`), the built-in corpus's held-out recall
tables (`recall_tasks.py`) and task files (`jsonl.py`), scored with the paper's metrics (`metrics.py`) by
`megatron-refine eval` (`runner.py`): packed greedy decoding and the tables in `scoring.py`, test-time training
in `ttt.py`."""

from megatron_refine.evaluation.examples import EvalExample
from megatron_refine.evaluation.runner import EvalArgs
from megatron_refine.evaluation.scoring import evaluate, generate_packed, summarize

__all__ = ["EvalArgs", "EvalExample", "evaluate", "generate_packed", "summarize"]
