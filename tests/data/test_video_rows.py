"""Rows with videos: the "videos" field in every row format and in a Hugging Face dataset, `<video>` tags as
ms-swift writes them, and the up-front check of every video (exists, decodes, its length against
dataset.max_video_seconds, the family's videos per conversation), remembered across runs."""

from __future__ import annotations

import pytest

from pipeline.data import video_check
from pipeline.data.hf_source import load_hf
from pipeline.data.rows import DatasetError, Row
from pipeline.data.sources import load_rows
from pipeline.data.validate import record_to_row
from pipeline.data.videos import decode_frames, read_video_header
from pipeline.families import get_family
from tests.helpers import write_rows, write_test_video


@pytest.fixture
def clip(tmp_path):
    return write_test_video(tmp_path / "clips" / "clip.mp4")


def test_the_test_video_reads_back_with_its_header_and_frames(clip):
    info = read_video_header(str(clip))
    assert (info.frames, info.fps, info.duration, info.width, info.height) == (8, 4.0, 2.0, 64, 48)
    frames = decode_frames(str(clip), [6, 0, 0])
    assert frames.shape == (3, 48, 64, 3) and frames.dtype.name == "uint8"
    assert (frames[1] == frames[2]).all() and not (frames[0] == frames[1]).all()


@pytest.mark.parametrize(
    "record",
    [
        {"query": "<video>What moves?", "response": "Noise.", "videos": ["clips/clip.mp4"]},
        {
            "messages": [
                {"role": "user", "content": "<video>What moves?"},
                {"role": "assistant", "content": "Noise."},
            ],
            "videos": ["clips/clip.mp4"],
        },
        {
            "conversations": [
                {"from": "human", "value": "<video>What moves?"},
                {"from": "gpt", "value": "Noise."},
            ],
            "videos": ["clips/clip.mp4"],
        },
        {
            "conversation": [{"human": "<video>What moves?", "assistant": "Noise."}],
            "videos": ["clips/clip.mp4"],
        },
        {"instruction": "<video>What moves?", "output": "Noise.", "videos": ["clips/clip.mp4"]},
    ],
    ids=["query/response", "messages", "sharegpt", "ms-swift-sharegpt", "alpaca"],
)
def test_every_row_format_carries_videos(record, clip, tmp_path):
    row = record_to_row(record, "rows.jsonl:1", tmp_path)
    assert isinstance(row, Row), row
    assert row.videos == [str(clip)] and row.images == [] and row.query == "<video>What moves?"


def test_video_tags_follow_the_image_tag_rules(tmp_path):
    two_tags = {"query": "<video><video>Compare.", "response": "Alike.", "videos": ["a.mp4"]}
    assert record_to_row(two_tags, "f.jsonl:2", tmp_path) == [
        "2 <video> tag(s) but 1 video(s) in 'videos'; each tag marks where one video goes"
    ]
    in_response = {"query": "Describe.", "response": "<video>", "videos": ["a.mp4"]}
    assert "<video> in a response" in record_to_row(in_response, "f.jsonl:3", tmp_path)[0]
    assert (
        "'videos' must be a list"
        in record_to_row({**in_response, "videos": "a.mp4"}, "f.jsonl:4", tmp_path)[0]
    )


def test_bad_videos_are_named_by_file_and_line(clip, tmp_path):
    (tmp_path / "not_a_video.mp4").write_text("hello")
    write_test_video(tmp_path / "long.mp4", frames=12, fps=2)  # 6 seconds
    data = write_rows(
        tmp_path / "rows.jsonl",
        [
            {"query": "<video>Moves?", "response": "Yes.", "videos": [str(clip)]},
            {"query": "<video>Moves?", "response": "Yes.", "videos": ["missing.mp4"]},
            {"query": "<video>Moves?", "response": "Yes.", "videos": ["not_a_video.mp4"]},
            {"query": "<video>Moves?", "response": "Yes.", "videos": ["long.mp4"]},
        ],
    )
    limits = get_family("qwen2_5_vl").video_limits()
    with pytest.raises(DatasetError) as caught:
        load_rows({"name": "custom", "path": str(data)}, video_limit=limits, max_video_seconds=5)
    message = str(caught.value)
    assert "3 problem(s)" in message
    assert f"{data}:2: video {tmp_path / 'missing.mp4'}: video file not found" in message
    assert f"{data}:3: video {tmp_path / 'not_a_video.mp4'}: not a readable video" in message
    assert f"{data}:4: video {tmp_path / 'long.mp4'}: 6.0 s long, over dataset.max_video_seconds=5" in message
    assert "Qwen2.5-VL (model.family=qwen2_5_vl): frames are sampled at model.video_fps=" in message
    rows, problems = load_rows(
        {"name": "custom", "path": str(data)}, video_limit=limits, max_video_seconds=5, on_error="skip"
    )
    assert [row.origin for row in rows] == [f"{data}:1"] and len(problems) == 3


def test_minicpm_v2_refuses_rows_with_videos(clip, tmp_path):
    data = write_rows(
        tmp_path / "rows.jsonl",
        [
            {"query": "Hello", "response": "Hi."},
            {"query": "<video>Moves?", "response": "Yes.", "videos": [str(clip)]},
        ],
    )
    limits = get_family("minicpm_v2").video_limits()
    with pytest.raises(DatasetError, match=rf"{data}:2: 1 video\(s\); MiniCPM-V-2 \(model.family=minicpm_v2\) "
                       "takes no video"):  # fmt: skip
        load_rows({"name": "custom", "path": str(data)}, video_limit=limits)


def test_video_headers_are_remembered_by_file_identity(clip, tmp_path, monkeypatch):
    opened: list[str] = []
    real = video_check.read_video_header

    def counting(ref, cache_dir=None):
        opened.append(ref)
        return real(ref, cache_dir)

    monkeypatch.setattr(video_check, "read_video_header", counting)
    missing = str(tmp_path / "missing.mp4")
    first = video_check.video_headers([str(clip), missing, str(clip)], check_cache=tmp_path / "checks")
    second = video_check.video_headers([str(clip), missing], check_cache=tmp_path / "checks")
    assert first == second and first[str(clip)].frames == 8 and "not found" in first[missing]
    assert sorted(opened) == sorted([str(clip), missing, missing])  # a missing file has no identity to keep
    write_test_video(clip, frames=4)  # a changed file is read again
    assert video_check.video_headers([str(clip)], check_cache=tmp_path / "checks")[str(clip)].frames == 4


@pytest.mark.parametrize("form", ["parquet", "disk"])
def test_a_hf_dataset_gives_videos_from_its_videos_column(clip, tmp_path, form):
    import datasets

    from tests.helpers import write_hf_dataset

    dataset = datasets.Dataset.from_dict(
        {"query": ["<video>What moves?", "Hello"], "response": ["Noise.", "Hi."], "clip": [str(clip), None]}
    )
    path = write_hf_dataset(dataset, tmp_path / "data", form)
    rows, problems = load_hf({"path": str(path), "columns": {"clip": "videos"}}, None)
    assert problems == [] and [row.videos for row in rows] == [[str(clip)], []]
