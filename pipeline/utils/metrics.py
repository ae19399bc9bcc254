"""Caption and question-answering metrics for generated text, computed offline.

Caption metrics (BLEU-4, ROUGE-L, CIDEr) use the scorers of ``pycocoevalcap``. Its PTB tokenizer needs a
Java runtime, so texts are tokenised here instead with one documented rule (see :func:`tokenize`).
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

logger = logging.getLogger(__name__)

# A reference row is either one string or several acceptable strings.
Reference = str | Sequence[str]

# Thousands separators ("12,345") are kept inside a number; a minus sign only counts when it does not
# follow a word or a digit, so "4-3" yields 4 and 3 rather than 4 and -3.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_WHITESPACE = re.compile(r"\s+")


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def tokenize(text: str) -> list[str]:
    """Return the caption tokens of ``text``: lowercased, punctuation replaced by spaces, split on whitespace.

    Punctuation (ASCII punctuation and every Unicode ``P*`` character) becomes a space rather than being
    deleted, so "well-known" gives two tokens and "end.Start" does not fuse into one word.
    """
    return "".join(" " if _is_punctuation(char) else char for char in text.lower()).split()


def normalize_answer(text: str) -> str:
    """Return ``text`` stripped, casefolded, with runs of whitespace collapsed and trailing periods dropped."""
    collapsed = _WHITESPACE.sub(" ", text.strip().casefold())
    return collapsed.rstrip(".").rstrip()


def last_number(text: str) -> Decimal | None:
    """Return the last number written in ``text`` (thousands commas allowed), or None when there is none."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return Decimal(matches[-1].replace(",", ""))
    except InvalidOperation:  # the pattern only admits valid literals; kept as a guard
        return None


def _as_reference_lists(predictions: Sequence[str], references: Sequence[Reference]) -> list[list[str]]:
    """Return ``references`` as one non-empty list of strings per prediction, after checking both inputs."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError(
            "predictions and references must be lists (one entry per sample), not a single string"
        )
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references; "
            "expected exactly one reference entry (a string or a list of strings) per prediction"
        )
    if not predictions:
        raise ValueError("no predictions to score; expected at least one (prediction, references) pair")
    rows: list[list[str]] = []
    for index, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(prediction, str):
            raise TypeError(f"prediction {index} is {type(prediction).__name__}; expected str")
        options = [reference] if isinstance(reference, str) else list(reference)
        if not options:
            raise ValueError(f"references[{index}] is empty; expected at least one reference string")
        for option in options:
            if not isinstance(option, str):
                raise TypeError(f"references[{index}] holds a {type(option).__name__}; expected str")
        rows.append(options)
    return rows


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Return corpus ``bleu4``, mean ``rouge_l`` and ``cider`` of ``predictions`` against their references.

    BLEU-4 is the corpus-level score (n-gram counts pooled over all rows, "closest" reference length);
    ROUGE-L (beta 1.2) and CIDEr are averaged over rows. CIDEr weighs n-grams by their document frequency
    across the references of the whole corpus, so it needs several rows to mean anything: with one row every
    n-gram occurs in "all" documents, its weight is zero and CIDEr is 0 whatever the prediction.
    """
    rows = _as_reference_lists(predictions, references)
    gts = {index: [" ".join(tokenize(ref)) for ref in refs] for index, refs in enumerate(rows)}
    res = {index: [" ".join(tokenize(prediction))] for index, prediction in enumerate(predictions)}

    bleu_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_l, _ = Rouge().compute_score(gts, res)
    if len(rows) < 2:
        logger.warning("CIDEr over %d sample is always 0 (document frequencies need several)", len(rows))
    if any(ref for refs in gts.values() for ref in refs):
        cider, _ = Cider().compute_score(gts, res)
    else:
        # pycocoevalcap fails on a corpus without a single reference n-gram; nothing can match anyway.
        cider = 0.0
    return {"bleu4": float(bleu_scores[3]), "rouge_l": float(rouge_l), "cider": float(cider)}


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Return the fraction of predictions equal to one of their references after :func:`normalize_answer`."""
    rows = _as_reference_lists(predictions, references)
    hits = 0
    for prediction, refs in zip(predictions, rows, strict=True):
        normalized = normalize_answer(prediction)
        hits += any(normalized == normalize_answer(ref) for ref in refs)
    return hits / len(rows)


def numeric_accuracy(predictions: Sequence[str], references: Sequence[Reference]) -> float | None:
    """Return the fraction of numeric rows whose prediction ends on the reference's number, or None.

    A row is numeric when one of its references contains a number; its target is the last number of each
    such reference, and the prediction is right when its own last number equals one of those targets
    (``5982``, ``5,982`` and ``5982.0`` are equal). Returns None when no row is numeric.
    """
    rows = _as_reference_lists(predictions, references)
    scored = hits = 0
    for prediction, refs in zip(predictions, rows, strict=True):
        targets = [number for number in map(last_number, refs) if number is not None]
        if not targets:
            continue
        scored += 1
        predicted = last_number(prediction)
        hits += predicted is not None and predicted in targets
    return hits / scored if scored else None


def compute_generation_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Return caption metrics, ``exact_match`` and, when any reference has a number, ``numeric_accuracy``."""
    metrics = caption_metrics(predictions, references)
    metrics["exact_match"] = exact_match(predictions, references)
    numeric = numeric_accuracy(predictions, references)
    if numeric is not None:
        metrics["numeric_accuracy"] = numeric
    return metrics
