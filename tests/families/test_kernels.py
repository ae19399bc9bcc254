"""The kernel levers' switches: liger-kernel's fused norms and MLPs (model.fused_kernels) and MiniCPM-V 4.6's
linear-attention kernels (model.linear_attention): where each resolves on, the clear refusals where it cannot
run, and that the choice reaches the loaded model. The kernels themselves run on a GPU
(tests/families/test_kernels_gpu.py)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from pipeline.config import ConfigError, validate
from pipeline.families import get_family, kernels, linear_attention
from pipeline.families.base import FamilyError
from tests.helpers import compose_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
PATCH = "apply_liger_kernel_to_qwen2_5_vl"


def test_fused_kernels_resolve_where_liger_runs_and_the_layers_are_not_compiled(monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    assert kernels.resolve("auto", CUDA, PATCH, compiled=False) is True
    assert kernels.resolve("auto", CUDA, PATCH, compiled=True) is False  # the compiler fuses them already
    assert kernels.resolve("liger", CUDA, PATCH, compiled=True) is True  # asked for: applied anyway
    assert kernels.resolve("auto", CPU, PATCH, compiled=False) is False
    assert kernels.resolve("auto", CUDA, None, compiled=False) is False
    assert kernels.resolve("off", CUDA, PATCH, compiled=False) is False
    with pytest.raises(
        FamilyError, match="model.fused_kernels=liger cannot run here: it runs on a CUDA device"
    ):
        kernels.resolve("liger", CPU, PATCH, compiled=False)
    with pytest.raises(FamilyError, match="no liger patch"):
        kernels.resolve("liger", CUDA, None, compiled=False)
    with pytest.raises(
        FamilyError, match=r"model.fused_kernels=fast is not a valid choice; valid: auto, liger"
    ):
        kernels.resolve("fast", CUDA, PATCH, compiled=False)
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    assert kernels.resolve("auto", CUDA, PATCH, compiled=False) is False
    with pytest.raises(
        FamilyError, match=re.escape("liger-kernel is not installed: pip install 'pipeline[gpu]'")
    ):
        kernels.resolve("liger", CUDA, PATCH, compiled=False)


@pytest.mark.parametrize(
    ("name", "patch", "target"),
    [
        ("qwen2_5_vl", "apply_liger_kernel_to_qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
        ("qwen3_vl", "apply_liger_kernel_to_qwen3_vl", "Qwen3VLForConditionalGeneration"),
        ("minicpm_v4_6", "apply_liger_kernel_to_qwen3_5", "Qwen3_5TextModel"),
    ],
)
def test_the_family_applies_its_liger_patch_to_the_loaded_model_where_it_resolves_on(
    family_twin, monkeypatch, name, patch, target
):
    applied = []
    monkeypatch.setattr(kernels, "apply", lambda fn, module: applied.append((fn, type(module).__name__)))
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    for choice, device, compiled, expected in (
        ("auto", CUDA, False, True),
        ("auto", CUDA, True, False),
        ("off", CUDA, False, False),
        ("auto", CPU, False, False),
    ):
        family = get_family(name, fused_kernels=choice)
        assert family.capabilities.fuses_kernels
        bundle = family.load_bundle(family_twin(name))
        monkeypatch.setattr(type(family), "device_of", lambda self, bundle, device=device: device)
        applied.clear()
        assert family.apply_fused_kernels(bundle, compiled=compiled) is expected
        assert applied == ([(patch, target)] if expected else [])


def test_minicpm_v2_fuses_nothing():
    assert get_family("minicpm_v2").capabilities.fuses_kernels is False


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["model=minicpm_v2_tiny", "model.fused_kernels=liger"], "model.fused_kernels=liger runs for model.family="),
        (["model=qwen2_5_vl_tiny", "model.linear_attention=torch"], "model.linear_attention=torch runs for model.family=minicpm_v4_6 only"),
        (["model=qwen2_5_vl_tiny", "model.fused_kernels=fast"], "model.fused_kernels=fast"),
        (["model=minicpm_v4_6_tiny", "model.linear_attention=cuda"], "model.linear_attention=cuda"),
    ],
)  # fmt: skip
def test_kernel_switches_are_validated_naming_the_key(overrides, said):
    with pytest.raises(ConfigError, match=re.escape(said)):
        validate(compose_config(overrides))


def test_the_kernel_switches_validate_where_they_apply():
    validate(compose_config(["model=qwen2_5_vl_tiny", "model.fused_kernels=off"]))
    validate(
        compose_config(
            ["model=minicpm_v4_6_tiny", "model.linear_attention=torch", "model.fused_kernels=liger"]
        )
    )


def test_linear_attention_choice_is_bound_to_the_layers_and_torch_runs_transformers_pytorch_code(
    family_twin, monkeypatch
):
    from transformers.models.qwen3_5 import modeling_qwen3_5 as modeling

    folder = family_twin("minicpm_v4_6")
    with pytest.raises(
        FamilyError, match="model.linear_attention=fla cannot run here: it runs on a CUDA device"
    ):
        get_family("minicpm_v4_6", linear_attention="fla").load(folder)
    auto_model, processor = get_family("minicpm_v4_6").load(folder)
    family = get_family("minicpm_v4_6", linear_attention="torch")
    model, _ = family.load(folder)
    assert linear_attention.choice_of(family.language_model(model)) == "torch"
    assert linear_attention.choice_of(family.language_model(auto_model)) == "auto"

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, auto_model(input_ids=ids).logits)
    original = {name: getattr(modeling, name) for name in linear_attention.KERNEL_FUNCTIONS}
    with linear_attention.torch_only():
        for name, fn in original.items():
            assert getattr(modeling, name) is inspect.unwrap(fn)  # transformers' own PyTorch function
    assert {name: getattr(modeling, name) for name in original} == original


def test_liger_patches_the_model_instance_only(family_twin, monkeypatch):
    """liger's functions also swap classes in transformers' modeling module; `kernels.apply` puts those back,
    so only the given model is fused (a stand-in for liger_kernel.transformers records what it was given)."""
    import sys
    import types

    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    original = modeling.Qwen2_5_VLRMSNorm
    given = []

    def fake_patch(rope, cross_entropy, fused_linear_cross_entropy, model):
        assert not (rope or cross_entropy or fused_linear_cross_entropy)
        modeling.Qwen2_5_VLRMSNorm = object  # what liger's functions do to the module
        given.append(model)

    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_qwen2_5_vl = fake_patch
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    family = get_family("qwen2_5_vl")
    bundle = family.load_bundle(family_twin("qwen2_5_vl"))
    kernels.apply(family.liger_patch, bundle.core)
    assert given == [bundle.core] and modeling.Qwen2_5_VLRMSNorm is original


def test_sft_refuses_liger_where_it_cannot_run_before_any_weight_loads(family_twin, tmp_path, monkeypatch):
    from pipeline.stages import sft
    from tests.helpers import run_stage, twin_config

    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded before the kernel choice was checked")

    monkeypatch.setattr(type(get_family("qwen2_5_vl")), "load_bundle", no_load)
    cfg = twin_config(
        family_twin("qwen2_5_vl"),
        "model=qwen2_5_vl_tiny",
        "device=cpu",
        "stages=[sft]",
        "model.fused_kernels=liger",
    )
    with pytest.raises(
        FamilyError, match="model.fused_kernels=liger cannot run here: it runs on a CUDA device"
    ):
        run_stage(sft, cfg, tmp_path / "run")
