"""Tests for pipeline.utils.metrics: caption scores, exact match and numeric accuracy."""

from __future__ import annotations

import pytest

from pipeline.utils.metrics import (
    caption_metrics,
    compute_generation_metrics,
    exact_match,
    last_number,
    normalize_answer,
    numeric_accuracy,
    tokenize,
)

# Several rows with distinct wording: CIDEr's document frequencies are degenerate on one or two rows.
CAPTIONS = [
    "A man riding a brown horse along the sandy beach.",
    "Two small dogs playing together in the fresh snow.",
    "A red car parked next to a very tall glass building.",
    "A white plate of food with rice, beans and green vegetables.",
    "Children flying colourful kites in a wide green park.",
    "An old woman reading a thick book on a wooden bench.",
]


def test_tokenize_lowercases_and_turns_punctuation_into_spaces() -> None:
    assert tokenize("A well-known Café, isn't it?") == ["a", "well", "known", "café", "isn", "t", "it"]
    assert tokenize("  \t\n") == []


def test_perfect_predictions_score_top_marks() -> None:
    references = [[caption] for caption in CAPTIONS]
    # Case and punctuation differences vanish under the documented tokenisation.
    predictions = [caption.upper().replace(".", "") for caption in CAPTIONS]

    scores = caption_metrics(predictions, references)

    assert scores["bleu4"] > 0.99
    assert scores["rouge_l"] == 1.0
    # pycocoevalcap scales CIDEr by 10; identical rows with unique n-grams reach that ceiling.
    assert scores["cider"] == pytest.approx(10.0, rel=1e-6)


def test_empty_and_unrelated_predictions_score_near_zero() -> None:
    references = [[caption] for caption in CAPTIONS]
    for predictions in ([""] * len(CAPTIONS), ["quantum entropy xylophone zebra"] * len(CAPTIONS)):
        scores = caption_metrics(predictions, references)
        assert scores["bleu4"] < 1e-6
        assert scores["rouge_l"] == 0.0
        assert scores["cider"] == 0.0


def test_partial_overlap_scores_between_the_extremes() -> None:
    references = [[caption] for caption in CAPTIONS]
    predictions = [" ".join(caption.split()[:5]) for caption in CAPTIONS]

    scores = caption_metrics(predictions, references)

    assert 0.0 < scores["bleu4"] < 0.99
    assert 0.0 < scores["rouge_l"] < 1.0
    assert 0.0 < scores["cider"] < 10.0


def test_best_of_several_references_counts_for_rouge() -> None:
    references = [["a cat on a mat", caption] for caption in CAPTIONS]

    scores = caption_metrics(CAPTIONS, references)

    assert scores["rouge_l"] == 1.0


def test_single_row_cider_is_degenerate_zero() -> None:
    scores = caption_metrics([CAPTIONS[0]], [[CAPTIONS[0]]])

    assert scores["rouge_l"] == 1.0
    assert scores["cider"] == 0.0


def test_exact_match_normalises_case_spaces_and_trailing_period() -> None:
    assert normalize_answer("  The  Eiffel\tTower. ") == "the eiffel tower"
    predictions = ["The Eiffel Tower.", "paris", "5982", "1452 + 4530 = 5982"]
    references = ["the eiffel   tower", "Paris", "5982.", "5982"]

    # The equation is not an exact match even though its final number is right.
    assert exact_match(predictions, references) == 0.75


def test_exact_match_accepts_any_of_several_references() -> None:
    assert exact_match(["NYC", "rome"], [["New York", "nyc"], ["Paris"]]) == 0.5


def test_last_number_reads_thousands_decimals_and_signs() -> None:
    assert last_number("1452 + 4530 = 5982") == 5982
    assert last_number("it costs 5,982.50 dollars.") == pytest.approx(5982.5)
    assert last_number("x = -3") == -3
    assert last_number("4-3") == 3
    assert last_number("no digits here") is None


def test_numeric_accuracy_compares_last_numbers_on_numeric_rows_only() -> None:
    predictions = ["1452 + 4530 = 5982", "The answer is 5,982.", "about 12", "a cat", "blue"]
    references = ["5982", "5982.0", "13", "7", "the sky is blue"]

    # Rows 0-3 have a numeric reference; 0 and 1 are right, 2 is wrong, 3 has no number at all.
    assert numeric_accuracy(predictions, references) == 0.5


def test_numeric_accuracy_is_none_without_numeric_references() -> None:
    assert numeric_accuracy(["7 cats"], ["some cats"]) is None


def test_compute_generation_metrics_merges_all_and_skips_none() -> None:
    references = [[caption] for caption in CAPTIONS]

    textual = compute_generation_metrics(CAPTIONS, references)
    assert set(textual) == {"bleu4", "rouge_l", "cider", "exact_match"}
    assert textual["exact_match"] == 1.0

    numeric = compute_generation_metrics(["1452 + 4530 = 5982", "7"], [["5982"], ["8"]])
    assert numeric["numeric_accuracy"] == 0.5
    assert numeric["exact_match"] == 0.0


@pytest.mark.parametrize(
    "metric", [caption_metrics, exact_match, numeric_accuracy, compute_generation_metrics]
)
def test_mismatched_lengths_raise(metric) -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric(["a", "b"], [["a"]])


def test_empty_reference_list_and_empty_input_raise() -> None:
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        caption_metrics(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="no predictions"):
        exact_match([], [])
