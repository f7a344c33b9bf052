"""One evaluation example, whatever made it: the RULER-style generators (`niah.py`) or a task file (`jsonl.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalExample:
    task: str  # e.g. niah_single, squad, narrativeqa
    prompt: str  # the whole model input, question included
    answers: list[str]  # gold answers: a prediction is scored against each, the best counts
    max_new_tokens: int  # greedy decoding stops here or at EOS
    metric: str  # a name of evaluation.metrics.METRICS
    length: int | None = None  # the target context length in tokens (a NIAH grid's column), None for task files
    meta: dict = field(default_factory=dict)  # e.g. needle depths, truncation, for reports and tests
