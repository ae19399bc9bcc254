"""QLoRA (model.quantization=nf4|int8, bitsandbytes on the CPU): every family's language model gets quantized
linear layers and peft's quantized LoRA layers on them; `+experiment=lora_qkv model.quantization=nf4` runs sft
-> eval -> merge -> infer through the entry point for every family, the adapter learns, and the merge writes
the full-precision merged model onto the unquantized base."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from bitsandbytes.nn import Linear4bit, Linear8bitLt  # noqa: E402
from peft.tuners.lora import bnb as lora_bnb  # noqa: E402

from pipeline.__main__ import run_pipeline  # noqa: E402
from pipeline.config import ConfigError, validate  # noqa: E402
from pipeline.families import FAMILIES, get_family, quantization  # noqa: E402
from pipeline.families.hf_native import HFNativeFamily  # noqa: E402
from tests.helpers import compose_config, copy_twin, log_records, read_rows  # noqa: E402
from tests.stages.test_families_pipeline import QUICK  # noqa: E402

MODEL_OF = {name: f"{name}_tiny" for name in FAMILIES}


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("choice", ["nf4", "int8"])
def test_the_language_model_is_quantized_and_lora_wraps_the_quantized_layers(family_twin, name, choice):
    family = get_family(name)
    bundle = family.load_bundle(family_twin(name))
    llm = family.freeze_groups().llm
    want = quantization.targets(bundle.core, llm)
    vision_before = {
        n: p.clone() for n, p in bundle.core.named_parameters() if family.freeze_groups().of(n) == "vision"
    }
    assert want and not any(n.endswith("lm_head") for n in want)
    assert family.quantize(bundle, choice, torch.float32, torch.device("cpu")) == len(want)
    kind = Linear4bit if choice == "nf4" else Linear8bitLt
    for n in want:
        layer = bundle.core.get_submodule(n)
        assert isinstance(layer, kind)
        assert layer.weight.dtype == (torch.uint8 if choice == "nf4" else torch.int8)  # quantized in place
    vision_after = dict(bundle.core.named_parameters())
    assert all(torch.equal(vision_after[n], p) for n, p in vision_before.items())  # the tower stays as it was
    qkv = family.lora_target_names(bundle.core, "qkv")  # bitsandbytes' layers are linear layers too
    lora = compose_config(["+experiment=lora_qkv"]).lora
    model = family.prepare_training(bundle, lora, False, "base")
    wrapped = [m for m in model.modules() if isinstance(m, (lora_bnb.Linear4bit, lora_bnb.Linear8bitLt))]
    assert len(wrapped) == len(qkv) > 0


def test_a_quantized_base_trains_adapters_only_and_needs_bitsandbytes(monkeypatch):
    with pytest.raises(
        ConfigError, match="model.quantization=nf4 trains adapters on a frozen quantized base"
    ):
        validate(compose_config(["+experiment=full", "model.quantization=nf4"]))
    with pytest.raises(ConfigError, match=r"model.quantization.*not one of|model.quantization=nf8"):
        validate(compose_config(["+experiment=lora_qkv", "model.quantization=nf8"]))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(
        ConfigError, match="model.quantization=nf4 needs bitsandbytes: pip install bitsandbytes"
    ):
        validate(compose_config(["+experiment=lora_qkv", "model.quantization=nf4"]))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_qlora_runs_every_stage_and_merges_onto_the_full_precision_base(family_twin, tmp_path, name):
    model = MODEL_OF[name]
    twin = copy_twin(family_twin(name), tmp_path / model)
    run_dir = tmp_path / "run"
    cfg = compose_config(
        [
            "+experiment=lora_qkv",
            f"model={model}",
            f"model.path={twin}",
            "model.quantization=nf4",
            f"output_root={tmp_path}",
            *QUICK,
        ]
    )
    run_pipeline(cfg, run_dir)
    losses = [r["loss"] for r in log_records(run_dir / "sft") if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    ckpt = run_dir / "sft" / "checkpoint-2"
    family = get_family(name)
    # the adapter moved: its B matrices (zero at the start) are not zero
    from safetensors.torch import load_file

    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert math.isfinite(metrics["eval_loss"])
    info = json.loads((run_dir / "merge" / "merge_info.json").read_text())
    assert info["verified"] is True
    merged = family.load_bundle(Path(info["output"]))
    assert not quantization.targets(merged.core, ()) and not quantization.is_quantized(merged.core)
    dtypes = {p.dtype for p in merged.core.parameters()}
    assert dtypes <= {torch.float32, torch.bfloat16, torch.float16}  # full precision, no packed 4-bit weights
    assert len(read_rows(run_dir / "infer" / "results.jsonl")) == 2


@pytest.mark.parametrize("name", ["qwen2_5_vl", "minicpm_v2"])
def test_a_quantized_base_compiles_whole_when_asked_and_trains_the_eager_steps(family_twin, tmp_path, name):
    """trainer.compile=true on a 4-bit base (auto leaves it off until timed on a GPU): the decoder layers,
    bitsandbytes' quantized linears and peft's LoRA on them, trace as one graph without a break (inductor on
    the CPU) and train the eager run's steps within the compiler's float reordering."""
    from pipeline.stages import sft
    from tests.helpers import run_stage

    twin = copy_twin(family_twin(name), tmp_path / MODEL_OF[name])

    def steps(run_dir: Path, *extra: str) -> list[dict]:
        cfg = compose_config(
            [
                "+experiment=lora_qkv",
                f"model={MODEL_OF[name]}",
                f"model.path={twin}",
                "model.quantization=nf4",
            ]
            + [*QUICK, "trainer.logging_steps=1", "lora.dropout=0.0", *extra]
        )
        run_stage(sft, cfg, run_dir)
        return [r for r in log_records(run_dir / "sft") if "loss" in r]

    packed = (
        ["trainer.packing=true"] if name == "qwen2_5_vl" else []
    )  # the HF-native families compile packed rows
    eager = steps(tmp_path / "eager", *packed, "trainer.compile=false")
    compiled = steps(tmp_path / "compiled", *packed, "trainer.compile=true")
    assert len(eager) == len(compiled) == 2
    for e, c in zip(eager, compiled, strict=True):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4), (e, c)
        assert c["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-3), (e, c)
        assert c["compiled_graphs"] >= 1 and c["graph_breaks"] == 0, c
    assert "compiled_graphs" not in eager[0]


def test_static_decode_is_off_for_a_quantized_base_and_after_a_compile_failure(family_twin, monkeypatch):
    family = get_family("qwen2_5_vl")
    bundle = family.load_bundle(family_twin("qwen2_5_vl"))
    cuda = torch.device("cuda")
    assert family.decodes_static(cuda, bundle.core)
    # auto compiles only for a job long enough to earn the compile back; model.decode=static always does
    few, many = HFNativeFamily.static_min_batches - 1, HFNativeFamily.static_min_batches
    assert not family.decodes_static(cuda, bundle.core, batches=few)
    assert family.decodes_static(cuda, bundle.core, batches=many)
    assert get_family("qwen2_5_vl", decode="static").decodes_static(cuda, bundle.core, batches=1)
    assert not get_family("qwen2_5_vl", decode="dynamic").decodes_static(cuda, bundle.core, batches=many)
    assert not family.decodes_static(torch.device("cpu"), bundle.core, batches=many)
    family.quantize(bundle, "nf4", torch.float32, torch.device("cpu"))
    assert not family.decodes_static(cuda, bundle.core)
    monkeypatch.setattr(HFNativeFamily, "static_decode_failed", True)
    assert not get_family("qwen3_vl").decodes_static(cuda)
