import pytest
import torch
from PIL import Image

from pipeline.families.base import IGNORE_INDEX
from pipeline.families.minicpm_v2.collate import (
    Sample,
    collate_for_generation,
    collate_for_training,
    encode_example,
)
from pipeline.families.minicpm_v2.processor import MiniCPMVImageProcessor
from pipeline.families.minicpm_v2.tokenizer import train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="module")
def proc():
    return MiniCPMVImageProcessor(query_num=8)


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (700, 300), (30, 60, 90))  # sliced: 1 row x 2 slices


def test_encode_example_with_image(tok, proc, image):
    s = encode_example(tok, proc, "What colour?", "Dark blue.", system="Be brief.", image=image)
    assert len(s.pixel_values) == 3 == len(s.image_bound)
    for start, end in s.image_bound:
        assert end - start == 8
        assert s.input_ids[start - 1] == tok.im_start_id and s.input_ids[end] == tok.im_end_id
    assert s.input_ids[0] == tok.bos_id and s.input_ids[-1] == tok.eos_id
    assert tok.decode([t for t in s.labels if t != IGNORE_INDEX]) == "Dark blue."


def test_encode_example_text_only_and_length_policies(tok, proc):
    s = encode_example(tok, proc, "Hi", "Hello there", history=[("a", "b")])
    assert s.pixel_values == [] and s.image_bound == []
    n = len(s.input_ids)
    assert encode_example(tok, proc, "Hi", "Hello there", history=[("a", "b")], max_length=n - 1) is None
    cut = encode_example(
        tok, proc, "Hi", "Hello there", history=[("a", "b")], max_length=n - 1, truncation="truncate"
    )
    assert cut.input_ids == s.input_ids[:-1]


def test_encode_example_never_keeps_a_cut_image(tok, proc, image):
    full = encode_example(tok, proc, "q", "answer", image=image)
    start, _ = full.image_bound[0]
    inside = start + 3
    assert (
        encode_example(tok, proc, "q", "answer", image=image, max_length=inside, truncation="truncate")
        is None
    )


def test_generation_prompt_sample(tok, proc, image):
    s = encode_example(tok, proc, "Describe.", None, image=image)
    assert s.input_ids[-len(tok.ai_ids) :] == tok.ai_ids
    assert all(t == IGNORE_INDEX for t in s.labels)


def _sample(n, bounds=(), pixels=0):
    return Sample(
        input_ids=list(range(10, 10 + n)),
        labels=[IGNORE_INDEX] * (n - 2) + [7, 8],
        image_bound=list(bounds),
        pixel_values=[torch.zeros(3, 14, 14) for _ in range(pixels)],
    )


def test_training_batch_is_right_padded():
    a, b = _sample(6, bounds=[(1, 3)], pixels=1), _sample(4)
    batch = collate_for_training([a, b], pad_id=0)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][1].tolist() == [10, 11, 12, 13, 0, 0]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["labels"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["image_bound"][0].tolist() == [[1, 3]]
    assert batch["image_bound"][1].shape == (0, 2) and batch["image_bound"][1].dtype == torch.long
    assert len(batch["pixel_values"][0]) == 1 and batch["pixel_values"][1] == []


def test_generation_batch_is_left_padded_with_shifted_bounds():
    a, b = _sample(7, bounds=[(1, 3)], pixels=1), _sample(4, bounds=[(1, 2), (2, 3)], pixels=2)
    batch = collate_for_generation([a, b], pad_id=0)
    assert "labels" not in batch
    assert batch["input_ids"][1].tolist() == [0, 0, 0, 10, 11, 12, 13]
    assert batch["attention_mask"][1].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert batch["image_bound"][0].tolist() == [[1, 3]]
    assert batch["image_bound"][1].tolist() == [[4, 5], [5, 6]]
    # The shifted bound still selects the same tokens.
    for i, s in enumerate([a, b]):
        for (s0, e0), (s1, e1) in zip(s.image_bound, batch["image_bound"][i].tolist(), strict=True):
            assert batch["input_ids"][i, s1:e1].tolist() == s.input_ids[s0:e0]


def test_real_samples_batch_together(tok, proc, image):
    samples = [
        encode_example(tok, proc, "What colour?", "Dark blue.", image=image),
        encode_example(tok, proc, "Say hi", "hi"),
    ]
    batch = collate_for_training(samples, pad_id=tok.pad_id)
    n = len(samples[1].input_ids)
    assert batch["input_ids"][1, n:].eq(tok.pad_id).all()
    assert batch["labels"][1, n:].eq(IGNORE_INDEX).all()
    assert int(batch["attention_mask"].sum()) == sum(len(s.input_ids) for s in samples)
    prompts = [
        encode_example(tok, proc, "Describe.", None, image=image),
        encode_example(tok, proc, "Hi", None),
    ]
    gen = collate_for_generation(prompts, pad_id=tok.pad_id)
    assert gen["input_ids"][:, -1].tolist() == [tok.ai_ids[-1]] * 2
    for start, end in gen["image_bound"][0].tolist():
        assert gen["input_ids"][0, start:end].eq(tok.unk_id).all()


def test_bad_batches_are_named():
    with pytest.raises(ValueError, match="empty"):
        collate_for_training([], pad_id=0)
    bad = _sample(4)
    bad.labels = bad.labels[:-1]
    with pytest.raises(ValueError, match="sample 0"):
        collate_for_training([bad], pad_id=0)
