"""RULER's needle-in-a-haystack tasks (Hsieh et al., 2024): S-NIAH, MK-NIAH, MQ-NIAH and MV-NIAH.

The structure is RULER's `niah` generator: an instruction, a haystack of filler sentences with needles
"One of the special magic numbers for {key} is: {value}." placed between sentences at chosen depths, the
question, and an answer prefix the model completes. Keys are adjective-noun words and values 7-digit numbers
(RULER's `words` keys and `numbers` values). The haystack is the built-in corpus's facts and filler sentences,
or a text the caller gives, grown or cut a word at a time until the prompt is `length` tokens long in the
caller's tokenizer. Every value appears once, in its needle; no key or value occurs anywhere else.
"""

from __future__ import annotations

import bisect
import random
import re
from dataclasses import dataclass
from itertools import cycle
from typing import Iterator, Sequence

from megatron_refine.data.corpus import FILLER, facts_document
from megatron_refine.evaluation.examples import EvalExample


@dataclass(frozen=True)
class NeedleLayout:
    keys: int  # distinct keys among the needles: the queried ones and distractors
    values: int  # values (needles) per key
    queries: int  # keys the question asks for
    # A value is one 7-digit number: a few tokens in a BPE vocabulary, 8 bytes with ByteTokenizer. RULER allows
    # 128 for chat models that talk before answering; the prompt ends in an answer prefix, so 32 covers one value
    # with room to spare and 64 covers four with their separators.
    max_new_tokens: int


# RULER's niah_single_1/2 (one needle), niah_multikey_1 (three distractor needles with other keys in the
# haystack), niah_multiquery (four keys, all asked for) and niah_multivalue (one key, four values).
LAYOUTS = {
    "niah_single": NeedleLayout(keys=1, values=1, queries=1, max_new_tokens=32),
    "niah_multikey": NeedleLayout(keys=4, values=1, queries=1, max_new_tokens=32),
    "niah_multiquery": NeedleLayout(keys=4, values=1, queries=4, max_new_tokens=64),
    "niah_multivalue": NeedleLayout(keys=1, values=4, queries=1, max_new_tokens=64),
}
NIAH_TASKS = tuple(LAYOUTS)
METRIC = "ruler_match_all"
LENGTH_TOLERANCE = 0.02  # prompt tokens within 2% of the asked length
DEPTH_GRID = [i / 39 for i in range(40)]  # RULER draws needle depths from 40 evenly spaced points

NEEDLE = "One of the special magic numbers for {key} is: {value}."
ONE_ANSWER = (
    "A special magic number is hidden in the text below. Memorize it: you will be asked for it afterwards.",
    "What is the special magic number for {query} mentioned in the provided text?",
    "The special magic number for {query} mentioned in the provided text is",
)
MANY_ANSWERS = (
    "Some special magic numbers are hidden in the text below. Memorize them: you will be asked for them afterwards.",
    "What are all the special magic numbers for {query} mentioned in the provided text?",
    "The special magic numbers for {query} mentioned in the provided text are",
)

ADJECTIVES = (
    "brave calm clever curly dusty eager fancy fuzzy gentle giddy glossy grumpy hollow humble jolly lanky lively "
    "lucky mellow misty nimble noisy plucky polite proud quirky rapid rusty shaggy silent sleepy smoky snowy spicy "
    "steady stormy sturdy sunny swift tidy vivid wary witty woolly zesty"
).split()
NOUNS = (
    "acorn anchor badger banjo beacon beetle bison canyon cactus comet compass cricket dingo falcon ferret gecko "
    "glacier goblet harbor hedgehog heron iguana kettle koala lantern lemur lobster magnet meadow mitten moose "
    "narwhal otter oyster parrot pebble pelican puffin quail quokka rocket saddle salmon thimble toucan trumpet "
    "tulip walrus weasel"
).split()
KEYS = [f"{a}-{n}" for a in ADJECTIVES for n in NOUNS]


