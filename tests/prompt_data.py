"""Prompt / answer data and a tiny pretrained checkpoint for the post-training and test-time training tests."""

import json
import random


def write_qa(path, n=16, seed=0):
    """Byte-text prompts of 40-80 characters with short answers; also an eval task file (task, metric)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(40, 80))) + " ?"
            f.write(json.dumps({"prompt": prompt, "answer": rng.choice(["ab", "cde", "fg"]), "task": "qa",
                                "metric": "exact_match", "max_new_tokens": 4}) + "\n")
    return str(path)


def _pretrain(cfg):
    from megatron_refine.training import train

    return train(cfg).losses


def pretrain_tiny(root, tmp_corpus, model="deltanet_tiny"):
    """A tiny model (DeltaNet by default) trained 2 steps on 50 documents of the byte corpus, saved in `root` (its
    checkpoint records the byte tokenizer)."""
    from megatron_refine.data import write_builtin_corpus
    from megatron_refine.runtime import spawn
    from megatron_refine.training import load_config

    write_builtin_corpus(tmp_corpus, 50, seed=0, shard_size=25, progress=False)
    spawn(_pretrain, 1, load_config("tiny-deltanet", [
        f"data.path={tmp_corpus}", "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=2",
        "train_steps=2", "optimizer.warmup_steps=0", f"checkpoint.save={root}", "device=cpu",
        "logging.log_interval=100", f"model.config={model}"]))
    return str(root)
