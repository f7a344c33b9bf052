"""Text / jsonl -> tokenized webdataset shards (same as `megatron-refine preprocess`).

    python tools/preprocess_data.py --input data/*.jsonl --output-dir shards/ --tokenizer byte
    python tools/preprocess_data.py --builtin-corpus 4000 --output-dir shards/
"""

from megatron_refine.data.preprocess import main

if __name__ == "__main__":
    main()
