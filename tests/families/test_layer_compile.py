"""The HF-native families' decoder layers compiled for training steps: same loss and gradients as eager, one
traced graph shared by every layer and no graph break inside it (padded and packed rows; the attention kernel's
device check stays out of the graph), evaluation and generation left on the eager layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.testing import CompileCounterWithBackend

from pipeline.families import get_family, vision_attention
from pipeline.families.base import Bundle, messages_from_row
from pipeline.families.layer_compile import compile_for_training, is_compiled_for_training
from tests.families.test_families import nonzero_adapter
from tests.families.test_packing import mixed_samples
from tests.helpers import loss_and_grads

HF_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "minicpm_v4_6")


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (48, 64, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_compiled_layers_give_the_eager_loss_and_gradients_from_one_shared_graph(family_twin, name):
    family = get_family(name)
    model, processor = family.load(family_twin(name))
    torch.manual_seed(0)
    model = family.apply_lora(model, family.lora_config(model, "qkv", r=4, alpha=8, dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    samples = [
        family.encode(processor, messages_from_row("<image>What is it?", "A small red thing."), [picture(0)]),
        family.encode(processor, messages_from_row("<image>Describe it.", "Noise."), [picture(1)]),
    ]
    batch = family.collate_for_training(processor, samples)
    # every layer's input then carries a gradient (without it the first layer's input, straight from the
    # frozen embeddings, does not, and it traces a graph of its own)
    model.enable_input_require_grads()
    model.train()
    eager_loss, eager_grads = loss_and_grads(family, model, batch)

    layers = model.get_base_model().get_submodule(family.decoder_layers)
    # one graph per kind of layer (MiniCPM-V 4.6 mixes full- and linear-attention layers)
    kinds = len(set(getattr(model.config.get_text_config(), "layer_types", None) or ["one"]))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    assert compile_for_training(layers, backend=counter) == len(layers) >= 2
    assert all(is_compiled_for_training(layer) for layer in layers)
    loss, grads = loss_and_grads(family, model, batch)
    assert counter.frame_count == kinds  # one trace serves every layer of a kind
    torch.testing.assert_close(loss, eager_loss)
    assert grads.keys() == eager_grads.keys() and grads
    for key, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[key], msg=key)
    loss_and_grads(family, model, batch)
    assert counter.frame_count == kinds  # the same shape replays the traced graphs

    model.eval()
    with torch.no_grad():
        family.loss_outputs(model, batch)
        family.generate(
            model, processor, family.collate_for_generation(processor, samples[:1]), max_new_tokens=2
        )
    assert counter.frame_count == kinds  # evaluation and generation run the eager layers


def test_the_family_compiles_its_decoder_layers_without_cuda_graphs(family_twin):
    family = get_family("qwen2_5_vl")
    bundle = family.load_bundle(family_twin("qwen2_5_vl"))
    assert family.capabilities.compiles and family.capabilities.compiled_shapes == "packed"
    with pytest.raises(Exception, match="not replayed as CUDA graphs"):
        family.compile_model(bundle, graphs=True)
    n = family.compile_model(bundle, graphs=False)
    layers = bundle.core.get_submodule(family.decoder_layers)
    assert n == len(layers) and all(is_compiled_for_training(layer) for layer in layers)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_compiled_layers_trace_a_packed_row_whole(family_twin, name):
    """A packed row (the training steps' shape on a GPU) through the compiled layers: one graph for every
    layer, no break (the segments' attention is one masked SDPA call off the kernel, not a host loop), and
    the eager packed row's loss and gradients."""
    family, model, collate, samples = packed_training(family_twin, name)
    assert_compiles_whole(family, model, collate(samples))


def packed_training(family_twin, name: str):
    """Returns (family, model with a nonzero LoRA-qkv adapter in training mode, ready to pack; the collate of
    packed rows at static shapes; mixed samples) for a family's twin."""
    family = get_family(name)
    model, processor = family.load(family_twin(name))
    model = nonzero_adapter(family, model, "qkv", seed=0)
    model.enable_input_require_grads()
    model.train()
    family.prepare_packing(model)
    bundle = Bundle(model, processor, family_twin(name), "base")
    collate = family.training_collate(bundle, pad_to_multiple=64, packed=True, segments=8, static=True)
    return family, model, collate, mixed_samples(family, processor)


def test_the_attention_kernels_device_check_stays_out_of_the_compiled_graph(monkeypatch):
    """The varlen kernel's check (compute capability 8.0+) runs inside compiled layers and vision blocks; the
    device query must not become part of their graph (torch.compile ignores functools.cache, and a query it
    cannot trace breaks the graph in every layer): it runs once, outside, and its answer is a constant."""
    calls = []

    def capability(index=None):
        calls.append(index)
        torch._dynamo.graph_break()  # what tracing such a query costs
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(vision_attention, "_CAPABLE", {})

    def step(x: torch.Tensor) -> torch.Tensor:
        return x * 2 if vision_attention.kernel_runs(torch.device("cuda", 0), torch.bfloat16) else x + 1

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    assert torch.equal(torch.compile(step, backend=counter)(torch.ones(2)), torch.full((2,), 2.0))
    assert counter.frame_count == 1 and not torch._dynamo.utils.counters["graph_break"]
    assert calls == [0]


def test_checkpointed_layers_compile_whole_with_the_checkpoint_around_them(family_twin):
    """With activation checkpointing (full fine-tuning, trainer=low_memory) the checkpoint stays outside the
    compiled call: traced inside (transformers checkpointing within `forward`), it is a higher-order op that
    refuses the layer's side effects and the whole layer fell back to eager. The recomputation replays the
    compiled graph; loss and gradients are the eager checkpointed run's."""
    family = get_family("qwen2_5_vl")
    model, processor = family.load(family_twin("qwen2_5_vl"))
    model = nonzero_adapter(family, model, "qkv", seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    batch = family.collate_for_training(processor, mixed_samples(family, processor)[:2])
    assert_compiles_whole(family, model, batch)


def assert_compiles_whole(family, model, batch) -> None:
    """Compiles the model's decoder layers and checks one training step of `batch`: one traced graph for
    every layer, no graph break, the eager step's loss and gradients."""
    eager_loss, eager_grads = loss_and_grads(family, model, batch)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compile_for_training(model.get_base_model().get_submodule(family.decoder_layers), backend=counter)
    loss, grads = loss_and_grads(family, model, batch)
    assert counter.frame_count == 1
    assert not torch._dynamo.utils.counters["graph_break"], list(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(loss, eager_loss)
    assert grads.keys() == eager_grads.keys() and grads
    for key, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[key], rtol=1e-4, atol=1e-5, msg=key)


def test_minicpm_v4_6_packed_row_compiles_around_the_linear_attention_fallback(family_twin):
    """Without flash-linear-attention (the CPU; Hopper under an older Triton) a packed row's linear-attention
    layers run transformers' PyTorch code on a padded batch of the row's samples, whose bounds are read on the
    host. Inside compiled layers that is one deliberate break around it (torch.compiler.disable), not breaks
    at every data-dependent step with a recompile for every packing; the eager packed row's loss and
    gradients."""
    family, model, collate, samples = packed_training(family_twin, "minicpm_v4_6")
    eager_loss, eager_grads = loss_and_grads(family, model, collate(samples))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compile_for_training(model.get_base_model().get_submodule(family.decoder_layers), backend=counter)
    loss, grads = loss_and_grads(family, model, collate(samples))
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert breaks and all("disable" in reason for reason in breaks), list(breaks)
    torch.testing.assert_close(loss, eager_loss)
    assert grads.keys() == eager_grads.keys() and grads
    for key, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[key], rtol=1e-4, atol=1e-5, msg=key)
    # other packings of the same bucket trace nothing new (the graphs after the break settle on the second)
    loss_and_grads(family, model, collate(samples[::-1]))
    frames = counter.frame_count
    for order in (samples[1:] + samples[:1], samples):
        loss_and_grads(family, model, collate(order))
    assert counter.frame_count == frames
