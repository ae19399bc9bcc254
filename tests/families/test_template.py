import pytest

from pipeline.families.base import IGNORE_INDEX
from pipeline.families.minicpm_v2.template import (
    EncodedConversation,
    render_conversation,
    truncate,
)
from pipeline.families.minicpm_v2.tokenizer import train_tiny_tokenizer

Q = 4  # a short query_num keeps the expected sequences readable


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="module")
def split_marker_tok(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok_split"), chat_markers_as_pieces=False)


def _sliced_placeholder(tok):
    single = [101] + [0] * Q + [102]
    return single + [111] + single * 2 + tok.newline_ids + single * 2 + [112]


def test_multi_round_with_system_and_image_token_by_token(tok):
    ph = [101] + [0] * Q + [102]
    enc = render_conversation(
        tok,
        "how many now?",
        "2",
        history=[("What is shown?", "A red star.")],
        system="You are helpful.",
        image_placeholder=ph,
    )
    e = tok.encode
    user, ai = tok.user_ids, tok.ai_ids
    assert user == [113] and ai == [114]
    segments = [
        ([1], False),
        (e("You are helpful."), False),
        (user, False),
        (ph, False),
        (e("\nWhat is shown?"), False),
        (ai, False),
        (e("A red star."), True),
        (user, False),
        (e("how many now?"), False),
        (ai, False),
        (e("2"), True),
        ([2], True),
    ]
    expected_ids = [i for ids, _ in segments for i in ids]
    expected_labels = [i if lab else IGNORE_INDEX for ids, lab in segments for i in ids]
    assert enc.input_ids == expected_ids
    assert enc.labels == expected_labels
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == (
        "<s>You are helpful.<用户><image>" + "<unk>" * Q + "</image>\nWhat is shown?<AI>A red star."
        "<用户>how many now?<AI>2</s>"
    )
    start = 1 + len(e("You are helpful.")) + 1
    assert enc.input_ids[start] == 101
    assert enc.image_bound == [(start + 1, start + 1 + Q)]
    assert enc.placeholder_spans == [(start, start + len(ph))]
    # Labelled tokens decode to exactly the responses and the final eos.
    labelled = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tok.decode(labelled, skip_special_tokens=False) == "A red star.2</s>"


def test_text_only_has_no_placeholder_and_no_newline(tok):
    enc = render_conversation(tok, "Say hi", "hi")
    assert enc.input_ids == [1] + tok.user_ids + tok.encode("Say hi") + tok.ai_ids + tok.encode("hi") + [2]
    assert enc.image_bound == [] and enc.placeholder_spans == []
    assert enc.labels == [IGNORE_INDEX] * (len(enc.input_ids) - len(tok.encode("hi")) - 1) + tok.encode(
        "hi"
    ) + [2]
    # Empty or None system adds nothing.
    assert render_conversation(tok, "Say hi", "hi", system="").input_ids == enc.input_ids


def test_generation_prompt(tok):
    ph = [101] + [0] * Q + [102]
    enc = render_conversation(tok, "Describe.", None, history=[["Hi", "Hello"]], image_placeholder=ph)
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == (
        "<s><用户><image>" + "<unk>" * Q + "</image>\nHi<AI>Hello<用户>Describe.<AI>"
    )
    assert enc.input_ids[-1] == tok.ai_ids[-1] and tok.eos_id not in enc.input_ids
    assert all(label == IGNORE_INDEX for label in enc.labels)
    # The prompt is exactly the training sequence up to the last response.
    train = render_conversation(tok, "Describe.", "Ok", history=[["Hi", "Hello"]], image_placeholder=ph)
    assert train.input_ids[: len(enc.input_ids)] == enc.input_ids


def test_image_bound_points_at_the_unk_runs_of_a_sliced_placeholder(tok):
    ph = _sliced_placeholder(tok)
    enc = render_conversation(tok, "Read it.", "Done.", system="sys", image_placeholder=ph)
    assert len(enc.image_bound) == 5
    for start, end in enc.image_bound:
        assert end - start == Q
        assert enc.input_ids[start - 1] == tok.im_start_id and enc.input_ids[end] == tok.im_end_id
        assert set(enc.input_ids[start:end]) == {tok.unk_id}
    s, e = enc.placeholder_spans[0]
    assert enc.input_ids[s] == 101 and enc.input_ids[e - 1] == 112
    assert sum(e - s for s, e in enc.image_bound) == enc.input_ids.count(tok.unk_id)


def test_image_tag_places_the_image_where_it_stands(tok):
    ph = [101] + [0] * Q + [102]
    e, user, ai = tok.encode, tok.user_ids, tok.ai_ids
    enc = render_conversation(tok, "what is <image>here?", "a star", image_placeholder=ph)
    assert enc.input_ids == [1, *user, *e("what is "), *ph, *e("\nhere?"), *ai, *e("a star"), 2]
    assert enc.image_bound == [
        (1 + len(user) + len(e("what is ")) + 1, 1 + len(user) + len(e("what is ")) + 1 + Q)
    ]
    # in a history turn: the image goes into that round, not the first one
    enc = render_conversation(
        tok, "and now?", "2", history=[("hi", "hello"), ("<image>count", "1")], image_placeholder=ph
    )
    expected = [1, *user, *e("hi"), *ai, *e("hello"), *user, *ph, *e("\ncount"), *ai, *e("1")]
    expected += [*user, *e("and now?"), *ai, *e("2"), 2]
    assert enc.input_ids == expected
    assert enc.input_ids.count(101) == 1 and tok.im_start_id not in e("count")


def test_image_tag_first_gives_the_ids_of_a_row_without_tag(tok):
    ph = [101] + [0] * Q + [102]
    plain = render_conversation(tok, "What is shown?", "A star.", history=[("q", "a")], image_placeholder=ph)
    tagged = render_conversation(
        tok, "What is shown?", "A star.", history=[("<image>q", "a")], image_placeholder=ph
    )
    assert tagged == plain
    text_only = render_conversation(tok, "What is shown?", "A star.")
    assert text_only.input_ids == [1, *tok.user_ids, *tok.encode("What is shown?"), *tok.ai_ids,
                                   *tok.encode("A star."), 2]  # fmt: skip


def test_more_image_tags_than_images_is_an_error(tok):
    ph = [101] + [0] * Q + [102]
    with pytest.raises(ValueError, match="1 <image> tag.* but no image"):
        render_conversation(tok, "what is <image>?", "no idea")
    with pytest.raises(ValueError, match="2 <image> tag.* but one image"):
        render_conversation(tok, "<image>a", "b", history=[("<image>c", "d")], image_placeholder=ph)


def test_multi_piece_chat_markers(split_marker_tok):
    tok = split_marker_tok
    enc = render_conversation(tok, "Q", "A", history=[("q0", "a0")], system="S")
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == "<s>S<用户>q0<AI>a0<用户>Q<AI>A</s>"
    labelled = [t for t in enc.labels if t != IGNORE_INDEX]
    assert labelled == tok.encode("a0") + tok.encode("A") + [2]


def test_bad_inputs_are_named(tok):
    with pytest.raises(ValueError, match=r"history\[0\]"):
        render_conversation(tok, "q", "a", history=[("only one",)])
    with pytest.raises(ValueError, match="image placeholder"):
        render_conversation(tok, "q", "a", image_placeholder=[0, 0, 0])
    with pytest.raises(ValueError, match="truncation policy"):
        truncate(render_conversation(tok, "q", "a"), 10, "cut")


def test_truncate_policies(tok):
    enc = render_conversation(tok, "Tell me", "a long answer with many words in it")
    n = len(enc.input_ids)
    assert truncate(enc, n, "delete") is enc and truncate(enc, n, "truncate") is enc
    assert truncate(enc, n - 1, "delete") is None
    cut = truncate(enc, n - 3, "truncate")
    assert cut.input_ids == enc.input_ids[: n - 3] and cut.labels == enc.labels[: n - 3]
    # Keeping no labelled token is useless.
    first_label = next(i for i, t in enumerate(enc.labels) if t != IGNORE_INDEX)
    assert truncate(enc, first_label, "truncate") is None
    assert truncate(enc, first_label + 1, "truncate") is not None
    # A too-long generation prompt is never cut.
    prompt = render_conversation(tok, "Tell me", None)
    assert truncate(prompt, len(prompt.input_ids) - 1, "truncate") is None


def test_truncate_never_cuts_an_image_span(tok):
    ph = _sliced_placeholder(tok)
    enc = render_conversation(tok, "Read", "x " * 40, image_placeholder=ph)
    s, e = enc.placeholder_spans[0]
    for max_length in range(1, len(enc.input_ids)):
        out = truncate(enc, max_length, "truncate")
        if s < max_length < e:
            assert out is None
        if out is not None:
            assert out.image_bound == enc.image_bound  # the whole image survives or nothing does
            assert len(out.input_ids) == max_length
            assert any(t != IGNORE_INDEX for t in out.labels)


def test_encoded_conversation_len():
    assert len(EncodedConversation([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3], [])) == 3
