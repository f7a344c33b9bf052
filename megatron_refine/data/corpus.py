"""A built-in corpus of synthetic documents with long-range structure, deterministic from a seed.

Three kinds, mixed: key-value registries whose values are asked for at the end, facts stated early and
asked about after filler text, and a needle (a secret number) hidden in filler. Each document states the
answers it asks for, so next-token prediction over them rewards remembering the context: something a
tiny fast-weight model can learn on a CPU in minutes, and that REFINE and the recall evaluation measure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

KEYS = (
    "amber azure birch cedar cobalt coral delta ember fern flint garnet hazel indigo ivory jade juniper "
    "lemon lilac maple marble mint nova olive onyx pearl pine plum quartz raven rose ruby sage slate "
    "tango teal umber violet willow zinc"
).split()
NAMES = "ada bo cyd dax eli fay gus hal ivo jun kai lea moe nia oto pia".split()
CITIES = "oslo lima rome kyiv doha bern riga nice baku fez".split()
FILLER = (
    "the river runs past the old mill . a cold wind came down from the hills . "
    "they walked along the road until dusk . the market was busy that morning . "
    "rain fell on the quiet town . the bell rang twice at noon . "
    "a small boat drifted near the shore . the lamps were lit one by one ."
).split(" . ")


@dataclass(frozen=True)
class RecallExample:
    prompt: str  # the document up to the question
    answer: str  # what comes next


def _filler(rng: random.Random, sentences: int) -> str:
    return " ".join(rng.choice(FILLER) + " ." for _ in range(sentences))


def key_value_document(rng: random.Random, num_pairs: int = 6, num_queries: int = 3) -> tuple[str, list[RecallExample]]:
    """'key K = VVV' lines, filler, then 'ask K = VVV' for some keys: each ask is a recall example."""
    keys = rng.sample(KEYS, num_pairs)
    values = {k: f"{rng.randrange(1000):03d}" for k in keys}
    text = f"registry {rng.randrange(100)} :\n" + "".join(f"key {k} = {values[k]}\n" for k in keys)
    text += _filler(rng, rng.randint(1, 3)) + "\n"
    examples = []
    for k in rng.sample(keys, num_queries):
        prompt = text + f"ask {k} ="
        examples.append(RecallExample(prompt, f" {values[k]}"))
        text = prompt + f" {values[k]}\n"
    return text, examples


def facts_document(rng: random.Random) -> str:
    people = rng.sample(NAMES, 3)
    homes = {p: rng.choice(CITIES) for p in people}
    text = " ".join(f"{p} lives in {homes[p]} ." for p in people) + "\n"
    text += _filler(rng, rng.randint(2, 4)) + "\n"
    for p in rng.sample(people, 2):
        text += f"where does {p} live ? {homes[p]} .\n"
    return text


def needle_document(rng: random.Random) -> str:
    code = f"{rng.randrange(10000):04d}"
    return (
        _filler(rng, rng.randint(1, 3)) + f" the secret code is {code} . " + _filler(rng, rng.randint(2, 4))
        + f"\nthe secret code was {code} .\n"
    )


def generate_documents(num_documents: int, seed: int = 0) -> Iterator[str]:
    """The built-in corpus: half key-value registries, a quarter facts, a quarter needles."""
    rng = random.Random(seed)
    for _ in range(num_documents):
        kind = rng.random()
        if kind < 0.5:
            yield key_value_document(rng)[0]
        elif kind < 0.75:
            yield facts_document(rng)
        else:
            yield needle_document(rng)


def key_value_recall_examples(num_examples: int, seed: int) -> list[RecallExample]:
    """Held-out recall prompts (use a seed the training corpus did not use): first query of fresh registries."""
    rng = random.Random(seed)
    return [key_value_document(rng)[1][0] for _ in range(num_examples)]
