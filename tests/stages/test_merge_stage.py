"""The merge stage: a tiny-twin LoRA run folded into a standalone checkpoint that reproduces its adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.families.minicpm_v2 import family as v2_family
from pipeline.families.minicpm_v2 import merge as v2_merge
from pipeline.families.minicpm_v2.bundle import load_bundle
from pipeline.families.minicpm_v2.checkpoint import (
    INDEX_NAME,
    load_model,
    read_checkpoint_shapes,
    save_checkpoint,
)
from pipeline.families.minicpm_v2.collate import collate_for_training
from pipeline.stages import merge, sft
from tests.helpers import compose_config, copy_twin, run_stage

OFFICIAL_FILES = ("config.json", INDEX_NAME, "tokenizer.model", "preprocessor_config.json")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The twin's matrices are too small to gain from a second thread, and on a busy machine every hand-off
    # between threads waits for a time slice: one thread runs this module many times faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_twin) -> Path:
    root = tmp_path_factory.mktemp("merge")
    # A random (not pre-trained) twin is enough to compare merged and adapter logits; this module's own copy,
    # as one test tries to merge over it.
    copy_twin(tiny_twin, root / "tiny")
    return root


def config(workdir: Path, *overrides: str):
    return compose_config(
        [
            "trainer.max_steps=2",
            "trainer.eval_steps=2",
            "trainer.save_steps=2",
            "trainer.max_eval_samples=2",
            "trainer.batch_size=2",
            "trainer.eval_batch_size=2",
            "model.gradient_checkpointing=false",
            f"model.path={workdir / 'tiny'}",
            f"dataset.path={workdir / 'demo'}",
            "device=cpu",
            "stages=[sft,merge]",
            *overrides,
        ]
    )


def train(workdir: Path, name: str, *overrides: str) -> tuple[Path, dict]:
    """Returns the run folder and the state after a 2-step sft run."""
    run_dir = workdir / name
    cfg = config(workdir, *overrides)
    return run_dir, run_stage(sft, cfg, run_dir)


@pytest.fixture(scope="module")
def qkv_run(workdir: Path) -> tuple[Path, dict, dict]:
    run_dir, state = train(workdir, "qkv")
    result = run_stage(merge, config(workdir), run_dir, **state)
    return run_dir, state, result


@pytest.fixture(scope="module")
def all_run(workdir: Path) -> tuple[Path, dict, dict]:
    run_dir, state = train(workdir, "all", "lora=all", "optim.lr=1e-2")
    result = run_stage(merge, config(workdir, "lora=all", "optim.lr=1e-2"), run_dir, **state)
    return run_dir, state, result


def logits_on(model: torch.nn.Module, bundle) -> list[torch.Tensor]:
    """Returns the logits of `model` on two generated image conversations (one sliced, one not)."""
    samples = v2_merge.dummy_samples(bundle.tokenizer, bundle.processor, 2, seed=7)
    assert len(samples) == 2 and all(len(s.image_bound) >= 1 for s in samples)
    return [v2_merge.sample_logits(model, s, bundle.tokenizer.pad_id, torch.device("cpu")) for s in samples]


def test_merged_folder_has_the_official_layout_and_the_base_keys(workdir: Path, qkv_run) -> None:
    run_dir, state, result = qkv_run
    merged = result["merged"]
    assert merged == state["ckpt"].with_name(f"{state['ckpt'].name}-merged")
    names = {p.name for p in merged.iterdir()}
    assert set(OFFICIAL_FILES) <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert not {"adapter_config.json", "adapter_model.safetensors", "base_model.json"} & names
    index = json.loads((merged / INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == shards

    got = {k: shape for k, (shape, _) in read_checkpoint_shapes(merged).items()}
    base = {k: shape for k, (shape, _) in read_checkpoint_shapes(workdir / "tiny").items()}
    assert not [k for k in got if "lora" in k]
    assert got == base  # same keys and shapes
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "float32"
    assert (merged / "tokenizer.model").read_bytes() == (workdir / "tiny" / "tokenizer.model").read_bytes()

    info = json.loads((run_dir / "merge" / merge.INFO_FILE).read_text())
    assert info["adapter"] == str(state["ckpt"]) and info["output"] == str(merged)
    assert info["base"] == str((workdir / "tiny").resolve())
    assert info["verify_inputs"] == "held-out" and info["verify_samples"] == 2
    assert info["verified"] is True and 0 <= info["max_abs_logits_diff"] <= info["tolerance"]


def test_merged_checkpoint_loads_as_a_base_model_and_matches_the_adapter(workdir: Path, qkv_run) -> None:
    _, state, result = qkv_run
    standalone = load_bundle(str(result["merged"]))
    assert standalone.kind == "base"
    adapter = load_bundle(str(workdir / "tiny"), ckpt=state["ckpt"])
    assert adapter.kind == "adapter"
    want = logits_on(adapter.model.eval(), adapter)
    got = logits_on(standalone.model, standalone)
    scale = max(float(w.abs().max()) for w in want)
    assert max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)) <= 1e-4 * max(scale, 1.0)


def test_lora_all_merges_vision_and_resampler_adapters(workdir: Path, all_run) -> None:
    _, state, result = all_run
    base = load_model(workdir / "tiny")
    merged = load_model(result["merged"])
    base_state, merged_state = base.state_dict(), merged.state_dict()
    changed = {k for k in base_state if not torch.equal(base_state[k], merged_state[k])}
    assert any(k.startswith("vpm.blocks.") and k.endswith("attn.qkv.weight") for k in changed)
    assert any(k.startswith("resampler.kv_proj") for k in changed)
    assert any(k.startswith("llm.model.layers.") and k.endswith("mlp.down_proj.weight") for k in changed)
    assert not any("norm" in k or k.endswith(".bias") for k in changed)  # LoRA only touches linear weights

    bundle = load_bundle(str(workdir / "tiny"))
    adapter = load_bundle(str(workdir / "tiny"), ckpt=state["ckpt"]).model.eval()
    from_base, from_adapter, from_merged = (logits_on(m, bundle) for m in (base, adapter, merged))
    scale = max(float(a.abs().max()) for a in from_adapter)
    moved = max(float((m - b).abs().max()) for m, b in zip(from_merged, from_base, strict=True))
    off = max(float((m - a).abs().max()) for m, a in zip(from_merged, from_adapter, strict=True))
    assert moved > 100 * 1e-4 * scale  # the merge changed the model's outputs
    assert off <= 1e-4 * max(scale, 1.0)  # and they are the adapter model's


def test_a_bf16_base_merges_and_is_written_in_bf16(workdir: Path) -> None:
    save_checkpoint(
        load_model(workdir / "tiny"),
        workdir / "tiny-bf16",
        dtype=torch.bfloat16,
        source_folder=workdir / "tiny",
    )
    overrides = (f"model.path={workdir / 'tiny-bf16'}", "model.dtype=bfloat16", "lora=all", "optim.lr=1e-2")
    run_dir, state = train(workdir, "bf16", *overrides)
    merged = run_stage(merge, config(workdir, *overrides), run_dir, **state)["merged"]
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(next(merged.glob("model-00001-*.safetensors"))), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    info = json.loads((run_dir / "merge" / merge.INFO_FILE).read_text())
    assert info["dtype"] == "bfloat16" and info["verified"] is True
    looser = merge.RELATIVE_TOLERANCE[torch.bfloat16] * max(info["logits_scale"], 1.0)
    assert info["tolerance"] == pytest.approx(looser) and looser > 100 * info["logits_scale"] * 1e-4


def test_a_merge_that_does_not_reproduce_the_adapter_fails(workdir: Path, all_run, monkeypatch) -> None:
    _, state, _ = all_run
    real_save = v2_family.save_checkpoint

    def save_with_a_damaged_head(model, folder, **kwargs):
        with torch.no_grad():
            model.llm.lm_head.weight.mul_(1.5)
        return real_save(model, folder, **kwargs)

    monkeypatch.setattr(v2_family, "save_checkpoint", save_with_a_damaged_head)
    out = workdir / "damaged"
    cfg = config(workdir, "lora=all", f"merge.output={out}", "merge.verify_samples=1")
    with pytest.raises(merge.MergeError, match=r"does not reproduce adapter .*exceeds"):
        run_stage(merge, cfg, workdir / "damaged-run", **state)
    info = json.loads((workdir / "damaged-run" / "merge" / merge.INFO_FILE).read_text())
    assert info["verified"] is False and info["max_abs_logits_diff"] > info["tolerance"]


def test_merge_from_a_ckpt_setting_without_data_checks_on_generated_inputs(workdir: Path, qkv_run) -> None:
    run_dir, state, _ = qkv_run
    out = workdir / "exported"
    cfg = compose_config(
        [
            f"model.path={workdir / 'tiny'}",
            "stages=[merge]",
            f"ckpt={run_dir}",
            f"merge.output={out}",
            "merge.shard_size=1MB",
            "merge.verify_samples=1",
            "dataset=custom",
            f"dataset.path={workdir / 'no-such-file.jsonl'}",
        ]
    )
    result = run_stage(merge, cfg, workdir / "export-run")
    assert result["merged"] == out.resolve()
    info = json.loads((workdir / "export-run" / "merge" / merge.INFO_FILE).read_text())
    assert info["adapter"] == str(state["ckpt"])  # the run folder's sft/best
    assert info["verify_inputs"] == "dummy" and info["verify_samples"] == 1 and info["verified"] is True
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2  # 1 MB shards split the ~3 MB twin further than the official LLM / vision split
    assert read_checkpoint_shapes(out).keys() == read_checkpoint_shapes(workdir / "tiny").keys()
    load_model(out)


def test_a_full_fine_tuning_checkpoint_is_refused(workdir: Path) -> None:
    full = workdir / "full-ckpt"
    shutil.copytree(workdir / "tiny", full, dirs_exist_ok=True)
    cfg = compose_config([f"model.path={workdir / 'tiny'}", "stages=[merge]", f"ckpt={full}"])
    refused = r"full fine-tuning checkpoint.*already a standalone.*model-00001"
    with pytest.raises(merge.MergeError, match=refused):
        run_stage(merge, cfg, workdir / "full-run")
    assert not (workdir / "full-ckpt-merged").exists()


def test_a_missing_or_absent_checkpoint_errors_clearly(workdir: Path) -> None:
    missing = workdir / "no-such-run" / "sft" / "checkpoint-9"
    cfg = compose_config([f"model.path={workdir / 'tiny'}", "stages=[merge]", f"ckpt={missing}"])
    with pytest.raises(FileNotFoundError, match=r"no-such-run/sft/checkpoint-9 does not exist"):
        run_stage(merge, cfg, workdir / "missing-run")
    with pytest.raises(FileNotFoundError, match=r"checkpoint-9 does not exist"):
        run_stage(merge, cfg, workdir / "missing-run", ckpt=missing)
    cfg = compose_config([f"model.path={workdir / 'tiny'}", "stages=[merge]"])
    with pytest.raises(merge.MergeError, match=r"sft saved no checkpoint"):
        run_stage(merge, cfg, workdir / "missing-run", ckpt=None)
    with pytest.raises(merge.MergeError, match=r"ckpt=null; set ckpt=<run>/sft/checkpoint-N"):
        run_stage(merge, cfg, workdir / "missing-run")


def test_the_output_never_overwrites_the_base_model(workdir: Path, qkv_run) -> None:
    _, state, _ = qkv_run
    cfg = config(workdir, f"merge.output={workdir / 'tiny'}")
    with pytest.raises(merge.MergeError, match=r"merge.output=.*tiny is the base model"):
        run_stage(merge, cfg, workdir / "guard-run", **state)
    assert (workdir / "tiny" / "config.json").is_file()


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5 KB", 1500), (4096, 4096)],
)
def test_parse_size(text, size: int) -> None:
    assert merge.parse_size(text) == size


def test_parse_size_names_the_key_and_the_accepted_forms() -> None:
    with pytest.raises(ValueError, match=r"merge.shard_size=5 gigs is not a size; use e.g. 5GB"):
        merge.parse_size("5 gigs")


def test_the_dtype_comes_from_the_base_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert merge.checkpoint_dtype(tmp_path) == torch.bfloat16
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float16"}))
    assert merge.checkpoint_dtype(tmp_path) == torch.float16
    (tmp_path / "config.json").write_text("{}")
    assert merge.checkpoint_dtype(tmp_path) == torch.float32
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "int8"}))
    with pytest.raises(merge.MergeError, match=r"config.json: torch_dtype=int8 is not one of"):
        merge.checkpoint_dtype(tmp_path)


def test_sample_logits_pads_nothing(workdir: Path) -> None:
    bundle = load_bundle(str(workdir / "tiny"))
    sample = v2_merge.dummy_samples(bundle.tokenizer, bundle.processor, 1, seed=0)[0]
    batch = collate_for_training([sample], bundle.tokenizer.pad_id)
    logits = v2_merge.sample_logits(bundle.model, sample, bundle.tokenizer.pad_id, torch.device("cpu"))
    assert logits.shape == (batch["input_ids"].shape[1], bundle.model.config.vocab_size)
    assert logits.dtype == torch.float32
