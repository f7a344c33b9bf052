"""The paper's evaluation metrics: RULER's substring rules and LongBench's scores, as pure functions.

Each metric maps `(prediction, answers)` to a score in [0, 1]: the best over the gold answers, except
`ruler_match_all`, which is the fraction of them found. `score` looks a metric up by name; the tables map each
task of the paper to its metric and its maximum answer length in tokens.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

from rapidfuzz import fuzz
from rouge_score.rouge_scorer import RougeScorer

from megatron_refine.evaluation.examples import EvalExample

# ---- RULER (scripts/eval/evaluate.py and scripts/eval/synthetic/constants.py) ----------------------------------

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def _ruler_clean(prediction: str) -> str:
    """RULER's postprocess_pred: control characters (newlines and tabs included) become line breaks."""
    return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def ruler_substring(prediction: str, answers: list[str]) -> float:
    """The paper's RULER QA rule: 1 when a gold answer is a case-insensitive substring of the output's first line
    (surrounding whitespace stripped first).

    RULER's own QA metric (`ruler_match_part`) searches the whole output; the paper scores the first line only,
    so an answer the model stumbles on after rambling does not count. Only a newline ends the line: RULER's
    clean-up turns tabs and other control characters into line breaks too, which would cut "first" lines short.
    """
    first_line = prediction.strip().split("\n")[0].lower()
    return float(any(a.lower() in first_line for a in answers))


