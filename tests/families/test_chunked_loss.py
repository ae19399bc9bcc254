"""The loss of many supervised positions a chunk at a time (pipeline/families/chunked_loss.py,
model.chunked_loss) on the HF-native families' tiny twins, CPU, fp32: the summed loss, the correct
predictions, every gradient (the output head's included) and each sample's log-probability equal those of
the logits computed in one piece, padded and packed, with gradients and without; the head never sees more
than a chunk of positions at once. MiniCPM-V-2's own loss (MiniCPMV.position_losses) likewise against its
slices without the recompute, and through the sft stage."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.families import chunked_loss, get_family
from pipeline.families.base import Bundle
from pipeline.families.hf_native import unwrapped
from pipeline.families.minicpm_v2.modeling import MiniCPMV
from pipeline.stages import sft
from tests.families.test_families import nonzero_adapter
from tests.families.test_model import batch as minicpm_v2_batch
from tests.families.test_model import small_config as minicpm_v2_config
from tests.families.test_packing import HF_FAMILIES, mixed_samples
from tests.helpers import losses_by_step, run_stage, twin_config

CHUNK = 5  # positions a chunk holds in these tests


@pytest.fixture(scope="module")
def twins(family_twin) -> dict:
    return {name: family_twin(name) for name in HF_FAMILIES}


def chunk_every_batch(monkeypatch, vocab: int) -> None:
    """Makes auto chunk every batch, CHUNK positions at a time."""
    monkeypatch.setattr(chunked_loss, "LOGITS_BYTES", 0)
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", CHUNK * 4 * vocab)


def record_head_calls(model: nn.Module) -> list[int]:
    """Returns a list that gets the number of positions of each computation of the output head's forward."""
    core = unwrapped(model)  # MiniCPM-V-2's model keeps its head in its llm
    head = core.llm.lm_head if isinstance(core, MiniCPMV) else core.get_output_embeddings()
    forward = head.forward
    seen: list[int] = []

    def counted(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(hidden.numel() // hidden.shape[-1])
        return forward(hidden)

    head.forward = counted
    return seen


def scores(family, model, batch) -> tuple[torch.Tensor, int, int, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = family.loss_outputs(model, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss_sum.detach(), int(out.num_tokens), int(out.num_correct), grads


@pytest.mark.parametrize("preset", ["all", "full"])
@pytest.mark.parametrize("name", HF_FAMILIES)
def test_a_chunked_loss_equals_the_one_piece_loss_and_gradients(twins, name, preset, monkeypatch):
    """Padded and packed batches: the same sums, correct count and gradients (LoRA on every linear layer, or
    every weight trained, the head's included), with gradients and without; each sample's summed
    log-probability (preference training) too."""
    family = get_family(name)
    model, processor = family.load(twins[name])
    if preset == "all":
        model = nonzero_adapter(family, model, preset, seed=0)
    else:
        model.requires_grad_(True)
    model.train()
    bundle = Bundle(model, processor, twins[name], "base")
    samples = mixed_samples(family, processor)
    batches = {
        "padded": family.training_collate(bundle)(samples),
        "packed": family.training_collate(bundle, packed=True)(samples),
    }
    vocab = unwrapped(model).config.get_text_config().vocab_size
    seen = record_head_calls(model)
    for kind, batch in batches.items():
        family.chunked_loss = "off"
        want_loss, want_tokens, want_correct, want = scores(family, model, batch)
        want_logps = family.sequence_logps(model, batch).logps.detach()
        with torch.no_grad():
            want_eval = family.loss_outputs(model, batch)
        positions = max(seen)
        assert positions > 2 * CHUNK, (kind, seen)  # one piece of every supervised position

        family.chunked_loss = "auto"
        with monkeypatch.context() as patch:
            chunk_every_batch(patch, vocab)
            seen.clear()
            loss, tokens, correct, got = scores(family, model, batch)
            # the forward's chunks, then each one again in the backward
            assert max(seen) <= CHUNK and sum(seen) == 2 * positions, (kind, seen)
            logps = family.sequence_logps(model, batch).logps.detach()
            with torch.no_grad():
                seen.clear()
                evaluated = family.loss_outputs(model, batch)
                assert max(seen) <= CHUNK and sum(seen) == positions, (kind, seen)
        assert (tokens, correct) == (want_tokens, want_correct) and tokens > 20
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logps, want_logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(evaluated.loss_sum, want_eval.loss_sum, rtol=1e-5, atol=1e-5)
        assert int(evaluated.num_correct) == int(want_eval.num_correct)
        assert got.keys() == want.keys() and len(want) > 0
        if preset == "full":  # the head's weight (tied to the embedding or not) is among the gradients
            weight = unwrapped(model).get_output_embeddings().weight
            assert [n for n, p in model.named_parameters() if p is weight][0] in want
        # fp32 sums in another order: within 1e-4 of each gradient's largest entry (and 1e-7: a key
        # projection's bias has a zero gradient in exact arithmetic, rounding noise here)
        for n in want:
            scale = float(want[n].abs().max())
            torch.testing.assert_close(
                got[n],
                want[n],
                rtol=1e-4,
                atol=1e-4 * scale + 1e-7,
                msg=lambda m, n=n, k=kind: f"{k} {n}: {m}",
            )
    head = unwrapped(model).get_output_embeddings()
    assert head.forward.__name__ == "counted"  # the chunking put back what it found


def test_minicpm_v2s_own_loss_in_chunks_equals_its_slices(monkeypatch):
    """MiniCPM-V-2's model sums its loss itself (every weight trained, the head's included): scored in
    chunks with the recompute (loss_chunking=auto, as the family passes model.chunked_loss) its sums, correct
    count, gradients, each sample's sum (preference training) and the no-grad sums equal those of its
    slices without the recompute (off)."""
    torch.manual_seed(0)
    model = MiniCPMV(minicpm_v2_config()).train()
    ids, pixels, bounds, labels = minicpm_v2_batch()
    inputs = {"input_ids": ids, "pixel_values": pixels, "image_bound": bounds, "labels": labels}
    positions = int((labels[:, 1:] != -100).sum())
    seen = record_head_calls(model)

    def run(mode: str) -> tuple:
        model.zero_grad()
        out = model(**inputs, loss_chunking=mode)
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        sums = model(**inputs, sample_sums=True, loss_chunking=mode).sample_loss_sum.detach()
        with torch.no_grad():
            evaluated = model(**inputs, loss_chunking=mode).loss_sum
        return out.loss_sum.detach(), int(out.num_correct), grads, sums, evaluated

    monkeypatch.setattr("pipeline.families.minicpm_v2.modeling.LOSS_CHUNK_ROWS", 7)
    want_loss, want_correct, want, want_sums, want_eval = run("off")
    assert max(seen) == 7 and positions > 2 * CHUNK  # its slices, each computed once
    chunk_every_batch(monkeypatch, 300)
    seen.clear()
    loss, correct, got, sums, evaluated = run("auto")
    # the loss's chunks forward and again in the backward, then each sample's sums' and the eval's forward
    assert max(seen) <= CHUNK and sum(seen) == 4 * positions, seen
    assert correct == want_correct
    for a, b in ((loss, want_loss), (sums, want_sums), (evaluated, want_eval)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys() and "llm.lm_head.weight" in want
    for n in want:
        scale = float(want[n].abs().max())
        torch.testing.assert_close(
            got[n], want[n], rtol=1e-4, atol=1e-4 * scale + 1e-7, msg=lambda m, n=n: f"{n}: {m}"
        )


def test_auto_chunks_only_large_unsharded_logits():
    vocab = 151_936
    most = chunked_loss.LOGITS_BYTES // (4 * vocab)  # the most positions auto leaves in one piece
    assert chunked_loss.chunk_positions("auto", most, vocab, one_piece=False) == 0
    chunk = chunked_loss.chunk_positions("auto", 16_384, vocab, one_piece=False)
    assert chunk == chunked_loss.CHUNK_BYTES // (4 * vocab) and 0 < chunk < most
    assert chunked_loss.chunk_positions("auto", 16_384, vocab, one_piece=True) == 0
    assert chunked_loss.chunk_positions("off", 16_384, vocab, one_piece=False) == 0
    with pytest.raises(ValueError, match="model.chunked_loss=on .*auto, off"):
        chunked_loss.chunk_positions("on", 16_384, vocab, one_piece=False)


def test_a_model_that_scales_or_caps_its_logits_keeps_them_in_one_piece():
    assert not chunked_loss.transforms_logits(SimpleNamespace(vocab_size=8))
    assert not chunked_loss.transforms_logits(SimpleNamespace(logit_scale=1.0, final_logit_softcapping=None))
    assert chunked_loss.transforms_logits(SimpleNamespace(final_logit_softcapping=30.0))
    assert chunked_loss.transforms_logits(SimpleNamespace(logit_scale=0.0625))


def test_sharded_weights_are_seen_through_wrappers():
    head = nn.Linear(4, 8)
    plain = nn.Sequential(head)

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    class FullyShardedDataParallel(Wrapper):  # FSDP's class, by name
        pass

    class DistributedDataParallel(Wrapper):  # by name: DDP replicates, shards nothing
        pass

    assert not chunked_loss.holds_sharded_weights(plain, head)
    assert not chunked_loss.holds_sharded_weights(DistributedDataParallel(plain), head)
    assert chunked_loss.holds_sharded_weights(DistributedDataParallel(FullyShardedDataParallel(plain)), head)
    head.weight.ds_id = 3  # a DeepSpeed ZeRO-3 partition
    assert chunked_loss.holds_sharded_weights(plain, head)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "minicpm_v2"])
def test_the_sft_stage_trains_the_same_with_the_loss_in_chunks(
    name, family_twin, tmp_path, monkeypatch, caplog
):
    """Through the sft stage (LoRA on every linear layer, the token budget's packed micro-batches): the
    logged losses of chunked and one-piece runs are equal, and the log says once that the loss is chunked;
    `model.chunked_loss=off` turns it off."""
    twin = family_twin(name)
    overrides = (f"model={name}_tiny", "device=cpu", "+experiment=lora_all", "trainer.max_steps=2")
    overrides += ("trainer.logging_steps=1", "trainer.eval_steps=100", "trainer.save_steps=100")
    overrides += ("trainer.packing=true", "lora.dropout=0.0")
    config = json.loads((twin / "config.json").read_text())
    chunk_every_batch(monkeypatch, config.get("text_config", config)["vocab_size"])
    seen: list[int] = []
    scored = chunked_loss._scored

    def counted(forward, hidden, labels):
        seen.append(hidden.shape[0])
        return scored(forward, hidden, labels)

    monkeypatch.setattr(chunked_loss, "_scored", counted)
    monkeypatch.setattr(chunked_loss, "_told", set())
    losses = {}
    for mode in ("auto", "off"):
        seen.clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.families.chunked_loss"):
            run_stage(sft, twin_config(twin, *overrides, f"model.chunked_loss={mode}"), tmp_path / mode)
        losses[mode] = losses_by_step(tmp_path / mode / "sft")
        assert (max(seen, default=0) == CHUNK) == (mode == "auto"), (mode, seen[:5])
        said = [r.getMessage() for r in caplog.records if "scored 5 positions at a time" in r.getMessage()]
        assert len(said) == (mode == "auto"), said  # the log says so, once
    assert sorted(losses["auto"]) == [1, 2]
    assert losses["auto"] == pytest.approx(losses["off"], rel=1e-5)
