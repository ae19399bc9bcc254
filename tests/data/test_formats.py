"""Row formats of custom files (messages, ShareGPT, Alpaca, query/response), column mapping, <image> tags, BOM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.rows import DatasetError, Row
from pipeline.data.sources import load_rows, read_custom_file
from pipeline.stages.infer import read_infer_input
from tests.helpers import write_rows


@pytest.fixture
def image(tmp_path: Path) -> str:
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    return "a.png"


def as_tuple(row: Row) -> tuple:
    return row.query, row.response, [list(pair) for pair in row.history], row.system, len(row.images)


# one conversation (a system prompt, a first round with the image tag, a second round) in every format
EXPECTED = ("How many?", "2", [["<image>What is it?", "A star."]], "Be brief.", 1)
FORMATS = {
    "query/response": {
        "query": "How many?",
        "response": "2",
        "history": [["<image>What is it?", "A star."]],
        "system": "Be brief.",
        "images": ["a.png"],
    },
    "messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "A star."},
            {"role": "user", "content": "How many?"},
            {"role": "assistant", "content": "2"},
        ],
        "images": ["a.png"],
    },
    "conversations (LLaMA-Factory)": {
        "conversations": [
            {"from": "human", "value": "<image>What is it?"},
            {"from": "gpt", "value": "A star."},
            {"from": "human", "value": "How many?"},
            {"from": "gpt", "value": "2"},
        ],
        "system": "Be brief.",
        "images": ["a.png"],
    },
    "conversation (ms-swift ShareGPT)": {
        "conversation": [
            {"human": "<image>What is it?", "assistant": "A star."},
            {"human": "How many?", "assistant": "2"},
        ],
        "system": "Be brief.",
        "images": ["a.png"],
    },
    "alpaca": {
        "instruction": "How",
        "input": "many?",
        "output": "2",
        "history": [["<image>What is it?", "A star."]],
        "system": "Be brief.",
        "images": ["a.png"],
    },
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_reads_into_the_same_conversation(tmp_path: Path, image: str, name: str) -> None:
    rows, problems = read_custom_file(write_rows(tmp_path / "d.jsonl", [FORMATS[name]]))
    assert problems == []
    expected = ("How\nmany?", *EXPECTED[1:]) if name == "alpaca" else EXPECTED
    assert as_tuple(rows[0]) == expected
    assert rows[0].images == [str((tmp_path / image).resolve())]


def test_conversations_with_role_and_content_keys_are_read(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows, problems = read_custom_file(write_rows(tmp_path / "d.jsonl", [{"conversations": turns}]))
    assert problems == [] and as_tuple(rows[0]) == ("q", "a", [], None, 0)


def test_alpaca_without_input_uses_the_instruction_as_query(tmp_path: Path) -> None:
    rows, _ = read_custom_file(write_rows(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Hello"}]))
    assert as_tuple(rows[0]) == ("Hi", "Hello", [], None, 0)


def test_columns_map_other_key_names_like_ms_swift(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.jsonl", [{"question": "2+2?", "answer": "4", "sys": "Math."}])
    rows, _ = load_rows(
        {
            "name": "custom",
            "path": str(path),
            "columns": {"question": "query", "answer": "response", "sys": "system"},
        }
    )
    assert as_tuple(rows[0]) == ("2+2?", "4", [], "Math.", 0)
    path = write_rows(
        tmp_path / "m.jsonl",
        [{"chat": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    rows, _ = load_rows({"name": "custom", "path": str(path), "columns": {"chat": "messages"}})
    assert as_tuple(rows[0]) == ("q", "a", [], None, 0)
    with pytest.raises(
        DatasetError, match=r"columns.question='question_text': renames to an unknown key; valid"
    ):
        load_rows({"name": "custom", "path": str(path), "columns": {"question": "question_text"}})


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"messages": []}, "'messages' must be a non-empty list of turns"),
        ({"messages": [{"role": "user", "content": "q"}]}, "'messages' must end with an assistant turn"),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
            r"messages\[0\] has role \"assistant\" where 'user' or 'human' was expected",
        ),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with 'role' and 'content'"),
        (
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
            r"messages\[0\].content must be a non-empty string",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]},
            r"conversations\[1\] has from \"human\" where 'assistant' or 'gpt' was expected",
        ),
        (
            {"conversation": [{"human": "q"}]},
            r"conversation\[0\] must be an object with 'human' and 'assistant'",
        ),
        ({"instruction": "", "output": "a"}, "'instruction' must be a non-empty string"),
        ({"instruction": "q"}, "missing key 'output'"),
        (
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ],
                "system": "t",
            },
            r"messages\[0\] is a system turn and the record also has 'system'",
        ),  # fmt: skip
        ({"query": "<image>what?", "response": "a"}, "1 <image> tag.* but 0 image"),
        ({"query": "what?", "response": "an <image>", "images": ["a.png"]}, "<image> in a response"),
        (
            {"query": "<image>b?", "response": "a", "history": [["<image>a?", "b"]], "images": ["a.png"]},
            "2 <image> tag.* but 1 image",
        ),
        (
            {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]},
            "1 <image> tag.* but 0 image",
        ),
    ],
)
def test_bad_records_of_every_format_name_the_line(
    tmp_path: Path, image: str, record: dict, reason: str
) -> None:
    path = write_rows(tmp_path / "d.jsonl", [{"query": "fine", "response": "ok"}, record])
    with pytest.raises(DatasetError, match=rf"d\.jsonl:2: {reason}"):
        load_rows({"name": "custom", "path": str(path), "check_images": False})


def test_ordinary_rows_keep_an_image_without_tag(tmp_path: Path, image: str) -> None:
    rows, problems = read_custom_file(
        write_rows(tmp_path / "d.jsonl", [{"query": "q", "response": "a", "images": [image]}])
    )
    assert problems == [] and rows[0].query == "q" and len(rows[0].images) == 1


def test_a_byte_order_mark_is_accepted_in_jsonl_and_json(tmp_path: Path) -> None:
    rows, problems = read_custom_file(
        write_rows(tmp_path / "d.jsonl", [{"query": "q", "response": "a"}], bom=True)
    )
    assert problems == [] and rows[0].query == "q"
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"query": "q2", "response": "a2"}]).encode())
    rows, problems = read_custom_file(path)
    assert problems == [] and rows[0].query == "q2"
    path = write_rows(tmp_path / "in.jsonl", [{"query": "q3"}], bom=True)
    rows, labels = read_infer_input(path)
    assert rows[0].query == "q3" and labels == [None]


def test_infer_input_reads_every_format_and_takes_the_last_answer_as_label(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "in.jsonl",
        [
            {"messages": [{"role": "user", "content": "q1"}]},
            {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
            {
                "conversations": [
                    {"from": "human", "value": "h"},
                    {"from": "gpt", "value": "g"},
                    {"from": "human", "value": "q3"},
                ]
            },  # fmt: skip
            {"instruction": "q4"},
            {"query": "q5", "response": None},
        ],
    )
    rows, labels = read_infer_input(path)
    assert [row.query for row in rows] == ["q1", "q2", "q3", "q4", "q5"]
    assert labels == [None, "a2", None, None, None]
    assert rows[2].history == [("h", "g")]
