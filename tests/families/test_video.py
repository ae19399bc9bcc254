"""Video in the families that take it (Qwen2.5-VL, Qwen3-VL, MiniCPM-V 4.6), on their tiny twins: frames
sampled by each processor's rule under the model.video_* settings, a video row packed as it is padded (its
mRoPE positions from its own grid), its patches in the token budget, and MiniCPM-V-2's refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.data.images import ImageFiles
from pipeline.data.rows import Row
from pipeline.families import get_family
from pipeline.families.base import Bundle, FamilyError, VideoInfo, load_video, messages_from_row
from tests.families.test_families import nonzero_adapter, picture
from tests.families.test_packing import HF_FAMILIES, sums_and_grads, twins  # noqa: F401 (a fixture)
from tests.helpers import write_test_video

TEN_SECONDS = VideoInfo(frames=40, fps=4.0, duration=10.0, width=64, height=48)


def loaded(twins, name: str, **video):  # noqa: F811
    family = get_family(name, None, video=video)
    model, processor = family.load(twins[name])
    return family, model, processor


@pytest.mark.parametrize(
    ("name", "video", "frames"),
    [
        ("qwen2_5_vl", {}, 20),  # 2 frames a second by default
        ("qwen2_5_vl", {"video_fps": 1.0}, 10),
        ("qwen2_5_vl", {"video_fps": 1.0, "video_max_frames": 6}, 6),
        ("qwen3_vl", {}, 20),
        ("qwen3_vl", {"video_fps": 0.5}, 5),
        ("qwen3_vl", {"video_max_frames": 6}, 6),
        ("minicpm_v4_6", {}, 10),  # one a second
        ("minicpm_v4_6", {"video_max_frames": 4}, 4),
    ],
)
def test_frames_are_sampled_by_the_processors_rule_under_the_settings(twins, name, video, frames):  # noqa: F811
    family, _, processor = loaded(twins, name, **video)
    picked = list(family.video_frame_picker(processor)(TEN_SECONDS))
    assert len(picked) == frames
    assert picked == sorted(picked) and 0 <= picked[0] and picked[-1] < TEN_SECONDS.frames
    assert len(set(picked)) == frames  # evenly spread, none twice


def test_a_key_the_family_does_not_read_is_refused():
    with pytest.raises(FamilyError, match=r"model.video_fps: MiniCPM-V 4.6 .* reads model.video_max_frames"):
        get_family("minicpm_v4_6", None, video={"video_fps": 2.0})
    with pytest.raises(FamilyError, match="MiniCPM-V-2 .*takes no video"):
        get_family("minicpm_v2", None, video={"video_max_frames": 8})


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_a_video_row_packs_as_it_pads_and_counts_its_patches(twins, name, tmp_path):  # noqa: F811
    """A packed row of a video conversation, a text one and an image one gives the padded loss and gradients
    (the video's mRoPE positions come from its own grid and frame spacing); the video's patches count."""
    path = write_test_video(tmp_path / "clip.mp4")
    settings = {"video_max_frames": 2} if name == "minicpm_v4_6" else {"video_max_pixels": 64 * 64}
    family, model, processor = loaded(twins, name, **settings)
    model = nonzero_adapter(family, model, "qkv", seed=0)
    model.train()
    video = load_video(str(path), ImageFiles(), family.video_frame_picker(processor))
    assert video.frames.shape[1:] == (48, 64, 3) and video.info.frames == 8
    with_video = family.encode(
        processor, messages_from_row("<video>What moves?", "The noise."), [], videos=[video]
    )
    samples = [
        family.encode(processor, messages_from_row("Two plus two?", "Four."), []),
        with_video,
        family.encode(processor, messages_from_row("<image>Colour?", "Blue."), [picture()]),
    ]
    bundle = Bundle(model, processor, twins[name], "base")
    padded = family.training_collate(bundle)(samples)
    packed = family.training_collate(bundle, packed=True)(samples)
    assert "pixel_values_videos" in padded
    want_loss, want_tokens, want = sums_and_grads(family, model, padded)
    loss, tokens, got = sums_and_grads(family, model, packed)
    assert tokens == want_tokens
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys() and len(want) > 0
    for n in want:
        scale = float(want[n].abs().max()) + 1e-8
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-4 * scale)
    assert family.sample_patches(processor, with_video) > 0
    row = Row("<video>What moves?", "The noise.", [], [], None, "rows.jsonl:1", videos=[str(path)])
    patches = family.patch_counter(bundle, ImageFiles())(row)
    tokens_counted = family.token_counter(bundle, 4096, "delete", ImageFiles())(row)
    assert patches == family.sample_patches(processor, with_video)
    assert tokens_counted == len(with_video)


def test_minicpm_v2_refuses_a_video_row(family_twin, tmp_path):
    family = get_family("minicpm_v2")
    assert family.capabilities.max_videos == 0
    row = Row("<video>What moves?", "", [], [], None, "rows.jsonl:3", videos=[str(tmp_path / "clip.mp4")])
    bundle = Bundle(torch.nn.Linear(1, 1), None, Path(family_twin("minicpm_v2")), "base")
    with pytest.raises(
        FamilyError, match=r"rows.jsonl:3: MiniCPM-V-2 \(model.family=minicpm_v2\) takes no video"
    ):
        family.encode_row_from(bundle, row, ImageFiles(), 512)


def test_the_config_validates_the_video_keys():
    from pipeline.config import ConfigError, validate
    from tests.helpers import compose_config

    validate(compose_config(["model=qwen3_vl_tiny", "model.video_fps=1", "model.video_max_frames=8"]))
    with pytest.raises(ConfigError, match="model.video_fps: MiniCPM-V-2 .*takes no video"):
        validate(compose_config(["model.video_fps=1"]))
    with pytest.raises(ConfigError, match="model.video_max_frames=0 is out of range"):
        validate(compose_config(["model=qwen2_5_vl_tiny", "model.video_max_frames=0"]))
