"""Every shipped config composes and validates; bad overrides fail early, naming the key and the choices."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from pipeline.__main__ import describe_error
from pipeline.config import ConfigError, objective_problems, resolve_device, resolve_dtype, validate
from pipeline.families import family_from_config
from pipeline.families.base import checkpointed_layers
from pipeline.stages import STAGES
from pipeline.stages import sft as sft_stage
from pipeline.stages.sft import plan_stage
from pipeline.training import plan
from pipeline.training.plan import (
    Launch,
    TrainingPlan,
    lora_trains_tower,
    plan_training,
    resolve_checkpointing,
    resolve_compile,
    static_bucket,
)
from tests.helpers import CONF_DIR

# groups selected with `+group=name` (not in config.yaml's defaults list)
APPENDED_GROUPS = {"experiment", "hparams_search"}
# keys a file needs before it validates (a required path has no useful default)
EXTRA_OVERRIDES = {
    "dataset/custom": ["dataset.path=rows.jsonl"],
    "dataset/hf": ["dataset.path=org/name", "dataset.trust_hub=true"],
    "lora/none": ["stages=[sft,eval,infer]"],  # full fine-tuning has no adapter to merge
}
# plugins a file builds on; its test is skipped when the extra is not installed
NEEDS_PLUGIN = {
    "hparams_search": "hydra_plugins.hydra_optuna_sweeper",
    "hydra/launcher": "hydra_plugins.hydra_submitit_launcher",
}


def plan_of(cfg, device=None, processes: int = 1, compiles: bool = True) -> TrainingPlan:
    """The training plan of `cfg` for one unsharded engine on `device` (the CPU unless given), for a family
    that compiles unless told."""
    return plan_training(cfg, Launch(device or torch.device("cpu"), processes), compiles=compiles)


def checkpointing_of(cfg, device) -> bool:
    return plan_of(cfg, device).gradient_checkpointing


def _group_files() -> list[tuple[str, str]]:
    """Return (group, option) for every yaml under conf/ except config.yaml itself."""
    return sorted(
        (str(path.parent.relative_to(CONF_DIR)), path.stem)
        for path in CONF_DIR.rglob("*.yaml")
        if path.parent != CONF_DIR
    )


def _select(group: str, option: str) -> list[str]:
    prefix = "+" if group in APPENDED_GROUPS else ""
    return [f"{prefix}{group}={option}", *EXTRA_OVERRIDES.get(f"{group}/{option}", [])]


def _skip_without_plugin(group: str) -> None:
    module = NEEDS_PLUGIN.get(group)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[sweeps,slurm]')")


def test_group_files_are_found():
    found = set(_group_files())
    assert {("model", "minicpm_v2"), ("experiment", "lora_qkv"), ("trainer", "cpu_smoke")} <= found


@pytest.mark.parametrize(("group", "option"), _group_files(), ids=lambda v: v)
def test_every_shipped_yaml_composes_and_validates(compose, group, option):
    _skip_without_plugin(group)
    cfg = compose(_select(group, option), return_hydra_config=True)
    validate(cfg)
    assert cfg.hydra.runtime.choices[group] == option
    if group == "experiment":
        assert cfg.experiment_name == option


@pytest.mark.parametrize(("group", "option"), _group_files(), ids=lambda v: v)
def test_every_yaml_opens_with_how_to_select_it(group, option):
    lines = (CONF_DIR / group / f"{option}.yaml").read_text().splitlines()
    header = [line for line in lines if line.startswith("#") and "@package" not in line]
    assert lines[0].startswith("#"), "the file must open with a comment"
    assert any("python -m pipeline" in line for line in header), "the opening comment must show the command"


def test_config_yaml_opens_with_how_to_run_it():
    text = (CONF_DIR / "config.yaml").read_text()
    assert text.startswith("#") and "model=minicpm_v2 trainer=default" in text.split("defaults:")[0]


def test_defaults_match_ms_swift_for_minicpm_v2(compose):
    cfg = compose(["model=minicpm_v2", "trainer=default", "dataset=custom"])
    assert cfg.model.path == "openbmb/MiniCPM-V-2" and cfg.model.dtype == "auto"
    # auto: on (ms-swift's default) wherever memory needs it; see the test below
    assert cfg.model.gradient_checkpointing == "auto" and cfg.model.max_slice_nums == 9
    assert checkpointing_of(cfg, torch.device("cpu")) is True
    assert (cfg.lora.name, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == ("qkv", 8, 32, 0.05)
    assert plan_of(cfg).lr == 1e-4 and cfg.optim.weight_decay == 0.1 and cfg.optim.max_grad_norm == 0.5
    assert cfg.optim.warmup_ratio == 0.05 and cfg.optim.scheduler == "cosine"
    t = cfg.trainer
    assert (t.epochs, t.batch_size, t.grad_accum) == (1, 1, None)  # ceil(16 / batch / processes)
    assert (t.eval_steps, t.save_steps, t.save_total_limit, t.eval_batch_size) == (50, None, 2, None)
    settings = plan_of(cfg).loop
    assert (settings.save_steps, settings.eval_batch_size, settings.grad_accum) == (50, 1, 16)  # as ms-swift
    assert cfg.dataset.max_length == 2048 and cfg.dataset.test_ratio == 0.01
    assert cfg.seed == 42 and list(cfg.stages) == [
        s for s in STAGES if s not in ("dpo", "serve")
    ]  # those only when asked


def test_compile_and_checkpointing_auto_resolve_by_device_tuning_and_budget(compose, monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    qkv = compose(["model=minicpm_v2", "trainer=default", "+experiment=lora_qkv"])
    assert qkv.trainer.compile == "auto"
    real_compiles_on = plan.compiles_on
    # trainer=default on one recent GPU: compiled, no checkpointing (activations bounded by the budget)
    monkeypatch.setattr(plan, "compiles_on", lambda device: device.type == "cuda")
    assert resolve_compile(qkv.trainer.compile, cuda, True, 1, False) is True
    assert plan_of(qkv, cuda).compile is True
    assert checkpointing_of(qkv, cuda) is False
    # where compile is not yet safe or not supported: off (a family that does not compile: `compiles` false)
    assert resolve_compile("auto", cpu, True, 1, False) is False
    assert resolve_compile("auto", cuda, False, 1, False) is False
    assert resolve_compile("auto", cuda, True, 2, False) is False
    assert resolve_compile("auto", cuda, True, 1, True) is False
    assert resolve_compile(True, cpu, False, 2, True) is True  # an explicit choice stays
    assert plan_of(qkv, cpu).compile is False and plan_of(qkv, cuda, compiles=False).compile is False
    assert plan_of(qkv, cuda, processes=2).compile is False
    assert plan_training(qkv, Launch(cuda, 2, "FSDP"), compiles=True).compile is False
    monkeypatch.setattr(plan, "compiles_on", lambda device: False)  # a pre-Ampere card, or no triton
    assert resolve_compile("auto", cuda, True, 1, False) is False
    assert plan_of(qkv, cuda).compile is False
    assert real_compiles_on(cpu) is False
    # checkpointing stays on where memory needs it: full fine-tuning, low_memory, the plain regime, CPU
    full = compose(["model=minicpm_v2", "trainer=default", "+experiment=full"])
    low = compose(["model=minicpm_v2", "trainer=low_memory", "+experiment=lora_qkv"])
    plain = compose(["model=minicpm_v2", "+experiment=lora_qkv", "trainer.micro_batch_tokens=0"])
    assert [checkpointing_of(c, cuda) for c in (full, low, plain)] == [True, True, True]
    assert checkpointing_of(qkv, cpu) is True
    assert resolve_checkpointing(True, cuda, "qkv", 4096) is True
    assert resolve_checkpointing(False, cpu, "none", 0) is False
    # LoRA that trains the vision tower checkpoints too: the token budget does not bound its activations
    # (MiniCPM-V-2 lora=all ran out of an 80 GB card at its first step without checkpointing)
    for model in ("minicpm_v2", "qwen2_5_vl_tiny"):
        assert (
            plan_of(compose([f"model={model}", "+experiment=lora_all"]), cuda).gradient_checkpointing is True
        )
        tower_qkv = compose(
            [f"model={model}", "+experiment=lora_qkv", "lora.target_modules=[vpm.blocks.0.attn.qkv]"]
        )
        assert plan_of(tower_qkv, cuda).gradient_checkpointing is True
    assert checkpointing_of(qkv, cuda) is False
    # "vision": the tower's blocks only, wherever it is asked for
    tower_only = compose(["model=minicpm_v2", "+experiment=lora_all", "model.gradient_checkpointing=vision"])
    assert checkpointing_of(tower_only, cuda) == "vision" == checkpointing_of(tower_only, cpu)
    assert "gradient checkpointing: vision tower only" in plan_of(tower_only, cuda).describe()
    frozen_full = compose(
        ["model=minicpm_v2", "trainer=default", "+experiment=full", "lora.freeze_vision=true"]
    )
    assert lora_trains_tower(frozen_full.lora) is False and lora_trains_tower(full.lora) is True


def test_the_training_plan_pads_and_preallocates_for_cuda_graphs_and_says_what_it_chose(compose, monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(plan, "compiles_on", lambda device: device.type == "cuda")
    qkv = compose(["model=minicpm_v2", "trainer=default", "+experiment=lora_qkv"])
    graphs = plan_of(qkv, cuda)
    assert graphs.cuda_graphs and graphs.loop.pad_to_multiple == 128 and graphs.loop.preallocate_grads
    # compiled on the CPU: no graphs, so no padding; DeepSpeed keeps its gradients in its own buffers
    forced = compose(["model=minicpm_v2", "trainer=default", "+experiment=lora_qkv", "trainer.compile=true"])
    on_cpu = plan_of(forced, cpu)
    assert on_cpu.compile and not on_cpu.cuda_graphs and on_cpu.loop.pad_to_multiple == 1
    deepspeed = plan_training(forced, Launch(cuda, 1, "DEEPSPEED"), compiles=True)
    assert deepspeed.cuda_graphs and not deepspeed.loop.preallocate_grads
    # full fine-tuning keeps fp32 master weights; LoRA holds the base in the model dtype
    assert plan_of(compose(["+experiment=full", "model.dtype=bfloat16"])).weights_dtype == torch.float32
    assert plan_of(compose(["+experiment=lora_qkv", "model.dtype=bfloat16"])).weights_dtype == torch.bfloat16
    assert plan_of(qkv, cpu).loop.num_workers == 0  # auto: the main process on the CPU
    assert (
        plan.resolve_mixed_precision("auto", cpu) == "no"
        and plan.resolve_mixed_precision("bf16", cpu) == "bf16"
    )
    text = plan_training(qkv, Launch(cuda, 2, "FSDP", "bf16"), compiles=True).describe()
    assert "engine: FSDP, 2 process(es), device cuda; mixed precision: bf16" in text
    assert "compile: off; CUDA graphs: off; gradient checkpointing: off" in text
    assert "optimizer step: 16 rows (batch 1 x grad_accum 8 x 2 process(es))" in text
    assert "micro-batches: up to 4096 padded tokens" in text and "lr 0.0001" in text
    assert "padded to a multiple of 128" in graphs.describe()


def test_packing_auto_resolves_by_family_device_and_budget(compose):
    """trainer.packing=auto: on for a family that packs padding-free on a CUDA device with a token budget;
    off on the CPU, in the plain regime and for MiniCPM-V-2 (its packing builds a mask); the plan says so."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    qwen = compose(["model=qwen2_5_vl_tiny", "trainer=default", "+experiment=lora_qkv"])
    assert qwen.trainer.packing == "auto"

    def packing_of(cfg, device, padding_free=True) -> bool:
        launch = Launch(device)
        return plan_training(cfg, launch, compiles=False, packs_padding_free=padding_free).loop.packing

    assert packing_of(qwen, cuda) is True
    assert packing_of(qwen, cpu) is False
    assert packing_of(qwen, cuda, padding_free=False) is False
    assert packing_of(compose(["model=qwen2_5_vl_tiny", "trainer.micro_batch_tokens=0"]), cuda) is False
    forced = compose(["model=minicpm_v2", "trainer.packing=true"])
    assert packing_of(forced, cpu, padding_free=False) is True  # true and false stay as given
    assert packing_of(compose(["model=qwen2_5_vl_tiny", "trainer.packing=false"]), cuda) is False
    assert plan.resolve_packing("auto", cuda, True, 0) is False
    text = plan_training(qwen, Launch(cuda), compiles=False, packs_padding_free=True).describe()
    assert "micro-batches: packed rows of up to 4096 tokens (padding-free)" in text


