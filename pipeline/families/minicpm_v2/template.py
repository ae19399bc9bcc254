"""The ``minicpm-v`` chat template: token ids, labels and image bounds of one conversation.

Layout (ms-swift's ``minicpm-v`` template)::

    <s>{system}<用户>{image placeholder}\\n{query_1}<AI>{response_1}<用户>{query_2}<AI>{response_2}...</s>

BOS rule: every sequence starts with ``<s>``, in training and in generation alike. The official fine-tuning
script drops BOS in training while its chat code prepends it; starting both with ``<s>`` (as ms-swift does)
means a fine-tuned model is prompted exactly the way it was trained.

- The system text, when given, follows ``<s>`` directly; rounds are concatenated with no separator.
- The image placeholder (if any) goes where the query's ``<image>`` tag is (ms-swift's row syntax, in the
  query or in a history turn's query), or opens the FIRST query when no query has the tag. It is followed by
  "\\n"; the "\\n" and the query text after it are encoded together, as the official code encodes
  ``placeholder + "\\n" + query``, and the text before a tag is encoded on its own. A tag at the very start
  of the first query therefore gives the same ids as no tag. At most one tag, and only with an image.
- Labels are the ids of every response and of the final ``</s>``, -100 everywhere else; they are NOT
  shifted (the model shifts). A generation prompt (``response=None``) ends with ``<AI>`` and has no label.
- ``image_bound`` is computed from where the placeholder was put.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.families import TRUNCATION_POLICIES
from pipeline.families.base import IGNORE_INDEX, IMAGE_TAG
from pipeline.families.minicpm_v2.tokenizer import MiniCPMVTokenizer


@dataclass
class EncodedConversation:
    """Token ids, unshifted labels and image bounds of one rendered conversation."""

    input_ids: list[int]
    labels: list[int]
    image_bound: list[tuple[int, int]]  # [start, end) of each image's <unk> run: (index of <image>) + 1
    # [start, end) of each whole image placeholder (source <image> ... last </image> or </slice>).
    placeholder_spans: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def _bounds_in_placeholder(
    tokenizer: MiniCPMVTokenizer, placeholder: Sequence[int], offset: int
) -> list[tuple[int, int]]:
    """Returns the [start, end) of every <unk> run between <image> and </image> in ``placeholder``."""
    bounds: list[tuple[int, int]] = []
    start: int | None = None
    for i, token in enumerate(placeholder):
        if token == tokenizer.im_start_id:
            if start is not None:
                raise ValueError(f"image placeholder: <image> at position {i} opens before </image> closed")
            start = i + 1
        elif token == tokenizer.im_end_id:
            if start is None:
                raise ValueError(f"image placeholder: </image> at position {i} has no opening <image>")
            bounds.append((offset + start, offset + i))
            start = None
    if start is not None or not bounds:
        raise ValueError(
            "image placeholder must be <image> <unk>... </image> (optionally followed by a <slice> block), "
            f"got {len(placeholder)} ids with {len(bounds)} closed image(s)"
        )
    return bounds


def _rounds(
    query: str, response: str | None, history: Sequence[Sequence[str]]
) -> list[tuple[str, str | None]]:
    """Returns the conversation as (query, response) rounds, checking the history's shape."""
    rounds: list[tuple[str, str | None]] = []
    for i, pair in enumerate(history):
        if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise ValueError(f"history[{i}] must be a [query, response] pair of strings, got {pair!r}")
        rounds.append((pair[0], pair[1]))
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if response is not None and not isinstance(response, str):
        raise TypeError(f"response must be a string or None, got {type(response).__name__}")
    rounds.append((query, response))
    return rounds


def image_round(rounds: Sequence[tuple[str, str | None]], has_image: bool) -> int | None:
    """Returns the index of the round whose query holds the image: the one with the <image> tag, else 0.

    None when there is no image. Raises ValueError for a tag without an image or more than one tag, as
    MiniCPM-V-2 takes one image per conversation.
    """
    tagged = [k for k, (q, _) in enumerate(rounds) for _ in range(q.count(IMAGE_TAG))]
    if len(tagged) > (1 if has_image else 0):
        images = "one image" if has_image else "no image"
        raise ValueError(
            f"the conversation has {len(tagged)} {IMAGE_TAG} tag(s) but {images}; MiniCPM-V-2 takes at most one "
            f"image per conversation, placed at its {IMAGE_TAG} tag (or before the first query without one)"
        )
    if not has_image:
        return None
    return tagged[0] if tagged else 0


def render_conversation(
    tokenizer: MiniCPMVTokenizer,
    query: str,
    response: str | None = None,
    history: Sequence[Sequence[str]] = (),
    system: str | None = None,
    image_placeholder: list[int] | None = None,
    last_round: bool = False,
) -> EncodedConversation:
    """Returns the ids, labels and image bounds of a conversation (a generation prompt when response is None);
    labels on every round's response, or on the last one alone with `last_round` (the history is context)."""
    ids: list[int] = [tokenizer.bos_id]
    labels: list[int] = [IGNORE_INDEX]
    bounds: list[tuple[int, int]] = []
    spans: list[tuple[int, int]] = []

    def add(new_ids: list[int], labelled: bool) -> None:
        ids.extend(new_ids)
        labels.extend(new_ids if labelled else [IGNORE_INDEX] * len(new_ids))

    if system:
        add(tokenizer.encode(system), labelled=False)
    rounds = _rounds(query, response, history)
    at = image_round(rounds, image_placeholder is not None)
    for k, (q, r) in enumerate(rounds):
        add(tokenizer.user_ids, labelled=False)
        text = q
        if k == at and image_placeholder is not None:
            before, _, after = q.partition(IMAGE_TAG) if IMAGE_TAG in q else ("", "", q)
            if before:
                add(tokenizer.encode(before), labelled=False)
            bounds = _bounds_in_placeholder(tokenizer, image_placeholder, offset=len(ids))
            spans.append((len(ids), len(ids) + len(image_placeholder)))
            add(list(image_placeholder), labelled=False)
            text = "\n" + after
        add(tokenizer.encode(text), labelled=False)
        add(tokenizer.ai_ids, labelled=False)
        if r is not None:
            # A generation prompt carries no label at all, not even on its history's responses.
            add(
                tokenizer.encode(r),
                labelled=response is not None and (not last_round or k == len(rounds) - 1),
            )
    if response is not None:
        add([tokenizer.eos_id], labelled=True)
    return EncodedConversation(input_ids=ids, labels=labels, image_bound=bounds, placeholder_spans=spans)


def truncate(enc: EncodedConversation, max_length: int, policy: str) -> EncodedConversation | None:
    """Returns ``enc`` if it fits ``max_length``, else its truncation or None when it cannot be kept.

    ``delete`` drops any conversation longer than ``max_length``. ``truncate`` cuts tokens from the end, but
    gives up (None) when the cut would fall inside an image placeholder or leave no labelled token; a
    generation prompt (no labels) that is too long is never cut, since cutting would remove its ``<AI>``.
    """
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation policy must be one of {TRUNCATION_POLICIES}, got {policy!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length}")
    if len(enc.input_ids) <= max_length:
        return enc
    if policy == "delete":
        return None
    cut = max_length
    if any(start < cut < end for start, end in enc.placeholder_spans):
        return None
    labels = enc.labels[:cut]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return EncodedConversation(
        input_ids=enc.input_ids[:cut],
        labels=labels,
        image_bound=[(s, e) for s, e in enc.image_bound if e <= cut],
        placeholder_spans=[(s, e) for s, e in enc.placeholder_spans if e <= cut],
    )