def ruler_match_part(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_part (its QA metric): 1 when a gold answer occurs anywhere, case-insensitive."""
    text = _ruler_clean(prediction).lower()
    return float(any(a.lower() in text for a in answers))


def ruler_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all (its NIAH metric): the fraction of the gold values found, case-insensitive.

    A multi-value or multi-query needle lists every value as an answer; each found one earns its share.
    """
    text = _ruler_clean(prediction).lower()
    return sum(a.lower() in text for a in answers) / len(answers)


# ---- LongBench (metrics.py and eval.py of THUDM/LongBench) -----------------------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """LongBench's (SQuAD's) normalisation: lowercase, drop ASCII punctuation, then the articles a/an/the, then
    collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _first_line(prediction: str) -> str:
    """LongBench's eval.py cut for its few-shot tasks (trec, triviaqa, samsum): the output's first line, after
    leading blank lines; the model would otherwise go on to invent the next few-shot example."""
    return prediction.lstrip("\n").split("\n")[0]


def qa_f1(prediction: str, answers: list[str]) -> float:
    """LongBench's qa_f1_score: token F1 between the normalised prediction and answer."""
    return max(_token_f1(prediction, a) for a in answers)


def qa_f1_first_line(prediction: str, answers: list[str]) -> float:
    """qa_f1 on the first line: LongBench's TriviaQA."""
    return qa_f1(_first_line(prediction), answers)


def exact_match(prediction: str, answers: list[str]) -> float:
    """1 when the normalised prediction equals a normalised answer (SQuAD's EM)."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


# LongBench scores ROUGE-L with the `rouge` package (py-rouge): it splits both texts into sentences at ".",
# takes the union LCS summary-level score over case-sensitive whitespace tokens (punctuation stays attached) and
# weights its F by beta = P / R. `rouge_score`'s rougeL is Lin's plain LCS F1 over the whole text, lowercased,
# with every non-[a-z0-9] character a separator. They agree on short single-sentence ASCII texts and can differ
# otherwise, so absolute numbers are close to, not identical with, LongBench's.
_ROUGE = RougeScorer(["rougeL"])


def rouge_l(prediction: str, answers: list[str]) -> float:
    """ROUGE-L F-measure (rouge_score's rougeL); an empty prediction scores 0."""
    return max(_ROUGE.score(a, prediction)["rougeL"].fmeasure for a in answers)


def rouge_l_first_line(prediction: str, answers: list[str]) -> float:
    """rouge_l on the first line: LongBench's SAMSum."""
    return rouge_l(_first_line(prediction), answers)


def classification(prediction: str, answers: list[str], all_classes: list[str] | None = None) -> float:
    """LongBench's classification_score (TREC) on the first line: the class names found in it (case-sensitive
    substrings), less those that are only part of the gold name; 1/len(found) when the gold class is among them.

    LongBench's fallback to the most similar class never runs (its guard `em_match_list != 0` compares a list
    with 0, always true), so nothing found scores 0, as here. Its removal loop edits the list it walks and can
    keep a second consecutive part-of-gold name; this removes every one, which differs only when two found
    names are both part of the gold name.
    """
    if not all_classes:
        raise ValueError(
            "the classification metric needs the task's label names: give each task-file line an "
            "'all_classes' list (LongBench's TREC export has one)"
        )
    line = _first_line(prediction)
    found = [c for c in all_classes if c in line]

    def one(gold: str) -> float:
        kept = [c for c in found if c == gold or c not in gold]
        return 1 / len(kept) if gold in kept else 0.0

    return max(one(a) for a in answers)


def code_sim(prediction: str, answers: list[str]) -> float:
    """LongBench's code_sim_score: the first line of the output without a backtick, '#' or '//' (a code line,
    not a fence or comment), compared by fuzz.ratio / 100.

    rapidfuzz's ratio is the normalised InDel similarity, python-Levenshtein's ratio that fuzzywuzzy uses when
    installed; fuzzywuzzy rounds it to a whole percent, so this does too. (Pure-Python fuzzywuzzy falls back to
    difflib, whose matching heuristic can differ slightly.)
    """
    code = next((line for line in prediction.lstrip("\n").split("\n")
                 if "`" not in line and "#" not in line and "//" not in line), "")
    return max(round(fuzz.ratio(code, a)) / 100 for a in answers)


METRICS: dict[str, Callable[..., float]] = {
    "ruler_substring": ruler_substring,
    "ruler_match_part": ruler_match_part,
    "ruler_match_all": ruler_match_all,
    "qa_f1": qa_f1,
    "qa_f1_first_line": qa_f1_first_line,
    "exact_match": exact_match,
    "rouge_l": rouge_l,
    "rouge_l_first_line": rouge_l_first_line,
    "classification": classification,
    "code_sim": code_sim,
}


def score(metric: str, prediction: str, answers: list[str], all_classes: list[str] | None = None) -> float:
    """Score a prediction with the named metric; `all_classes` is the label set the classification metric needs."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: known metrics are {', '.join(sorted(METRICS))}")
    if not answers:
        raise ValueError("no gold answers to score against: every example needs at least one answer")
    if metric == "classification":
        return classification(prediction, answers, all_classes)
    return METRICS[metric](prediction, answers)


def score_example(example: EvalExample, prediction: str) -> float:
    """Score a prediction for an example with its own metric and answers (and label set, if it has one)."""
    return score(example.metric, prediction, example.answers, example.meta.get("all_classes"))


# ---- The paper's tasks: name -> (metric, max answer tokens) -------------------------------------------------------

# LongBench's dataset names, its eval.py metric (with the first-line cut it applies to trec, triviaqa and samsum),
# and the paper's answer budgets (LongBench's dataset2maxlen).
LONGBENCH_TASKS: dict[str, tuple[str, int]] = {
    "narrativeqa": ("qa_f1", 128),
    "qasper": ("qa_f1", 128),
    "multifieldqa_en": ("qa_f1", 64),
    "hotpotqa": ("qa_f1", 32),
    "2wikimqa": ("qa_f1", 32),
    "qmsum": ("rouge_l", 512),
    "multi_news": ("rouge_l", 512),
    "samsum": ("rouge_l_first_line", 128),
    "trec": ("classification", 64),
    "triviaqa": ("qa_f1_first_line", 32),
    "lcc": ("code_sim", 64),
    "repobench-p": ("code_sim", 64),
}

# RULER's QA tasks (its qa_1 and qa_2) with RULER's 32-token budget. Prefixed: LongBench owns the name hotpotqa.
RULER_QA_TASKS: dict[str, tuple[str, int]] = {
    "ruler_squad": ("ruler_substring", 32),
    "ruler_hotpotqa": ("ruler_substring", 32),
}

TASKS: dict[str, tuple[str, int]] = {**LONGBENCH_TASKS, **RULER_QA_TASKS}
