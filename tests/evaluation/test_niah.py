"""RULER-style needle-in-a-haystack generators: length, planted answers, depths, determinism, haystacks."""

import re

import pytest

from megatron_refine.data import ByteTokenizer
from megatron_refine.data.corpus import FILLER
from megatron_refine.evaluation.niah import DEPTH_GRID, KEYS, NEEDLE, NIAH_TASKS, niah_examples

TOK = ByteTokenizer()
NEEDLES = {"niah_single": 1, "niah_multikey": 4, "niah_multiquery": 4, "niah_multivalue": 4}


def haystack_of(ex):
    """The haystack line of a prompt (instruction, haystack and question are one line each) and its offset."""
    start = ex.prompt.index("\n") + 1
    return ex.prompt[start:ex.prompt.index("\n", start)], start


def check_planted(ex):
    """Every value once, in its needle at its recorded offsets; each key only in its needles and the question."""
    needles = ex.meta["needles"]
    assert len(needles) == NEEDLES[ex.task]
    values = [n["value"] for n in needles]
    assert sorted(re.findall(r"\d+", ex.prompt)) == sorted(values)  # no other number anywhere
    assert all(re.fullmatch(r"[1-9]\d{6}", v) for v in values) and len(set(values)) == len(values)
    for n in needles:
        assert ex.prompt.count(n["value"]) == 1
        assert ex.prompt[n["value_offset"]:n["value_offset"] + 7] == n["value"]
        assert ex.prompt[n["offset"]:].startswith(NEEDLE.format(key=n["key"], value=n["value"]))
    question = ex.prompt[ex.prompt.rindex("\n"):]
    for key in {n["key"] for n in needles}:
        in_needles = sum(n["key"] == key for n in needles)
        assert ex.prompt.lower().count(key) == in_needles + question.count(key)
        assert question.count(key) == (2 if key in ex.meta["query_keys"] else 0)  # question and answer prefix
    assert set(ex.answers) <= set(values)


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("task", NIAH_TASKS)
def test_length_fields_and_planted_answers(task, length):
    for ex in niah_examples(task, length, samples=3, tokenizer=TOK, seed=0):
        tokens = len(TOK.encode(ex.prompt))
        assert abs(tokens - length) <= 0.02 * length and ex.meta["tokens"] == tokens
        assert (ex.task, ex.length, ex.metric, ex.meta["haystack"]) == (task, length, "ruler_match_all", "corpus")
        assert ex.max_new_tokens == (32 if len(ex.answers) == 1 else 64)
        check_planted(ex)
        assert not re.search(r"secret code|\bkey \w+ =|registry", ex.prompt)  # no needle-like corpus documents


def test_single_needle():
    for ex in niah_examples("niah_single", 1024, 4, TOK, seed=1):
        (needle,) = ex.meta["needles"]
        assert ex.answers == [needle["value"]] and ex.meta["query_keys"] == [needle["key"]]
        assert ex.prompt.endswith(f"The special magic number for {needle['key']} mentioned in the provided text is")


def test_multikey_distractors_have_other_keys_and_are_not_answers():
    for ex in niah_examples("niah_multikey", 4096, 4, TOK, seed=2):
        keys = [n["key"] for n in ex.meta["needles"]]
        assert len(set(keys)) == 4
        (real,) = ex.meta["query_keys"]
        (real_value,) = [n["value"] for n in ex.meta["needles"] if n["key"] == real]
        assert ex.answers == [real_value]
        distractors = [n for n in ex.meta["needles"] if n["key"] != real]
        assert len(distractors) == 3 and all(n["value"] not in ex.answers for n in distractors)
        assert ex.prompt.endswith(f"The special magic number for {real} mentioned in the provided text is")


def test_multiquery_asks_for_every_key():
    for ex in niah_examples("niah_multiquery", 4096, 4, TOK, seed=3):
        by_key = {n["key"]: n["value"] for n in ex.meta["needles"]}
        assert len(by_key) == 4 and sorted(ex.meta["query_keys"]) == sorted(by_key)
        assert ex.answers == [by_key[k] for k in ex.meta["query_keys"]]
        q = ex.meta["query_keys"]
        assert ex.prompt.endswith(f"for {q[0]}, {q[1]}, {q[2]}, and {q[3]} mentioned in the provided text are")


def test_multivalue_asks_for_every_value_of_one_key():
    for ex in niah_examples("niah_multivalue", 4096, 4, TOK, seed=4):
        (key,) = ex.meta["query_keys"]
        assert all(n["key"] == key for n in ex.meta["needles"])
        assert ex.answers == [n["value"] for n in ex.meta["needles"]] and len(set(ex.answers)) == 4
        assert ex.prompt.endswith(f"The special magic numbers for {key} mentioned in the provided text are")