def niah_examples(
    task: str,
    length: int,
    samples: int,
    tokenizer,
    seed: int,
    haystack: str | None = None,
    *,
    depths: Sequence[float] | None = None,
) -> list[EvalExample]:
    """`samples` prompts of `length` tokens (within 2%, answer excluded) for one RULER needle task.

    `haystack` is a text to use as filler instead of the built-in corpus (repeated as needed, from a random
    sentence). `depths` places the needles, one depth in [0, 1] per needle, taken in increasing order (0 = before
    the first filler sentence, 1 = after the last); by default each example draws them from RULER's grid of 40.
    Sample i depends only on (task, length, seed, i), so a longer run begins with a shorter one's examples.
    """
    if task not in LAYOUTS:
        raise ValueError(f"unknown NIAH task {task!r}: the known tasks are {', '.join(NIAH_TASKS)}")
    if length <= 0 or samples < 0:
        raise ValueError(f"length must be positive and samples non-negative, got length={length}, samples={samples}")
    layout = LAYOUTS[task]
    needles = layout.keys * layout.values
    if depths is not None and (len(depths) != needles or not all(0 <= d <= 1 for d in depths)):
        raise ValueError(f"{task} has {needles} needle(s): pass that many depths, each in [0, 1], got {list(depths)}")
    user_sentences = None
    if haystack is not None:
        user_sentences = split_sentences(haystack)
        if not user_sentences:
            raise ValueError("the haystack text has no words: pass a text file with some prose in it")
    return [
        _example(task, layout, length, tokenizer, random.Random(f"niah/{task}/{length}/{seed}/{i}"), user_sentences,
                 depths)
        for i in range(samples)
    ]


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, whitespace collapsed: a break after '.', '!' or '?' followed by a space."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def _example(task, layout, length, tokenizer, rng, user_sentences, depths) -> EvalExample:
    keys = _distinct_keys(rng, layout.keys)
    values = [str(v) for v in rng.sample(range(10**6, 10**7), layout.keys * layout.values)]
    needles = [(k, values[i * layout.values + j]) for i, k in enumerate(keys) for j in range(layout.values)]
    rng.shuffle(needles)  # which needle lands at which depth
    placed = sorted(depths) if depths is not None else sorted(rng.sample(DEPTH_GRID, len(needles)))
    query_keys = rng.sample(keys, layout.queries)
    answers = [v for q in query_keys for k, v in needles if k == q]  # a key's values in prompt order

    instruction, question, answer_prefix = ONE_ANSWER if len(answers) == 1 else MANY_ANSWERS
    query = _join_keys(query_keys)
    head = instruction + "\n"
    tail = "\n" + question.format(query=query) + " " + answer_prefix.format(query=query)

    filler = _Filler(_sentences(rng, user_sentences, planted=keys + values))

    def render(words: int) -> tuple[str, list[dict]]:
        return _render(head, tail, filler.take(words), needles, placed)

    words, tokens = _fit_words(lambda w: len(tokenizer.encode(render(w)[0])), length, task)
    prompt, placements = render(words)
    return EvalExample(
        task=task, prompt=prompt, answers=answers, max_new_tokens=layout.max_new_tokens, metric=METRIC,
        length=length,
        meta={
            "needles": placements,  # in prompt order: key, value, depth, placed_depth, offset, value_offset
            "depths": [n["depth"] for n in placements],
            "query_keys": query_keys,
            "tokens": tokens,
            "haystack": "corpus" if user_sentences is None else "user",
        },
    )


def _distinct_keys(rng: random.Random, n: int) -> list[str]:
    while True:  # no key inside another, so counting a key's occurrences counts only its own
        keys = rng.sample(KEYS, n)
        if not any(a != b and a in b for a in keys for b in keys):
            return keys


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _sentences(rng: random.Random, user_sentences: list[str] | None, planted: list[str]) -> Iterator[str]:
    """Endless filler, none of it holding a key or value (case-insensitively), so each occurs only where
    planted: the user's sentences from a random one on, or the corpus's facts documents and filler (never its
    key-value registries or secret-code documents, which look like needles)."""
    planted = [p.lower() for p in planted]

    def clean(sentence: str) -> bool:
        return not any(p in sentence.lower() for p in planted)

    if user_sentences is not None:
        usable = [s for s in user_sentences if clean(s)]
        if not usable:
            raise ValueError("every sentence of the haystack text holds a needle's key or value: pass another text")
        start = rng.randrange(len(usable))
        yield from cycle(usable[start:] + usable[:start])
    while True:  # corpus sentences end in " ." ("where does X live ? Y ." is one); the stray "." of the
        # last FILLER sentence (split there keeps its own " .") is dropped
        doc = facts_document(rng) if rng.random() < 0.5 else " ".join(
            rng.choice(FILLER) + " ." for _ in range(rng.randint(2, 5)))
        yield from (s for s in re.split(r"(?<= \.)\s+", doc.strip()) if re.search(r"\w", s) and clean(s))


