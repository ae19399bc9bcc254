"""The infer stage: batch answers from a jsonl file or the held-out rows, checkpoint choice, interactive mode."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.data.rows import DatasetError
from pipeline.stages import infer
from tests.helpers import copy_twin, run_stage, run_state, workdir_config, write_rows
from tests.helpers import read_rows as read_results

RESULT_KEYS = {"system", "query", "response", "label", "history", "images"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_twin) -> Path:
    root = tmp_path_factory.mktemp("infer")
    copy_twin(tiny_twin, root / "tiny")
    Image.new("RGB", (160, 112), (40, 160, 60)).save(root / "green.png")
    write_rows(
        root / "queries.jsonl",
        [
            {"query": "Describe the image.", "images": ["green.png"]},
            {"query": "What is the result?", "response": "5", "history": [["What is 2 plus 3?", "the sum"]]},
            {"query": "Say hello.", "system": "Answer briefly."},
        ],
    )
    rows = [{"query": f"Question {i}?", "response": f"answer {i}"} for i in range(4)]
    write_rows(root / "train.jsonl", rows)
    write_rows(
        root / "val.jsonl",
        [
            {"query": "Held out?", "response": "yes"},
            {"query": "Second?", "response": "no"},
            {"query": "Third?", "response": "maybe"},
        ],
    )
    return root


def config(workdir: Path, *overrides: str):
    return workdir_config(
        workdir,
        "stages=[infer]",
        "ckpt=base",
        "infer.max_new_tokens=6",
        "infer.batch_size=2",
        *overrides,
    )


def test_out_of_memory_in_infer_names_the_stage_and_its_settings(workdir, tmp_path, monkeypatch):
    from pipeline.families.minicpm_v2.family import MiniCPMV2
    from pipeline.utils.memory import OutOfGPUMemory

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MiniCPMV2, "generate_batch", out_of_memory)
    with pytest.raises(OutOfGPUMemory) as caught:
        run_stage(infer, config(workdir, f"infer.input={workdir / 'queries.jsonl'}"), tmp_path)
    assert str(caught.value) == (
        "out of GPU memory in the infer stage (3 rows). Knobs, cheapest first: infer.batch_size=1 (now 2), "
        "infer.max_new_tokens=3 (now 6), model.max_slice_nums (fewer image tokens)"
    )
    assert not (tmp_path / "infer" / "results.jsonl").exists()


def test_batch_infer_from_a_jsonl_file_writes_one_row_per_query(workdir: Path, tmp_path: Path):
    cfg = config(workdir, f"infer.input={workdir / 'queries.jsonl'}")
    result = run_stage(infer, cfg, tmp_path)
    assert result["infer"] == tmp_path / "infer" / "results.jsonl"
    rows = read_results(result["infer"])
    assert len(rows) == 3 and all(set(row) == RESULT_KEYS for row in rows)
    assert [row["query"] for row in rows] == ["Describe the image.", "What is the result?", "Say hello."]
    assert [row["label"] for row in rows] == [None, "5", None]  # "response" is optional in an input file
    assert rows[0]["images"] == [str(workdir / "green.png")]  # resolved against the file's folder
    assert rows[1]["history"] == [["What is 2 plus 3?", "the sum"]]
    assert rows[2]["system"] == "Answer briefly."
    assert all(isinstance(row["response"], str) for row in rows)
    timing = json.loads((tmp_path / "infer" / "timing.json").read_text())  # the load and the generation apart
    assert set(timing) == {"load_s", "generate_s", "prepare_wait_s", "decode_s", "first_batch_s", "rows"}
    assert timing["rows"] == 3 and timing["load_s"] > 0 and timing["generate_s"] > 0
    parts = timing["prepare_wait_s"] + timing["decode_s"]
    ms = 1e-3  # each figure is rounded to the millisecond
    assert 0 < timing["first_batch_s"] <= parts + 2 * ms and parts <= timing["generate_s"] + 2 * ms


def test_greedy_answers_are_the_same_on_a_second_run(workdir: Path, tmp_path: Path):
    cfg = config(workdir, f"infer.input={workdir / 'queries.jsonl'}")
    first = read_results(run_stage(infer, cfg, tmp_path / "a")["infer"])
    second = read_results(run_stage(infer, cfg, tmp_path / "b")["infer"])
    assert first == second
    assert any(row["response"] for row in first)


def test_sampled_answers_repeat_for_the_same_seed(workdir: Path, tmp_path: Path):
    cfg = config(
        workdir,
        f"infer.input={workdir / 'queries.jsonl'}",
        "infer.do_sample=true",
        "infer.temperature=1.0",
        "infer.top_p=1.0",
        "infer.top_k=0",
    )
    first = read_results(run_stage(infer, cfg, tmp_path / "a")["infer"])
    second = read_results(run_stage(infer, cfg, tmp_path / "b")["infer"])
    assert [r["response"] for r in first] == [r["response"] for r in second]


def test_without_input_the_held_out_rows_are_answered_up_to_max_samples(workdir: Path, tmp_path: Path):
    rows = read_results(run_stage(infer, config(workdir, "infer.max_samples=2"), tmp_path)["infer"])
    assert [(row["query"], row["label"]) for row in rows] == [("Held out?", "yes"), ("Second?", "no")]


def test_checkpoint_precedence(workdir: Path, tmp_path: Path):
    ckpt, merged, other = (tmp_path / name for name in ("ckpt", "merged", "other"))
    for folder in (ckpt, merged, other):
        folder.mkdir()

    def pick(cfg, state):
        return run_state(cfg, **state).weights_for("infer", cfg)

    assert pick(config(workdir, f"infer.ckpt={other}"), {"merged": merged, "ckpt": ckpt}) == other.resolve()
    assert pick(config(workdir, "infer.ckpt=base"), {"merged": merged}) is None
    assert pick(config(workdir), {"merged": merged, "ckpt": ckpt}) == merged
    assert pick(config(workdir), {"ckpt": ckpt}) == ckpt
    assert pick(config(workdir, "stages=[infer]", f"ckpt={other}"), {}) == other.resolve()
    assert pick(config(workdir), {}) is None  # ckpt=base


def test_a_bad_input_record_is_named_with_its_line(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "fine"}\n{"query": "", "images": []}\nnot json\n', encoding="utf-8")
    with pytest.raises(
        DatasetError,
        match=r"2 problem\(s\): .*bad.jsonl:2: 'query' is empty.*bad.jsonl:3: "
        r"invalid JSON",
    ):
        infer.read_infer_input(path)
    with pytest.raises(DatasetError, match=r"infer.input=.*missing.jsonl: file not found"):
        infer.read_infer_input(tmp_path / "missing.jsonl")


def test_interactive_mode_chats_on_stdin_and_records_each_turn(
    workdir: Path, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello?\n\nAnd then?\nexit\n"))
    result = run_stage(infer, config(workdir, "infer.interactive=true"), tmp_path)
    out = capsys.readouterr().out
    assert out.count("<<< ") >= 3 and "Input a media path or URL <<< " in out
    turns = read_results(result["infer"])
    assert [turn["query"] for turn in turns] == ["Hello?", "And then?"]
    assert turns[1]["history"] == [["Hello?", turns[0]["response"]]]
    assert all(set(turn) == RESULT_KEYS for turn in turns)
