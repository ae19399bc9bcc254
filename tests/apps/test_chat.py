"""The chat API and CLI on MiniCPM-V-2: history semantics, the conversation's image, streaming, commands and bad
input."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from pipeline.apps.chat import Chat
from pipeline.apps.chat_cli import SEPARATOR, main, run_chat
from pipeline.families.checkpoints import CheckpointError
from pipeline.families.minicpm_v2.configuration import MiniCPMVConfig
from pipeline.families.minicpm_v2.lora import apply_lora, build_lora_config
from pipeline.families.minicpm_v2.modeling import MiniCPMV
from pipeline.families.minicpm_v2.tiny import TINY_SIZES
from tests.helpers import copy_twin

IMAGE_PROMPT = "Input a media path or URL <<< "


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_twin) -> Path:
    root = tmp_path_factory.mktemp("chat")
    copy_twin(tiny_twin, root / "tiny")
    Image.new("RGB", (112, 112), (230, 200, 30)).save(root / "yellow.png")
    return root


@pytest.fixture(scope="module")
def chat(workdir: Path) -> Chat:
    return Chat.from_pretrained(str(workdir / "tiny"), device="cpu", generation={"max_new_tokens": 8})


@pytest.fixture
def prompts(chat: Chat, monkeypatch) -> list[dict]:
    """Records the query, history, system text and image of every prompt the chat encodes (to see which image
    goes in)."""
    seen: list[dict] = []
    encode = chat.family.encode_chat

    def spy(bundle, messages, images, max_length):
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = [m["content"] for m in messages if m["role"] != "system"]
        history = [turns[k : k + 2] for k in range(0, len(turns) - 1, 2)]
        seen.append(
            {"query": turns[-1], "history": history, "system": system, "image": (images or [None])[0]}
        )
        return encode(bundle, messages, images, max_length)

    monkeypatch.setattr(chat.family, "encode_chat", spy)
    return seen


def test_infer_appends_the_new_pair_to_the_history(chat: Chat, workdir: Path):
    image = str(workdir / "yellow.png")
    response, history = chat.infer("Describe the image.", images=[image])
    assert isinstance(response, str) and history == [["Describe the image.", response]]
    given = [list(pair) for pair in history]
    response2, history2 = chat.infer("How many shapes?", history=history)
    assert history2 == [["Describe the image.", response], ["How many shapes?", response2]]
    assert history == given  # the caller's history is not modified


def test_the_first_image_stays_with_the_conversation(chat: Chat, workdir: Path, prompts: list[dict]):
    _, history = chat.infer("Describe the image.", images=[str(workdir / "yellow.png")])
    chat.infer("And the colour?", history=history)
    chat.infer("A new question without an image.")  # no history: a new conversation, the image is dropped
    first, later, fresh = prompts
    assert first["image"] is not None and later["image"] is first["image"]
    assert later["history"] == history
    assert fresh["image"] is None and fresh["history"] == []


def test_one_image_per_conversation(chat: Chat, workdir: Path, tmp_path: Path):
    image = str(workdir / "yellow.png")
    with pytest.raises(
        ValueError, match=r"MiniCPM-V-2 .* takes one image per conversation; this one would hold 2"
    ):
        chat.infer("Compare them.", images=[image, image])
    _, history = chat.infer("Describe the image.", images=[image])
    _, history = chat.infer("Again?", images=[image], history=history)  # the same image: no second one
    Image.new("RGB", (112, 112), (10, 20, 200)).save(tmp_path / "blue.png")
    with pytest.raises(
        ValueError, match="one image per conversation.* already has .*yellow.png.*start a new conversation"
    ):
        chat.infer("And this one?", images=[str(tmp_path / "blue.png")], history=history)
    with pytest.raises(ValueError, match="1 <image> tag.* but no image"):
        chat.infer("<image>What is this?")


def test_a_history_from_another_conversation_does_not_get_its_image(
    chat: Chat, workdir: Path, prompts: list[dict]
):
    chat.infer("Describe the image.", images=[str(workdir / "yellow.png")])
    unrelated = [["What is 2 + 3?", "5"]]
    chat.infer("And 4 + 4?", history=unrelated)
    assert prompts[0]["image"] is not None
    assert prompts[1]["image"] is None and prompts[1]["history"] == unrelated


def test_stream_yields_growing_text_ending_with_the_infer_response(chat: Chat, workdir: Path):
    image = str(workdir / "yellow.png")
    steps = list(chat.infer_stream("Describe the image.", images=[image]))
    texts = [text for text, _ in steps]
    assert texts and all(len(a) < len(b) for a, b in zip(texts, texts[1:], strict=False))
    response, history = chat.infer("Describe the image.", images=[image])
    assert texts[-1] == response and steps[-1][1] == history


def test_stream_never_shows_half_a_multi_byte_character(chat: Chat, monkeypatch):
    tok = chat.bundle.tokenizer
    ids = tok.encode("café ok")
    assert "<0xC3>" in tok.convert_ids_to_tokens(
        ids
    )  # "é" is spelt in two byte tokens in the tiny vocabulary
    monkeypatch.setattr(chat, "_token_stream", lambda sample: iter([*ids, tok.eos_id, *ids]))
    texts = [text for text, _ in chat.infer_stream("Say it.")]
    assert texts[-1] == "café ok"
    assert not any("\ufffd" in text for text in texts)
    assert "caf" in texts and "café" in texts


def test_run_chat_handles_images_commands_and_bad_input(chat: Chat, workdir: Path, tmp_path: Path):
    missing = tmp_path / "nowhere.png"
    script = (
        "\n".join(
            [
                "Describe the image.",
                str(missing),
                str(workdir / "yellow.png"),  # a bad path, asked again
                "How many shapes?",  # same conversation: no image prompt
                "clear",
                "",  # an empty query is ignored
                "What is 2 plus 3?",
                "",  # new conversation, no image
                "multi-line",
                "first line",
                "second line#",
                "exit",
                "never read",
            ]
        )
        + "\n"
    )
    out = io.StringIO()
    turns: list[dict] = []
    assert run_chat(chat, io.StringIO(script), out, record=turns.append) == 4
    text = out.getvalue()
    assert text.startswith("commands:") and text.count("<<< ") >= 6
    assert text.count(IMAGE_PROMPT) == 3
    assert f"cannot use the image ({missing}: file not found)" in text
    assert "(empty query ignored" in text and "(new conversation)" in text and "<<<[M] " in text
    assert text.count(SEPARATOR) == 4
    assert [t["query"] for t in turns] == [
        "Describe the image.",
        "How many shapes?",
        "What is 2 plus 3?",
        "first line\nsecond line",
    ]
    assert turns[0]["images"] == turns[1]["images"] == [str(workdir / "yellow.png")]
    assert turns[1]["history"] == [["Describe the image.", turns[0]["response"]]]
    assert turns[2]["images"] == [] and turns[2]["history"] == []
    assert turns[3]["history"] == [["What is 2 plus 3?", turns[2]["response"]]]


def test_reset_system_sets_the_system_prompt_and_eof_ends_the_chat(chat: Chat, prompts: list[dict]):
    out = io.StringIO()
    turns: list[dict] = []
    run_chat(
        chat, io.StringIO("reset-system\nAnswer briefly.\nHello?\n\n"), out, stream=False, record=turns.append
    )
    assert "<<<[system] " in out.getvalue()
    assert [t["system"] for t in turns] == ["Answer briefly."] and prompts[-1]["system"] == "Answer briefly."


def test_reset_system_starts_a_new_conversation(chat: Chat, workdir: Path, prompts: list[dict]):
    image = str(workdir / "yellow.png")
    script = f"Describe the image.\n{image}\nreset-system\nBe brief.\nHow many?\n\nexit\n"
    out = io.StringIO()
    turns: list[dict] = []
    run_chat(chat, io.StringIO(script), out, stream=False, record=turns.append)
    assert out.getvalue().count(IMAGE_PROMPT) == 2  # asked again: the image went with the old conversation
    assert "(new conversation)" in out.getvalue()
    assert turns[1]["history"] == [] and turns[1]["images"] == [] and turns[1]["system"] == "Be brief."
    assert prompts[-1]["image"] is None and prompts[-1]["history"] == []


def test_missing_checkpoint_and_foreign_adapter_raise_checkpoint_error(workdir: Path, tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"nowhere does not exist"):
        Chat.from_pretrained(str(workdir / "tiny"), ckpt=str(tmp_path / "nowhere"), device="cpu")
    sizes = {**TINY_SIZES, "hidden_size": 256}  # another base: every LoRA matrix has another shape
    other = MiniCPMV(MiniCPMVConfig(vocab_size=1024, **sizes))
    apply_lora(other, build_lora_config(other, "qkv", r=4, alpha=8, dropout=0.0)).save_pretrained(
        tmp_path / "a"
    )
    with pytest.raises(CheckpointError, match=r"adapter .*a does not fit base model .*tiny"):
        Chat.from_pretrained(str(workdir / "tiny"), ckpt=str(tmp_path / "a"), device="cpu")


def test_command_line_runs_the_chat_and_reports_a_bad_checkpoint(
    workdir: Path, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello?\n\nquit\n"))
    assert main(["--model", str(workdir / "tiny"), "--device", "cpu", "--max-new-tokens", "4"]) == 0
    assert "<<< " in capsys.readouterr().out
    assert main(["--model", str(workdir / "tiny"), "--ckpt", str(tmp_path / "gone"), "--device", "cpu"]) == 1
    assert "error: checkpoint" in capsys.readouterr().err
