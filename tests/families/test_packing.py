"""Padding-free packing of the HF-native families (pipeline/families/packing.py) on their tiny twins, CPU, fp32:
one packed row scores and trains exactly as the same samples right-padded, with each sample's own positions
and no attention mask built."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import masking_utils

from pipeline.families import get_family, linear_attention, packing
from pipeline.families.base import IGNORE_INDEX, Bundle, messages_from_row
from tests.families.test_families import CONVERSATION, nonzero_adapter, picture

HF_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "minicpm_v4_6")


def mixed_samples(family, processor) -> list:
    """Four conversations of different lengths: one image, text only, two images, a larger image."""
    return [
        family.encode(processor, CONVERSATION, [picture()]),
        family.encode(processor, messages_from_row("Two plus two?", "Four, as always."), []),
        family.encode(
            processor,
            messages_from_row("<image><image>Compare the two.", "Alike in every way."),
            [picture(64, 48, seed=1), picture(32, 32, seed=2)],
        ),
        family.encode(processor, messages_from_row("<image>Colour?", "Blue."), [picture(96, 120, seed=3)]),
    ]


@pytest.fixture(scope="module")
def twins(family_twin) -> dict:
    return {name: family_twin(name) for name in HF_FAMILIES}


def loaded(twins, name: str):
    family = get_family(name)
    model, processor = family.load(twins[name])
    return family, model, processor


def sums_and_grads(family, model, batch) -> tuple[float, int, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = family.loss_outputs(model, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss_sum.detach(), int(out.num_tokens), grads


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("preset", ["qkv", "all"])
@pytest.mark.parametrize("name", HF_FAMILIES)
def test_a_packed_row_gives_the_padded_loss_and_gradients(twins, name, preset):
    """The summed loss, the supervised token count and every trainable gradient of one packed row equal
    those of the same samples right-padded; so with the tail padded to a multiple of 64 and cu_seq_lens
    padded to 8 segments (empty ones). lora=all trains the vision tower and the projector too, and runs
    with activation checkpointing (the packed layers recomputed during backward)."""
    family, model, processor = loaded(twins, name)
    model = nonzero_adapter(family, model, preset, seed=0)
    if preset == "all":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    bundle = Bundle(model, processor, twins[name], "base")
    samples = mixed_samples(family, processor)
    assert len({len(s) for s in samples}) == len(samples)
    padded = family.training_collate(bundle)(samples)
    packed = family.training_collate(bundle, packed=True)(samples)
    tailed = family.training_collate(bundle, pad_to_multiple=64, packed=True, segments=8)(samples)
    assert packed["input_ids"].shape == (1, sum(len(s) for s in samples))
    assert tailed["input_ids"].shape[1] % 64 == 0 and tailed["cu_seq_lens_q"].shape == (9,)

    want_loss, want_tokens, want = sums_and_grads(family, model, padded)
    groups = family.freeze_groups()
    for batch in (packed, tailed):
        loss, tokens, got = sums_and_grads(family, model, batch)
        assert tokens == want_tokens > 20
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        assert got.keys() == want.keys() and len(want) > 0
        for n in want:  # fp32 sums in another order: within 1e-4 of each gradient's largest entry
            scale = float(want[n].abs().max()) + 1e-8
            torch.testing.assert_close(
                got[n], want[n], rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=n: f"{n}: {m}"
            )
        if preset == "all":
            for group in ("vision", "projector"):
                names = [n for n in want if groups.of(n.removeprefix("base_model.model.")) == group]
                assert names, group
                a = torch.cat([got[n].flatten() for n in names])
                b = torch.cat([want[n].flatten() for n in names])
                assert cosine(a, b) >= 0.999, (group, cosine(a, b))


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_packed_positions_are_each_samples_own(twins, name):
    """Every sample's positions in the packed row are the ones the model gives it alone (the Qwen VLs'
    mRoPE rows after a text row of 0, 1, 2, ...; MiniCPM-V 4.6's plain 0, 1, 2, ...); the tail restarts
    at 0 and is its own segment; no sample's first token is predicted."""
    family, model, processor = loaded(twins, name)
    bundle = Bundle(model, processor, twins[name], "base")
    samples = mixed_samples(family, processor)
    batch = family.training_collate(bundle, pad_to_multiple=64, packed=True)(samples)
    lengths = [len(s) for s in samples]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    total, length = sum(lengths), batch["input_ids"].shape[1]
    assert batch["cu_seq_lens_q"].tolist() == [*starts, total, length]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == max(lengths)
    assert batch["num_samples"] == len(samples) and int(batch["attention_mask"].sum()) == total
    assert all(int(batch["labels"][0, s]) == IGNORE_INDEX for s in starts)
    positions = batch["position_ids"]
    rows = positions if positions.ndim == 3 else positions.unsqueeze(1)
    assert rows.shape[1:] == (1, length)
    assert torch.equal(rows[:, 0, total:], torch.arange(length - total).expand(rows.shape[0], -1))
    for sample, start, n in zip(samples, starts, lengths, strict=True):
        own = rows[:, 0, start : start + n]
        assert torch.equal(own[0], torch.arange(n))
        if name == "minicpm_v4_6":
            assert own.shape[0] == 1  # the text model repeats it on its four rows, as for a sample alone
            continue
        ids = torch.tensor([sample.input_ids])
        alone, _ = model.model.get_rope_index(
            ids,
            torch.tensor([sample.token_inputs["mm_token_type_ids"]]),
            image_grid_thw=sample.pixel_inputs.get("image_grid_thw"),
        )
        assert torch.equal(own[1:], alone[:, 0]), name


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_a_packed_forward_builds_no_mask_and_padded_ones_keep_sdpa(twins, name, monkeypatch, tmp_path):
    """A packed forward attends by segments: no attention mask reaches any attention layer and no mask is
    built; unpacked batches on the same model (after packing was enabled) still get SDPA's mask, the same
    logits, and the same greedy answers; a saved model never names the packed attention."""
    family, model, processor = loaded(twins, name)
    bundle = Bundle(model, processor, twins[name], "base")
    samples = mixed_samples(family, processor)
    padded = family.collate_for_training(processor, samples)
    prompt = family.collate_for_generation(
        processor, [family.encode(processor, CONVERSATION[:2], [picture()], generation=True)]
    )
    with torch.no_grad():
        before = model(**{k: v for k, v in padded.items() if k != "labels"}).logits
        answer = family.generate(model, processor, prompt, max_new_tokens=4)
    built, calls = [], []
    real_mask = masking_utils.sdpa_mask

    def mask_spy(*args, **kwargs):
        mask = real_mask(*args, **kwargs)
        built.append(mask)
        return mask

    def attention_spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((attention_mask, "cu_seq_lens_q" in kwargs))
        return packing.packed_attention(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(masking_utils, "sdpa_mask", mask_spy)
    packed = family.training_collate(bundle, packed=True)(samples)
    family.prepare_packing(model)
    from transformers import AttentionInterface

    AttentionInterface.register(packing.PACKED, attention_spy)
    try:
        with torch.no_grad():
            family.loss_outputs(model, packed)
            assert built == [] and calls and all(mask is None and cu for mask, cu in calls), calls
            calls.clear()
            after = model(**{k: v for k, v in padded.items() if k != "labels"}).logits
    finally:
        packing.register()
    assert any(mask is not None and mask.ndim == 4 for mask in built)  # the padded batch's mask
    assert calls and not any(cu for _, cu in calls)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert family.generate(model, processor, prompt, max_new_tokens=4) == answer
    family.save(model, processor, tmp_path / "saved")
    assert packing.PACKED not in (tmp_path / "saved" / "config.json").read_text()


def test_the_segment_attention_equals_causal_sdpa_per_sample():
    """The CPU path of the packed attention: causal within each segment, grouped key/value heads, empty
    segments skipped."""
    torch.manual_seed(0)
    bounds = [0, 5, 5, 12, 16, 16]
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    module = torch.nn.Module().eval()
    out, _ = packing.packed_attention(
        module, q, k, v, None, cu_seq_lens_q=torch.tensor(bounds, dtype=torch.int32), max_length_q=7
    )
    for start, end in zip(bounds, bounds[1:], strict=False):
        if end > start:
            s = slice(start, end)
            want = F.scaled_dot_product_attention(
                q[:, :, s], k[:, :, s], v[:, :, s], is_causal=True, enable_gqa=True
            )
            torch.testing.assert_close(out[0, s], want[0].transpose(0, 1))


def test_the_packed_attention_computes_in_autocasts_precision_as_sdpa_does(monkeypatch):
    """fp32 queries under autocast (full fine-tuning's fp32 weights, RoPE's fp32 tables) are attended in
    autocast's dtype, as the padded path's SDPA attends them, and come back in it: the varlen kernel is
    asked for that dtype (on a GPU: bf16, which it takes; fp32 it does not); without autocast they stay
    fp32 (the CPU's training)."""
    asked: list[torch.dtype] = []
    monkeypatch.setattr(packing, "kernel_runs", lambda device, dtype: asked.append(dtype) or False)
    torch.manual_seed(0)
    bounds = torch.tensor([0, 6, 16], dtype=torch.int32)
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    module = torch.nn.Module().eval()
    plain, _ = packing.packed_attention(module, q, k, v, None, cu_seq_lens_q=bounds, max_length_q=10)
    assert plain.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, _ = packing.packed_attention(module, q, k, v, None, cu_seq_lens_q=bounds, max_length_q=10)
        for start, end in ((0, 6), (6, 16)):
            s = slice(start, end)
            want = F.scaled_dot_product_attention(
                q[:, :, s], k[:, :, s], v[:, :, s], is_causal=True, enable_gqa=True
            )
            assert want.dtype == cast.dtype == torch.bfloat16
            torch.testing.assert_close(cast[0, s], want[0].transpose(0, 1), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(cast.float(), plain, rtol=5e-2, atol=5e-2)
    assert asked == [torch.float32, torch.bfloat16]


def test_linear_attention_layers_are_wrapped_once(twins):
    family, model, _ = loaded(twins, "minicpm_v4_6")
    language_model = family.language_model(model)
    assert linear_attention.enable(language_model) == linear_attention.enable(language_model) >= 1
    wrapped = [m.forward for m in language_model.modules() if linear_attention._is_gated_delta_net(m)]
    assert all(f.args[0] is not None and f.func is linear_attention._packed_or_plain for f in wrapped)
    assert not any(isinstance(f.args[1], type(f)) for f in wrapped)  # never a wrapper of a wrapper


def test_too_many_samples_for_the_fixed_segments_are_refused(twins):
    family, model, processor = loaded(twins, "qwen2_5_vl")
    bundle = Bundle(model, processor, twins["qwen2_5_vl"], "base")
    collate = family.training_collate(bundle, pad_to_multiple=64, packed=True, segments=3)
    with pytest.raises(ValueError, match="needs 5 segments; only 3 were asked for"):
        collate(mixed_samples(family, processor))


def fake_fla(monkeypatch, calls: list) -> None:
    """Installs stand-ins for the two fla functions `_fla_forward` calls, computed per segment with PyTorch
    (transformers' gated delta rule, a depthwise causal convolution), recording what each call was handed."""
    import sys
    import types

    from transformers.models.qwen3_5 import modeling_qwen3_5 as modeling

    rule = inspect.unwrap(modeling.torch_chunk_gated_delta_rule)

    def spans(kwargs):
        bounds = kwargs["cu_seqlens_cpu"].tolist()
        return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]

    def causal_conv1d(x, weight, bias=None, activation=None, **kwargs):
        calls.append(("conv", kwargs))
        width = weight.shape[1]
        outs = []
        for a, b in spans(kwargs):
            seg = x[:, a:b].transpose(1, 2)
            y = F.conv1d(seg, weight.unsqueeze(1), bias, padding=width - 1, groups=weight.shape[0])
            outs.append(y[..., : b - a].transpose(1, 2))
        out = torch.cat(outs, dim=1)
        return (F.silu(out) if activation in ("silu", "swish") else out), None

    def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False, **kwargs):
        calls.append(("rule", kwargs))
        outs = [
            rule(
                q[:, a:b], k[:, a:b], v[:, a:b], g=g[:, a:b], beta=beta[:, a:b], use_qk_l2norm_in_kernel=True
            )[0]
            for a, b in spans(kwargs)
        ]
        return torch.cat(outs, dim=1), None

    for name, attrs in {
        "fla": {},
        "fla.modules": {},
        "fla.modules.convolution": {"causal_conv1d": causal_conv1d},
        "fla.ops": {},
        "fla.ops.gated_delta_rule": {"chunk_gated_delta_rule": chunk_gated_delta_rule},
    }.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(__name__=name, **attrs))


