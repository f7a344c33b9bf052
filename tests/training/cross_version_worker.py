"""Runs training jobs in this interpreter and prints their losses as JSON: the cross-version checkpoint test
starts it under each megatron-core end (`python tests/training/cross_version_worker.py JOBS_JSON`).

Each job is {"corpus", "root", "steps", "load", "extra"}: train the tiny DeltaNet for `steps` steps in this
process (world size 1, gloo), saving to `root` and, with `load`, resuming from it first.
"""

import json
import sys

from megatron_refine.megatron_compat import MEGATRON_CORE_VERSION
from megatron_refine.training import load_config, train
from megatron_refine.warnings import filter_library_warnings


def run(corpus: str, root: str, steps: int, load: bool, extra: list[str]) -> list[float]:
    cfg = load_config("tiny-deltanet", [
        f"data.path={corpus}", "data.seq_length=32", "data.micro_batch_size=2", "data.global_batch_size=2",
        "optimizer.warmup_steps=2", "logging.log_interval=100", "device=cpu", f"train_steps={steps}",
        f"checkpoint.save={root}", *([f"checkpoint.load={root}"] if load else []), *extra,
    ])
    return train(cfg).losses


if __name__ == "__main__":
    filter_library_warnings()
    losses = [run(**job) for job in json.loads(sys.argv[1])]
    print(json.dumps({"megatron_core": str(MEGATRON_CORE_VERSION), "losses": losses}))
