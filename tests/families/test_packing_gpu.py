"""GPU checks of padding-free packing (`pytest -m gpu` on a CUDA machine): torch's varlen kernel and
flash-linear-attention's variable-length kernels give what the per-sample paths the CPU tests cover give,
and a packed row trains as the padded batch in bf16."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pipeline.families import get_family, linear_attention, packing
from pipeline.families.base import Bundle
from tests.families.test_packing import HF_FAMILIES, cosine, mixed_samples, sums_and_grads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def skip_unless_fla_trains() -> None:
    """Skips where fla is missing, or refuses to train on this GPU (its own check: Hopper under Triton
    3.4-3.7.0); model.linear_attention=auto then runs transformers' PyTorch code, which other tests cover."""
    if importlib.util.find_spec("fla") is None:
        pytest.skip("flash-linear-attention is not installed")
    failure = linear_attention.fla_trains(torch.device("cuda", torch.cuda.current_device()))
    if failure is not None:
        pytest.skip(f"flash-linear-attention does not train on this GPU: {failure}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_varlen_kernel_equals_causal_sdpa_per_segment(dtype):
    """Causal within each segment, grouped key/value heads, empty segments (fixed-size cu_seq_lens)."""
    if not packing.kernel_runs(torch.device("cuda"), dtype):
        pytest.skip("torch's varlen kernel does not run on this card / torch")
    torch.manual_seed(0)
    bounds = [0, 37, 37, 200, 256, 256]
    q = torch.randn(256, 8, 64, device="cuda", dtype=dtype)
    k, v = (torch.randn(256, 2, 64, device="cuda", dtype=dtype) for _ in range(2))
    cu = torch.tensor(bounds, device="cuda", dtype=torch.int32)
    got = packing._kernel_attention(q, k, v, cu, 163, 64**-0.5)
    want = packing._segment_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), bounds, 64**-0.5, 0.0
    )
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_fla_linear_attention_equals_the_per_sample_layer(family_twin):
    """MiniCPM-V 4.6's GatedDeltaNet layer on fla's variable-length kernels equals the layer run one sample
    at a time (outputs and input gradients), empty segments included."""
    skip_unless_fla_trains()
    family = get_family("minicpm_v4_6")
    model, _ = family.load(family_twin("minicpm_v4_6"), torch.float32, "cuda")
    layer = next(m for m in model.modules() if linear_attention._is_gated_delta_net(m))
    torch.manual_seed(0)
    hidden = torch.randn(1, 150, model.config.get_text_config().hidden_size, device="cuda")
    bounds = [0, 40, 41, 110, 150, 150]
    cu = torch.tensor(bounds, device="cuda", dtype=torch.int32)
    outs, grads = [], []
    for fla in (True, False):
        h = hidden.clone().requires_grad_(True)
        if fla:
            out = linear_attention._fla_forward(layer, h, cu)
        else:
            out = torch.cat(
                [layer(h[:, a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a], dim=1
            )
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(h.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-2, atol=1e-3)
    assert cosine(grads[0], grads[1]) > 0.999
    # the chunk table handed to fla (built once per row on the host) is the one fla derives itself
    from fla.ops.utils.index import prepare_chunk_indices

    want = prepare_chunk_indices(cu.long(), linear_attention.FLA_CHUNK).cpu()
    assert torch.equal(linear_attention.chunk_indices(cu.cpu()), want)


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_a_packed_row_trains_as_the_padded_batch_in_bf16(family_twin, name):
    family = get_family(name)
    folder = family_twin(name)
    model, processor = family.load(folder, torch.bfloat16, "cuda")
    model = family.apply_lora(model, family.lora_config(model, "all", r=4, alpha=8, dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    bundle = Bundle(model, processor, folder, "base")
    samples = mixed_samples(family, processor)

    def on_cuda(batch: dict) -> dict:
        return family.to_device(batch, "cuda")  # as the training loop moves it (host_inputs stay)

    want_loss, want_tokens, want = sums_and_grads(
        family, model, on_cuda(family.training_collate(bundle)(samples))
    )
    packed = family.training_collate(bundle, pad_to_multiple=128, packed=True, segments=8)(samples)
    loss, tokens, got = sums_and_grads(family, model, on_cuda(packed))
    assert tokens == want_tokens
    assert float(loss) == pytest.approx(float(want_loss), rel=2e-2)
    a = torch.cat([got[n].float().flatten() for n in want])
    b = torch.cat([want[n].float().flatten() for n in want])
    assert cosine(a, b) > 0.99


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_compiled_layers_trace_a_packed_row_whole_over_the_varlen_kernel(family_twin, name):
    """The training step's shape on the GPU (bf16, a static packed row, torch's varlen kernel): one graph for
    every decoder layer, no graph break, and the eager row's loss."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from pipeline.families.layer_compile import compile_for_training
    from tests.families.test_families import nonzero_adapter

    if not packing.kernel_runs(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch's varlen kernel does not run on this card / torch")
    family = get_family(name)
    folder = family_twin(name)
    model, processor = family.load(folder, torch.bfloat16, "cuda")
    model = nonzero_adapter(family, model, "qkv", seed=0)
    model.enable_input_require_grads()
    model.train()
    family.prepare_packing(model)
    collate = family.training_collate(
        Bundle(model, processor, folder, "base"), pad_to_multiple=64, packed=True, segments=8, static=True
    )
    batch = family.to_device(collate(mixed_samples(family, processor)), "cuda")
    eager, _, _ = sums_and_grads(family, model, batch)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compile_for_training(model.get_base_model().get_submodule(family.decoder_layers), backend=counter)
    loss, _, _ = sums_and_grads(family, model, batch)
    assert counter.frame_count == 1, counter.frame_count
    assert not torch._dynamo.utils.counters["graph_break"], list(torch._dynamo.utils.counters["graph_break"])
    assert float(loss) == pytest.approx(float(eager), rel=1e-2)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_fp32_weights_under_autocast_take_the_varlen_kernel(family_twin, name, monkeypatch):
    """Full fine-tuning's step (fp32 weights, bf16 autocast): the packed row's attention runs torch's varlen
    kernel in bf16, as SDPA computes the padded batch's, not fp32 block-diagonal math; compiled, one graph
    for every decoder layer, no graph break; the padded batch's loss."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from pipeline.families.layer_compile import compile_for_training

    if not packing.kernel_runs(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch's varlen kernel does not run on this card / torch")
    family = get_family(name)
    folder = family_twin(name)
    model, processor = family.load(folder, torch.float32, "cuda")
    model.requires_grad_(True)
    model.train()
    family.prepare_packing(model)
    bundle = Bundle(model, processor, folder, "base")
    samples = mixed_samples(family, processor)
    padded = family.to_device(family.training_collate(bundle)(samples), "cuda")
    packed = family.to_device(
        family.training_collate(bundle, pad_to_multiple=64, packed=True, segments=8, static=True)(samples),
        "cuda",
    )
    asked: list[torch.dtype] = []
    real = packing._kernel_attention

    def recorded(q, *args, **kwargs):
        asked.append(q.dtype)
        return real(q, *args, **kwargs)

    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = float(family.loss_outputs(model, padded).loss_sum)
        monkeypatch.setattr(packing, "_kernel_attention", recorded)
        eager = float(family.loss_outputs(model, packed).loss_sum)
        monkeypatch.setattr(packing, "_kernel_attention", real)
    assert asked and set(asked) == {torch.bfloat16}
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compile_for_training(model.get_submodule(family.decoder_layers), backend=counter)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        compiled = float(family.loss_outputs(model, packed).loss_sum)
    assert counter.frame_count == 1, counter.frame_count
    assert not torch._dynamo.utils.counters["graph_break"], list(torch._dynamo.utils.counters["graph_break"])
    assert eager == pytest.approx(want, rel=2e-2) and compiled == pytest.approx(eager, rel=1e-2)
