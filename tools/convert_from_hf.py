"""A Hugging Face `delta_net` or `gated_deltanet` (fla's DeltaNet, Gated DeltaNet) or `lact_swiglu` (the LaCT authors') folder -> a Megatron checkpoint (+ model_config.yaml) (same as
`megatron-refine convert-from-hf`).

    python tools/convert_from_hf.py --load hf_model/ --save checkpoints/imported [--tp N --pp M] [--overwrite]
"""

import sys

from megatron_refine.cli import main

if __name__ == "__main__":
    main(["convert-from-hf", *sys.argv[1:]])  # the console script's handling: one-line errors, --debug
