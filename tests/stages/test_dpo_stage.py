"""The dpo stage on the tiny twins (CPU, fp32): every family through `+experiment=dpo` then merge and infer,
exact resume, the cached reference of full fine-tuning, and training on from an sft adapter."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from pipeline.__main__ import run_pipeline
from pipeline.config import ConfigError, validate
from pipeline.stages import dpo
from pipeline.training import loop
from pipeline.training.checkpoints import list_checkpoints
from pipeline.training.preference import CACHE_FILE, read_cached_table
from tests.helpers import compose_config, copy_twin, log_records, losses_by_step, read_rows, run_stage

# A few steps on a few pairs of the bundled preference demo: enough to pass through every stage.
QUICK = [
    "device=cpu",
    "dataset.max_rows=12",
    "dataset.test_ratio=0.25",
    "trainer.max_steps=2",
    "trainer.batch_size=2",
    "trainer.eval_steps=2",
    "trainer.logging_steps=1",
    "eval.max_samples=2",
    "eval.max_new_tokens=2",
    "eval.compare_base=false",
    "infer.max_samples=2",
    "infer.max_new_tokens=2",
    "merge.verify_samples=1",
]
FAMILIES = ("minicpm_v2", "qwen2_5_vl", "qwen3_vl", "minicpm_v4_6")
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen")


def config(twin: Path, name: str, run_dir: Path, *extra: str):
    return compose_config(
        [
            "+experiment=dpo",
            f"model={name}_tiny",
            f"model.path={twin}",
            f"output_root={run_dir.parent}",
            *QUICK,
            *extra,
        ]
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_trains_on_pairs_then_merges_and_answers(name, family_twin, tmp_path, caplog):
    twin = copy_twin(family_twin(name), tmp_path / f"{name}_tiny")
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="pipeline.stages.dpo"):
        run_pipeline(config(twin, name, run_dir), run_dir)
    assert "takes the policy's image features" in caplog.text  # lora=qkv: the tower runs once a pair

    records = log_records(run_dir / "dpo")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r[key]) for r in steps for key in REWARDS)
    assert (
        records[0]["step"] == 0 and records[0]["eval_rewards/margins"] == 0.0
    )  # the policy is the reference
    assert (run_dir / "dpo" / "checkpoint-2" / "adapter_config.json").is_file()
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["pref_accuracy"] <= 1.0 and math.isfinite(metrics["pref_margin"])
    assert Path(metrics["checkpoint"]).parent == (run_dir / "dpo").resolve()
    merged = json.loads((run_dir / "merge" / "merge_info.json").read_text())
    assert Path(merged["output"]).is_dir()
    results = read_rows(run_dir / "infer" / "results.jsonl")
    assert len(results) == 2 and all(isinstance(r["response"], str) for r in results)


def test_resume_repeats_the_uninterrupted_losses(family_twin, tmp_path, monkeypatch):
    twin = copy_twin(family_twin("qwen2_5_vl"), tmp_path / "qwen2_5_vl_tiny")
    steps = ["trainer.max_steps=4", "trainer.save_steps=2", "trainer.eval_steps=4", "stages=[dpo]"]
    whole = tmp_path / "whole"
    run_stage(dpo, config(twin, "qwen2_5_vl", whole, *steps), whole)
    reference = losses_by_step(whole / "dpo")

    crashed = tmp_path / "crashed"
    real_step = loop.Trainer._step
    calls = {"n": 0}

    def crash_at_step_3(self, micro):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_step(self, micro)

    monkeypatch.setattr(loop.Trainer, "_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(dpo, config(twin, "qwen2_5_vl", crashed, *steps), crashed)
    monkeypatch.setattr(loop.Trainer, "_step", real_step)
    assert [p.name for p in list_checkpoints(crashed / "dpo")] == ["checkpoint-2"]

    out = run_stage(dpo, config(twin, "qwen2_5_vl", crashed, *steps), crashed)
    assert out["dpo"]["resumed_from"].endswith("checkpoint-2")
    resumed = losses_by_step(crashed / "dpo")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_full_finetuning_caches_the_reference_once(family_twin, tmp_path, caplog):
    twin = copy_twin(family_twin("minicpm_v2"), tmp_path / "minicpm_v2_tiny")
    run_dir = tmp_path / "full"
    cfg = config(twin, "minicpm_v2", run_dir, "lora=none", "stages=[dpo]")
    run_stage(dpo, cfg, run_dir)
    cache = run_dir / "dpo" / CACHE_FILE
    written = cache.stat().st_mtime_ns
    records = log_records(run_dir / "dpo")
    assert records[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # the cache is the start
    assert (run_dir / "dpo" / "checkpoint-2" / "config.json").is_file()  # full weights

    # the same run again (a new plan in the same folder): the reference is read, not computed
    with caplog.at_level(logging.INFO, logger="pipeline.training.preference"):
        run_stage(
            dpo,
            config(twin, "minicpm_v2", run_dir, "lora=none", "stages=[dpo]", "trainer.resume=never"),
            run_dir,
        )
    assert cache.stat().st_mtime_ns == written
    assert "read from" in caplog.text
    assert read_cached_table(cache, "the key of other pairs or weights", 9) is None


def test_multi_round_pairs_are_scored_on_their_final_answers(family_twin, tmp_path):
    # dataset.loss_scale=auto is the final answer's log-probability, as ms-swift's rlhf and TRL; default adds
    # the history's responses, which are the same in both answers of a pair (and cancel in their difference)
    from safetensors.torch import load_file

    twin = copy_twin(family_twin("qwen2_5_vl"), tmp_path / "qwen2_5_vl_tiny")
    rows = [
        {
            "history": [[f"Count to {k}.", " ".join(str(i) for i in range(1, k + 2))]],
            "query": "And backwards?",
            "response": " ".join(str(i) for i in range(k + 1, 0, -1)),
            "rejected_response": "I cannot.",
        }
        for k in range(1, 7)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tables = {}
    for scale in ("auto", "default"):
        run_dir = tmp_path / scale
        extra = ("stages=[dpo]", "dataset=custom", f"dataset.path={data}", "preference.reference=cached")
        run_stage(dpo, config(twin, "qwen2_5_vl", run_dir, *extra, f"dataset.loss_scale={scale}"), run_dir)
        tables[scale] = load_file(str(run_dir / "dpo" / CACHE_FILE))["logps"]
    final, every = tables["auto"], tables["default"]
    assert final.shape == (6, 2) and bool((final > every).all())  # fewer tokens: a larger log-probability
    history = every - final
    assert torch.allclose(history[:, 0], history[:, 1], atol=1e-4)


def test_dpo_trains_on_an_sft_adapter_with_that_model_as_reference(family_twin, tmp_path):
    twin = copy_twin(family_twin("qwen2_5_vl"), tmp_path / "qwen2_5_vl_tiny")
    sft_run = tmp_path / "sft"
    sft_cfg = compose_config(
        [
            "+experiment=lora_qkv",
            "model=qwen2_5_vl_tiny",
            f"model.path={twin}",
            "dataset=demo_pairs",  # sft trains on the chosen answers
            "stages=[sft]",
            *QUICK,
        ]
    )
    run_pipeline(sft_cfg, sft_run)
    run_dir = tmp_path / "dpo"
    cfg = config(twin, "qwen2_5_vl", run_dir, f"ckpt={sft_run}", "stages=[dpo]")
    out = run_stage(dpo, cfg, run_dir)
    assert (run_dir / "dpo" / CACHE_FILE).is_file()  # the sft model's log-probs, cached
    first = log_records(run_dir / "dpo")[0]
    assert first["step"] == 0 and first["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    saved = json.loads((Path(out["ckpt"]) / "adapter_config.json").read_text())
    sft_saved = json.loads((sft_run / "sft" / "checkpoint-2" / "adapter_config.json").read_text())
    assert (saved["r"], saved["target_modules"]) == (sft_saved["r"], sft_saved["target_modules"])


@pytest.mark.parametrize("loss_type", ["cpo", "orpo"])
def test_reference_free_losses_train_full_weights_without_a_reference(family_twin, tmp_path, loss_type):
    # full fine-tuning: a reference would have to be cached; cpo and orpo need none, and add the NLL term
    twin = copy_twin(family_twin("minicpm_v2"), tmp_path / "minicpm_v2_tiny")
    run_dir = tmp_path / loss_type
    extra = (
        "lora=none",
        "stages=[dpo]",
        f"preference.loss_type={loss_type}",
        "trainer.metric_for_best_model=nll",
    )
    out = run_stage(dpo, config(twin, "minicpm_v2", run_dir, *extra), run_dir)
    assert not (run_dir / "dpo" / CACHE_FILE).exists()
    records = log_records(run_dir / "dpo")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r[key]) for r in steps for key in (*REWARDS, "nll"))
    assert all(r["loss"] > r["nll"] > 0 for r in steps)  # the preference term adds to the chosen answer's NLL
    assert out["dpo"]["metric_for_best_model"] == "eval_nll" and out["dpo"]["best_metric"] > 0


@pytest.mark.parametrize(
    "extra",
    [
        ("preference.loss_type=apo_zero",),
        ("preference.loss_type=exo_pair", "preference.label_smoothing=1e-3"),
        ("preference.loss_type=discopop", "preference.discopop_tau=0.1"),
        ("preference.loss_type=sigmoid_norm",),
        ("preference.loss_type=aot",),
        ("preference.f_divergence_type=alpha_divergence", "preference.f_alpha_divergence_coef=0.5"),
        ("preference.loss_mix={sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}",),  # MPO
    ],
)
def test_other_pair_losses_train_through_the_stage(family_twin, tmp_path, extra):
    twin = copy_twin(family_twin("qwen2_5_vl"), tmp_path / "qwen2_5_vl_tiny")
    run_dir = tmp_path / "run"
    out = run_stage(dpo, config(twin, "qwen2_5_vl", run_dir, "stages=[dpo]", *extra), run_dir)
    steps = [r for r in log_records(run_dir / "dpo") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    assert out["dpo"]["global_step"] == 2
    assert all(("nll" in r) == ("loss_mix" in extra[0]) for r in steps)  # MPO's sft share is the NLL term


def test_sft_and_dpo_in_one_run_and_a_disabled_adapter_without_one_are_refused():
    with pytest.raises(ConfigError, match="both sft and dpo"):
        validate(compose_config(["+experiment=dpo", "stages=[sft,dpo]"]))
    with pytest.raises(
        ConfigError, match=r"rpo_alpha=0.5 weighs .*loss_type=orpo that term is part of its loss"
    ):
        validate(compose_config(["+experiment=dpo", "preference.loss_type=orpo", "preference.rpo_alpha=0.5"]))
    with pytest.raises(ConfigError, match=r"loss_type=simpo that term is weighed by preference.cpo_alpha"):
        validate(
            compose_config(["+experiment=dpo", "preference.loss_type=simpo", "preference.rpo_alpha=0.5"])
        )
    with pytest.raises(
        ConfigError, match=r"exo_pair takes preference.label_smoothing as its epsilon, which must be > 0"
    ):
        validate(compose_config(["+experiment=dpo", "preference.loss_type=exo_pair"]))
    with pytest.raises(
        ConfigError, match=r"robust divides by 1 - 2 x preference.label_smoothing: it must be below 0.5"
    ):
        validate(
            compose_config(
                ["+experiment=dpo", "preference.loss_type=robust", "preference.label_smoothing=0.5"]
            )
        )
    with pytest.raises(ConfigError, match=r"preference.loss_mix names \['kto'\]; it mixes sigmoid, hinge"):
        validate(compose_config(["+experiment=dpo", "preference.loss_mix={sigmoid: 1.0, kto: 0.5}"]))
    with pytest.raises(
        ConfigError, match=r"preference.loss_mix='sigmoid' is not a mapping of loss names to weights"
    ):
        validate(compose_config(["+experiment=dpo", "preference.loss_mix=sigmoid"]))
    with pytest.raises(ConfigError, match=r"loss_mix replaces preference.loss_type and rpo_alpha"):
        validate(
            compose_config(
                ["+experiment=dpo", "preference.loss_mix={sigmoid: 1.0}", "preference.loss_type=ipo"]
            )
        )
    with pytest.raises(ConfigError, match=r"at least one preference loss \(not sft\) weighs more than 0"):
        validate(compose_config(["+experiment=dpo", "preference.loss_mix={sft: 1.0}"]))
    with pytest.raises(ConfigError, match="no_adapter needs a LoRA adapter"):
        validate(
            compose_config(
                ["+experiment=dpo", "lora=none", "preference.reference=no_adapter", "stages=[dpo]"]
            )
        )
    with pytest.raises(
        ConfigError,
        match=r"f_divergence_type=js_divergence changes the margin of sigmoid, .*loss_type=ipo does not",
    ):
        validate(
            compose_config(
                ["+experiment=dpo", "preference.loss_type=ipo", "preference.f_divergence_type=js_divergence"]
            )
        )
    with pytest.raises(ConfigError, match=r"preference.loss_mix=\{'bco_pair': 1.0\} does not read it"):
        validate(
            compose_config(
                [
                    "+experiment=dpo",
                    "preference.loss_mix={bco_pair: 1.0}",
                    "preference.f_divergence_type=forward_kl",
                ]
            )
        )
    with pytest.raises(ConfigError, match=r"preference.f_divergence_type"):
        validate(compose_config(["+experiment=dpo", "preference.f_divergence_type=kl"]))


def test_dpo_plans_its_training_as_sft_does(monkeypatch, tmp_path):
    """One plan for both training stages (sft.plan_stage): on a recent GPU a quantized base runs eagerly
    (bitsandbytes' layers), and MiniCPM-V 4.6 packs only where its linear attention runs on kernels."""
    import torch

    from pipeline.families import family_from_config, linear_attention, vision_attention
    from pipeline.stages import sft
    from pipeline.training import plan
    from pipeline.training.plan import Launch

    assert dpo.plan_stage is sft.plan_stage
    monkeypatch.setattr(plan, "compiles_on", lambda device: device.type == "cuda")
    monkeypatch.setattr(vision_attention, "kernel_runs", lambda device, dtype: True)
    launch = Launch(torch.device("cuda", 0), mixed_precision="bf16")

    def planned(*overrides):
        cfg = compose_config(["+experiment=dpo", "trainer=default", *overrides])
        return dpo.plan_stage(cfg, family_from_config(cfg.model), launch, str(tmp_path / "no-folder"))

    assert planned("model=qwen2_5_vl_tiny").compile is True
    assert planned("model=qwen2_5_vl_tiny", "model.quantization=nf4").compile is False
    monkeypatch.setattr(linear_attention, "fla_installed", lambda: True)
    monkeypatch.setattr(linear_attention, "fla_trains", lambda device: None)
    assert planned("model=minicpm_v4_6_tiny").loop.packing is True
    monkeypatch.setattr(linear_attention, "fla_trains", lambda device: "RuntimeError: not on this GPU")
    assert planned("model=minicpm_v4_6_tiny").loop.packing is False
