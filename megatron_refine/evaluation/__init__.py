"""Evaluations of trained models: RULER-style needle tasks (`niah.py`) and task files (`jsonl.py`) scored with the
paper's metrics (`metrics.py`) by `megatron-refine eval` (`runner.py`); the demo's key-value recall (`recall.py`)."""

from megatron_refine.evaluation.examples import EvalExample
from megatron_refine.evaluation.recall import RecallResult, key_value_recall
from megatron_refine.evaluation.runner import EvalArgs, evaluate, generate_packed, summarize

__all__ = ["EvalArgs", "EvalExample", "RecallResult", "evaluate", "generate_packed", "key_value_recall", "summarize"]
