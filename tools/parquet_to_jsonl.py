"""The REFINE release's RULER QA parquet (columns `prompt`, `answer`) -> a prompt / answer jsonl for
`data.layout: prompt_answer` (and, with --task / --metric, an `eval --data` task file); same as
`megatron-refine parquet-to-jsonl`.

    python tools/parquet_to_jsonl.py --input squad_4k_train.parquet --output squad_4k_train.jsonl \
        [--task ruler_squad] [--metric ruler_substring] [--max-new-tokens 32]
"""

import sys

from megatron_refine.cli import main

if __name__ == "__main__":
    main(["parquet-to-jsonl", *sys.argv[1:]])  # the console script's handling: one-line errors, --debug
