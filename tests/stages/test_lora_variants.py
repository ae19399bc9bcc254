"""LoRA's variants through the entry point, for MiniCPM-V-2 and an HF-native family: DoRA (lora.use_dora)
and rank-stabilised LoRA (lora.use_rslora) train, save, resume only with the same setting and merge into a
model that reproduces the adapter; LoRA+ (optim.loraplus_lr_ratio) puts the B matrices at that multiple of
their part's rate and moves them further."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.__main__ import run_pipeline
from pipeline.config import ConfigError, validate
from pipeline.stages import engine, sft
from pipeline.training.checkpoints import CheckpointError
from pipeline.training.optim import parameter_groups
from tests.helpers import compose_config, copy_twin, run_stage
from tests.stages.test_families_pipeline import QUICK as FAMILY_QUICK

MODELS = {"minicpm_v2_tiny": "minicpm_v2", "qwen2_5_vl_tiny": "qwen2_5_vl"}
# the HF families' quick run (a few steps on a few rows), sft then merge, at a rate that moves the adapters
QUICK = [*FAMILY_QUICK, "stages=[sft,merge]", "optim.lr=1e-2", "optim.warmup_ratio=0"]


@pytest.fixture(scope="module")
def twin_root(tmp_path_factory, family_twin) -> Path:
    root = tmp_path_factory.mktemp("variant-twins")
    for model, family in MODELS.items():
        copy_twin(family_twin(family), root / model)
    return root


def config(model: str, twin_root: Path, *extra: str):
    return compose_config(
        ["+experiment=lora_all", f"model={model}", f"model.path={twin_root / model}", *QUICK, *extra]
    )


@pytest.mark.parametrize("variant", ["use_dora", "use_rslora"])
@pytest.mark.parametrize("model", list(MODELS))
def test_a_variant_trains_saves_and_merges_into_the_adapters_model(model, variant, twin_root, tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline(config(model, twin_root, f"lora.{variant}=true"), run_dir)
    ckpt = run_dir / "sft" / "checkpoint-2"
    saved = json.loads((ckpt / "adapter_config.json").read_text())
    assert saved[variant] is True and saved["use_dora" if variant == "use_rslora" else "use_rslora"] is False
    weights = (ckpt / "adapter_model.safetensors").read_bytes()
    assert (b"lora_magnitude_vector" in weights) == (variant == "use_dora")
    info = json.loads((run_dir / "merge" / "merge_info.json").read_text())
    assert info["verified"] is True, info  # the merged model's logits reproduce the adapter's
    # the other setting cannot resume this run: named, before any weight loads
    again = config(model, twin_root, f"lora.{variant}=false", "trainer.max_steps=4", "stages=[sft]")
    with pytest.raises(CheckpointError, match=rf"\(lora\.{variant}\)"):
        run_stage(sft, again, run_dir)


def test_rank_stabilised_scaling_is_alpha_over_the_root_of_r(twin_root, tmp_path, monkeypatch):
    seen = {}
    real = sft.prepare_engine

    def prepare(accelerator, model, *args, **kwargs):
        seen["model"] = model
        return real(accelerator, model, *args, **kwargs)

    monkeypatch.setattr(sft, "prepare_engine", prepare)
    cfg = config("qwen2_5_vl_tiny", twin_root, "lora.use_rslora=true", "lora.r=4", "lora.alpha=8")
    run_stage(sft, cfg, tmp_path / "run")
    lora_layers = [module for module in seen["model"].modules() if hasattr(module, "lora_A")]
    scales = [module.scaling["default"] for module in lora_layers]
    assert scales and all(scale == pytest.approx(8 / 4**0.5) for scale in scales)


def test_loraplus_puts_the_b_matrices_at_their_parts_rate_times_the_ratio(twin_root, tmp_path, monkeypatch):
    """Through sft (LoRA on every linear layer, the vision tower at optim.vit_lr): every lora_B at 16x its
    part's rate, every other parameter at its part's; after two steps at a constant rate the B matrices have
    moved further than without LoRA+."""
    optimizers, models = [], []
    real_build, real_prepare = engine.build_optimizer, sft.prepare_engine

    def recording(*args, **kwargs):
        optimizers.append(real_build(*args, **kwargs))
        return optimizers[-1]

    def prepare(accelerator, model, *args, **kwargs):
        models.append((model, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}))
        return real_prepare(accelerator, model, *args, **kwargs)

    monkeypatch.setattr(engine, "build_optimizer", recording)
    monkeypatch.setattr(sft, "prepare_engine", prepare)
    common = ("stages=[sft]", "optim.lr=1e-3", "optim.vit_lr=1e-4", "optim.scheduler=constant")
    run_stage(
        sft, config("qwen2_5_vl_tiny", twin_root, *common, "optim.loraplus_lr_ratio=16"), tmp_path / "a"
    )
    run_stage(sft, config("qwen2_5_vl_tiny", twin_root, *common), tmp_path / "b")
    names = {id(p): n for n, p in models[0][0].named_parameters()}
    rates = {names[id(p)]: g["initial_lr"] for g in optimizers[0].param_groups for p in g["params"]}
    b_names = [n for n in rates if "lora_B" in n]
    assert b_names and len(b_names) < len(rates)
    for name, rate in rates.items():
        part = 1e-4 if ".visual." in name and ".merger." not in name else 1e-3  # the merger: the projector
        assert rate == pytest.approx(part * (16 if "lora_B" in name else 1)), name
    moved = [
        sum(
            float((p.detach() - models[k][1][n]).abs().sum())
            for n, p in models[k][0].named_parameters()
            if n in models[k][1]
        )
        for k in (0, 1)
    ]
    assert moved[0] > 2 * moved[1] > 0


def test_parameter_groups_split_the_b_matrices_by_part_and_decay():
    model = torch.nn.ModuleDict(
        {
            "vision": torch.nn.ModuleDict({"lora_A": torch.nn.Linear(2, 2), "lora_B": torch.nn.Linear(2, 2)}),
            "llm": torch.nn.ModuleDict({"lora_A": torch.nn.Linear(2, 2), "lora_B": torch.nn.Linear(2, 2)}),
        }
    )
    part_of = {id(p): name.split(".")[0] for name, p in model.named_parameters()}
    groups = parameter_groups(model, 0.1, 1e-3, {"vision": 1e-4}, part_of, loraplus_ratio=8)
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        base = 1e-4 if name.startswith("vision") else 1e-3
        want = base * (8 if ".lora_B." in name else 1)
        assert rate[id(param)] == (pytest.approx(want), 0.1 if name.endswith("weight") else 0.0), name


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["lora=none", "lora.use_dora=true"], "lora.use_dora=true applies to LoRA only"),
        (["lora=none", "optim.loraplus_lr_ratio=16"], "optim.loraplus_lr_ratio=16 applies to LoRA only"),
        (["optim.loraplus_lr_ratio=0"], "optim.loraplus_lr_ratio"),
    ],
)
def test_a_variant_that_cannot_apply_is_refused_naming_the_key(overrides, said):
    with pytest.raises(ConfigError, match=said.replace(".", r"\.")):
        validate(compose_config(["stages=[sft]", *overrides]))
