"""The paper's metrics on hand-computed cases: RULER's substring rules and LongBench's scores."""

import pytest

from megatron_refine.evaluation.examples import EvalExample
from megatron_refine.evaluation.metrics import (
    LONGBENCH_TASKS,
    METRICS,
    RULER_QA_TASKS,
    TASKS,
    classification,
    code_sim,
    exact_match,
    normalize_answer,
    qa_f1,
    qa_f1_first_line,
    rouge_l,
    rouge_l_first_line,
    ruler_match_all,
    ruler_match_part,
    ruler_substring,
    score,
    score_example,
)


# ---- RULER ----------------------------------------------------------------------------------------------------

def test_ruler_substring_reads_the_first_line_only_case_insensitive():
    out = "  Paris is the capital.\nLondon, not Paris."
    assert ruler_substring(out, ["PARIS"]) == 1.0  # first line "Paris is the capital."
    assert ruler_substring(out, ["london"]) == 0.0  # only on the second line
    assert ruler_substring(out, ["london", "capital"]) == 1.0  # any gold answer counts
    assert ruler_substring("\n\n madrid\n", ["Madrid"]) == 1.0  # leading blank lines are not the first line
    assert ruler_substring("foo\tmadrid", ["madrid"]) == 1.0  # a tab does not end the line
    assert ruler_substring("", ["madrid"]) == 0.0


def test_ruler_match_part_searches_the_whole_output():
    assert ruler_match_part("Answer:\nLONDON", ["london"]) == 1.0  # where ruler_substring gives 0
    assert ruler_substring("Answer:\nLONDON", ["london"]) == 0.0
    assert ruler_match_part("Answer: Rome", ["london", "paris"]) == 0.0