def test_fla_forward_hands_every_layer_of_a_row_one_prepared_set_of_bounds(twins, monkeypatch):
    """MiniCPM-V 4.6's linear-attention layers on fla's kernels (here PyTorch stand-ins of the same contract)
    equal each sample run alone, and every layer of a packed row is handed the same bounds tensors, built
    once from one read of the row's bounds: int64 on the device, int64 on the host, and the chunk table
    (segment, chunk within it) for fla's 64-token chunks. Without them fla reads the bounds back to the host
    in every call, a stream sync each time."""
    family, model, _ = loaded(twins, "minicpm_v4_6")
    layers = [m for m in model.modules() if linear_attention._is_gated_delta_net(m)][:2]
    calls: list = []
    fake_fla(monkeypatch, calls)
    built = []
    monkeypatch.setattr(linear_attention, "chunk_indices", lambda b, c=64: built.append(b) or table(b, c))
    torch.manual_seed(0)
    hidden = torch.randn(1, 150, model.config.get_text_config().hidden_size)
    bounds = [0, 40, 41, 110, 150, 150]  # a one-token sample and an empty tail segment
    cu = torch.tensor(bounds, dtype=torch.int32)
    with torch.no_grad():
        for layer in layers:
            got = linear_attention._fla_forward(layer, hidden, cu)
            want = torch.cat(
                [layer(hidden[:, a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a], 1
            )
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert len(built) == 1 and len(calls) == 2 * len(layers)
        first = calls[0][1]
        assert all(all(c[1][key] is first[key] for key in first) for c in calls)
        assert first["cu_seqlens"].dtype == first["cu_seqlens_cpu"].dtype == torch.int64
        assert first["cu_seqlens_cpu"].device.type == "cpu" and first["cu_seqlens_cpu"].tolist() == bounds
        assert first["chunk_indices"].tolist() == [[0, 0], [1, 0], [2, 0], [2, 1], [3, 0]]
        linear_attention._fla_forward(layers[0], hidden, cu.clone())  # another row: built anew
    assert len(built) == 2


table = linear_attention.chunk_indices


def test_the_chunk_table_lists_every_chunk_of_every_segment():
    bounds = torch.tensor([0, 64, 65, 65, 300, 428], dtype=torch.int32)
    want = [
        [s, c]
        for s, (a, b) in enumerate(zip(bounds.tolist(), bounds.tolist()[1:], strict=False))
        for c in range(-(-(b - a) // 64))
    ]
    assert linear_attention.chunk_indices(bounds).tolist() == want
    assert linear_attention.chunk_indices(bounds, 16).shape == (4 + 1 + 0 + 15 + 8, 2)


def test_static_lengths_pad_rows_by_less_than_a_quarter_and_stay_few():
    """Compiled layers take packed rows at a few static lengths: four lengths per doubling in multiples of 128,
    from a quarter of the bucket (a quarter of the budget) up, so that a row is padded by less than a quarter
    of its length whatever its share of the budget (MiniCPM-V 4.6: most of its budget is vision patches;
    Qwen3-VL's 16 rows of a step: ~5,800 tokens of a 16384 budget went to 8,192 at multiples of the bucket),
    and a run compiles few lengths."""
    bucket = 4096
    lengths = {packing.static_length(n, bucket) for n in range(1, 3 * bucket + 1)}
    for n in range(1, 3 * bucket + 1, 7):
        got = packing.static_length(n, bucket)
        assert got >= n and got % 128 == 0
        if n > bucket // 4:
            assert got - n < n // 4
    assert packing.static_length(1108, bucket) == 1280 and packing.static_length(5000, bucket) == 5120
    assert packing.static_length(300, bucket) == 1024 == packing.static_length(1024, bucket)
    below = [1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584]
    assert sorted(lengths) == [*below, 4096, 5120, 6144, 7168, 8192, 10240, 12288]
    assert packing.static_length(4432, 16384) == 5120  # 16 MiniCPM-V 4.6 rows in a 65536-token budget
    assert packing.static_length(5770, 4096) == 6144  # 16 Qwen3-VL rows in a 16384-token budget
    assert packing.static_length(77, 1) == 77


def test_minicpm_v4_6_keeps_its_patch_grids_on_the_host(twins):
    """The batch mover keeps MiniCPM-V 4.6's per-slice patch grids (`target_sizes`) on the host, where its
    vision tower and merger read them slice by slice (on a GPU each read of a device tensor is a stream
    sync); every other tensor moves. (The GPU tests train it this way against the padded batch.)"""
    family, _, processor = loaded(twins, "minicpm_v4_6")
    batch = family.collate_for_training(processor, mixed_samples(family, processor))
    moved = family.to_device(batch, "meta")
    assert moved["target_sizes"].device.type == "cpu" and moved["input_ids"].device.type == "meta"
    assert moved["pixel_values"].device.type == "meta"
    assert get_family("qwen2_5_vl").to_device(batch, "meta")["target_sizes"].device.type == "meta"


def test_cpu_rows_run_pytorch_code_where_kernel_packages_are_installed(twins, monkeypatch):
    """On a GPU machine with fla installed, transformers 5.24's Qwen3.5 code hands CPU tensors to fla's Triton
    kernels, which refuse them (the tiny twin is built on the CPU there). MiniCPM-V 4.6's linear-attention
    layers run CPU rows, unpacked and packed, on transformers' PyTorch code where kernel packages are
    installed: here stand-ins that refuse CPU tensors as Triton does."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as modeling

    family, model, processor = loaded(twins, "minicpm_v4_6")
    bundle = Bundle(model, processor, twins["minicpm_v4_6"], "base")
    samples = mixed_samples(family, processor)
    padded = family.training_collate(bundle)(samples)
    with torch.no_grad():
        want = family.loss_outputs(model, padded).loss_sum

    def refusing(name):
        @functools.wraps(getattr(modeling, name))  # __wrapped__: transformers' function, as a kernel has
        def kernel(*args, **kwargs):
            raise ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")

        return kernel

    for name in linear_attention.KERNEL_FUNCTIONS:
        monkeypatch.setattr(modeling, name, refusing(name))
    with torch.no_grad(), pytest.raises(ValueError, match="cannot be accessed from Triton"):
        family.loss_outputs(model, padded)  # wrapped when no kernel package was found: the stand-ins run
    monkeypatch.setattr(linear_attention, "fla_installed", lambda: True)
    model, processor = family.load(twins["minicpm_v4_6"])  # auto on the CPU, the packages now "installed"
    assert linear_attention.choice_of(family.language_model(model)) == "auto"
    bundle = Bundle(model, processor, twins["minicpm_v4_6"], "base")
    with torch.no_grad():
        for batch in (padded, family.training_collate(bundle, packed=True)(samples)):
            torch.testing.assert_close(family.loss_outputs(model, batch).loss_sum, want)


def test_kernel_packages_are_looked_up_when_the_layers_are_wrapped_not_in_their_forwards(twins, monkeypatch):
    """The lookup (importlib) inside a compiled decoder layer split its graph at every linear-attention layer:
    it happens when the layers are wrapped (at load, and once more when the first packed row switches the
    model to packing), and no forward, packed or not, looks again."""
    family, model, processor = loaded(twins, "minicpm_v4_6")
    lookups: list[int] = []
    monkeypatch.setattr(linear_attention, "fla_installed", lambda: lookups.append(1) or False)
    assert linear_attention.enable(family.language_model(model)) >= 1 and len(lookups) == 1
    bundle = Bundle(model, processor, twins["minicpm_v4_6"], "base")
    samples = mixed_samples(family, processor)
    batches = [
        family.training_collate(bundle)(samples),
        family.training_collate(bundle, packed=True)(samples),
    ]
    with torch.no_grad():
        for batch in batches:
            family.loss_outputs(model, batch)
        wrapped = len(lookups)  # the first packed row wrapped the layers for packing
        for batch in batches:
            family.loss_outputs(model, batch)
    assert wrapped == len(lookups) == 2
