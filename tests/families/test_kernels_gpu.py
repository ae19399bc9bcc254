"""GPU checks of the kernel levers (`pytest -m gpu` on a CUDA machine): liger-kernel's fused norms and MLPs,
and MiniCPM-V 4.6's flash-linear-attention kernels, give the loss and the LoRA gradients of transformers' own
modules within bf16 rounding, on every HF-native family's tiny twin."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pipeline.families import get_family
from tests.families.test_families import nonzero_adapter
from tests.families.test_packing import HF_FAMILIES, cosine, mixed_samples, sums_and_grads
from tests.families.test_packing_gpu import skip_unless_fla_trains

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def loss_and_grads(family, model, processor):
    batch = family.collate_for_training(processor, mixed_samples(family, processor))
    batch = family.to_device(batch, "cuda")  # as the training loop moves it (host_inputs stay)
    model.train()
    return sums_and_grads(family, model, batch)


def assert_same_training(family, reference, candidate, processor) -> None:
    want_loss, want_tokens, want = loss_and_grads(family, reference, processor)
    loss, tokens, got = loss_and_grads(family, candidate, processor)
    assert tokens == want_tokens and got.keys() == want.keys() and got
    torch.testing.assert_close(loss, want_loss, rtol=2e-2, atol=0.0)
    for key, grad in got.items():
        assert cosine(grad.float(), want[key].float()) > 0.99, key


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
@pytest.mark.parametrize("name", HF_FAMILIES)
def test_liger_fused_kernels_train_as_transformers_modules(family_twin, name):
    folder = family_twin(name)
    plain = get_family(name, fused_kernels="off")
    fused = get_family(name, fused_kernels="liger")
    reference = plain.load_bundle(folder, dtype=torch.bfloat16, device="cuda")
    bundle = fused.load_bundle(folder, dtype=torch.bfloat16, device="cuda")
    assert fused.apply_fused_kernels(bundle, compiled=False)
    models = [nonzero_adapter(plain, m, "qkv", seed=0) for m in (reference.model, bundle.model)]
    assert_same_training(plain, *models, bundle.processor)


def test_minicpm_v4_6_trains_alike_on_fla_and_on_transformers_pytorch_code(family_twin):
    skip_unless_fla_trains()
    folder = family_twin("minicpm_v4_6")
    torch_family = get_family("minicpm_v4_6", linear_attention="torch")
    fla_family = get_family("minicpm_v4_6", linear_attention="fla")
    reference = torch_family.load_bundle(folder, dtype=torch.bfloat16, device="cuda")
    bundle = fla_family.load_bundle(folder, dtype=torch.bfloat16, device="cuda")
    models = [nonzero_adapter(torch_family, m, "qkv", seed=0) for m in (reference.model, bundle.model)]
    assert_same_training(torch_family, *models, bundle.processor)
