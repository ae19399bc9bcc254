"""FSDP on two CPU processes (gloo): each holds half of every weight and of its AdamW state; a checkpoint
holds whole tensors, resumes the sharded run exactly, and resumes in one unsharded process too. Every family is
wrapped in its own units with the shipped config, and an HF-native family's text-only rank trains like one
process."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import DistributedType
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from safetensors.torch import load_file

from pipeline.config import ConfigError
from pipeline.families import get_family
from pipeline.families.minicpm_v2.checkpoint import check_checkpoint
from pipeline.stages import engine
from pipeline.stages.engine import configure_fsdp
from pipeline.training.checkpoints import load_training_checkpoint
from tests.helpers import compose_config, free_port, run_python

from . import fsdp_worker

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# pissa: LoRA started from the base weights, whose checkpoint is a rank-2r adapter of the original base
@pytest.fixture(scope="module", params=["lora", "full", "pissa"])
def sharded_run(request, tmp_path_factory) -> tuple[str, Path, dict]:
    mode = request.param
    out = tmp_path_factory.mktemp(f"fsdp-{mode}")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "training" / "fsdp_worker.py"), mode, str(out)]  # fmt: skip
    done = run_python(cmd, out, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return mode, out, json.loads((out / "result.json").read_text())


def test_each_process_holds_half_of_every_trainable_weight(sharded_run):
    _, _, result = sharded_run
    assert result["world"] == 2
    shapes = result["shapes"]
    assert shapes
    for name, (local, full) in shapes.items():
        assert local[1:] == full[1:] and local[0] == (full[0] + 1) // 2, name


def test_a_sharded_run_resumes_exactly_from_its_checkpoint(sharded_run):
    _, _, result = sharded_run
    a, b = result["losses_a"], result["losses_b"]
    assert len(a) == fsdp_worker.STEPS and len(b) == fsdp_worker.STEPS - fsdp_worker.SAVE_AT
    assert b == pytest.approx(a[fsdp_worker.SAVE_AT :], rel=1e-6, abs=1e-7)
    assert a[-1] != a[fsdp_worker.SAVE_AT - 1]  # the steps after the checkpoint did change the model


def test_the_checkpoint_holds_whole_tensors(sharded_run):
    mode, out, result = sharded_run
    ckpt = out / "sft" / f"checkpoint-{fsdp_worker.SAVE_AT}"
    assert (ckpt / "rng_state.pt").is_file() and (ckpt / "rng_state_1.pt").is_file()
    model, _, _ = fsdp_worker.build(mode, sharded=False)
    if mode == "full":
        check_checkpoint(ckpt, model.config)  # every official key, full shapes
    else:
        saved = load_file(str(ckpt / "adapter_model.safetensors"))
        full = {n: s[1] for n, s in result["shapes"].items()}
        if mode == "pissa":  # [A; A0] and [B, -B0]: the rank doubled
            full = {n: [2 * s[0], s[1]] if ".lora_A." in n else [s[0], 2 * s[1]] for n, s in full.items()}
        assert len(saved) == len(full)
        assert sorted(list(t.shape) for t in saved.values()) == sorted(full.values())
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(optim["state"]) == set(trainable)
    for name, state in optim["state"].items():
        assert state["exp_avg"].shape == trainable[name].shape, name


def test_the_sharded_checkpoint_resumes_in_one_process(sharded_run):
    mode, out, result = sharded_run
    torch.set_num_threads(1)
    ckpt = out / "sft" / f"checkpoint-{fsdp_worker.SAVE_AT}"
    model, optimizer, scheduler = fsdp_worker.build(
        mode, sharded=False, resume_from=ckpt if mode == "pissa" else None
    )
    state = load_training_checkpoint(ckpt, model, optimizer, scheduler, read_full=fsdp_worker.reader())
    assert state.global_step == fsdp_worker.SAVE_AT
    losses = [
        fsdp_worker.train_step(model, optimizer, scheduler, step)
        for step in range(state.global_step + 1, fsdp_worker.STEPS + 1)
    ]
    # every rank saw the same batches, so the sharded run was a one-process run up to float rounding
    assert losses == pytest.approx(result["losses_a"][fsdp_worker.SAVE_AT :], rel=1e-5)


def test_a_rank_without_images_keeps_step_with_the_others(sharded_run):
    # rank 0's batch has images of two sizes (two passes through the tower), rank 1's none: rank 1 makes
    # two blank passes so that every block's gathering pairs up; the losses equal an unsharded copy's
    _, _, result = sharded_run
    (before_sharded, before_whole), (after_sharded, after_whole) = result["mixed"]
    assert before_sharded == pytest.approx(before_whole, rel=1e-5)
    assert after_sharded == pytest.approx(after_whole, rel=1e-5)
    assert after_sharded != before_sharded  # the training step between them did update the weights


# ----- which modules FSDP makes its own units: the shipped configs name none, the pipeline names the model's
UNITS = {
    "minicpm_v2": {"MiniCPMDecoderLayer", "Block"},
    "qwen2_5_vl": {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"},
    "qwen3_vl": {"Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"},
    # its vision embeddings and window merger too; Qwen3_5VisionBlock, declared but not built, is left out
    "minicpm_v4_6": {
        "Qwen3_5DecoderLayer",
        "MiniCPMV4_6VisionEncoderLayer",
        "MiniCPMV4_6VisionEmbeddings",
        "MiniCPMV4_6ViTWindowAttentionMerger",
    },
}


def fsdp_accelerator(names: list[str] | None = None) -> SimpleNamespace:
    """What configure_fsdp reads of an Accelerator launched with bench/accelerate/fsdp.yaml (`names`: the
    config's fsdp_transformer_layer_cls_to_wrap)."""
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=names
    )
    return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))


