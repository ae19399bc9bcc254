"""lora.init_weights through the entry point: an adapter started from the base weights (PiSSA, its randomised
SVD form, OLoRA) trains on the residual base; every checkpoint stores it as a LoRA of twice the rank on the
original base that merges into exactly the model that trained, a crash resumes with the uninterrupted losses,
DPO takes the original model as its reference, and what cannot go with it is refused naming the keys."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from pipeline.config import ConfigError, validate
from pipeline.families import get_family
from pipeline.stages import sft
from pipeline.training.checkpoints import CheckpointError
from pipeline.training.residual_lora import MARKER
from tests.helpers import compose_config, losses_by_step, run_stage, step_fails_at
from tests.stages import test_lora_variants as variants
from tests.stages.test_lora_variants import MODELS, config

twin_root = variants.twin_root  # the same two twins, as a fixture of this module


def merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with its adapter folded in (a copy-free merge of the PEFT model given)."""
    assert isinstance(model, PeftModel)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize(
    ("model", "init"),
    [
        ("minicpm_v2_tiny", "pissa"),
        ("minicpm_v2_tiny", "olora"),
        ("qwen2_5_vl_tiny", "pissa_niter_2"),
        ("qwen2_5_vl_tiny", "pissa"),
    ],
)
def test_the_checkpoint_is_a_lora_of_the_original_base_that_merges_into_the_trained_model(
    model, init, twin_root, tmp_path, monkeypatch
):
    seen = {}
    real = sft.prepare_engine

    def prepare(accelerator, module, *args, **kwargs):
        seen["model"] = module
        seen["base"] = {  # the adapted layers' base weights as training starts: the residual
            name: layer.get_base_layer().weight.detach().clone()
            for name, layer in module.named_modules()
            if hasattr(layer, "lora_A") and hasattr(layer, "get_base_layer")
        }
        return real(accelerator, module, *args, **kwargs)

    monkeypatch.setattr(sft, "prepare_engine", prepare)
    run_dir = tmp_path / "run"
    run_stage(sft, config(model, twin_root, f"lora.init_weights={init}", "lora.r=4"), run_dir)
    ckpt = run_dir / "sft" / "checkpoint-2"
    saved = json.loads((ckpt / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 64 and saved["init_lora_weights"] is True
    assert json.loads((ckpt / MARKER).read_text()) == {
        "init_weights": init,
        "r": 4,
        "lora_alpha": 32,
        "use_rslora": False,
    }
    # the base it trained on is not the model's: PiSSA/OLoRA moved the principal part into the adapter
    family = get_family(MODELS[model])
    original = family.load_bundle(str(twin_root / model), dtype=torch.float32).model
    modules = dict(original.named_modules())
    moved = [
        float((weight - modules[name.removeprefix("base_model.model.")].weight.detach()).abs().max())
        for name, weight in seen["base"].items()
    ]
    assert moved and min(moved) > 1e-3
    # the checkpoint read as a plain LoRA of the original base: the same model as the one that trained
    reloaded = family.load_bundle(str(twin_root / model), ckpt, dtype=torch.float32).model
    trained, restored = merged_weights(seen["model"]), merged_weights(reloaded)
    assert trained.keys() == restored.keys()
    for name in trained:
        torch.testing.assert_close(restored[name], trained[name], atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("model", list(MODELS))
def test_a_crash_resumes_with_the_uninterrupted_losses_and_merges(model, twin_root, tmp_path, monkeypatch):
    extra = (
        "lora.init_weights=pissa",
        "trainer.max_steps=4",
        "trainer.save_steps=2",
        "trainer.logging_steps=1",
    )
    run_stage(sft, config(model, twin_root, *extra), tmp_path / "whole")
    with step_fails_at(monkeypatch, 2, "power cut"), pytest.raises(RuntimeError, match="power cut"):
        run_stage(sft, config(model, twin_root, *extra), tmp_path / "cut")
    out = run_stage(sft, config(model, twin_root, *extra), tmp_path / "cut")  # trainer.resume=auto
    assert out["sft"]["resumed_from"].endswith("checkpoint-2")
    whole, resumed = losses_by_step(tmp_path / "whole" / "sft"), losses_by_step(tmp_path / "cut" / "sft")
    assert sorted(whole) == [1, 2, 3, 4]
    assert [resumed[s] for s in sorted(whole)] == pytest.approx([whole[s] for s in sorted(whole)], rel=1e-5)
    last = {}
    for run in ("whole", "cut"):
        reloaded = get_family(MODELS[model]).load_bundle(
            str(twin_root / model), tmp_path / run / "sft" / "checkpoint-4", dtype=torch.float32
        )
        last[run] = merged_weights(reloaded.model)
    for name in last["whole"]:
        torch.testing.assert_close(last["cut"][name], last["whole"][name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_merge_stage_verifies_a_pissa_checkpoint_and_the_init_cannot_change_on_resume(
    twin_root, tmp_path
):
    run_dir = tmp_path / "run"
    cfg = config("minicpm_v2_tiny", twin_root, "lora.init_weights=pissa", "lora.use_rslora=true")
    from pipeline.__main__ import run_pipeline

    run_pipeline(cfg, run_dir)
    saved = json.loads((run_dir / "sft" / "checkpoint-2" / "adapter_config.json").read_text())
    assert saved["lora_alpha"] == pytest.approx(32 * 2**0.5)  # alpha / sqrt(r) kept at twice the rank
    info = json.loads((run_dir / "merge" / "merge_info.json").read_text())
    assert info["verified"] is True, info
    again = config(
        "minicpm_v2_tiny", twin_root, "lora.use_rslora=true", "trainer.max_steps=4", "stages=[sft]"
    )
    with pytest.raises(CheckpointError, match=r"started from the base weights .*\(lora\.init_weights\)"):
        run_stage(sft, again, run_dir)


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["lora.init_weights=pisa"], "lora.init_weights=pisa is not a valid choice; valid: true, gaussian"),
        (["lora.init_weights=pissa_niter_0"], "lora.init_weights=pissa_niter_0 is not a valid choice"),
        (["lora=none", "lora.init_weights=olora"], "lora.init_weights=olora applies to LoRA only"),
        (
            ["lora.init_weights=pissa", "lora.use_dora=true"],
            "lora.init_weights=pissa with lora.use_dora=true",
        ),
    ],
)
def test_what_cannot_go_with_the_init_is_refused_naming_the_key(overrides, said):
    with pytest.raises(ConfigError, match=said.replace(".", r"\.")):
        validate(compose_config(["stages=[sft]", *overrides]))


def test_dpo_refuses_the_adapter_disabled_reference_of_a_residual_adapter():
    cfg = compose_config(["+experiment=dpo", "lora.init_weights=olora", "preference.reference=no_adapter"])
    with pytest.raises(ConfigError, match=r"lora\.init_weights=olora with preference\.reference=no_adapter"):
        validate(cfg)
    validate(compose_config(["+experiment=dpo", "lora.init_weights=olora"]))  # auto: the cached reference


def test_the_default_and_gaussian_inits_leave_the_base_as_it_is():
    for value in ("true", "True", "gaussian"):
        validate(compose_config(["stages=[sft]", f"lora.init_weights={value}"]))


def test_dpo_from_the_base_weights_takes_the_original_model_as_reference(family_twin, tmp_path, monkeypatch):
    """DPO with lora.init_weights=pissa: preference.reference=auto caches the starting model's log-probabilities
    (W_res + s * B0 @ A0, the original model), not the adapter-disabled residual; they equal those of a run whose
    adapter starts as a plain LoRA, and a crash resumes with the uninterrupted losses."""
    from safetensors.torch import load_file

    from pipeline.stages import dpo
    from pipeline.training.preference import CACHE_FILE
    from tests.stages.test_dpo_stage import config as dpo_config

    twin = family_twin("qwen2_5_vl")
    common = ("preference.reference=auto", "stages=[dpo]", "trainer.max_steps=4", "trainer.save_steps=2")
    tables = {}
    for init in ("pissa", "true"):
        run_dir = tmp_path / init
        extra = (f"lora.init_weights={init}", "preference.reference=cached" if init == "true" else "")
        cfg = dpo_config(twin, "qwen2_5_vl", run_dir, *common, *[e for e in extra if e])
        run_stage(dpo, cfg, run_dir)
        tables[init] = load_file(str(run_dir / "dpo" / CACHE_FILE))
    assert tables["pissa"].keys() == tables["true"].keys()
    for name in tables["true"]:
        torch.testing.assert_close(tables["pissa"][name], tables["true"][name], atol=1e-4, rtol=1e-5)
    saved = json.loads((tmp_path / "pissa" / "dpo" / "checkpoint-4" / "adapter_config.json").read_text())
    assert saved["r"] == 16 and (tmp_path / "pissa" / "dpo" / "checkpoint-4" / MARKER).is_file()

    cfg = dpo_config(twin, "qwen2_5_vl", tmp_path / "cut", *common, "lora.init_weights=pissa")
    with step_fails_at(monkeypatch, 2, "power cut"), pytest.raises(RuntimeError, match="power cut"):
        run_stage(dpo, cfg, tmp_path / "cut")
    out = run_stage(dpo, cfg, tmp_path / "cut")
    assert out["dpo"]["resumed_from"].endswith("checkpoint-2")
    whole, resumed = losses_by_step(tmp_path / "pissa" / "dpo"), losses_by_step(tmp_path / "cut" / "dpo")
    assert [resumed[s] for s in (1, 2, 3, 4)] == pytest.approx([whole[s] for s in (1, 2, 3, 4)], rel=1e-5)
