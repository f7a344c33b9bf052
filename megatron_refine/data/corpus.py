"""A built-in corpus of synthetic documents with long-range structure, deterministic from a seed.

Four kinds, mixed: dense key-value tables (many "K=VV" lines, then every key asked back in random order,
as the MQAR associative-recall task of the Zoology work: every asked value is a retrieval, which is how small
recurrent models learn recall quickly), key-value registries whose values are asked for after filler, facts
stated early and asked about after filler text, and a needle (a secret number) hidden in filler. Each document
states the answers it asks for, so next-token prediction over them rewards remembering the context: something a
tiny fast-weight model can learn on a CPU in minutes, and that REFINE and the recall evaluation measure.
"""

from __future__ import annotations

import random
from typing import Iterator

CORPUS_VERSION = 2  # raise when the generator's output for a seed changes: written corpora are then regenerated

KEYS = (
    "amber azure birch cedar cobalt coral delta ember fern flint garnet hazel indigo ivory jade juniper "
    "lemon lilac maple marble mint nova olive onyx pearl pine plum quartz raven rose ruby sage slate "
    "tango teal umber violet willow zinc"
).split()
# The tables' keys: one letter each, so a fast-weight model reads a key and its value within its short convolution's
# window (4 tokens): the write "K=VV" and the read "K?" both hold the whole key, and a tiny model learns the lookup
# in about a million tokens. Longer keys (words of three letters, "key cat = 42") were not learned by the demo's
# model in 3M tokens: a multi-token key has to be assembled across layers before it can be written.
TABLE_KEYS = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
TABLE_SIZES = (2, 16)  # keys per training table: small tables teach the lookup, large ones test its capacity
NAMES = "ada bo cyd dax eli fay gus hal ivo jun kai lea moe nia oto pia".split()
CITIES = "oslo lima rome kyiv doha bern riga nice baku fez".split()
FILLER = (
    "the river runs past the old mill . a cold wind came down from the hills . "
    "they walked along the road until dusk . the market was busy that morning . "
    "rain fell on the quiet town . the bell rang twice at noon . "
    "a small boat drifted near the shore . the lamps were lit one by one ."
).split(" . ")


def _filler(rng: random.Random, sentences: int) -> str:
    return " ".join(rng.choice(FILLER) + " ." for _ in range(sentences))


def _value(rng: random.Random) -> str:
    return f"{rng.randrange(100):02d}"


def table_lines(rng: random.Random, keys: list[str], repeated: list[str] = ()) -> tuple[str, dict[str, list[str]]]:
    """A table's header and "K=VV" lines in `keys` order (2-digit values), and each key's values: a key of
    `repeated` gets a second line with another value, later on."""
    values = {k: [_value(rng)] for k in keys}
    lines = [(k, values[k][0]) for k in keys]
    for k in repeated:
        values[k].append(_value(rng))
        lines.insert(rng.randint(lines.index((k, values[k][0])) + 1, len(lines)), (k, values[k][1]))
    return "table:\n" + "".join(f"{k}={v}\n" for k, v in lines), values


def ask_line(keys: list[str], values: dict[str, list[str]]) -> tuple[str, str]:
    """"K?" and its answer "VV": several keys are asked as "K1,K2?" -> "V1,V2", and a key with several values
    answers all of them in order ("V1 V2")."""
    return f"{','.join(keys)}?", ",".join(" ".join(values[k]) for k in keys)


def table_document(rng: random.Random) -> str:
    """A dense associative-recall document: a table of 2 to 16 "K=VV" lines (now and then a key written twice),
    then every key asked back in random order, one a line or, now and then, two or three a line. Every answer is
    a retrieval, and the lookup gets most of the documents' signal: with fewer asks, multi-key asks and repeated
    keys more often, the demo's model took far longer to start retrieving."""
    keys = rng.sample(TABLE_KEYS, rng.randint(*TABLE_SIZES))
    text, values = table_lines(rng, keys, rng.sample(keys, 1) if rng.random() < 0.1 else [])
    asked = rng.sample(keys, len(keys))
    while asked:
        n = 1 if rng.random() < 0.9 else rng.randint(2, 3)
        prompt, answer = ask_line(asked[:n], values)
        text += prompt + answer + "\n"
        asked = asked[n:]
    return text


def registry_prompt(rng: random.Random, num_pairs: int = 6) -> tuple[str, dict[str, str]]:
    """A registry's "key K = VVV" lines and filler, up to its asks, and its values."""
    keys = rng.sample(KEYS, num_pairs)
    values = {k: f"{rng.randrange(1000):03d}" for k in keys}
    text = f"registry {rng.randrange(100)} :\n" + "".join(f"key {k} = {values[k]}\n" for k in keys)
    return text + _filler(rng, rng.randint(1, 3)) + "\n", values


def key_value_document(rng: random.Random, num_pairs: int = 6, num_queries: int = 3) -> str:
    """A registry: "key K = VVV" lines, filler, then "ask K = VVV" for some of its keys."""
    text, values = registry_prompt(rng, num_pairs)
    return text + "".join(f"ask {k} = {values[k]}\n" for k in rng.sample(list(values), num_queries))


def facts_prompt(rng: random.Random) -> tuple[str, dict[str, str]]:
    """Three people's homes stated, then filler, up to the questions; and the homes."""
    people = rng.sample(NAMES, 3)
    homes = {p: rng.choice(CITIES) for p in people}
    text = " ".join(f"{p} lives in {homes[p]} ." for p in people) + "\n"
    return text + _filler(rng, rng.randint(2, 4)) + "\n", homes


def facts_document(rng: random.Random) -> str:
    text, homes = facts_prompt(rng)
    return text + "".join(f"where does {p} live ? {homes[p]} .\n" for p in rng.sample(list(homes), 2))


def needle_document(rng: random.Random) -> str:
    code = f"{rng.randrange(10000):04d}"
    return (
        _filler(rng, rng.randint(1, 3)) + f" the secret code is {code} . " + _filler(rng, rng.randint(2, 4))
        + f"\nthe secret code was {code} .\n"
    )


TABLE_SHARE = 0.85  # of the documents; the rest split 2:1:1 into registries, facts and needles


def generate_documents(num_documents: int, seed: int = 0) -> Iterator[str]:
    """The built-in corpus: mostly dense key-value tables, then registries, facts and needles."""
    rng = random.Random(seed)
    rest = (1 - TABLE_SHARE) / 4
    for _ in range(num_documents):
        kind = rng.random()
        if kind < TABLE_SHARE:
            yield table_document(rng)
        elif kind < TABLE_SHARE + 2 * rest:
            yield key_value_document(rng)
        elif kind < TABLE_SHARE + 3 * rest:
            yield facts_document(rng)
        else:
            yield needle_document(rng)
