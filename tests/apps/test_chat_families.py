"""The chat for a transformers-native family (Qwen2.5-VL's tiny twin on the CPU): answers equal to the family's
own greedy generation turn by turn, several images in a conversation, the family's image limit, the terminal
chat's image prompts and the interactive infer stage's records.

The twin's weights are redrawn larger once (its own small initialisation answers "\\n" to everything), so an
answer depends on the prompt and on each image.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.__main__ import run_pipeline
from pipeline.apps.chat import Chat
from pipeline.apps.chat_cli import SEPARATOR, run_chat
from pipeline.config import validate
from pipeline.families import get_family
from tests.helpers import compose_config

MAX_TOKENS = 8
LIMIT = 16  # Qwen2.5-VL's images per conversation
IMAGE_PROMPT = "Input a media path or URL <<< "


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (40, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def family():
    return get_family("qwen2_5_vl")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat-families")
    for seed in range(3):
        picture(seed).save(root / f"p{seed}.png")
    return root


@pytest.fixture(scope="module")
def chat(family, varied_twin) -> Chat:
    chat = Chat.from_pretrained(
        str(varied_twin(family.name)), device="cpu", generation={"max_new_tokens": MAX_TOKENS}
    )
    assert chat.family.name == "qwen2_5_vl"  # picked by the folder's model_type
    return chat


def reference(family, chat: Chat, messages: list[dict], images: list[Image.Image]) -> str:
    """Returns the family's own greedy answer to the tagged `messages`."""
    bundle = chat.bundle
    sample = family.encode(bundle.processor, messages, images, generation=True)
    batch = family.collate_for_generation(bundle.processor, [sample])
    (answer,) = family.generate(bundle.model, bundle.processor, batch, max_new_tokens=MAX_TOKENS)
    return answer


def test_each_turn_equals_the_familys_own_greedy_generation(family, chat: Chat, root: Path):
    first, history = chat.infer("Describe the image.", images=[str(root / "p0.png")])
    expected = reference(
        family, chat, [{"role": "user", "content": "<image>Describe the image."}], [picture(0)]
    )
    assert first == expected and first.strip()
    second, history = chat.infer("And its colours?", history=history)  # the image stays
    conversation = [
        {"role": "user", "content": "<image>Describe the image."},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And its colours?"},
    ]
    assert second == reference(family, chat, conversation, [picture(0)])
    assert history == [["Describe the image.", first], ["And its colours?", second]]
    # the image is read: another one gives another first answer
    other, _ = chat.infer("Describe the image.", images=[str(root / "p1.png")])
    assert other != first
    # streamed, the answer grows to the same whole
    steps = [text for text, _ in chat.infer_stream("Describe the image.", images=[str(root / "p0.png")])]
    assert steps[-1] == first and all(len(a) < len(b) for a, b in zip(steps, steps[1:], strict=False))


def test_several_images_in_a_turn_and_a_later_one_in_its_own_turn(family, chat: Chat, root: Path):
    paths = [str(root / f"p{seed}.png") for seed in range(3)]
    first, history = chat.infer("Compare them.", images=paths[:2])
    assert first == reference(
        family, chat, [{"role": "user", "content": "<image><image>Compare them."}], [picture(0), picture(1)]
    )
    second, _ = chat.infer("And this one?", images=[paths[2]], history=history)
    conversation = [
        {"role": "user", "content": "<image><image>Compare them."},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "<image>And this one?"},
    ]
    assert second == reference(family, chat, conversation, [picture(0), picture(1), picture(2)])


def test_an_image_over_the_familys_limit_is_refused_naming_it(chat: Chat, root: Path):
    with pytest.raises(
        ValueError,
        match=rf"Qwen2.5-VL \(model.family=qwen2_5_vl\) takes at most {LIMIT} images per conversation",
    ):
        chat.infer("Look.", images=[picture(k) for k in range(LIMIT + 1)])
    _, history = chat.infer("Look.", images=[str(root / "p0.png")])
    with pytest.raises(ValueError, match=f"at most {LIMIT} images .* would hold {LIMIT + 1}"):
        chat.infer("And these?", images=[picture(k) for k in range(LIMIT)], history=history)


def test_the_terminal_chat_asks_for_images_at_every_query(chat: Chat, root: Path, tmp_path: Path):
    p0, p1, p2 = (str(root / f"p{seed}.png") for seed in range(3))
    missing = tmp_path / "nowhere.png"
    script = "\n".join(
        ["Compare them.", p0, str(missing), p1, "", "And this one?", p2, "", "clear", "Hello?", "", "exit"]
    )
    out = io.StringIO()
    turns: list[dict] = []
    assert run_chat(chat, io.StringIO(script + "\n"), out, stream=False, record=turns.append) == 3
    text = out.getvalue()
    assert f"images: up to {LIMIT} per conversation" in text
    assert f"cannot use the image ({missing}: file not found)" in text
    assert text.count(IMAGE_PROMPT) == 7 and text.count(SEPARATOR) == 3
    assert [t["images"] for t in turns] == [[p0, p1], [p0, p1, p2], []]
    assert turns[1]["history"] == [["Compare them.", turns[0]["response"]]] and turns[2]["history"] == []
    expected, history = chat.infer("Compare them.", images=[p0, p1])
    assert turns[0]["response"] == expected
    assert turns[1]["response"] == chat.infer("And this one?", images=[p2], history=history)[0]


def test_interactive_infer_stage_chats_and_records_each_turn(
    root: Path, varied_twin, tmp_path: Path, monkeypatch, capsys
):
    p0 = str(root / "p0.png")
    cfg = compose_config(
        [
            "stages=[infer]",
            "infer.interactive=true",
            "model=qwen2_5_vl_tiny",
            f"model.path={varied_twin('qwen2_5_vl')}",
            f"output_root={tmp_path}",
            "device=cpu",
            "ckpt=base",
            f"infer.max_new_tokens={MAX_TOKENS}",
        ]
    )
    validate(cfg)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"Describe the image.\n{p0}\n\nAnd then?\n\nexit\n"))
    run_pipeline(cfg, tmp_path / "run")
    assert IMAGE_PROMPT in capsys.readouterr().out
    lines = (tmp_path / "run" / "infer" / "results.jsonl").read_text(encoding="utf-8").splitlines()
    turns = [json.loads(line) for line in lines]
    assert [t["query"] for t in turns] == ["Describe the image.", "And then?"]
    assert [t["images"] for t in turns] == [[p0], [p0]]
    assert turns[1]["history"] == [["Describe the image.", turns[0]["response"]]]
    assert all(set(t) == {"system", "query", "response", "label", "history", "images"} for t in turns)
    assert turns[0]["response"].strip()


def test_sampling_with_a_seed_repeats(family, chat: Chat, root: Path):
    settings = {"do_sample": True, "temperature": 1.5, "top_p": 1.0, "max_new_tokens": MAX_TOKENS}
    answers = [
        Chat(family, chat.bundle, generation=settings, seed=3).infer("Describe.", images=[picture(0)])[0]
        for _ in range(2)
    ]
    assert answers[0] == answers[1] and answers[0].strip()
    others = [
        Chat(family, chat.bundle, generation=settings, seed=seed).infer("Describe.", images=[picture(0)])[0]
        for seed in (4, 5)
    ]
    assert any(other != answers[0] for other in others)  # it samples: other seeds, other answers