@pytest.mark.parametrize("task,depths", [
    ("niah_single", [0.0]), ("niah_single", [0.3]), ("niah_single", [1.0]),
    ("niah_multikey", [0.1, 0.4, 0.6, 0.9]), ("niah_multiquery", [0.0, 0.5, 0.5, 1.0]),
    ("niah_multivalue", [0.2, 0.35, 0.8, 0.95]),
])
def test_needles_sit_at_requested_depths(task, depths):
    """Depth = share of the filler's characters before the needle, measured here from the prompt itself."""
    for ex in niah_examples(task, 4096, 2, TOK, seed=5, depths=depths):
        hay, start = haystack_of(ex)
        needles = ex.meta["needles"]
        texts = [NEEDLE.format(key=n["key"], value=n["value"]) for n in needles]
        filler_chars = len(hay.replace(" ", "")) - sum(len(t.replace(" ", "")) for t in texts)
        assert ex.meta["depths"] == depths
        for i, n in enumerate(needles):
            before = hay[:n["offset"] - start].replace(" ", "")
            depth = (len(before) - sum(len(t.replace(" ", "")) for t in texts[:i])) / filler_chars
            assert abs(depth - depths[i]) < 0.03, (depth, depths[i])
            assert abs(n["placed_depth"] - depths[i]) < 0.03


def test_default_depths_come_from_rulers_grid():
    for task in NIAH_TASKS:
        for ex in niah_examples(task, 1024, 3, TOK, seed=6):
            depths = ex.meta["depths"]
            assert all(d in DEPTH_GRID for d in depths) and len(set(depths)) == len(depths) == NEEDLES[task]
            assert depths == sorted(depths)


def test_deterministic_by_seed_and_samples_differ():
    for task in NIAH_TASKS:
        a = niah_examples(task, 1024, 4, TOK, seed=7)
        assert a == niah_examples(task, 1024, 4, TOK, seed=7)
        assert a[:2] == niah_examples(task, 1024, 2, TOK, seed=7)  # sample i depends on i, not on the count
        assert len({ex.prompt for ex in a}) == 4 and len({tuple(ex.answers) for ex in a}) == 4
        b = niah_examples(task, 1024, 4, TOK, seed=8)
        assert all(x.prompt != y.prompt for x, y in zip(a, b))


def test_user_haystack_is_used_and_repeated():
    sentences = ["The ferry left the pier at seven.", "Gulls followed it past the breakwater!",
                 "Was the fog lifting yet?"]
    for ex in niah_examples("niah_multikey", 4096, 2, TOK, seed=9, haystack="\n\n".join(sentences)):
        assert ex.meta["haystack"] == "user" and abs(len(TOK.encode(ex.prompt)) - 4096) <= 0.02 * 4096
        check_planted(ex)
        hay, _ = haystack_of(ex)
        for t in (NEEDLE.format(key=n["key"], value=n["value"]) for n in ex.meta["needles"]):
            hay = hay.replace(t, "")
        assert hay.count(sentences[0]) > 20  # a short text is repeated to fill 4K tokens
        assert not any(f.strip(" .") in hay for f in FILLER)
        pieces = re.split(r"(?<=[.!?])\s+", " ".join(hay.split()))
        assert all(p in sentences for p in pieces[:-1]) and any(s.startswith(pieces[-1]) for s in sentences)


def test_user_haystack_sentences_holding_a_key_are_dropped():
    text = " ".join(f"The {k} waits by the door." for k in KEYS) + " Nothing happens here. " * 50
    for task in NIAH_TASKS:
        for ex in niah_examples(task, 4096, 2, TOK, seed=10, haystack=text):
            check_planted(ex)
    with pytest.raises(ValueError, match="every sentence of the haystack"):
        niah_examples("niah_single", 1024, 1, TOK, seed=0, haystack="Keys: " + " ".join(KEYS) + ".")


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="niah_single, niah_multikey, niah_multiquery, niah_multivalue"):
        niah_examples("niah_single_1", 1024, 1, TOK, seed=0)
    with pytest.raises(ValueError, match="at least"):
        niah_examples("niah_multiquery", 200, 1, TOK, seed=0)
    with pytest.raises(ValueError, match="4 needle"):
        niah_examples("niah_multivalue", 1024, 1, TOK, seed=0, depths=[0.5])
    with pytest.raises(ValueError, match="no words"):
        niah_examples("niah_single", 1024, 1, TOK, seed=0, haystack=" \n ")
