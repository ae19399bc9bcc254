import json

import pytest

from pipeline.families.minicpm_v2.tokenizer import (
    SPECIAL_TOKENS,
    MiniCPMVTokenizer,
    train_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_tok")
    train_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    return MiniCPMVTokenizer.from_pretrained(tok_dir)


def test_special_ids_match_the_checkpoint(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
    assert (tok.im_start_id, tok.im_end_id, tok.slice_start_id, tok.slice_end_id) == (101, 102, 111, 112)
    for token, i in SPECIAL_TOKENS.items():
        assert tok.sp.id_to_piece(i) == token
        assert tok.encode(token) == [i]
    assert tok.user_ids == [tok.sp.piece_to_id("<用户>")] and tok.user_ids[0] != tok.unk_id
    assert tok.ai_ids == [tok.sp.piece_to_id("<AI>")] and tok.ai_ids[0] != tok.unk_id
    assert tok.vocab_size == 1024 == len(tok)


def test_training_is_deterministic(tmp_path, tok_dir):
    train_tiny_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()


def test_digits_are_single_pieces(tok):
    ids = tok.encode("1234567890")
    assert tok.convert_ids_to_tokens(ids) == list("1234567890")


@pytest.mark.parametrize(
    "text",
    [
        "There are 3 red circles left of the blue square.",
        "中文：图中有几只羊？共有4只。",
        "line one\nline two\n\n  indented\ttab",
        "12 + 30 = 42",
        "  leading and trailing spaces  ",
        "emoji 🐑 and accents café",
    ],
)
def test_decode_inverts_encode(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids  # byte fallback covers any text
    assert tok.decode(ids) == text


def test_text_right_after_special_tokens(tok):
    text = "<s>sys<用户><image><unk></image>\nhello 7<AI>world 中文</s>"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids, skip_special_tokens=False) == text
    # Special tokens vanish when skipped, the chat markers are ordinary text and stay.
    assert tok.decode(ids) == "sys<用户>\nhello 7<AI>world 中文"
    # A chunk after a special token is encoded as a fresh text.
    after = ids[ids.index(tok.ai_ids[0]) + 1 : -1]
    assert after == tok.encode("world 中文")


def test_newline_ids(tok):
    assert tok.newline_ids == tok.encode("\n")
    assert tok.decode(tok.newline_ids) == "\n"
    assert tok.newline_id == tok.newline_ids[0]


def test_convert_ids_to_tokens_and_bad_ids(tok):
    assert tok.convert_ids_to_tokens([1, 101, 0, 102, 2]) == ["<s>", "<image>", "<unk>", "</image>", "</s>"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 99999])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.convert_ids_to_tokens([-1])


def test_save_pretrained_writes_official_files(tok, tmp_path):
    tok.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["legacy"] is True and config["add_bos_token"] is True
    assert config["pad_token"] == "<unk>" and config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
    decoder = {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()}
    assert decoder == {i: t for t, i in SPECIAL_TOKENS.items()}
    assert (
        config["additional_special_tokens"][0] == "<image>"
        and config["additional_special_tokens"][-1] == "</slice>"
    )
    special_map = json.loads((tmp_path / "out" / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special_map["pad_token"]["content"] == "<unk>"
    again = MiniCPMVTokenizer.from_pretrained(tmp_path / "out")
    text = "<用户>count the 5 stars<AI>five"
    assert again.encode(text) == tok.encode(text)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MiniCPMVTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        MiniCPMVTokenizer.from_pretrained(tmp_path)


def test_config_ids_take_precedence_and_bad_config_is_named(tok_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        MiniCPMVTokenizer.from_pretrained(tmp_path)
    # Without a config the ids come from the sentencepiece vocab.
    (tmp_path / "tokenizer_config.json").unlink()
    assert MiniCPMVTokenizer.from_pretrained(tmp_path).im_start_id == 101


def test_multi_piece_chat_markers(tmp_path):
    # The official vocab has no <用户>/<AI> piece: they encode to several ordinary pieces.
    tok = train_tiny_tokenizer(tmp_path, chat_markers_as_pieces=False)
    assert len(tok.user_ids) > 1 and len(tok.ai_ids) > 1
    assert tok.decode(tok.user_ids) == "<用户>" and tok.decode(tok.ai_ids) == "<AI>"
    ids = tok.encode("<用户>hi<AI>ok")
    assert ids == tok.user_ids + tok.encode("hi") + tok.ai_ids + tok.encode("ok")
    assert tok.decode(ids) == "<用户>hi<AI>ok"


def test_extra_texts_shape_the_vocab(tmp_path):
    plain = train_tiny_tokenizer(tmp_path / "a", vocab_size=512)
    extra = train_tiny_tokenizer(tmp_path / "b", vocab_size=512, extra_texts=["zebraphant " * 50] * 20)
    assert len(extra.encode("zebraphant")) < len(plain.encode("zebraphant"))
    with pytest.raises(ValueError, match="vocab_size"):
        train_tiny_tokenizer(tmp_path / "c", vocab_size=100)