def test_ruler_match_all_is_the_fraction_of_values_found():
    # "123" and "456" present, "789" missing: 2 of 3.
    assert ruler_match_all("The values are 123 and\n456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert ruler_match_all("KEY-ABC", ["key-abc"]) == 1.0
    assert ruler_match_all("", ["1", "2"]) == 0.0


# ---- LongBench ------------------------------------------------------------------------------------------------

def test_normalize_answer():
    # lower -> "the  cat's, a hat!"; punctuation -> "the  cats a hat"; articles -> "  cats   hat"; spaces.
    assert normalize_answer("The  Cat's, a HAT!") == "cats hat"
    # articles are whole words only: "anthem" and "theory" stay.
    assert normalize_answer("Anthem: the theory") == "anthem theory"
    assert normalize_answer("") == ""


def test_qa_f1():
    # pred "cat sat on mat" (4 tokens), gold "cat on mat" (3): 3 shared, P = 3/4, R = 1, F1 = 1.5 / 1.75 = 6/7.
    assert qa_f1("The cat sat on the mat.", ["a cat on a mat"]) == pytest.approx(6 / 7)
    # the best gold answer counts: "dog" shares nothing.
    assert qa_f1("The cat sat on the mat.", ["dog", "a cat on a mat"]) == pytest.approx(6 / 7)
    # counts clip: pred "cat cat", gold "cat": 1 shared, P = 1/2, R = 1, F1 = 1 / 1.5 = 2/3.
    assert qa_f1("cat cat", ["cat"]) == pytest.approx(2 / 3)
    assert qa_f1("PARIS!", ["paris"]) == 1.0
    assert qa_f1("", ["paris"]) == 0.0
    assert qa_f1("!!! the", ["paris"]) == 0.0  # normalises to nothing


def test_qa_f1_first_line_is_longbench_triviaqa():
    out = "\n\nParis\nLondon is the answer"
    assert qa_f1_first_line(out, ["London"]) == 0.0  # first line after the leading newlines is "Paris"
    # the whole output: "paris london is answer" (4 tokens) vs "london": P = 1/4, R = 1, F1 = 0.5 / 1.25 = 0.4.
    assert qa_f1(out, ["London"]) == pytest.approx(0.4)


def test_exact_match():
    assert exact_match("The Paris.", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["paris"]) == 0.0
    assert exact_match("Paris, France", ["paris", "paris france"]) == 1.0


def test_rouge_l():
    # 6 tokens each, LCS "the cat on the mat" = 5: P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", ["the cat lay on the mat"]) == pytest.approx(5 / 6)
    assert rouge_l("the cat sat on the mat", ["dog", "the cat lay on the mat"]) == pytest.approx(5 / 6)
    # LCS "a c" = 2: P = 2/4, R = 2/2, F = 2 * 0.5 / 1.5 = 2/3.
    assert rouge_l("a b c d", ["a c"]) == pytest.approx(2 / 3)
    assert rouge_l("The CAT, sat.", ["the cat sat"]) == 1.0  # lowercased, punctuation a separator
    assert rouge_l("", ["the cat sat"]) == 0.0


def test_rouge_l_first_line_is_longbench_samsum():
    out = "cat sat\nextra words here"
    assert rouge_l_first_line(out, ["cat sat"]) == 1.0
    # the whole output: 5 tokens, LCS 2: P = 2/5, R = 1, F = 0.8 / 1.4 = 4/7.
    assert rouge_l(out, ["cat sat"]) == pytest.approx(4 / 7)


def test_classification():
    classes = ["City", "Country", "number", "Other number"]
    assert classification("City", ["City"], classes) == 1.0
    # two classes named: the gold one gets half.
    assert classification("City or Country", ["City"], classes) == 0.5
    assert classification("Country", ["City"], classes) == 0.0
    # "number" is only part of the gold name "Other number": dropped, so the gold class is alone: 1, not 1/2.
    assert classification("Other number", ["Other number"], classes) == 1.0
    # nothing named scores 0 (LongBench's similarity fallback never runs); matching is case-sensitive.
    assert classification("a town", ["City"], classes) == 0.0
    assert classification("city", ["City"], classes) == 0.0
    assert classification("Country\nCity", ["City"], classes) == 0.0  # first line only
    assert classification("Country", ["City", "Country"], classes) == 1.0  # best gold answer
    with pytest.raises(ValueError, match="all_classes"):
        classification("City", ["City"])


def test_code_sim():
    # the first line without a backtick, '#' or '//' is "x = foo(1)"; vs "x = foo(2)": lengths 10 + 10, InDel
    # distance 2 (drop "1", add "2"): ratio (20 - 2) / 20 = 0.9.
    assert code_sim("```python\n# call it\nx = foo(1)\n```", ["x = foo(2)"]) == pytest.approx(0.9)
    # "abc" vs "abd": (6 - 2) / 6 = 66.67%, rounded to a whole percent as fuzzywuzzy does: 0.67.
    assert code_sim("abc", ["abd"]) == pytest.approx(0.67)
    assert code_sim("abc", ["xyz", "abd"]) == pytest.approx(0.67)
    assert code_sim("\n\nz = 1", ["z = 1"]) == 1.0  # leading blank lines skipped
    # LongBench's rule skips any line holding "//", integer division included.
    assert code_sim("y = a // b\nz = 1", ["z = 1"]) == 1.0
    assert code_sim("# only a comment", ["z = 1"]) == 0.0  # no code line: "" vs the answer
    assert code_sim("", ["z = 1"]) == 0.0


# ---- registry and tables --------------------------------------------------------------------------------------

def test_score_looks_up_metrics_and_names_the_known_ones():
    assert score("qa_f1", "cat cat", ["cat"]) == pytest.approx(2 / 3)
    assert score("classification", "City", ["City"], all_classes=["City", "Country"]) == 1.0
    with pytest.raises(ValueError, match="unknown metric 'bleu'.*qa_f1.*rouge_l"):
        score("bleu", "x", ["x"])
    with pytest.raises(ValueError, match="no gold answers"):
        score("qa_f1", "x", [])
    with pytest.raises(ValueError, match="all_classes"):
        score("classification", "City", ["City"])


def test_score_example_uses_the_examples_metric_and_label_set():
    ex = EvalExample(task="trec", prompt="...", answers=["City"], max_new_tokens=64, metric="classification",
                     meta={"all_classes": ["City", "Country"]})
    assert score_example(ex, "City or Country") == 0.5


def test_every_metric_scores_in_unit_interval():
    for name in METRICS:
        for pred in ["", "the answer 42", "```\n// x\nanswer = 42\n"]:
            s = score(name, pred, ["answer 42", "42"], all_classes=["answer", "42"])
            assert 0.0 <= s <= 1.0, (name, pred, s)


def test_task_tables_are_the_papers():
    budgets = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
               "qmsum": 512, "multi_news": 512, "samsum": 128, "trec": 64, "triviaqa": 32, "lcc": 64,
               "repobench-p": 64}
    assert {t: n for t, (_, n) in LONGBENCH_TASKS.items()} == budgets
    families = {"qa_f1": {"narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa"},
                "qa_f1_first_line": {"triviaqa"}, "rouge_l": {"qmsum", "multi_news"},
                "rouge_l_first_line": {"samsum"}, "classification": {"trec"}, "code_sim": {"lcc", "repobench-p"}}
    assert {t: m for t, (m, _) in LONGBENCH_TASKS.items()} == {t: m for m, ts in families.items() for t in ts}
    assert RULER_QA_TASKS == {"ruler_squad": ("ruler_substring", 32), "ruler_hotpotqa": ("ruler_substring", 32)}
    assert all(m in METRICS for m, _ in TASKS.values())