def lora_all(family: str, folder: Path) -> torch.nn.Module:
    """The family's twin with LoRA on every linear layer (lora=all), as the sft stage wraps it."""
    fam = get_family(family)
    model = fam.load_bundle(folder).model
    return fam.apply_lora(model, fam.lora_config(model, "all", r=2, alpha=4, dropout=0.0))


@pytest.mark.parametrize("family", sorted(UNITS))
def test_every_family_is_wrapped_in_its_own_decoder_layers_and_vision_blocks(family_twin, family):
    model = lora_all(family, family_twin(family))
    accelerator = fsdp_accelerator()
    configure_fsdp(accelerator, model)
    plugin = accelerator.state.fsdp_plugin
    assert set(plugin.transformer_cls_names_to_wrap) == UNITS[family]
    # accelerate's own FSDP2 policy then picks those modules, every decoder layer and block among them
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    picked = [type(m).__name__ for m in model.modules() if policy(m)]
    assert set(picked) == UNITS[family]
    layers = model.config.get_text_config().num_hidden_layers
    assert sum(name in UNITS[family] and "Decoder" in name for name in picked) == layers


def test_a_config_naming_another_familys_layers_is_refused_naming_them(family_twin):
    model = lora_all("qwen2_5_vl", family_twin("qwen2_5_vl"))
    with pytest.raises(ConfigError) as err:
        configure_fsdp(fsdp_accelerator(["MiniCPMDecoderLayer", "Block"]), model)
    message = str(err.value)
    assert "fsdp_transformer_layer_cls_to_wrap names MiniCPMDecoderLayer, Block" in message
    assert "Qwen2_5_VLForConditionalGeneration" in message and "Qwen2_5_VLDecoderLayer" in message
    # a config naming the model's own classes is kept as written
    accelerator = fsdp_accelerator(["Qwen2_5_VLDecoderLayer"])
    configure_fsdp(accelerator, model)
    assert accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap == ["Qwen2_5_VLDecoderLayer"]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "minicpm_v4_6"])
def test_an_hf_family_sharded_in_its_units_trains_a_text_only_rank_like_one_process(
    family_twin, tmp_path, family
):
    # lora=all: the vision tower is sharded and trains; rank 1's micro-batch has no image, so it passes a
    # blank one through the tower (HFNativeFamily.balanced_vision), or the ranks' gathers would not pair up
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "training" / "fsdp_family_worker.py"), family, str(family_twin(family)),
           str(tmp_path)]  # fmt: skip
    done = run_python(cmd, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["units"]) == UNITS[family]
    sharded, whole = result["losses"]
    assert sharded == pytest.approx(whole, rel=1e-5)
    # every trainable weight, the tower's LoRA included, gets FSDP's mean of the two ranks' gradients
    assert result["sharded_grads"] == result["trainable"]
    assert any(".visual." in n or "vision" in n for n in result["cosines"])
    assert min(result["cosines"].values()) > 0.9999
    assert result["max_abs_diff"] < 1e-5


def test_an_fsdp_config_off_the_gpu_says_that_the_run_replicates_instead(monkeypatch, caplog):
    # accelerate shards with FSDP on GPUs only; elsewhere it would run plain data parallel without a word
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.engine"):
        accelerator = engine.start_accelerator(compose_config(["device=cpu"]))
    assert str(accelerator.distributed_type).endswith("NO")
    assert "asks for FSDP, which shards on GPUs only: on cpu this run trains as NO" in caplog.text
