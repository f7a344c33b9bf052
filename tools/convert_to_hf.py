"""A Megatron checkpoint (any TP/PP/DP layout) -> a Hugging Face folder: DeltaNet as fla's `delta_net`, Gated
DeltaNet as fla's `gated_deltanet`, LaCT as the authors' `lact_swiglu` with its modeling code (trust_remote_code)
(same as `megatron-refine convert-to-hf`).

    python tools/convert_to_hf.py --load checkpoints/ --save hf_model/ [--iteration N]
        [--tokenizer tokenizer.json] [--dtype bf16|fp32] [--overwrite]
"""

import sys

from megatron_refine.cli import main

if __name__ == "__main__":
    main(["convert-to-hf", *sys.argv[1:]])  # the console script's handling: one-line errors, --debug
