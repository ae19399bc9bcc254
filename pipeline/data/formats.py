"""The row formats a data file may use, turned into the query/response layout every other part reads.

Each record is recognised by its keys (the first match wins, in this order):

    messages        {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...], "images": [...]}
    conversations   {"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"system", "value": ...}],
                     "system": ..., "images": [...]}                       (LLaMA-Factory's ShareGPT)
                    (either list may use role/content or from/value)
    conversation    {"conversation": [{"human": ..., "assistant": ...}, ...], "system": ..., "images": [...]}
                                                                            (ms-swift's ShareGPT)
    alpaca          {"instruction": ..., "input": ..., "output": ..., "system": ..., "history": [...],
                     "images": [...]}     query = instruction, or instruction + "\\n" + input when input is given
    query/response  {"query": ..., "response": ..., "history": [[q, a], ...], "images": [...], "system": ...}

Preference pairs (pipeline/data/pairs.py) add a rejected answer to these: ``rejected_response`` beside any
format above (ms-swift's), or ``prompt``/``chosen``/``rejected`` (TRL's).
Every format may also hold "videos": [...] (paths or URLs) beside "images", placed by `<video>` tags as images
are by `<image>` tags (ms-swift's layout).

``columns`` ({name in the file: name above}, like ms-swift's ``--columns``) renames a record's top-level keys
first. A conversation must alternate user and assistant turns after an optional leading system turn, and end
with the assistant's (the last pair becomes query/response, the earlier ones the history).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "images", "videos", "system"),
    "conversations": ("conversations", "images", "videos", "system"),
    "conversation": ("conversation", "images", "videos", "system"),
    "alpaca": ("instruction", "input", "output", "history", "images", "videos", "system"),
    "query/response": ("query", "response", "history", "images", "videos", "system"),
}
# the key that marks each format, in the order formats are recognised
_MARKERS = (
    ("messages", "messages"),
    ("conversations", "conversations"),
    ("conversation", "conversation"),
    ("alpaca", "instruction"),
)
# the keys a preference pair adds: ms-swift's rejected_response, TRL's prompt/chosen/rejected
PAIR_KEYS = ("prompt", "chosen", "rejected", "rejected_response")
# the keys a row of binary feedback (KTO) adds: ms-swift's and TRL's label, TRL's prompt/completion
FEEDBACK_KEYS = ("label", "completion")
COLUMN_TARGETS = tuple(
    sorted({key for keys in FORMAT_KEYS.values() for key in keys} | set(PAIR_KEYS) | set(FEEDBACK_KEYS))
)
USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt")
SYSTEM_ROLE = "system"


def check_columns(columns: object, where: str = "columns") -> dict[str, str]:
    """Returns the column mapping as a dict; raises ValueError naming the bad entry and the accepted names."""
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise ValueError(
            f"{where} must map a file's key to a known one, e.g. {{text: query}}; got {columns!r}"
        )
    mapping = {}
    for source, target in columns.items():
        if not isinstance(source, str) or target not in COLUMN_TARGETS:
            raise ValueError(
                f"{where}.{source}={target!r}: renames to an unknown key; valid targets: {', '.join(COLUMN_TARGETS)}"
            )
        mapping[source] = target
    return mapping


def rename_columns(record: object, columns: Mapping[str, str]) -> object:
    """Returns the record with its keys renamed by ``columns`` (other keys and non-objects unchanged)."""
    if not columns or not isinstance(record, Mapping):
        return record
    return {columns.get(key, key): value for key, value in record.items()}


def detect_format(record: Mapping) -> str:
    """Returns the name of the format a record is in (see the module docstring); query/response otherwise."""
    return next((name for name, marker in _MARKERS if marker in record), "query/response")


def unknown_format_keys(record: object) -> set[str]:
    """Returns the keys of a record that its format does not define (they are ignored)."""
    if not isinstance(record, Mapping):
        return set()
    known = FORMAT_KEYS[detect_format(record)]
    return {str(key) for key in record if key not in known}


def to_query_response(record: Mapping, need_response: bool = True) -> dict | list[str]:
    """Returns the record in the query/response layout, or the reasons it cannot be read.

    With ``need_response=False`` (prompts to answer) a conversation may end with the user's turn and an
    Alpaca record may leave out its output; the result then has no "response".
    """
    kind = detect_format(record)
    if kind == "query/response":
        return dict(record)
    extra = {key: record[key] for key in ("images", "videos", "system") if key in record}
    if kind == "alpaca":
        return _from_alpaca(record, extra, need_response)
    turns = record[kind]
    if not isinstance(turns, list) or not turns:
        return [f"'{kind}' must be a non-empty list of turns, got {show_value(turns)}"]
    if kind == "conversation":
        return _from_pairs(turns, extra, need_response)
    # messages use role/content and conversations from/value, but each is also seen with the other's keys
    first = turns[0] if isinstance(turns[0], Mapping) else {}
    if "role" in first or ("from" not in first and kind == "messages"):
        role_key, text_key = "role", "content"
    else:
        role_key, text_key = "from", "value"
    return _from_turns(kind, turns, role_key, text_key, extra, need_response)


def _from_alpaca(record: Mapping, extra: dict, need_response: bool) -> dict | list[str]:
    instruction, given = record.get("instruction"), record.get("input")
    reasons = []
    if not isinstance(instruction, str) or not instruction.strip():
        reasons.append(f"'instruction' must be a non-empty string, got {show_value(instruction)}")
    if given is not None and not isinstance(given, str):
        reasons.append(f"'input' must be a string or null, got {show_value(given)}")
    if "output" not in record and need_response:
        reasons.append("missing key 'output' (a non-empty string)")
    if reasons:
        return reasons
    out = {**extra, "query": f"{instruction}\n{given}" if given else instruction}
    if "output" in record:
        out["response"] = record["output"]
    if "history" in record:
        out["history"] = record["history"]
    return out


def _from_pairs(turns: list, extra: dict, need_response: bool) -> dict | list[str]:
    reasons, pairs = [], []
    for index, turn in enumerate(turns):
        last = index == len(turns) - 1
        keys = ("human",) if last and not need_response else ("human", "assistant")
        if not isinstance(turn, Mapping) or any(key not in turn for key in keys):
            reasons.append(
                f"conversation[{index}] must be an object with 'human' and 'assistant', got {show_value(turn)}"
            )
            continue
        reasons += [
            f"conversation[{index}].{key} must be a non-empty string, got {show_value(turn[key])}"
            for key in keys
            if not _is_text(turn[key])
        ]
        pairs.append((turn["human"], turn.get("assistant")))
    if reasons:
        return reasons
    out = {**extra, "history": [list(pair) for pair in pairs[:-1]], "query": pairs[-1][0]}
    if pairs[-1][1] is not None:
        out["response"] = pairs[-1][1]
    return out


def _from_turns(
    kind: str, turns: list, role_key: str, text_key: str, extra: dict, need_response: bool
) -> dict | list[str]:
    roles: list[str] = []
    texts: list[object] = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or role_key not in turn or text_key not in turn:
            return [
                f"{kind}[{index}] must be an object with '{role_key}' and '{text_key}', got {show_value(turn)}"
            ]
        if not _is_text(turn[text_key]):
            return [
                f"{kind}[{index}].{text_key} must be a non-empty string, got {show_value(turn[text_key])}"
            ]
        roles.append(turn[role_key])
        texts.append(turn[text_key])
    out = dict(extra)
    start = 0
    if roles[0] == SYSTEM_ROLE:
        if "system" in extra:
            return [f"{kind}[0] is a system turn and the record also has 'system'; give one of them"]
        out["system"] = texts[0]
        start = 1
    body = list(range(start, len(turns)))
    for position, index in enumerate(body):
        wanted = USER_ROLES if position % 2 == 0 else ASSISTANT_ROLES
        if roles[index] not in wanted:
            return [
                f"{kind}[{index}] has {role_key} {show_value(roles[index])} where {' or '.join(map(repr, wanted))} "
                f"was expected; turns alternate user and assistant after an optional system turn"
            ]
    if not body or (len(body) % 2 == 1 and need_response):
        return [f"'{kind}' must end with an assistant turn answering a user turn"]
    pairs = [[texts[i], texts[i + 1] if i + 1 < len(turns) else None] for i in body[::2]]
    out["history"] = pairs[:-1]
    out["query"] = pairs[-1][0]
    if pairs[-1][1] is not None:
        out["response"] = pairs[-1][1]
    return out


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def show_value(value: object) -> str:
    """Returns a value as the start of its JSON, for an error message to show what was found."""
    return json.dumps(value, ensure_ascii=False, default=str)[:80]
