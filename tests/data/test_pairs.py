"""Preference pairs in custom files: ms-swift's, TRL's and RLAIF-V's layouts, and their errors by file:line."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.demo import generate_demo_pairs
from pipeline.data.rows import DatasetError
from pipeline.data.sources import load_rows, read_custom_file
from tests.helpers import write_rows

# one pair (a system prompt, a first round with the image tag, the question, two answers) in every layout
EXPECTED = ("How many?", "2", "3", [("<image>What is it?", "A star.")], "Be brief.", 1)
LAYOUTS = {
    "ms-swift messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "A star."},
            {"role": "user", "content": "How many?"},
            {"role": "assistant", "content": "2"},
        ],
        "rejected_response": "3",
        "images": ["a.png"],
    },
    "ms-swift query/response": {
        "query": "How many?",
        "response": "2",
        "rejected_response": "3",
        "history": [["<image>What is it?", "A star."]],
        "system": "Be brief.",
        "images": ["a.png"],
    },
    "TRL conversational": {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A star."},
            {"role": "user", "content": [{"type": "text", "text": "How many?"}]},
        ],
        "chosen": [{"role": "assistant", "content": "2"}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "3"}]}],
        "images": ["a.png"],
    },
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    return tmp_path


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_pair_layout_reads_as_the_same_pair(layout, folder):
    rows, problems = read_custom_file(write_rows(folder / "pairs.jsonl", [LAYOUTS[layout]]))
    assert not problems
    (row,) = rows
    got = (row.query, row.response, row.rejected, row.history, row.system, len(row.images))
    assert got == EXPECTED
    assert row.origin.endswith("pairs.jsonl:1")


def test_rlaif_v_columns_read_through_the_column_mapping(folder):
    record = {"question": "What colour?", "chosen": "Red.", "rejected": "Blue.", "image": "a.png", "idx": 7}
    path = write_rows(folder / "rlaif.jsonl", [record])
    rows, _ = load_rows(
        {"name": "custom", "path": str(path), "columns": {"question": "prompt", "image": "images"}}
    )
    (row,) = rows
    assert (row.query, row.response, row.rejected) == ("What colour?", "Red.", "Blue.")
    assert row.images == [str((folder / "a.png").resolve())]


def test_bad_pairs_are_named_by_file_and_line(folder):
    path = write_rows(
        folder / "bad.jsonl",
        [
            {"query": "q", "response": "a", "rejected_response": "b"},
            {"query": "q", "response": "a", "rejected_response": ""},
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"chosen": "a", "rejected": "b"},
            {"prompt": "q <image>", "chosen": "a", "rejected": "b"},
            {"query": "q", "response": "a", "rejected_response": "<image> b", "images": ["a.png"]},
        ],
    )
    with pytest.raises(DatasetError) as caught:
        load_rows({"name": "custom", "path": str(path)})
    message = str(caught.value)
    assert "5 problem(s)" in message
    for line, reason in (
        (2, "'rejected_response' must be a non-empty string"),
        (3, "the chosen and the rejected answer are the same"),
        (4, "a preference pair with 'chosen' and 'rejected' needs its 'prompt'"),
        (5, "1 <image> tag(s) but 0 image(s)"),
        (6, "<image> in the rejected answer"),
    ):
        assert f"bad.jsonl:{line}: {reason}" in message


# one labelled row (binary feedback, KTO) in every layout: the answer and whether it is desirable
FEEDBACK = {
    "ms-swift messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "A star."},
        ],
        "label": False,
        "images": ["a.png"],
    },
    "ms-swift query/response, label 0": {
        "query": "<image>What is it?",
        "response": "A star.",
        "label": 0,
        "system": "Be brief.",
        "images": ["a.png"],
    },
    "TRL prompt/completion": {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        ],
        "completion": [{"role": "assistant", "content": "A star."}],
        "label": False,
        "images": ["a.png"],
    },
}


@pytest.mark.parametrize("layout", list(FEEDBACK))
def test_every_feedback_layout_reads_as_the_same_labelled_row(layout, folder):
    rows, problems = read_custom_file(write_rows(folder / "feedback.jsonl", [FEEDBACK[layout]]))
    assert not problems
    (row,) = rows
    got = (row.query, row.response, row.label, row.rejected, row.system, len(row.images))
    assert got == ("<image>What is it?", "A star.", False, None, "Be brief.", 1)


def test_bad_labels_are_named_by_file_and_line(folder):
    path = write_rows(
        folder / "bad.jsonl",
        [
            {"query": "q", "response": "a", "label": True},
            {"query": "q", "response": "a", "label": "yes"},
            {"query": "q", "response": "a", "label": 2},
            {"completion": "a", "label": True},
            {"prompt": "q", "completion": "", "label": False},
        ],
    )
    with pytest.raises(DatasetError) as caught:
        load_rows({"name": "custom", "path": str(path)})
    message = str(caught.value)
    assert "4 problem(s)" in message
    for line, reason in (
        (2, "'label' must be true or false (whether the answer is desirable), got \"yes\""),
        (3, "'label' must be true or false (whether the answer is desirable), got 2"),
        (4, "a labelled row needs its 'prompt'"),
        (5, "'completion' must be a non-empty string (the answer)"),
    ):
        assert f"bad.jsonl:{line}: {reason}" in message


def test_the_preference_demo_prefers_the_sentence_to_the_bare_colour_and_to_another_colour():
    rows, images = generate_demo_pairs(8)
    assert len(rows) == 8 and len(images) == 8
    for index, row in enumerate(rows):
        assert row["response"].startswith("The colour is ")
        color = row["response"].removeprefix("The colour is ").removesuffix(".")
        if index % 2 == 0:  # the pre-trained twin's own answer: the bare colour
            assert row["rejected_response"] == color
        else:  # the sentence with another colour
            assert row["rejected_response"].startswith("The colour is ")
            assert row["rejected_response"] != row["response"]
    assert generate_demo_pairs(8)[0] == rows  # the same on every call