def fake_card(monkeypatch, gib: int) -> dict[str, int]:
    """Makes torch.cuda report one Hopper card of `gib` GiB; returns {"gib": ...}, which a test changes to
    change the card's memory."""
    total = {"gib": gib}

    class Properties:
        major, minor = 9, 0

        @property
        def total_memory(self) -> int:
            return total["gib"] * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties())
    return total


def test_the_token_budget_auto_resolves_by_card_memory_and_tuning(compose, monkeypatch):
    """trainer.micro_batch_tokens=auto: 16384 for LoRA on a card of 60 GiB or more, and for full fine-tuning
    there where its state (16 bytes a parameter, split over sharding processes) takes at most half the card;
    4096 on smaller cards, for full fine-tuning of a model whose state fills the card or whose size is not
    known, and on the CPU; a number stays as given; the plan and checkpointing follow it."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    total = fake_card(monkeypatch, 80)
    qkv = compose(["model=qwen2_5_vl_tiny", "trainer=default", "+experiment=lora_qkv"])
    assert qkv.trainer.micro_batch_tokens == "auto"
    large = plan_training(qkv, Launch(cuda), compiles=False, packs_padding_free=True)
    assert large.loop.micro_batch_tokens == 16384 and large.loop.packing and not large.gradient_checkpointing
    assert "packed rows of up to 16384 tokens" in large.describe()
    full = compose(["model=qwen2_5_vl_tiny", "trainer=default", "+experiment=full"])
    assert plan_training(full, Launch(cuda), compiles=False).loop.micro_batch_tokens == 4096  # size unknown

    def full_budget(parameters: int, launch: Launch | None = None) -> int:
        launch = launch or Launch(cuda)
        return plan_training(full, launch, compiles=False, parameters=parameters).loop.micro_batch_tokens

    # MiniCPM-V 4.6 (1.30 B: ~21 GB of state) and Qwen2.5-VL-3B (3.75 B: ~60 GB) on an 80 GiB card
    assert full_budget(1_300_000_000) == 16384 and full_budget(3_750_000_000) == 4096
    assert full_budget(3_750_000_000, Launch(cuda, 4, "FSDP")) == 16384  # a quarter of the state each
    assert full_budget(3_750_000_000, Launch(cuda, 4, "MULTI_GPU")) == 4096  # DDP: the whole state each
    assert plan_of(qkv, cpu).loop.micro_batch_tokens == 4096
    given = compose(["model=qwen2_5_vl_tiny", "+experiment=lora_qkv", "trainer.micro_batch_tokens=2048"])
    assert plan_training(given, Launch(cuda), compiles=False).loop.micro_batch_tokens == 2048
    low = compose(["model=qwen2_5_vl_tiny", "trainer=low_memory", "+experiment=lora_qkv"])
    assert plan_training(low, Launch(cuda), compiles=False).loop.micro_batch_tokens == 1024
    total["gib"] = 24
    assert plan_training(qkv, Launch(cuda), compiles=False).loop.micro_batch_tokens == 4096
    assert full_budget(100_000_000) == 4096
    for bad in ("lots", "-1", "true"):
        with pytest.raises(
            ConfigError, match=r"trainer\.micro_batch_tokens=.* must be auto or an integer >= 0"
        ):
            validate(compose([f"trainer.micro_batch_tokens={bad}"]))


def test_only_an_auto_budget_of_one_process_halves_on_out_of_memory(compose, monkeypatch):
    """auto (16384 on an 80 GiB card) may halve down to 512, then no more; a budget given explicitly, the
    plain regime, several processes (which would have to agree on it), DeepSpeed and CUDA graphs never halve;
    compiled packed rows keep the static lengths they started with (the collate built pads to them)."""
    cuda = torch.device("cuda")
    fake_card(monkeypatch, 80)
    monkeypatch.setattr(plan, "compiles_on", lambda device: device.type == "cuda")
    qkv = compose(["model=qwen2_5_vl_tiny", "trainer=default", "+experiment=lora_qkv"])
    loop = plan_training(
        qkv, Launch(cuda), compiles=True, packs_padding_free=True, compiled_shapes="packed"
    ).loop
    assert loop.halves_on_oom and (loop.micro_batch_tokens, loop.pad_to_multiple) == (
        16384,
        static_bucket(16384),
    )
    budgets = []
    while loop is not None:
        budgets.append((loop.micro_batch_tokens, loop.pad_to_multiple))
        loop = loop.halved()
    assert budgets == [(n, static_bucket(16384)) for n in (16384, 8192, 4096, 2048, 1024, 512)]
    # CUDA graphs (MiniCPM-V-2 compiled on a GPU): a recording cut short is not known to recover
    graphs = plan_training(qkv, Launch(cuda), compiles=True, compiled_shapes="padded").loop
    assert graphs.pad_to_multiple == 128 and graphs.halved() is None
    eager = plan_training(qkv, Launch(cuda), compiles=False, compiled_shapes="padded").loop
    assert eager.halved().micro_batch_tokens == 8192 and eager.halved().pad_to_multiple == 1
    assert plan_training(qkv, Launch(cuda, 2, "MULTI_GPU"), compiles=False).loop.halved() is None
    assert plan_training(qkv, Launch(cuda, 1, "DEEPSPEED"), compiles=False).loop.halved() is None
    for fixed in ("trainer.micro_batch_tokens=8192", "trainer.micro_batch_tokens=0"):
        given = compose(["model=qwen2_5_vl_tiny", "trainer=default", "+experiment=lora_qkv", fixed])
        assert plan_training(given, Launch(cuda), compiles=False).loop.halved() is None


def test_compile_and_checkpointing_take_only_auto_true_false(compose):
    for key in ("trainer.compile", "model.gradient_checkpointing", "trainer.packing"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(compose([f"{key}=sometimes"]))
    # checkpointing also takes a share of the language model's layers, strictly between 0 and 1
    for share in ("1.5", "0.0", "1", "-0.5"):
        with pytest.raises(ConfigError, match=r"model\.gradient_checkpointing=.* share between 0 and 1"):
            validate(compose([f"model.gradient_checkpointing={share}"]))


def test_a_share_of_checkpointed_layers_resolves_as_given_and_names_the_first_layers(compose):
    cuda = torch.device("cuda")
    full = compose(
        ["model=minicpm_v2", "trainer=default", "+experiment=full", "model.gradient_checkpointing=0.5"]
    )
    validate(full)
    resolved = plan_of(full, cuda)
    assert resolved.gradient_checkpointing == 0.5
    assert "the vision tower and 0.5 of the language model's layers" in resolved.describe()
    assert resolve_checkpointing(0.25, torch.device("cpu"), "qkv", 0) == 0.25
    # how many layers a share checkpoints: the first ones, rounded, never none nor all of them
    assert [checkpointed_layers(0.5, n) for n in (40, 36, 3, 2, 1)] == [20, 18, 2, 1, 1]
    assert [checkpointed_layers(0.01, 40), checkpointed_layers(0.99, 40)] == [1, 39]
    assert [checkpointed_layers(c, 40) for c in (True, False, "vision")] == [40, 0, 0]


def test_embedded_default_is_the_tiny_twin_on_cpu_settings(compose, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", "/somewhere")
    cfg = compose()
    assert cfg.model.name == "minicpm_v2_tiny" and cfg.model.build_if_missing is True
    assert cfg.model.path == "/somewhere/minicpm_v2_tiny"
    assert cfg.trainer.max_steps > 0 and cfg.trainer.grad_accum == 1
    assert cfg.dataset.name == "demo" and cfg.tracking.backend == "none"


def test_full_experiment_uses_the_full_lr_and_skips_merge(compose):
    cfg = compose(["+experiment=full"])
    assert cfg.lora.name == "none" and "merge" not in cfg.stages
    # optim.lr null: the model's recipe for full fine-tuning (ms-swift's 1e-5 for MiniCPM-V-2)
    assert cfg.optim.lr is None and plan_of(cfg).lr == cfg.model.full_lr
    assert plan_of(compose(["+experiment=full", "model=minicpm_v2"])).lr == 1e-5
    assert plan_of(compose(["+experiment=lora_qkv", "model=minicpm_v2"])).lr == 1e-4
    assert plan_of(compose(["+experiment=full", "optim.lr=3e-4"])).lr == 3e-4


def test_misspelt_key_fails_naming_key_and_valid_keys(compose):
    with pytest.raises(ConfigCompositionException) as info:
        compose(["lora.rank=4"])
    message = describe_error(info.value)
    assert "lora.rank" in message and "valid keys" in message and "alpha" in message


def test_wrong_type_fails_naming_the_key(compose):
    with pytest.raises(ConfigCompositionException) as info:
        compose(["lora.r=abc"])
    message = describe_error(info.value)
    assert message.startswith("lora.r:") and "Integer" in message


def test_unknown_group_choice_lists_the_real_options(compose):
    with pytest.raises(MissingConfigException) as info:
        compose(["lora=foo"])
    message = describe_error(info.value)
    assert "lora/foo" in message and "all, none, qkv" in message and "base_lora" not in message
    assert "\n" not in message


def test_unknown_stage_names_valid_stages(compose):
    cfg = compose(["stages=[sft,bogus]"])
    with pytest.raises(ConfigError, match="'bogus'.*sft, dpo, eval, merge, infer"):
        validate(cfg)


@pytest.mark.parametrize(
    ("stages", "fragment"),
    [("[merge,sft]", "out of order"), ("[sft,sft]", "twice")],
)
def test_stage_order_and_duplicates_are_rejected(compose, stages, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate(compose([f"stages={stages}"]))


def test_empty_stage_list_is_valid(compose):
    validate(compose(["stages=[]"]))


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("lora.name=foo", "lora.name=foo is not a valid choice; valid: qkv, all, none"),
        ("model.dtype=fp8", "valid: auto, float32, bfloat16, float16"),
        ("device=gpu", "valid: auto, cpu, cuda, cuda:N"),
        ("tracking.backend=mlflow", "valid: none, wandb, tensorboard"),
        ("optim.fused=maybe", "valid: auto, true, false"),
        ("model.decode=graph", "model.decode=graph is not a valid choice; valid: auto, static, dynamic"),
        ("model.chunked_loss=on", "model.chunked_loss=on is not a valid choice; valid: auto, off"),
        ("lora.r=0", "lora.r=0 is out of range"),
        ("infer.top_p=1.5", "infer.top_p=1.5 is out of range"),
        ("merge.shard_size=lots", "merge.shard_size=lots"),
        ("+foo=1", "foo is not a known key"),
        ("+lora.rank=4", "lora.rank is not a known key; valid keys of lora"),
        ("dataset.sources=[{name:nope}]", "dataset.sources[0].name=nope is not a valid dataset"),
        ("trainer.max_steps=-5", "trainer.max_steps=-5 is not valid; use -1 (train for trainer.epochs)"),
    ],
)
def test_bad_values_name_key_and_choices(compose, override, fragment):
    with pytest.raises(ConfigError) as info:
        validate(compose([override]))
    assert fragment in str(info.value)


def test_validate_reports_every_problem_at_once(compose):
    with pytest.raises(ConfigError) as info:
        validate(compose(["lora.name=foo", "lora.r=0"]))
    assert len(info.value.problems) == 2


def test_optim_fused_accepts_booleans(compose):
    validate(compose(["optim.fused=true"]))
    validate(compose(["optim.fused=false"]))


def test_custom_dataset_requires_a_path(compose):
    with pytest.raises(ConfigError, match="dataset.path is required for dataset=custom"):
        validate(compose(["dataset=custom"]))
    validate(compose(["dataset=custom", "stages=[]"]))


def test_missing_mandatory_value_names_the_key(compose):
    with pytest.raises(ConfigError, match=r"model.path has no value"):
        validate(compose(["model.path=???"]))


def test_stages_without_sft_need_a_checkpoint(compose, tmp_path):
    with pytest.raises(ConfigError, match="ckpt is required when stages=\\[eval,infer\\]"):
        validate(compose(["stages=[eval,infer]"]))
    validate(compose(["stages=[eval,infer]", "ckpt=base"]))
    validate(compose(["stages=[merge]", f"ckpt={tmp_path}"]))
    validate(compose(["stages=[infer]", f"infer.ckpt={tmp_path}"]))
    with pytest.raises(ConfigError, match="does not exist"):
        validate(compose(["stages=[eval]", f"ckpt={tmp_path / 'nope'}"]))
    with pytest.raises(ConfigError, match="no adapter to merge"):
        validate(compose(["stages=[merge]", "ckpt=base"]))


def test_a_missing_ckpt_for_sft_and_merge_without_adapter_are_rejected(compose, tmp_path):
    # sft trains on from `ckpt` (tests/stages/test_sft_from_ckpt.py); one that is not there is named, with
    # trainer.resume for what continues an interrupted run
    with pytest.raises(ConfigError, match=r"missing does not exist.*trainer\.resume"):
        validate(compose([f"ckpt={tmp_path / 'missing'}"]))
    with pytest.raises(ConfigError, match="lora=none"):
        validate(compose(["lora=none"]))


def test_optuna_search_space_and_direction_follow_the_config(compose):
    _skip_without_plugin("hparams_search")
    cfg = compose(["+hparams_search=optuna", "eval.direction=maximize"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert "optuna" in sweeper._target_ and sweeper.direction == "maximize"
    assert sweeper.n_trials == 4 and sweeper.sampler.seed == 42
    assert sweeper.params["lora.r"] == "choice(4, 8, 16)"
    assert sweeper.params["optim.lr"] == "tag(log, interval(1e-5, 1e-3))"


def test_slurm_launcher_takes_its_settings_from_config(compose):
    _skip_without_plugin("hydra/launcher")
    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (
        "SlurmLauncher" in launcher._target_ and launcher.partition == "gpu" and launcher.gpus_per_node == 1
    )


def test_run_and_sweep_folders(compose):
    cfg = compose(["experiment_name=x", "output_root=/r"], return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("/r/x/") and cfg.hydra.sweep.dir.startswith("/r/x/multirun-")
    assert cfg.hydra.job.chdir is False
    logging = OmegaConf.to_container(cfg.hydra.job_logging, resolve=False)
    assert logging["handlers"]["file"]["filename"] == "${hydra.runtime.output_dir}/run.log"


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="cuda:99"):
        resolve_device("cuda:99")
    with pytest.raises(ConfigError, match="valid: auto, cpu"):
        resolve_device("tpu")
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="model.dtype=int8"):
        resolve_dtype("int8", cpu)


def test_resolve_device_reads_the_config(compose):
    cfg = compose(["device=cpu", "model.dtype=float16"])
    device = resolve_device(cfg)
    assert device == torch.device("cpu") and resolve_dtype(cfg, device) == torch.float16


@pytest.mark.parametrize("override", ["model.attn_implementation=eager", "dataset.num_workers=2"])
def test_keys_that_did_nothing_fail_like_a_misspelt_key(compose, override):
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    key = override.split("=")[0]
    assert describe_error(info.value).startswith(f"{key} is not a key of {key.split('.')[0]}; valid keys")


def test_freeze_switches_belong_to_full_fine_tuning(compose):
    with pytest.raises(ConfigError) as info:
        validate(compose(["lora.freeze_vision=true", "lora.freeze_llm=true"]))
    assert info.value.problems == [
        f"lora.{key}=true applies to full fine-tuning (lora=none) only; with lora=qkv only the adapters "
        "train: choose what they cover with lora.target_modules"
        for key in ("freeze_vision", "freeze_llm")
    ]
    validate(compose(["lora=none", "lora.freeze_vision=true", "stages=[sft,eval,infer]"]))
    with pytest.raises(ConfigError, match="lora.bias=all applies to LoRA only"):
        validate(compose(["lora=none", "lora.bias=all", "stages=[sft,eval,infer]"]))
    validate(compose(["lora=all", "lora.bias=all"]))


def test_dataset_columns_are_for_custom_files(compose):
    with pytest.raises(ConfigError, match="dataset.columns renames the keys of custom files; dataset=demo"):
        validate(compose(["dataset.columns={q: query}"]))
    cfg = compose(["dataset=custom", "dataset.path=rows.jsonl", "dataset.columns={q: query}", "stages=[]"])
    validate(cfg)
    assert cfg.dataset.columns == {"q": "query"}


def test_generation_defaults_have_one_source(compose):
    from pipeline.apps.chat_cli import build_parser
    from pipeline.apps.generation import GENERATION_KEYS
    from pipeline.families.minicpm_v2.generation import GenerationSettings

    defaults = GenerationSettings()
    cfg = compose()
    args = vars(build_parser().parse_args([]))
    for key in GENERATION_KEYS:
        assert cfg.infer[key] == getattr(defaults, key) == args[key], key
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.3, 0.7, 20)  # ms-swift 2.2's


def test_accumulation_follows_ms_swift_when_unset(compose):
    def accumulation_steps(cfg, world: int) -> int:
        return plan_of(cfg, processes=world).loop.grad_accum

    cfg = compose(["trainer=default"])
    assert [accumulation_steps(cfg, world) for world in (1, 2, 4, 3)] == [16, 8, 4, 6]
    cfg = compose(["trainer=default", "trainer.batch_size=4"])
    assert accumulation_steps(cfg, 1) == 4
    assert accumulation_steps(compose(["trainer=default", "trainer.grad_accum=3"]), 4) == 3


def test_model_learning_rates_and_processor_settings_are_checked_before_any_work(compose):
    from pipeline.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"model.lora_lr=0.0 is out of range"):
        validate(compose(["model.lora_lr=0.0"]))
    with pytest.raises(
        ConfigError, match=r"model.processor_kwargs: .*unknown processor setting\(s\) max_pixel"
    ):
        validate(compose(["model=qwen2_5_vl_tiny", "+model.processor_kwargs.max_pixel=100"]))


def test_the_objective_is_one_check_before_and_after_eval():
    assert objective_problems("bleu4", generate=True) == []
    assert "(generation metrics need eval.generate=true)" in objective_problems("bleu4", generate=False)[0]
    assert objective_problems("bleu4", generate=True, written={"eval_loss": 1.0, "bleu4": 0.5}) == []
    assert objective_problems(
        "numeric_accuracy", generate=True, written={"eval_loss": 1.0, "bleu4": 0.5}
    ) == [
        "eval.objective=numeric_accuracy is not among the metrics eval wrote: bleu4, eval_loss "
        "(written only when some reference holds a number)"
    ]


def test_a_family_that_compiles_packed_rows_compiles_them_in_static_buckets_without_cuda_graphs(
    compose, monkeypatch
):
    cuda = torch.device("cuda")
    monkeypatch.setattr(plan, "compiles_on", lambda device: device.type == "cuda")
    packed = compose(
        ["model=qwen2_5_vl_3b", "trainer=default", "+experiment=lora_qkv", "trainer.packing=true"]
    )
    padded = compose(
        ["model=qwen2_5_vl_3b", "trainer=default", "+experiment=lora_qkv", "trainer.packing=false"]
    )

    def of(cfg, device=cuda):
        return plan_training(cfg, Launch(device, 1), compiles=True, compiled_shapes="packed")

    on = of(packed)
    assert on.compile and not on.cuda_graphs and not on.loop.preallocate_grads
    assert on.loop.pad_to_multiple == static_bucket(4096) == 1024  # rows of 1024, 2048, 3072 or 4096 tokens
    assert "compile: on; CUDA graphs: off" in on.describe()
    assert of(padded).compile is False  # auto: unpacked batches would take a new shape every step
    assert of(packed, torch.device("cpu")).compile is False
    explicit = compose(["model=qwen2_5_vl_tiny", "trainer.compile=true", "trainer.packing=false"])
    with pytest.raises(
        ValueError, match="compiles packed rows of static lengths only; set trainer.packing=true"
    ):
        of(explicit)
    assert [static_bucket(n) for n in (256, 1000, 4096, 8192)] == [128, 256, 1024, 2048]
    # MiniCPM-V-2 (any padded batch): CUDA graphs, batches padded to a multiple of 128
    v2 = plan_training(padded, Launch(cuda, 1), compiles=True, compiled_shapes="padded")
    assert v2.compile and v2.cuda_graphs and v2.loop.pad_to_multiple == 128


def test_the_compute_dtype_is_the_half_precision_weights_or_else_the_autocast(compose):
    """What the family's vision attention resolves by at training time (Family.attend_in): full
    fine-tuning's fp32 weights compute in the autocast's dtype on a GPU, in fp32 on the CPU."""
    cuda = torch.device("cuda")
    full = compose(["model=qwen2_5_vl_tiny", "trainer=default", "+experiment=full"])
    for mixed, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("no", torch.float32)):
        plan = plan_training(full, Launch(cuda, mixed_precision=mixed), compiles=False)
        assert plan.weights_dtype == torch.float32 and plan.compute_dtype == dtype
    assert plan_of(full, torch.device("cpu")).compute_dtype == torch.float32
    half = compose(["model=qwen2_5_vl_tiny", "+experiment=lora_qkv", "model.dtype=float16"])
    assert (
        plan_training(half, Launch(cuda, mixed_precision="bf16"), compiles=False).compute_dtype
        == torch.float16
    )


def test_lora_that_trains_the_tower_keeps_its_activations_where_the_family_bounds_them(compose, monkeypatch):
    """model.gradient_checkpointing and trainer.micro_batch_tokens auto for LoRA that trains the vision tower:
    on a card of 75 GiB or more, a family that declares the budget bounding its tower's activations
    (MiniCPM-V-2: 2048 language-model tokens, whose slices bound the patches) trains within it without
    checkpointing; smaller cards, full fine-tuning, a larger budget given by hand and families that declare
    none checkpoint every block, as before."""
    cuda = torch.device("cuda")
    total = fake_card(monkeypatch, 80)
    monkeypatch.setattr(plan, "compiles_on", lambda device: True)

    def plan_of(overrides: list[str]) -> plan.TrainingPlan:
        cfg = compose(["trainer=default", *overrides])
        return plan_stage(cfg, family_from_config(cfg.model), Launch(cuda), "/no/such/folder")

    def planned(overrides: list[str]) -> tuple[int, bool | str]:
        result = plan_of(overrides)
        return result.loop.micro_batch_tokens, result.gradient_checkpointing

    v2_all = ["model=minicpm_v2", "+experiment=lora_all"]
    assert family_from_config(compose(v2_all).model).capabilities.trained_tower_budget == 2048
    assert planned(v2_all) == (2048, False)
    assert "gradient checkpointing: off" in plan_of(v2_all).describe()
    # custom targets in the tower train it as lora=all does
    tower_qkv = ["model=minicpm_v2", "+experiment=lora_qkv", "lora.target_modules=[vpm.blocks.0.attn.qkv]"]
    assert planned(tower_qkv) == (2048, False)
    assert planned(["model=minicpm_v2", "+experiment=lora_qkv"]) == (16384, False)  # a frozen tower
    # a budget above the family's, given by hand, checkpoints; one within it does not
    assert planned([*v2_all, "trainer.micro_batch_tokens=4096"]) == (4096, True)
    assert planned([*v2_all, "trainer.micro_batch_tokens=1536"]) == (1536, False)
    assert planned([*v2_all, "trainer.micro_batch_tokens=1024"]) == (1024, True)  # low_memory's budget
    assert planned([*v2_all, "model.gradient_checkpointing=true"]) == (2048, True)
    assert planned(["model=minicpm_v2", "+experiment=full"])[1] is True  # full fine-tuning's state fills it
    # the Qwen VLs declare theirs for cards of 120 GiB or more and models of up to 5 B parameters: on this
    # card they checkpoint their trained tower at the large-card budget
    qwen_all = ["model=qwen2_5_vl_tiny", "+experiment=lora_all"]
    assert planned(qwen_all) == (16384, True)
    total["gib"] = 48
    assert planned(v2_all) == (4096, True)
    # on an H200-sized card: within their budget for a 3.75 B model, whose size the model folder tells
    total["gib"] = 140
    monkeypatch.setattr(sft_stage, "parameters_in_folder", lambda path: 3_750_000_000)
    assert planned(qwen_all) == (8192, False)
    assert planned(["model=qwen3_vl_tiny", "+experiment=lora_all"]) == (8192, False)
    assert planned(["model=qwen2_5_vl_tiny", "+experiment=lora_qkv"]) == (16384, False)  # a frozen tower
    assert planned(["model=qwen2_5_vl_tiny", "+experiment=full"])[1] is True
    # a larger model, or one whose size is not known before loading, checkpoints every block
    monkeypatch.setattr(sft_stage, "parameters_in_folder", lambda path: 8_300_000_000)
    assert planned(qwen_all) == (16384, True)
    monkeypatch.setattr(sft_stage, "parameters_in_folder", lambda path: None)
    assert planned(qwen_all) == (16384, True)
    assert planned(v2_all) == (2048, False)  # MiniCPM-V-2 declares no size limit


def test_a_family_whose_recompute_costs_most_checkpoints_only_its_trained_tower(compose, monkeypatch):
    """model.gradient_checkpointing auto for LoRA that trains the vision tower, where the family declares
    Capabilities.checkpoints_tower_only (MiniCPM-V 4.6: recomputing its language model runs its
    linear-attention kernels twice): the tower's blocks only ("vision"), on every card size; LoRA that leaves
    the tower frozen keeps every activation, and full fine-tuning, trainer=low_memory's budget and the CPU
    checkpoint every block, as for the other families."""
    cuda = torch.device("cuda")
    total = fake_card(monkeypatch, 80)
    monkeypatch.setattr(plan, "compiles_on", lambda device: True)

    def checkpointing(overrides: list[str], device: torch.device = cuda) -> bool | str:
        cfg = compose(["model=minicpm_v4_6_tiny", "trainer=default", *overrides])
        family = family_from_config(cfg.model)
        assert family.capabilities.checkpoints_tower_only
        result = plan_stage(cfg, family, Launch(device), "/no/such/folder")
        if result.gradient_checkpointing == "vision":
            assert "gradient checkpointing: vision tower only" in result.describe()
        return result.gradient_checkpointing

    all_ = ["+experiment=lora_all"]
    assert checkpointing(all_) == "vision"
    total["gib"] = 24  # a smaller card: its budget (4096) bounds the language model's activations too
    assert checkpointing(all_) == "vision"
    assert checkpointing(["+experiment=lora_qkv"]) is False
    assert checkpointing(["+experiment=full"]) is True
    assert checkpointing([*all_, "trainer=low_memory"]) is True
    assert checkpointing(all_, torch.device("cpu")) is True
    assert checkpointing([*all_, "model.gradient_checkpointing=true"]) is True
    # the other families keep checkpointing every block of a trained tower beyond their budget
    qwen = compose(["model=qwen2_5_vl_tiny", "trainer=default", "+experiment=lora_all"])
    assert not family_from_config(qwen.model).capabilities.checkpoints_tower_only
    assert plan_training(qwen, Launch(cuda), compiles=False).gradient_checkpointing is True
