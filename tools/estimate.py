"""Per-GPU memory and step time of a recipe (recipes/) or a training config, from shapes alone (no GPU).

    python tools/estimate.py midtrain_deltanet_7b                 # a recipe: its layout and nodes
    python tools/estimate.py --config refine-mid-deltanet-1p3b --gpus 8 --set parallel.tensor_model_parallel_size=2
    python tools/estimate.py --all                                # every recipe (the table in docs/scaling.md)
    python tools/estimate.py --largest                            # the largest DeltaNet fitting REFINE at 16K tokens
    python tools/estimate.py --longest                            # the longest document 1.3B and 7B fit (CP, TP)
    python tools/estimate.py --cp-sweep deltanet_1p3b --seq-length 65536      # per-GPU memory vs CP at one length
"""

import sys

from megatron_refine.warnings import filter_library_warnings

filter_library_warnings()  # before the libraries recipes.estimate imports

from recipes.estimate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
