"""JSON-lines files read with errors that name the line: prompt / answer data and evaluation task files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from megatron_refine.data.shards import DataError


def jsonl_rows(path: Path) -> Iterator[tuple[object, str]]:
    """Each non-blank line's JSON value and where it is ("file:line"), for messages."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}): write one JSON object a line") from None
