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
NORM = (0.0, "llama")


def test_fused_kernels_resolve_where_liger_runs_and_the_layers_are_not_compiled(monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    assert kernels.resolve("auto", CUDA, NORM, compiled=False) is True
    assert kernels.resolve("auto", CUDA, NORM, compiled=True) is False  # the compiler fuses them already
    assert kernels.resolve("liger", CUDA, NORM, compiled=True) is True  # asked for: applied anyway
    assert kernels.resolve("auto", CPU, NORM, compiled=False) is False
    assert kernels.resolve("auto", CUDA, None, compiled=False) is False
    assert kernels.resolve("off", CUDA, NORM, compiled=False) is False
    with pytest.raises(
        FamilyError, match="model.fused_kernels=liger cannot run here: it runs on a CUDA device"
    ):
        kernels.resolve("liger", CPU, NORM, compiled=False)
    with pytest.raises(FamilyError, match="no fused kernels"):
        kernels.resolve("liger", CUDA, None, compiled=False)
    with pytest.raises(
        FamilyError, match=r"model.fused_kernels=fast is not a valid choice; valid: auto, liger"
    ):
        kernels.resolve("fast", CUDA, NORM, compiled=False)
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    assert kernels.resolve("auto", CUDA, NORM, compiled=False) is False
    with pytest.raises(
        FamilyError, match=re.escape("liger-kernel is not installed: pip install 'pipeline[gpu]'")
    ):
        kernels.resolve("liger", CUDA, NORM, compiled=False)


@pytest.mark.parametrize(
    ("name", "patch", "target"),
    [
        ("qwen2_5_vl", (0.0, "llama"), "Qwen2_5_VLTextModel"),
        ("qwen3_vl", (0.0, "llama"), "Qwen3VLTextModel"),
        ("minicpm_v4_6", (1.0, "gemma"), "Qwen3_5TextModel"),
    ],
)
def test_the_family_applies_its_liger_patch_to_the_loaded_model_where_it_resolves_on(
    family_twin, monkeypatch, name, patch, target
):
    applied = []

    def record(norm, module):
        applied.append((norm, type(module).__name__))
        return 1, 1

    monkeypatch.setattr(kernels, "apply", record)
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


def fake_liger_ops(monkeypatch) -> list[tuple]:
    """liger_kernel.ops as far as kernels.apply uses it, computing what liger's kernels compute (RMSNorm with
    an offset and a casting mode; silu(a) * b) in PyTorch; records the norm arguments it was given."""
    import sys
    import types

    calls = []

    class RMSNorm:
        @staticmethod
        def apply(x, weight, eps, offset, casting, in_place):
            calls.append((offset, casting))
            normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            if casting == "gemma":
                return (normed * (offset + weight.float())).to(x.dtype)
            return (offset + weight) * normed.to(x.dtype)

    class SiLUMul:
        @staticmethod
        def apply(a, b):
            return torch.nn.functional.silu(a) * b

    for name, attrs in (
        ("liger_kernel", {}),
        ("liger_kernel.ops", {}),
        ("liger_kernel.ops.rms_norm", {"LigerRMSNormFunction": RMSNorm}),
        ("liger_kernel.ops.swiglu", {"LigerSiLUMulFunction": SiLUMul}),
    ):
        module = types.ModuleType(name)
        vars(module).update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize("name", ["qwen2_5_vl", "minicpm_v4_6"])
def test_liger_is_bound_to_every_norm_and_mlp_of_the_language_model_of_that_instance_only(
    family_twin, monkeypatch, name
):
    """Every RMSNorm and gated SiLU MLP of the language model gets the fused forward with the family's offset
    and casting (Qwen3.5's 1 + weight in fp32), the fused model computes what transformers' modules do, and a
    model loaded after it is transformers' own."""
    calls = fake_liger_ops(monkeypatch)
    family = get_family(name)
    plain, fused = (family.load_bundle(family_twin(name)) for _ in range(2))
    language_model = fused.core.get_submodule(family.fused_target)
    want_norms = sum(kernels.is_rms_norm(m) for m in language_model.modules())
    want_mlps = sum(kernels.is_gated_silu_mlp(m) for m in language_model.modules())
    assert want_norms > 0 and want_mlps > 0
    assert kernels.apply(family.fused_norm, language_model) == (want_norms, want_mlps)
    ids = torch.tensor([[5, 9, 3, 17, 2, 11]])
    with torch.no_grad():
        want = plain.core.get_submodule(family.fused_target)(input_ids=ids).last_hidden_state
        got = language_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls and set(calls) == {family.fused_norm}
    calls.clear()
    with torch.no_grad():
        plain.core.get_submodule(family.fused_target)(input_ids=ids)
    assert calls == []


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


def test_linear_attention_auto_falls_back_to_pytorch_where_fla_fails_its_check_and_fla_is_refused(
    monkeypatch,
):
    """fla refuses its gated backward on some GPU and Triton pairs (Hopper under Triton 3.4-3.7.0): auto then
    binds transformers' PyTorch code with a warning that says why, and an explicit fla is refused."""
    failure = "RuntimeError: Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results"
    monkeypatch.setattr(linear_attention, "fla_installed", lambda: True)
    monkeypatch.setattr(linear_attention, "fla_trains", lambda device: failure)
    gpu = torch.device("cuda", 0)
    with pytest.warns(UserWarning, match="fail on this GPU .*Hopper.*transformers' PyTorch code"):
        assert linear_attention.resolve("auto", gpu) == "torch"
    with pytest.raises(FamilyError, match="model.linear_attention=fla cannot run on this GPU: .*Hopper"):
        linear_attention.resolve("fla", gpu)
    assert linear_attention.resolve("torch", gpu) == "torch"
    assert linear_attention.resolve("auto", CPU) == "auto"  # per-sample PyTorch code on a packed row
    monkeypatch.setattr(linear_attention, "fla_trains", lambda device: None)
    assert linear_attention.resolve("auto", gpu) == "auto" and linear_attention.resolve("fla", gpu) == "fla"


def test_minicpm_v4_6_packs_only_where_its_linear_attention_runs_on_kernels(monkeypatch):
    """trainer.packing=auto: a packed row on transformers' PyTorch linear-attention code runs one sample at a
    time, so MiniCPM-V 4.6 packs on a GPU only where flash-linear-attention runs there."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(linear_attention, "fla_installed", lambda: True)
    monkeypatch.setattr(linear_attention, "fla_trains", lambda device: None)
    assert get_family("minicpm_v4_6").packs_padding_free_on(gpu) is True
    assert get_family("minicpm_v4_6", linear_attention="torch").packs_padding_free_on(gpu) is False
    monkeypatch.setattr(linear_attention, "fla_trains", lambda device: "RuntimeError: not on Hopper")
    assert get_family("minicpm_v4_6").packs_padding_free_on(gpu) is False
    assert get_family("qwen2_5_vl").packs_padding_free_on(gpu) is True
    assert get_family("minicpm_v2").packs_padding_free_on(gpu) is False
