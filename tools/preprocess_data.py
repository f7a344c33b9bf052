"""Text / jsonl -> tokenized webdataset shards (same as `megatron-refine preprocess`).

    python tools/preprocess_data.py --input data/*.jsonl --output-dir shards/ --tokenizer byte
    python tools/preprocess_data.py --builtin-corpus 4000 --output-dir shards/
"""

import sys

from megatron_refine.cli import main

if __name__ == "__main__":
    main(["preprocess", *sys.argv[1:]])  # the console script's handling: one-line errors, --debug