class _Filler:
    """Filler sentences drawn on demand; `take(n)` is the first n words: whole sentences and a cut one."""

    def __init__(self, sentences: Iterator[str]):
        self._sentences, self._drawn, self._words = sentences, [], 0

    def take(self, words: int) -> tuple[list[str], str]:
        while self._words < words:
            self._drawn.append(next(self._sentences).split())
            self._words += len(self._drawn[-1])
        whole, left = [], words
        for s in self._drawn:
            if left < len(s):
                return whole, " ".join(s[:left])
            whole.append(" ".join(s))
            left -= len(s)
        return whole, ""


def _render(head: str, tail: str, filler: tuple[list[str], str], needles, depths) -> tuple[str, list[dict]]:
    """The prompt with each needle at the sentence boundary nearest its depth, measured in filler characters.
    A cut last sentence ends the haystack, after any needle at depth 1, so no needle splits a sentence."""
    sentences, cut = filler
    cum = [0]  # filler characters before each boundary
    for s in sentences:
        cum.append(cum[-1] + len(s))
    total = cum[-1] + len(cut)
    at: dict[int, list[int]] = {}
    for i, d in enumerate(depths):
        b = min(bisect.bisect_left(cum, d * total), len(cum) - 1)
        if b > 0 and d * total - cum[b - 1] <= cum[b] - d * total:
            b -= 1
        at.setdefault(b, []).append(i)

    pieces, offset, placements = [], len(head), []
    for b in range(len(sentences) + 1):
        for i in at.get(b, []):
            key, value = needles[i]
            text = NEEDLE.format(key=key, value=value)
            placements.append({
                "key": key, "value": value, "depth": depths[i], "placed_depth": cum[b] / total if total else 0.0,
                "offset": offset, "value_offset": offset + text.index(value),
            })
            pieces.append(text)
            offset += len(text) + 1
        if b < len(sentences):
            pieces.append(sentences[b])
            offset += len(sentences[b]) + 1
    return head + " ".join(pieces + [cut] if cut else pieces) + tail, placements


def _fit_words(tokens, length: int, task: str) -> tuple[int, int]:
    """The most filler words whose prompt is at most `length` tokens, and its token count. Tokens grow almost
    linearly in words, so each probe interpolates inside the bracket [lo, hi), with a bisection when that gains
    little: a few encodings of the prompt per example."""
    lo, t_lo = 0, tokens(0)
    if t_lo > length * (1 + LENGTH_TOLERANCE):
        raise ValueError(
            f"{task} needs {t_lo} tokens for its instruction, needles and question alone: ask for a length of at "
            f"least {t_lo}, not {length}"
        )
    if t_lo >= length:
        return 0, t_lo
    hi = max(length, 1)
    t_hi = tokens(hi)
    while t_hi <= length:  # a tokenizer with several words a token
        lo, t_lo, hi = hi, t_hi, hi * 2
        t_hi = tokens(hi)
    bisect_next = False
    while hi - lo > 1:
        if bisect_next:
            w = (lo + hi) // 2
        else:
            w = lo + round((length - t_lo) * (hi - lo) / (t_hi - t_lo))
            w = min(max(w, lo + 1), hi - 1)
        width = hi - lo
        t = tokens(w)
        if t <= length:
            lo, t_lo = w, t
        else:
            hi, t_hi = w, t
        bisect_next = not bisect_next and hi - lo > width // 2
    if t_lo < length * (1 - LENGTH_TOLERANCE):
        raise ValueError(
            f"{task}: one more haystack word takes the prompt from {t_lo} to {t_hi} tokens, so {length} cannot be "
            "met within 2%: pass a haystack text with shorter words"
        )
    return lo, t_lo
