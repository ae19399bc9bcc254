"""Preference pairs: a prompt (with its images) and two answers to it, the chosen and the rejected one.

A pair record is recognised by its rejected answer, in either of the layouts the tools people compare with
read:

    ms-swift    any row format of pipeline.data.formats plus "rejected_response": the row's own answer is the
                chosen one, e.g. {"messages": [..., {"role": "assistant", "content": chosen}],
                "rejected_response": "...", "images": [...]} or {"query", "response", "rejected_response"}
    TRL         {"prompt": ..., "chosen": ..., "rejected": ..., "images": [...]}: the prompt a string or a
                list of messages ending with the user's, each answer a string or one assistant message;
                message contents may be lists of parts ({"type": "image"}, {"type": "text", "text": ...}),
                an image part standing where its <image> tag goes

RLAIF-V's columns (question, chosen, rejected, image) read as TRL's through `dataset.columns={question:
prompt, image: images}`; `images` may then be one path instead of a list. Pairs become Rows (pipeline/data/
rows.py) whose `response` is the chosen answer and `rejected` the other, so every check of a row (file:line,
images, token lengths) applies to pairs as they are, sft trains on the chosen answers, and eval scores them.

Binary feedback (KTO: one answer and whether it is desirable) is recognised by its label:

    ms-swift    any row format of pipeline.data.formats plus "label" (true or false; 1 or 0)
    TRL         {"prompt": ..., "completion": ..., "label": ..., "images": [...]}: prompt and completion as
                TRL's pair layout has its prompt and answers

They become Rows with their `label`; the dpo stage's kto loss reads them, and pairs as two of them.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.data.formats import FORMAT_KEYS, detect_format, show_value, to_query_response
from pipeline.families.base import IMAGE_TAG

# the prompt's key in TRL's layout, and the one RLAIF-V-like rows renamed to the query/response layout use
PROMPT_KEYS = ("prompt", "query")


def is_pair_record(record: object) -> bool:
    """Returns True when a record holds a rejected answer (a preference pair in either layout)."""
    return isinstance(record, Mapping) and ("rejected_response" in record or "rejected" in record)


def is_feedback_record(record: object) -> bool:
    """Returns True when a record holds a label and no rejected answer (binary feedback, KTO's rows)."""
    return isinstance(record, Mapping) and "label" in record and not is_pair_record(record)


def feedback_unknown_keys(record: Mapping) -> set[str]:
    """Returns the keys of a feedback record that its layout does not define (they are ignored)."""
    if "completion" in record:
        known = {*PROMPT_KEYS, "completion", "label", "images", "system"}
    else:
        rest = {key: value for key, value in record.items() if key != "label"}
        known = set(FORMAT_KEYS[detect_format(rest)]) | {"label"}
    return {str(key) for key in record if key not in known}


def feedback_to_query_response(record: Mapping) -> dict | list[str]:
    """Returns a feedback record in the query/response layout with its "label" (a bool), or the reasons it
    cannot be read."""
    label = record["label"]
    if isinstance(label, bool):
        desirable = label
    elif isinstance(label, int) and label in (0, 1):
        desirable = bool(label)
    else:
        return [f"'label' must be true or false (whether the answer is desirable), got {show_value(label)}"]
    if "completion" in record:
        rest = {key: value for key, value in record.items() if key not in ("completion", "label")}
        converted = _from_prompt_answer(rest, record.get("completion"), "completion")
    else:
        converted = to_query_response({key: value for key, value in record.items() if key != "label"})
    if isinstance(converted, list):
        return converted
    if "images" in converted and isinstance(converted["images"], str):
        converted["images"] = [converted["images"]]
    return {**converted, "label": desirable}


def pair_unknown_keys(record: Mapping) -> set[str]:
    """Returns the keys of a pair record that its layout does not define (they are ignored)."""
    if "rejected_response" in record:
        rest = {key: value for key, value in record.items() if key != "rejected_response"}
        known = set(FORMAT_KEYS[detect_format(rest)]) | {"rejected_response"}
    else:
        known = {*PROMPT_KEYS, "chosen", "rejected", "images", "system"}
    return {str(key) for key in record if key not in known}


def pair_to_query_response(record: Mapping) -> dict | list[str]:
    """Returns a pair record in the query/response layout with its "rejected" answer (the response is the
    chosen one), or the reasons it cannot be read."""
    if "rejected_response" in record:
        rest = {key: value for key, value in record.items() if key != "rejected_response"}
        converted = to_query_response(rest)
        rejected = record["rejected_response"]
        key = "rejected_response"
    else:
        converted = _from_prompt_chosen_rejected(record)
        rejected = _answer_text(record.get("rejected"))
        key = "rejected"
    if isinstance(converted, list):
        return converted
    if not isinstance(rejected, str) or not rejected.strip():
        return [
            f"'{key}' must be a non-empty string (the rejected answer), got {show_value(record.get(key))}"
        ]
    if "images" in converted and isinstance(converted["images"], str):
        converted["images"] = [converted["images"]]  # RLAIF-V's one image per row
    return {**converted, "rejected": rejected}


def _from_prompt_chosen_rejected(record: Mapping) -> dict | list[str]:
    """TRL's layout: the prompt (text or messages) and the two answers."""
    return _from_prompt_answer(record, record.get("chosen"), "chosen")


def _from_prompt_answer(record: Mapping, answer: object, answer_key: str) -> dict | list[str]:
    """TRL's layouts: the prompt (text or messages) and an answer (`answer_key`: chosen, or a feedback row's
    completion), in the query/response layout."""
    pair = answer_key == "chosen"
    what = "a preference pair with 'chosen' and 'rejected'" if pair else "a labelled row"
    noun = "the chosen answer" if pair else "the answer"
    prompt_key = next((key for key in PROMPT_KEYS if key in record), None)
    if prompt_key is None:
        return [
            f"{what} needs its 'prompt' (a string or a list of messages); rename another key to it with "
            "dataset.columns, e.g. {question: prompt}"
        ]
    chosen = _answer_text(answer)
    if not isinstance(chosen, str) or not chosen.strip():
        return [f"'{answer_key}' must be a non-empty string ({noun}), got {show_value(answer)}"]
    prompt = record[prompt_key]
    extra = {key: record[key] for key in ("images", "system") if key in record}
    if isinstance(prompt, str):
        if not prompt.strip():
            return [f"'{prompt_key}' is empty; it must be a non-empty string or a list of messages"]
        return {**extra, "query": prompt, "response": chosen}
    if not isinstance(prompt, list) or not prompt:
        return [f"'{prompt_key}' must be a non-empty string or a list of messages, got {show_value(prompt)}"]
    messages = []
    for index, message in enumerate(prompt):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            return [
                f"{prompt_key}[{index}] must be an object with 'role' and 'content', got {show_value(message)}"
            ]
        messages.append({"role": message["role"], "content": _content_text(message["content"])})
    converted = to_query_response(
        {**extra, "messages": [*messages, {"role": "assistant", "content": chosen}]}
    )
    if isinstance(converted, list):
        return [reason.replace("messages", prompt_key, 1) for reason in converted]
    return converted


def _answer_text(answer: object) -> object:
    """Returns an answer as text: itself, or the content of its one assistant message (TRL's conversational
    layout); anything else unchanged, for the error to show."""
    if isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], Mapping):
        answer = answer[0].get("content")
    return _content_text(answer)


def _content_text(content: object) -> object:
    """Returns a message content as text: a list of parts joined, each image part its <image> tag."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if isinstance(part, Mapping) and part.get("type") == "image":
            texts.append(IMAGE_TAG)
        elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            return content  # not parts: left as it is, so the error shows it
    return "".join(texts)
