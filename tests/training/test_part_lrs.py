"""Per-part learning rates (optim.vit_lr, optim.aligner_lr; ms-swift's names) for every family: each
parameter's optimizer group has its part's rate, and after training steps the parts move as their rates say."""

from __future__ import annotations

import pytest
import torch

from pipeline.families import get_family
from pipeline.stages import engine, sft
from pipeline.training.optim import parameter_groups
from tests.helpers import run_stage, twin_config

# two optimizer steps of sft alone on a few rows, on the CPU, no evaluation or checkpoint inside
SHORT_SFT = (
    "device=cpu",
    "stages=[sft]",
    "dataset.max_rows=8",
    "trainer.max_steps=2",
    "trainer.batch_size=2",
    "trainer.grad_accum=1",
    "trainer.eval_steps=100",
    "trainer.save_steps=100",
)
MODEL_OF = {
    "minicpm_v2": "minicpm_v2_tiny",
    "qwen2_5_vl": "qwen2_5_vl_tiny",
    "minicpm_v4_6": "minicpm_v4_6_tiny",
}


def test_parameter_groups_put_each_part_at_its_rate():
    model = torch.nn.ModuleDict(
        {"vision": torch.nn.Linear(2, 2), "projector": torch.nn.Linear(2, 2), "llm": torch.nn.Linear(2, 2)}
    )
    part_of = {id(p): name.split(".")[0] for name, p in model.named_parameters()}
    groups = parameter_groups(model, 0.1, 1e-4, {"vision": 0.0, "projector": 3e-4}, part_of)
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        lr = {"vision": 0.0, "projector": 3e-4, "llm": 1e-4}[name.split(".")[0]]
        assert rate[id(param)] == (lr, 0.1 if name.endswith("weight") else 0.0), name
    assert parameter_groups(model, 0.1)[0]["weight_decay"] == 0.1  # no parts: the two decay groups


@pytest.mark.parametrize("name", sorted(MODEL_OF))
def test_full_finetuning_moves_each_part_at_its_own_rate(family_twin, tmp_path, monkeypatch, name):
    """vit_lr=0 keeps the vision tower where it was while the projector (at aligner_lr) and the language
    model (at lr) move; the optimizer's groups say the same."""
    optimizers = []
    real = engine.build_optimizer

    def recording(*args, **kwargs):
        optimizers.append(real(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(engine, "build_optimizer", recording)
    family = get_family(name)
    cfg = twin_config(
        family_twin(name),
        f"model={MODEL_OF[name]}",
        "+experiment=full",
        *SHORT_SFT,
        "optim.lr=1e-3",
        "optim.vit_lr=0",
        "optim.aligner_lr=1e-2",
        "optim.warmup_ratio=0",
    )
    state: dict = {}
    real_prepare = sft.prepare_engine

    def prepare(accelerator, model, *args, **kwargs):  # the model as it starts training
        state["model"] = model
        state["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return real_prepare(accelerator, model, *args, **kwargs)

    monkeypatch.setattr(sft, "prepare_engine", prepare)
    run_stage(sft, cfg, tmp_path / "run")
    groups, before = family.freeze_groups(), state["before"]
    # the scheduler scales every group from its own initial rate (the last step of cosine decay is 0)
    rates = {id(p): g["initial_lr"] for g in optimizers[0].param_groups for p in g["params"]}
    moved = {"vision": [], "projector": [], "llm": []}
    for n, p in state["model"].named_parameters():
        part = groups.of(n)
        if part is None or not p.requires_grad:
            continue
        assert rates[id(p)] == {"vision": 0.0, "projector": 1e-2, "llm": 1e-3}[part], n
        moved[part].append(not torch.equal(p.detach(), before[n]))
    assert moved["vision"] and not any(moved["vision"])  # rate 0: the tower stays
    assert any(moved["projector"]) and any(moved["llm"])


def test_under_lora_the_adapters_of_each_part_train_at_its_rate(family_twin, tmp_path, monkeypatch):
    """lora=all puts adapters in the vision tower too: with vit_lr=0 they stay as initialised, the others
    move."""
    family, state = get_family("qwen2_5_vl"), {}
    real_prepare = sft.prepare_engine

    def prepare(accelerator, model, *args, **kwargs):
        state["model"], state["parts"] = model, family.parameter_parts(model)
        state["before"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return real_prepare(accelerator, model, *args, **kwargs)

    monkeypatch.setattr(sft, "prepare_engine", prepare)
    cfg = twin_config(
        family_twin("qwen2_5_vl"),
        "model=qwen2_5_vl_tiny",
        "+experiment=lora_all",
        *SHORT_SFT,
        "optim.vit_lr=0",
        "optim.warmup_ratio=0",
        "lora.dropout=0",
    )
    run_stage(sft, cfg, tmp_path / "run")
    moved: dict[str, list[bool]] = {}
    for n, p in state["model"].named_parameters():
        if n in state["before"]:
            part = state["parts"][id(p)]
            moved.setdefault(part, []).append(not torch.equal(p.detach(), state["before"][n]))
    assert moved["vision"] and not any(moved["vision"])
    assert any(moved["llm"])
