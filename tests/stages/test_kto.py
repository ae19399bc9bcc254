"""KTO through the entry point on the tiny twins (CPU, fp32): labelled rows (unbalanced, mixed with a pair)
train every family, then eval scores the desirable rows only; the KL samples pair each prompt with another
row's answer; sft and the pair losses refuse what they cannot train on, naming the line."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from pipeline.__main__ import run_pipeline
from pipeline.config import ConfigError, validate
from pipeline.data.demo import ensure_demo_pairs
from pipeline.data.rows import DatasetError
from pipeline.stages import dpo, sft
from tests.helpers import compose_config, copy_twin, log_records, read_rows, run_stage
from tests.stages.test_dpo_stage import FAMILIES, QUICK

KTO_STATS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")


def feedback_file(folder: Path, pairs: int = 2) -> Path:
    """The demo pairs' first 16 rows as binary feedback: 10 desirable and 4 undesirable answers (ms-swift's
    layout), then `pairs` pairs (each one desirable and one undesirable row under kto)."""
    demo = ensure_demo_pairs(folder / "demo_pairs", n=16)
    records = [json.loads(line) for line in (demo / "train.jsonl").read_text().splitlines()]
    rows = []
    for k, record in enumerate(records[: 14 - pairs]):
        wanted = k % 7 < 5
        answer = record["response"] if wanted else record["rejected_response"]
        images = [str((demo / image).resolve()) for image in record["images"]]
        rows.append({"query": record["query"], "response": answer, "label": wanted, "images": images})
    for record in records[14 - pairs : 14]:
        rows.append({**record, "images": [str((demo / image).resolve()) for image in record["images"]]})
    path = folder / "feedback.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def kto_config(twin: Path, name: str, run_dir: Path, data: Path, *extra: str):
    return compose_config(
        [
            "+experiment=dpo",
            f"model={name}_tiny",
            f"model.path={twin}",
            f"output_root={run_dir.parent}",
            "dataset=custom",
            f"dataset.path={data}",
            "preference.loss_type=kto",
            *QUICK,
            *extra,
        ]
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_trains_on_labelled_rows_then_evaluates_the_desirable_ones(
    name, family_twin, tmp_path, caplog
):
    twin = copy_twin(family_twin(name), tmp_path / f"{name}_tiny")
    run_dir = tmp_path / "run"
    data = feedback_file(tmp_path)
    with caplog.at_level(logging.INFO, logger="pipeline.stages.dpo"):
        run_pipeline(kto_config(twin, name, run_dir, data, "dataset.max_rows=null"), run_dir)
    # 12 labelled rows and 2 pairs: 16 rows under kto, 12 of them trained on (a quarter of the 14 held out)
    assert "kto: " in caplog.text and "desirable" in caplog.text
    assert "outside [1, 4/3] where KTO's paper keeps it" in caplog.text  # more desirable rows than that
    records = log_records(run_dir / "dpo")
    first = records[0]
    assert first["step"] == 0 and first["eval_rewards/chosen"] == 0.0 and first["eval_kl"] == 0.0
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert 0 <= record["loss"] <= 1.5 and record["desirable"] + record["undesirable"] == pytest.approx(1)
        assert all(math.isfinite(record[key]) for key in KTO_STATS if key in record)
    # eval scores the held-out rows whose answers are desirable: references to imitate
    desirable = {row["response"] for row in read_rows(data) if row.get("label", True)}
    undesirable = {row["response"] for row in read_rows(data) if row.get("label") is False}
    held_out = read_rows(run_dir / "eval" / "predictions.jsonl")
    assert held_out and all(row["label"] in desirable - undesirable for row in held_out)
    assert (run_dir / "merge" / "merge_info.json").is_file()


def test_the_kl_samples_pair_each_prompt_with_another_row_s_answer(family_twin, tmp_path, monkeypatch):
    twin = copy_twin(family_twin("minicpm_v2"), tmp_path / "minicpm_v2_tiny")
    run_dir = tmp_path / "run"
    data = feedback_file(tmp_path, pairs=0)
    seen = {}
    real = dpo.PairDataset

    def record(chosen, rejected, sizes, offset=0, rows=(), labels=None):
        seen.setdefault("train", (list(rows), labels))
        return real(chosen, rejected, sizes, offset, rows, labels)

    monkeypatch.setattr(dpo, "PairDataset", record)
    cfg = kto_config(twin, "minicpm_v2", run_dir, data, "stages=[dpo]", "dataset.max_rows=null")
    run_stage(dpo, cfg, run_dir)
    rows, labels = seen["train"]
    assert labels == [row.label for row in rows] and any(labels) and not all(labels)
    answers = [row.response for row in rows]
    assert all(row.rejected in answers for row in rows)  # the KL sample's answer: another row's
    assert sum(row.rejected != row.response for row in rows) >= len(rows) - 2


def test_sft_refuses_undesirable_answers_and_the_pair_losses_refuse_labelled_rows(family_twin, tmp_path):
    twin = copy_twin(family_twin("minicpm_v2"), tmp_path / "minicpm_v2_tiny")
    data = feedback_file(tmp_path, pairs=0)
    common = [f"model.path={twin}", "dataset=custom", f"dataset.path={data}", "device=cpu"]
    with pytest.raises(DatasetError, match=r"feedback\.jsonl:6: an undesirable answer \(label false\)"):
        run_stage(sft, compose_config(["+experiment=lora_qkv", *common]), tmp_path / "sft")
    with pytest.raises(DatasetError, match=r"feedback\.jsonl:1: a labelled row .* preference\.loss_type=kto"):
        dpo.read_pairs(compose_config(["+experiment=dpo", *common]), None)
    with pytest.raises(ConfigError, match="preference.loss_type=kto takes neither"):
        validate(compose_config(["+experiment=dpo", "preference.loss_type=kto", "preference.rpo_alpha=1"]))
    with pytest.raises(ConfigError, match="each is >= 0 and one of them > 0"):
        validate(
            compose_config(["+experiment=dpo", "preference.loss_type=kto", "preference.desirable_weight=-1"])
        )


def test_full_finetuning_caches_kto_s_reference_for_each_row_and_its_kl_sample(family_twin, tmp_path):
    from safetensors.torch import load_file

    from pipeline.training.preference import CACHE_FILE

    twin = copy_twin(family_twin("qwen2_5_vl"), tmp_path / "qwen2_5_vl_tiny")
    run_dir = tmp_path / "run"
    data = feedback_file(tmp_path)
    cfg = kto_config(twin, "qwen2_5_vl", run_dir, data, "stages=[dpo]", "lora=none", "dataset.max_rows=null")
    out = run_stage(dpo, cfg, run_dir)
    table = load_file(str(run_dir / "dpo" / CACHE_FILE))["logps"]
    assert table.shape == (16, 2) and bool(torch.isfinite(table).all())  # 12 labelled rows, 2 pairs x 2
    assert out["dpo"]["global_step"] == 2
    assert log_records(run_dir / "dpo")[0]["eval_kl"] == pytest.approx(
        0.0, abs=1e-4
    )  # the policy is the reference
