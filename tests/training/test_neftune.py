"""NEFTune (trainer.neftune_noise_alpha): the noise's bound follows each token's own sample length, padded or
packed; padding, evaluation and anything outside a training forward get none; through sft, the evaluation
before training is untouched and the training losses change, for MiniCPM-V-2 and an HF-native family."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline.config import ConfigError, validate
from pipeline.data.demo import ensure_demo_pairs
from pipeline.data.images import ImageFiles
from pipeline.data.sources import read_custom_file
from pipeline.families import get_family
from pipeline.stages import sft
from pipeline.training.neftune import EmbeddingNoise
from tests.helpers import compose_config, eval_losses, log_records, losses_by_step, run_stage, twin_config

ALPHA = 5.0
DIM = 64


def test_the_noise_is_bounded_by_each_samples_length_and_spares_padding():
    torch.manual_seed(0)
    embeddings = torch.nn.Embedding(100, DIM)
    noise = EmbeddingNoise(embeddings, ALPHA)
    ids = torch.randint(0, 100, (2, 50))
    lengths = torch.zeros(2, 50, dtype=torch.long)
    lengths[0, :50] = 50  # a full row
    lengths[1, :10], lengths[1, 10:30] = 10, 20  # a packed row: two samples, then padding
    clean = embeddings(ids)
    with noise.lengths(lengths):
        noisy = embeddings(ids)
    delta = (noisy - clean).detach()
    for row, (start, end, length) in enumerate([(0, 50, 50), (0, 10, 10)]):
        bound = ALPHA / math.sqrt(length * DIM)
        part = delta[row, start:end]
        assert float(part.abs().max()) <= bound and float(part.abs().max()) > 0.9 * bound
    assert float(delta[1, 10:30].abs().max()) <= ALPHA / math.sqrt(20 * DIM)
    assert torch.equal(delta[1, 30:], torch.zeros_like(delta[1, 30:]))  # padding
    assert torch.equal(embeddings(ids), clean)  # outside a forward the loop announced
    embeddings.eval()
    with noise.lengths(lengths):
        assert torch.equal(embeddings(ids), clean)  # evaluation
    embeddings.train()
    with noise.lengths(lengths[:, :10]), pytest.raises(RuntimeError, match="neftune_noise_alpha"):
        embeddings(ids)
    noise.remove()
    with noise.lengths(lengths):
        assert torch.equal(embeddings(ids), clean)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list:
    """Four of the bundled demo's rows (an image each), their answers made of different lengths."""
    folder = ensure_demo_pairs(tmp_path_factory.mktemp("neftune") / "demo", n=4)
    found, problems = read_custom_file(folder / "train.jsonl")
    assert not problems
    return [
        dataclasses.replace(row, response=" ".join([row.response] * (i + 1))) for i, row in enumerate(found)
    ]


@pytest.mark.parametrize("name", ["minicpm_v2", "qwen2_5_vl"])
def test_each_token_gets_its_samples_length_padded_and_packed(name, family_twin, rows):
    family = get_family(name)
    bundle = family.load_bundle(family_twin(name))
    dataset = family.dataset(bundle, rows, 4096, "delete", ImageFiles())
    samples = [dataset[i] for i in range(len(rows))]
    sizes = sorted(len(sample.input_ids) for sample in samples)
    assert len(set(sizes)) > 1
    for packed in (False, True):
        batch = family.training_collate(bundle, packed=packed)(samples)
        lengths = family.token_sample_lengths(batch)
        assert lengths.shape == batch["input_ids"].shape
        # a sample of n tokens gives n tokens of length n, and padding none
        values, counts = lengths[lengths > 0].unique(return_counts=True)
        found = sorted(
            int(n) for n, count in zip(values, counts, strict=True) for _ in range(int(count) // int(n))
        )
        assert found == sizes and int(counts.sum()) == sum(sizes), (packed, found, sizes)


@pytest.mark.parametrize(
    ("name", "packing"), [("minicpm_v2", "false"), ("qwen2_5_vl", "false"), ("qwen2_5_vl", "true")]
)
def test_sft_with_neftune_evaluates_the_same_and_trains_on_noisy_embeddings(
    name, packing, family_twin, tmp_path
):
    overrides = (
        f"model={name}_tiny",
        f"trainer.packing={packing}",
        "device=cpu",
        "stages=[sft]",
        "dataset.max_rows=12",
        "trainer.max_steps=2",
        "trainer.batch_size=2",
        "trainer.eval_steps=2",
        "trainer.max_eval_samples=2",
        "trainer.logging_steps=1",
        "lora.dropout=0.0",
    )
    for alpha in (None, ALPHA):
        run_stage(
            sft,
            twin_config(family_twin(name), *overrides, f"trainer.neftune_noise_alpha={alpha or 'null'}"),
            tmp_path / str(alpha),
        )
    plain, noisy = (tmp_path / "None" / "sft", tmp_path / str(ALPHA) / "sft")
    assert (
        eval_losses(noisy)[0] == eval_losses(plain)[0]
    )  # the model before training: no noise when evaluating
    assert losses_by_step(noisy)[1] != pytest.approx(losses_by_step(plain)[1], rel=1e-6)
    assert all(math.isfinite(x) for x in losses_by_step(noisy).values())
    assert [r for r in log_records(noisy) if "loss" in r]


def test_a_negative_alpha_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"trainer\.neftune_noise_alpha"):
        validate(compose_config(["trainer.neftune_noise_alpha=-1"]))
