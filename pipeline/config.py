"""The typed config schema (one dataclass per group), its registration with Hydra, and cross-field checks.

Hydra merges every yaml in conf/ onto these dataclasses, so a misspelt key or a value of the wrong type fails
while the config is composed. `validate` then checks what a type cannot express: choices, ranges, the stage
list, and which checkpoint the stages will read. Both happen before any work starts.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from pipeline.families import CHUNKED_LOSS_MODES, DEFAULT_FAMILY, FAMILIES, LORA_PRESETS, TRUNCATION_POLICIES
from pipeline.families.checkpoints import DEFAULT_SHARD_SIZE, parse_size
from pipeline.families.generation_settings import DECODE_MODES, GenerationSettings
from pipeline.families.lora_init import init_problem, is_residual, normal_init
from pipeline.stage_names import (
    DEFAULT_STAGES,
    GENERATION_METRICS,
    KTO_STATS,
    LOSS_METRICS,
    PREFERENCE_METRICS,
    STAGES,
    TRAINING_EVAL_STATS,
    TRAINING_STAGES,
)
from pipeline.utils.secrets import REDACTED

if TYPE_CHECKING:
    import torch


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = DEFAULT_FAMILY  # the family (pipeline/families/) that loads and encodes it
    path: str = MISSING  # local folder or hub id
    dtype: str = "auto"  # auto = bf16 on a GPU with bf16, fp16 on other GPUs, fp32 on CPU
    max_slice_nums: int = 9
    slice_mode: bool = True
    # auto: off for LoRA that leaves the vision tower frozen on a CUDA device with micro-batches of more than
    # 1024 tokens (trainer=default: activations bounded by the budget), on otherwise (lora=all, full
    # fine-tuning, low_memory, the plain regime, CPU); vision: the vision tower's blocks only; a number
    # between 0 and 1: the vision tower's blocks and that share of the language model's decoder layers (the
    # first ones; the others keep their activations and skip the recompute: MiniCPM-V-2 full fine-tuning at
    # 0.5 ran 1.03x every block's speed for 7.5 GB more on an H100, Qwen2.5-VL-3B's no faster, so auto does
    # not choose it; bench/RESULTS.md "Seventeenth GPU calls")
    gradient_checkpointing: Any = "auto"
    build_if_missing: bool = False  # build the family's tiny twin when `path` is its cache place and absent
    trust_hub: bool = False  # allow downloading `path` from the hub when it is not a local folder
    # a transformers-native family's resolution settings (e.g. max_pixels); MiniCPM-V-2 uses the keys above
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    # video frame sampling of the families that take video (null = the processor's own default): frames per
    # second (Qwen VLs: 2), the most frames per video (Qwen VLs: 768; MiniCPM-V 4.6: 128, at one a second),
    # and the video processor's pixel bound (its size.longest_edge: Qwen2.5-VL per frame, Qwen3-VL over all
    # sampled frames); a family refuses a key it does not read
    video_fps: float | None = None
    video_max_frames: int | None = None
    video_max_pixels: int | None = None
    # the HF-native families' vision towers: auto = one variable-length FlashAttention call per layer over
    # all images (or windows) where torch's kernel runs (Ampere+ CUDA, bf16/fp16), else transformers' SDPA loop
    # over them; varlen; sdpa. MiniCPM-V-2's own tower ignores it.
    vision_attention: str = "auto"
    # HF-native families' training kernels: auto (liger-kernel's fused norms and MLPs on a GPU where it is
    # installed and the layers are not compiled) | liger | off; see pipeline/families/kernels.py
    fused_kernels: str = "auto"
    # MiniCPM-V 4.6's linear-attention layers: auto (flash-linear-attention's kernels where installed, on a
    # GPU) | fla | torch (transformers' PyTorch code); see pipeline/families/linear_attention.py
    linear_attention: str = "auto"
    # how eval and infer decode a batch: auto (the family's default: on a GPU a static cache, its step replayed
    # as a CUDA graph (MiniCPM-V-2) or compiled (the HF-native families); on the CPU the growing cache) |
    # static (a preallocated cache, one captured or compiled step per batch shape) | dynamic (the growing
    # cache, eager)
    decode: str = "auto"
    # every family's loss over many supervised positions (long answers): auto (the output head scores them a
    # chunk at a time, recomputed in the backward, where their fp32 logits would exceed 1 GiB, not under FSDP
    # or DeepSpeed) | off; see pipeline/families/chunked_loss.py
    chunked_loss: str = "auto"
    # QLoRA: the language model's linear layers in 4-bit NF4 or 8-bit (bitsandbytes) for LoRA training, eval,
    # infer and serve; merge folds the adapter into the full-precision base (pipeline/families/quantization.py)
    quantization: str = "none"
    # learning rates of this model's recipe, taken when optim.lr is null: LoRA, and full fine-tuning (lora=none);
    # the defaults are ms-swift's for MiniCPM-V-2
    lora_lr: float = 1e-4
    full_lr: float = 1e-5


@dataclass
class LoraConfig:
    name: str = "qkv"  # qkv | all | none (none = full fine-tuning)
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None = the preset of `name`; or module names / a regex
    modules_to_save: list[str] = field(default_factory=list)
    # full fine-tuning (name=none) only: with LoRA only the adapters (and modules_to_save) train
    freeze_vision: bool = False
    freeze_resampler: bool = False
    freeze_llm: bool = False
    # which biases train beside the adapters: none | all | lora_only (PEFT's `bias`, ms-swift's
    # lora_bias_trainable)
    bias: str = "none"
    # DoRA (ms-swift's --use_dora): each adapted weight's magnitude trains apart from its direction; merges
    # into the base like LoRA
    use_dora: bool = False
    # rank-stabilised LoRA (--use_rslora): the update scaled by alpha / sqrt(r) instead of alpha / r
    use_rslora: bool = False
    # how the adapter starts (ms-swift's --init_lora_weights): true (B zero) | gaussian | pissa | pissa_niter_<N> |
    # olora; pissa/olora start it from the base weights' principal directions and train on the residual, and
    # every checkpoint stores it as a rank-2r LoRA of the original base (pipeline/training/residual_lora.py)
    init_weights: str = "true"


@dataclass
class DatasetConfig:
    name: str = "demo"
    path: Any = None  # a file, a list of files, or a folder; None = the dataset's own default location
    # other datasets mixed in: [{name, path, n | ratio, ...}]; [] = just this one
    sources: list[dict[str, Any]] = field(default_factory=list)
    val_path: Any = None  # None = hold out test_ratio of the rows
    # custom files: {key in the file: key of a known row format}, like ms-swift's --columns
    columns: Any = None  # a mapping; Any so that `dataset.columns={a: query}` replaces it whole
    test_ratio: float = 0.01
    max_length: int = 2048
    truncation: str = "delete"  # delete | truncate (a conversation longer than max_length)
    # which responses of a multi-round row carry the loss (ms-swift's --loss_scale): default = every round's,
    # last_round = the final one alone (the history is context); auto = default for sft and the eval loss,
    # last_round for preference pairs (dpo, eval's pair metrics), as ms-swift's sft and rlhf
    loss_scale: str = "auto"
    on_error: str = "raise"  # raise | skip (skipped rows are listed in the run folder)
    image_root: str | None = None
    allow_download: bool = False  # true: fetch images missing under image_root from their URL
    check_images: bool = (
        True  # read every image's header before training; false skips it (large sets you trust)
    )
    max_rows: int | None = None
    system: str | None = None
    # the longest video (seconds) a row may hold; longer ones are problems (null = no limit). The processors
    # sample at most video_max_frames frames, so a longer video is seen ever more sparsely
    max_video_seconds: float | None = 3600.0
    # dataset=hf (Hugging Face datasets): the split and subset (config name) to read, and whether a hub id may
    # be downloaded (as model.trust_hub); cache_dir: where datasets keeps its Arrow copies (null = its own)
    split: str = "train"
    subset: str | None = None
    trust_hub: bool = False
    cache_dir: str | None = None


@dataclass
class OptimConfig:
    lr: float | None = None  # None = ms-swift's: 1e-4 with LoRA, 1e-5 for full fine-tuning (lora=none)
    # the vision tower's and the projector's (resampler / merger) own rates, ms-swift's names; None = lr.
    # Under LoRA they apply to the adapters in those parts (lora=all), under full fine-tuning to their weights.
    vit_lr: float | None = None
    aligner_lr: float | None = None
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    warmup_steps: int = 0  # > 0: that many warmup steps instead of warmup_ratio (transformers' rule)
    # cosine: the share of each peak rate it decays to (transformers' cosine_with_min_lr, LLaMA-Factory's
    # lr_scheduler_kwargs.min_lr_rate); 0 = down to zero
    min_lr_rate: float = 0.0
    max_grad_norm: float = 0.5
    # adamw_torch (torch's AdamW, ms-swift's and transformers' default) | adamw_bnb_8bit (bitsandbytes' 8-bit
    # AdamW: its two moments in 8 bits for tensors of 4096 elements or more, a quarter of their memory; for
    # full fine-tuning, whose moments are half its state)
    name: str = "adamw_torch"
    fused: Any = "auto"  # auto | true | false (adamw_torch only)
    # LoRA+ (ms-swift 2.x's --lora_lr_ratio, LLaMA-Factory's loraplus_lr_ratio; its paper suggests 16): the
    # adapters' B matrices learn at this multiple of their part's rate; None = the same rate as A
    loraplus_lr_ratio: float | None = None


@dataclass
class TrainerConfig:
    epochs: int = 1
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 1
    grad_accum: int | None = None  # None = ceil(16 / (batch_size x processes)), ms-swift's default
    eval_batch_size: int | None = None  # None = batch_size, as ms-swift
    logging_steps: int = 5
    eval_steps: int = 50
    save_steps: int | None = None  # None = eval_steps, as ms-swift
    save_total_limit: int | None = 2
    # ms-swift's save_only_model: checkpoints without the optimizer's state (full fine-tuning's AdamW moments
    # are twice its fp32 weights). A run resumed from one continues from its weights, step, schedule, data
    # order and random state, with the optimizer's moments starting again from zero (a warning says so)
    save_only_model: bool = False
    # The evaluation metric that picks the best checkpoint (sft/best, what later stages read) and that early
    # stopping watches, as transformers' and ms-swift's: `loss`, or a statistic the training stage's evaluation
    # reports (sft: token_acc; dpo: rewards/accuracies, rewards/margins, ...), with or without `eval_`.
    # greater_is_better: null = false for a name that ends in `loss`, else true (transformers' rule)
    metric_for_best_model: str = "loss"
    greater_is_better: bool | None = None
    # Early stopping (transformers' EarlyStoppingCallback settings, ms-swift's --early_stop_interval): training
    # ends, with a checkpoint, after this many evaluations in a row that do not improve the best value of
    # metric_for_best_model so far by more than early_stopping_threshold; null = never. A resumed run keeps
    # the count.
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    resume: str = "auto"  # auto (the latest checkpoint of this run folder) | never | <checkpoint path>
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    num_workers: Any = "auto"  # auto (0 on CPU; on a GPU from the CPU count, up to 8) | N
    # Micro-batches filled to this many padded tokens instead of batch_size rows (the optimizer step still
    # sees batch_size x grad_accum rows and the same loss); 0 = fixed micro-batches of batch_size; auto =
    # 16384 for LoRA on a GPU of 60 GiB or more (80 GB cards), else 4096 (pipeline/training/plan.py); in one
    # process without CUDA graphs, auto halves its budget for a step that runs out of GPU memory, down to 512.
    micro_batch_tokens: Any = "auto"
    # Each micro-batch one row of its samples back to back (no padding; attention kept within each sample).
    # auto: on where the family attends packed rows by variable-length attention (the HF-native families;
    # MiniCPM-V-2's packing builds a mask) on a CUDA device with micro_batch_tokens > 0; off on the CPU and
    # in the plain regime. true needs micro_batch_tokens > 0 (the packed row's length).
    packing: Any = "auto"
    # NEFTune (ms-swift's --neftune_noise_alpha, its paper suggests 5): uniform noise of at most
    # alpha / sqrt(length x hidden size) added to the text embeddings while training, `length` each sample's
    # own tokens (padded or packed alike); null = none
    neftune_noise_alpha: float | None = None
    # What one vision-tower patch counts as in micro_batch_tokens (the budget then bounds the work of the
    # language model and of the vision tower together): auto = a patch's FLOPs relative to a token's for the
    # families that count patches (the HF-native ones: the tower's parameters a patch passes through over the
    # language model's, a third of that for a frozen tower, which runs forward only, an eighth for a trained
    # tower whose blocks are checkpointed, which keep their inputs only; MiniCPM-V-2 counts language-model
    # tokens only, as measured); 0 = tokens only; or a number >= 0.
    patch_weight: Any = "auto"
    # auto: on for MiniCPM-V-2 on one CUDA device (compiled layers replayed as CUDA graphs), off otherwise
    compile: Any = "auto"
    # The HF-native vision towers' blocks compiled with the language model's layers, on patch sequences
    # padded to a few static lengths (pipeline/families/vision_compile.py): auto = on where trainer.compile
    # is, the tower attends by variable-length attention (model.vision_attention) and the family compiles its
    # tower by default (Capabilities.compiles_vision_by_default: off where it measured no faster); true;
    # false = eager
    compile_vision: Any = "auto"
    max_eval_samples: int | None = None
    # > 0: torch.profiler over that many optimizer steps (after 3 unrecorded ones), into sft/profile/
    # (ops.txt, trace.json)
    profile_steps: int = 0


@dataclass
class PreferenceConfig:
    """The dpo stage's objective (ms-swift's `swift rlhf` names and defaults)."""

    # sigmoid (DPO) | ipo (IPO, on the answers' mean token log-probabilities) | simpo (SimPO, reference-free)
    # | cpo (CPO, reference-free) | orpo (ORPO: the odds ratio of the answers' mean token probabilities,
    # reference-free, with the chosen answer's NLL) | kto (KTO, on binary feedback: rows labelled desirable
    # or not, and pairs as one of each) | sigmoid_norm (DPO on the answers' mean token log-ratios) | aot (AOT:
    # DPO on the sorted margins of the policy and of the reference, within each micro-batch) | TRL's other
    # pair losses on the reference log-ratios: hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard,
    # apo_zero, apo_down, discopop, aot_unpaired (sorted within each micro-batch)
    loss_type: str = "sigmoid"
    beta: float | None = None  # None = ms-swift's: 0.1, and 2.0 for simpo (orpo: the odds ratio's weight)
    # weight of an SFT term on the chosen answer (its mean token negative log-likelihood), as RLAIF-V mixes
    # it in, for DPO's losses (sigmoid, ipo); None = none
    rpo_alpha: float | None = None
    # the same term's weight for cpo and simpo (TRL's CPOTrainer, which ms-swift runs both with: 1.0); 0 =
    # SimPO as its paper has it
    cpo_alpha: float = 1.0
    # sigmoid, simpo, cpo, robust: the share of pairs taken as mislabelled (cDPO); exo_pair: its epsilon (> 0)
    label_smoothing: float = 0.0
    simpo_gamma: float = 1.0  # simpo: the target reward margin
    # discopop: the temperature of its blend of the logistic and the exponential loss
    discopop_tau: float = 0.05
    # the f-divergence the margin losses regularise with (TRL's f_divergence_type; f-DPO): reverse_kl (DPO) |
    # forward_kl | js_divergence | alpha_divergence (at f_alpha_divergence_coef); it changes the margin of
    # sigmoid, hinge, robust, exo_pair and discopop, the losses that read it in TRL
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    # kto: the weights of the desirable and the undesirable rows' losses (ms-swift's and TRL's names); with
    # unbalanced feedback, KTO's paper keeps desirable_weight x desirable rows / (undesirable_weight x
    # undesirable rows) in [1, 4/3]
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # a weighted mix of losses in place of loss_type (ms-swift's --loss_type a b c --loss_weights x y z), e.g.
    # MPO's {sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}: losses of the implicit rewards (MIXABLE_LOSSES) and `sft`,
    # the chosen answer's mean token NLL; null = loss_type alone. Any so that `preference.loss_mix={...}`
    # replaces it whole
    loss_mix: Any = None
    # where the reference log-probabilities come from: auto = the same weights with the adapter disabled when
    # a new LoRA adapter trains, else (full fine-tuning, or training on from an SFT adapter) computed once
    # before training and cached in the run folder; no_adapter; cached. simpo needs none.
    reference: str = "auto"
    # no_adapter with an adapter that leaves the vision tower and projector untouched (lora=qkv): the
    # reference scores each pair on the policy's image features, the tower running once a pair a step;
    # false runs it again for the reference (the same numbers, slower)
    share_image_features: bool = True


@dataclass
class EvalConfig:
    objective: str = "eval_loss"  # a metric name written by eval; what sweeps optimise
    direction: str = "minimize"
    max_samples: int | None = 200
    batch_size: int = 8
    generate: bool = True
    max_new_tokens: int = 64
    compare_base: bool = True  # with a fine-tuned checkpoint, score the base model on the same rows too


@dataclass
class MergeConfig:
    device: str = "cpu"
    verify_samples: int = 2
    output: str | None = None  # None = <ckpt>-merged
    shard_size: str = DEFAULT_SHARD_SIZE  # e.g. 5GB (10^9 bytes), 500MB, 2GiB (2^30 bytes)


@dataclass
class InferConfig:
    ckpt: str | None = None
    input: str | None = None  # jsonl path; None = the held-out split
    interactive: bool = False
    # generation: the defaults are GenerationSettings'
    max_new_tokens: int = GenerationSettings.max_new_tokens
    do_sample: bool = GenerationSettings.do_sample
    temperature: float = GenerationSettings.temperature
    top_p: float = GenerationSettings.top_p
    top_k: int = GenerationSettings.top_k
    repetition_penalty: float = GenerationSettings.repetition_penalty
    batch_size: int = 8
    stream: bool = True
    max_samples: int | None = 20


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # 0.0.0.0 listens on every interface
    port: int = 8000
    api_key: str | None = None  # a bearer key every route but /health asks for; None = no key
    # the environment variable holding that key, e.g. PIPELINE_API_KEY (as vLLM reads VLLM_API_KEY); read when
    # the server starts, so the key is in no config, command line or run folder; null = use api_key
    api_key_env: str | None = None
    max_batch_size: int = 8  # concurrent requests generated together
    max_new_tokens: int = 512  # the largest max_tokens a request may ask for, and its default
    max_image_bytes: int = 10 * 1024 * 1024
    # a video_url's bytes (a data URL's decoded base64, or an http(s) URL's body; families that take video);
    # its sampled frames count with the images against max_image_pixels and max_request_pixels
    max_video_bytes: int = 64 * 1024 * 1024
    # seconds for the whole fetch of an image URL (connect, headers, body, redirects), however slowly it comes
    url_timeout: float = 10.0
    # image URLs are fetched only from public addresses (resolved here, checked again on every redirect);
    # allowed_url_hosts: when not empty, only these hosts (names or IPs, `*.example.org` for subdomains),
    # each trusted at whatever address it resolves to; allow_private_urls: true on a trusted network
    # lifts the public-address rule for every host
    allowed_url_hosts: list[str] = field(default_factory=list)
    allow_private_urls: bool = False
    url_fetch_workers: int = 4  # image URLs fetched at once, on threads of their own
    allow_local_files: bool = False  # accept file:// URLs and local paths as images
    # Limits checked before the work they protect (pipeline/apps/serve/limits.py). With these defaults one
    # request makes the server hold at most about 1.2 GB above idle, besides the model's generation: its body
    # (read no further than the cap, about 0.1 GB while parsed), its text while encoded (at worst ~0.7 KB a
    # byte: 0.37 GB), its images decoded (3 bytes a pixel: 0.1 GB) and as the family's tensors (Qwen's
    # processor: 24 bytes a pixel it keeps, at most 12.8 Mpx an image: 0.6 GB).
    # The body cap is flat, not images x max_image_bytes: 32 MiB holds two images at the byte cap, or 16
    # photos of 1.5 MB, as base64; a video sent inline as a data URL is held to it too (about 24 MB of video:
    # raise it for larger ones, or send them as http(s) URLs, which max_video_bytes bounds).
    max_body_bytes: int = 32 * 1024 * 1024
    max_queue: int = 64  # requests waiting beside those generated together; one more gets 429 + Retry-After
    max_image_pixels: int = 24_000_000  # an image's width x height, from its header (a 6000x4000 photo fits)
    max_request_pixels: int = 32_000_000  # all of a request's images together
    # the UTF-8 bytes of a request's text; the model's positions x 32 bytes bound it too (no prompt over that
    # fits). 512 KiB holds ~120k tokens of English (Qwen's tokenizer: ~4.3 bytes a token); raise it for a
    # longer context, at up to 0.7 GB of encoding memory a MiB.
    max_prompt_bytes: int = 512 * 1024


@dataclass
class TrackingConfig:
    backend: str = "none"
    project: str = "minicpm-v-finetune"
    entity: str | None = None
    group: str | None = None  # None = the experiment name; in a sweep, the sweep folder (its jobs share it)
    tags: list[str] = field(default_factory=list)
    name: str | None = None  # None = the run folder's name
    mode: str = "auto"  # auto (online when an API key is found, else offline) | online | offline | disabled
    log_model: bool = False  # true: upload checkpoints as artifacts


@dataclass
class Config:
    # an ordered subset of sft, dpo, eval, merge, infer, serve; dpo (preference pairs) and serve (runs until
    # stopped) only when listed
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    seed: int = 42
    experiment_name: str = "default"
    # eval/merge/infer/serve without sft: checkpoint, run folder, or "base"; sft and dpo: the weights they train
    # on from, an adapter (trained on as that adapter) or full weights, with a fresh optimizer (None = the base)
    ckpt: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_root: str = "outputs"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# groups with yaml files in conf/<group>/; each file starts from `base_<group>`
GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "dataset": DatasetConfig,
    "trainer": TrainerConfig,
    "tracking": TrackingConfig,
}

ON_ERROR_CHOICES = ("raise", "skip")  # dataset.on_error: stop at a bad row, or skip it and list it
# model.dtype's names besides auto, and the checkpoints' torch_dtype: torch's own name of each dtype
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")

CHECKPOINTING_CHOICES = ("auto", True, False, "vision")  # model.gradient_checkpointing, or a share in (0, 1)
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit")  # optim.name (transformers' names for them)
# the preference losses that read only the answers' summed log-ratios to the reference (their implicit rewards)
REWARD_LOSSES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "aot_unpaired",
)

# preference.f_divergence_type, and the losses whose margin it changes (TRL's)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSSES = ("sigmoid", "hinge", "robust", "exo_pair", "discopop")

CHOICES: dict[str, tuple[Any, ...]] = {
    "model.dtype": ("auto", *DTYPE_NAMES),
    "model.family": tuple(FAMILIES),
    "lora.name": (*LORA_PRESETS, "none"),
    "lora.bias": ("none", "all", "lora_only"),
    "dataset.name": ("demo", "demo_pairs", "custom", "hf", "coco_en_2_mini"),
    "dataset.truncation": TRUNCATION_POLICIES,
    "dataset.loss_scale": ("auto", "default", "last_round"),
    "dataset.on_error": ON_ERROR_CHOICES,
    "optim.scheduler": ("cosine", "linear", "constant"),
    "optim.name": OPTIMIZERS,
    "optim.fused": ("auto", True, False),
    "model.vision_attention": ("auto", "varlen", "sdpa"),
    "model.fused_kernels": ("auto", "liger", "off"),
    "model.linear_attention": ("auto", "fla", "torch"),
    "model.decode": DECODE_MODES,
    "model.chunked_loss": CHUNKED_LOSS_MODES,
    "model.quantization": ("none", "nf4", "int8"),
    "trainer.compile": ("auto", True, False),
    "trainer.compile_vision": ("auto", True, False),
    "trainer.packing": ("auto", True, False),
    "trainer.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "preference.loss_type": (
        "sigmoid",
        "ipo",
        "sigmoid_norm",
        "aot",
        "simpo",
        "cpo",
        "orpo",
        "kto",
        *REWARD_LOSSES[1:],
    ),
    "preference.reference": ("auto", "no_adapter", "cached"),
    "preference.f_divergence_type": F_DIVERGENCES,
    "eval.direction": ("minimize", "maximize"),
    "tracking.backend": ("none", "wandb", "tensorboard"),
    "tracking.mode": ("auto", "online", "offline", "disabled"),
}

# (key, lowest allowed value, highest allowed value or None); None values are skipped
RANGES: tuple[tuple[str, float, float | None], ...] = (
    ("model.max_slice_nums", 1, None),
    ("model.video_fps", 1e-3, None),
    ("model.video_max_frames", 1, None),
    ("model.video_max_pixels", 1, None),
    ("dataset.max_video_seconds", 1e-3, None),
    ("model.lora_lr", 1e-12, None),
    ("model.full_lr", 1e-12, None),
    ("lora.r", 1, None),
    ("lora.alpha", 1, None),
    ("lora.dropout", 0.0, 0.999),
    ("dataset.test_ratio", 0.0, 0.999),
    ("dataset.max_length", 16, None),
    ("dataset.max_rows", 1, None),
    ("optim.lr", 1e-12, None),
    ("optim.vit_lr", 0, None),
    ("optim.aligner_lr", 0, None),
    ("optim.weight_decay", 0.0, None),
    ("optim.eps", 0.0, None),
    ("optim.warmup_ratio", 0.0, 0.999),
    ("optim.warmup_steps", 0, None),
    ("optim.min_lr_rate", 0.0, 0.999),
    ("optim.max_grad_norm", 0.0, None),
    ("optim.loraplus_lr_ratio", 1e-6, None),
    ("trainer.epochs", 0, None),
    ("trainer.batch_size", 1, None),
    ("trainer.grad_accum", 1, None),
    ("trainer.eval_batch_size", 1, None),
    ("trainer.logging_steps", 1, None),
    ("trainer.eval_steps", 1, None),
    ("trainer.save_steps", 1, None),
    ("trainer.save_total_limit", 1, None),
    ("trainer.early_stopping_patience", 1, None),
    ("trainer.early_stopping_threshold", 0.0, None),
    ("trainer.profile_steps", 0, None),
    ("trainer.neftune_noise_alpha", 0.0, None),
    ("trainer.max_eval_samples", 1, None),
    ("preference.beta", 1e-6, None),
    ("preference.rpo_alpha", 0.0, None),
    ("preference.cpo_alpha", 0.0, None),
    ("preference.label_smoothing", 0.0, 0.5),
    ("preference.simpo_gamma", 0.0, None),
    ("preference.discopop_tau", 1e-6, None),
    ("preference.f_alpha_divergence_coef", 1e-6, None),
    ("eval.max_samples", 1, None),
    ("eval.batch_size", 1, None),
    ("eval.max_new_tokens", 1, None),
    ("merge.verify_samples", 0, None),
    ("infer.max_new_tokens", 1, None),
    ("infer.temperature", 0.0, None),
    ("infer.top_p", 0.0, 1.0),
    ("infer.top_k", 0, None),
    ("infer.repetition_penalty", 0.0, None),
    ("infer.batch_size", 1, None),
    ("infer.max_samples", 1, None),
    ("serve.port", 1, 65535),
    ("serve.max_batch_size", 1, None),
    ("serve.max_new_tokens", 1, None),
    ("serve.max_image_bytes", 1, None),
    ("serve.max_video_bytes", 1, None),
    ("serve.url_timeout", 0.001, None),
    ("serve.max_body_bytes", 1, None),
    ("serve.max_queue", 0, None),
    ("serve.max_image_pixels", 1, 2 * 89_478_485),  # PIL refuses to open a larger image at all
    ("serve.max_request_pixels", 1, None),
    ("serve.max_prompt_bytes", 1, None),
    ("serve.url_fetch_workers", 1, None),
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """Returns the absolute folder for local caches: $PIPELINE_CACHE (relative to the working folder), else
    the project's .cache."""
    chosen = os.environ.get("PIPELINE_CACHE")
    return Path(chosen).expanduser().absolute() if chosen else PROJECT_ROOT / ".cache"


def twin_name(family: str) -> str:
    """Returns the cache folder (and model config) name of a family's tiny twin, e.g. qwen2_5_vl_tiny."""
    return f"{family}_tiny"


TINY_TWIN_FOLDER = twin_name(DEFAULT_FAMILY)  # the default model's twin (conf/config.yaml)


def default_twin_path(name: str = TINY_TWIN_FOLDER) -> Path:
    """Returns where the tiny twin `name` is built and cached, absolute: <cache>/<name>
    (`${tiny_twin_path:<name>}` in conf/model/*_tiny.yaml; the default is MiniCPM-V-2's)."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"a tiny twin's name is a plain folder name, got {name!r}")
    return cache_root() / name


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
BASE_CKPT = "base"  # ckpt value that means "the model at model.path, without fine-tuned weights"


class ConfigError(ValueError):
    """A config value that is composable but unusable; the message names each key and what is accepted."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent): `base_config` and `<group>/base_<group>`."""
    OmegaConf.register_new_resolver(
        "tiny_twin_path", lambda name=TINY_TWIN_FOLDER: str(default_twin_path(name)), replace=True
    )
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name=f"base_{group}", node=schema)


def _get(tree: dict, key: str) -> Any:
    """Return the value at dotted `key` in a plain nested dict."""
    node: Any = tree
    for part in key.split("."):
        node = node[part]
    return node


def _show(value: Any) -> str:
    """Return `value` as it would be typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _to_plain(cfg: DictConfig) -> dict:
    """Return the resolved config (without Hydra's own `hydra` node) as plain containers.

    Missing values and broken interpolations become a ConfigError naming the key.
    """
    tree: dict = {}
    for key in cfg:
        if key == "hydra":
            continue
        try:
            value = cfg[key]
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as exc:
            where = getattr(exc, "full_key", None) or key
            if isinstance(exc, MissingMandatoryValue):
                raise ConfigError(f"{where} has no value (???); set it, e.g. {where}=...") from None
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{where}: {msg}") from None
        tree[str(key)] = value
    return tree


def _check_unknown_keys(tree: dict, schema: type = Config, prefix: str = "") -> list[str]:
    """Return a problem for every key the schema does not define (`+key=value` overrides can add them)."""
    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    problems = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key not in known:
            where = f" of {prefix[:-1]}" if prefix else ""
            problems.append(f"{path} is not a known key; valid keys{where}: {', '.join(known)}")
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            problems += _check_unknown_keys(value, hints[key], f"{path}.")
    return problems


def _check_choices(tree: dict) -> list[str]:
    problems = []
    for key, allowed in CHOICES.items():
        value = _get(tree, key)
        # bools compare equal to 0/1, so check type as well as value
        if not any(value == a and type(value) is type(a) for a in allowed):
            valid = ", ".join(_show(a) for a in allowed)
            problems.append(f"{key}={_show(value)} is not a valid choice; valid: {valid}")
    checkpointing = tree["model"]["gradient_checkpointing"]
    if not (
        any(checkpointing == a and type(checkpointing) is type(a) for a in CHECKPOINTING_CHOICES)
        or (isinstance(checkpointing, float) and 0 < checkpointing < 1)
    ):
        problems.append(
            f"model.gradient_checkpointing={_show(checkpointing)} is not valid; valid: auto, true, false, vision "
            "or a share between 0 and 1 of the language model's layers to checkpoint (e.g. 0.5)"
        )
    if not DEVICE_PATTERN.match(str(tree["device"])):
        problems.append(f"device={tree['device']} is not valid; valid: auto, cpu, cuda, cuda:N")
    if not DEVICE_PATTERN.match(str(tree["merge"]["device"])):
        problems.append(
            f"merge.device={tree['merge']['device']} is not valid; valid: auto, cpu, cuda, cuda:N"
        )
    try:
        parse_size(tree["merge"]["shard_size"])
    except ValueError as err:
        problems.append(str(err))
    return problems


def _check_ranges(tree: dict) -> list[str]:
    problems = []
    for key, low, high in RANGES:
        value = _get(tree, key)
        if value is None:
            continue
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"between {low} and {high}"
            problems.append(f"{key}={value} is out of range; must be {bound}")
    budget = tree["trainer"]["micro_batch_tokens"]
    if budget != "auto" and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        problems.append(f"trainer.micro_batch_tokens={_show(budget)} must be auto or an integer >= 0")
    elif tree["trainer"]["packing"] is True and budget != "auto" and budget <= 0:
        problems.append("trainer.packing=true needs trainer.micro_batch_tokens > 0 (the packed row's length)")
    workers = tree["trainer"]["num_workers"]
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        problems.append(f"trainer.num_workers={_show(workers)} must be auto or an integer >= 0")
    weight = tree["trainer"]["patch_weight"]
    if weight != "auto" and (isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0):
        problems.append(f"trainer.patch_weight={_show(weight)} must be auto or a number >= 0")
    if tree["trainer"]["max_steps"] < -1:
        problems.append(
            f"trainer.max_steps={tree['trainer']['max_steps']} is not valid; use -1 (train for trainer.epochs) "
            "or a number of optimizer steps > 0"
        )
    elif tree["trainer"]["max_steps"] <= 0 and tree["trainer"]["epochs"] <= 0:
        problems.append("trainer.epochs and trainer.max_steps are both <= 0; set one of them > 0")
    problems += _check_url_hosts(tree["serve"]["allowed_url_hosts"])
    if len(tree["optim"]["betas"]) != 2:
        problems.append(f"optim.betas={_show_list(tree['optim']['betas'])} must hold exactly two numbers")
    return problems


_URL_HOST_NAME = re.compile(r"^(\*\.)?[^\s/@:?#*\[\]]+$")


def _is_url_host(host: str) -> bool:
    """A host name (`*.` in front for its subdomains), an IPv4 address, or an IPv6 address (brackets or not)."""
    if ":" not in host:
        return bool(_URL_HOST_NAME.match(host))
    try:
        ipaddress.IPv6Address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def _check_url_hosts(hosts: list[str]) -> list[str]:
    """serve.allowed_url_hosts holds host names or IP addresses, without scheme, port or path."""
    bad = [host for host in hosts if not _is_url_host(host)]
    if not bad:
        return []
    return [
        f"serve.allowed_url_hosts: {', '.join(map(repr, bad))} is not a host name or IP address; list hosts "
        "alone (images.example.org, 10.0.0.5, *.example.org for its subdomains), without scheme, port or path"
    ]


def _show_list(values: list) -> str:
    """Return a list as typed in an override, e.g. [sft,eval]."""
    return "[" + ",".join(_show(v) for v in values) + "]"


def _check_stages(stages: list[str]) -> list[str]:
    order = ", ".join(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        return [
            f"stages: unknown stage {', '.join(map(repr, unknown))}; valid stages, in this order: {order}"
        ]
    if len(set(stages)) != len(stages):
        return [f"stages={_show_list(stages)} lists a stage twice; each of {order} runs at most once"]
    if stages != sorted(stages, key=STAGES.index):
        return [f"stages={_show_list(stages)} is out of order; stages run in the order {order}"]
    return []


def _check_ckpt(tree: dict) -> list[str]:
    stages = tree["stages"]
    ckpt = tree["ckpt"]
    lora = tree["lora"]["name"]
    problems = []
    training = [s for s in stages if s in TRAINING_STAGES]
    if len(training) > 1:
        return [
            f"stages={_show_list(stages)} lists both sft and dpo; run sft first, then dpo from its run: "
            "+experiment=dpo ckpt=<the sft run folder>"
        ]
    if training:
        if ckpt not in (None, BASE_CKPT) and not Path(ckpt).exists():
            problems.append(
                f"ckpt={ckpt} does not exist; give a checkpoint folder or run folder to train on from "
                "(trainer.resume=<checkpoint> continues an interrupted run instead)"
            )
        if "merge" in stages and lora == "none":
            problems.append(
                "stages includes merge but lora=none (full fine-tuning) has no adapter to merge; "
                "drop merge from stages"
            )
        if "dpo" in stages:
            problems += _check_preference(tree)
        return problems
    infer_only = stages == ["infer"] and tree["infer"]["ckpt"] is not None
    needs_ckpt = [s for s in stages if s in ("eval", "merge", "infer", "serve")]
    if needs_ckpt and ckpt is None and not infer_only:
        problems.append(
            f"ckpt is required when stages={_show_list(stages)} runs without sft: "
            "set ckpt=<run>/sft/checkpoint-N "
            f"(or an earlier run folder), or ckpt={BASE_CKPT} to use model.path as it is"
        )
    if ckpt == BASE_CKPT and "merge" in stages:
        problems.append(f"ckpt={BASE_CKPT} has no adapter to merge; point ckpt at a LoRA checkpoint folder")
    for key, value in (("ckpt", ckpt), ("infer.ckpt", tree["infer"]["ckpt"])):
        if value not in (None, BASE_CKPT) and not Path(value).exists():
            problems.append(
                f"{key}={value} does not exist; give a checkpoint folder or an earlier run folder"
            )
    return problems


def _check_preference(tree: dict) -> list[str]:
    """The dpo stage's objective: a reference the tuning mode can give, and an NLL weight its loss reads."""
    preference = tree["preference"]
    loss, mix = preference["loss_type"], preference["loss_mix"]
    if mix is not None and not (
        isinstance(mix, Mapping)
        and all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in mix.values())
    ):
        return [
            f"preference.loss_mix={mix!r} is not a mapping of loss names to weights, e.g. {{sigmoid: 0.8, sft: 1.0}}"
        ]
    if mix:
        unknown = [name for name in mix if name not in MIXABLE_LOSSES]
        if unknown:
            return [f"preference.loss_mix names {unknown}; it mixes {', '.join(MIXABLE_LOSSES)}"]
        if loss != "sigmoid" or preference["rpo_alpha"]:
            return [
                "preference.loss_mix replaces preference.loss_type and rpo_alpha (its `sft` entry is the NLL "
                "term): leave them at their defaults, or preference.loss_mix=null"
            ]
        if any(weight < 0 for weight in mix.values()) or not any(w > 0 for n, w in mix.items() if n != "sft"):
            return [
                f"preference.loss_mix={dict(mix)}: weights are >= 0 and at least one preference loss (not sft) "
                "weighs more than 0"
            ]
        loss = "exo_pair" if "exo_pair" in mix else "robust" if "robust" in mix else loss
    if loss == "kto":
        if preference["label_smoothing"] or preference["rpo_alpha"]:
            return [
                "preference.loss_type=kto takes neither preference.label_smoothing nor rpo_alpha (its rows are "
                "labelled, not paired): leave them at their defaults"
            ]
        weights = (preference["desirable_weight"], preference["undesirable_weight"])
        if min(weights) < 0 or max(weights) <= 0:
            return [
                f"preference.desirable_weight={weights[0]}, undesirable_weight={weights[1]}: each is >= 0 and "
                "one of them > 0"
            ]
    divergence = preference["f_divergence_type"]
    if divergence != "reverse_kl" and not any(name in F_DIVERGENCE_LOSSES for name in (mix or {loss: 1})):
        return [
            f"preference.f_divergence_type={divergence} changes the margin of {', '.join(F_DIVERGENCE_LOSSES)}; "
            f"{f'preference.loss_mix={dict(mix)}' if mix else f'preference.loss_type={loss}'} does not read "
            "it: leave it at reverse_kl"
        ]
    if loss == "exo_pair" and preference["label_smoothing"] <= 0:
        return [
            "preference.loss_type=exo_pair takes preference.label_smoothing as its epsilon, which must be > 0 "
            "(the EXO paper recommends 1e-3)"
        ]
    if loss == "robust" and preference["label_smoothing"] >= 0.5:
        return [
            f"preference.loss_type=robust divides by 1 - 2 x preference.label_smoothing: it must be below 0.5, "
            f"not {preference['label_smoothing']}"
        ]
    if preference["rpo_alpha"] and loss in ("cpo", "simpo", "orpo"):
        weight = (
            "is part of its loss, at weight 1" if loss == "orpo" else "is weighed by preference.cpo_alpha"
        )
        return [
            f"preference.rpo_alpha={preference['rpo_alpha']} weighs the NLL term of DPO's losses (sigmoid, ipo); "
            f"with preference.loss_type={loss} that term {weight}"
        ]
    if preference["reference"] == "no_adapter" and tree["lora"]["name"] == "none":
        return [
            "preference.reference=no_adapter needs a LoRA adapter to disable; with lora=none (full fine-tuning) "
            "the reference log-probabilities are cached before training (preference.reference=auto or cached)"
        ]
    return []


def _check_model(tree: dict) -> list[str]:
    model = tree["model"]
    path = Path(str(model["path"])).expanduser()
    # a tiny twin is built (and pre-trained) only at its own cache place; any other model.path must exist
    own = default_twin_path(twin_name(str(model["family"])))
    if tree["stages"] and model["build_if_missing"] and not path.exists() and path.absolute() != own:
        return [
            f"model.path={model['path']} does not exist; the tiny twin is built only at its own place "
            f"{own} (PIPELINE_CACHE moves it); to write one at another folder run "
            f"`python -m pipeline.training.twin --family {model['family']} --out {model['path']}`, "
            "or give an existing model folder"
        ]
    return []


def _check_dataset(tree: dict) -> list[str]:
    data = tree["dataset"]
    uses_data = any(s in tree["stages"] for s in (*TRAINING_STAGES, "eval", "infer"))
    problems = []
    if uses_data and data["name"] == "custom" and not data["path"] and not data["sources"]:
        problems.append(
            "dataset.path is required for dataset=custom: set dataset.path=/path/to/data.jsonl "
            "(or a list of .jsonl/.json/.parquet/.arrow files)"
        )
    if uses_data and data["name"] == "hf" and not data["path"] and not data["sources"]:
        problems.append(
            "dataset.path is required for dataset=hf: .parquet/.arrow files, a save_to_disk folder, a folder "
            "of data files, or a hub id (with dataset.trust_hub=true)"
        )
    infer_input = tree["infer"]["input"]
    if "infer" in tree["stages"] and not tree["infer"]["interactive"] and infer_input is not None:
        if Path(infer_input).suffix.lower() not in (".jsonl", ".json"):
            problems.append(f"infer.input={infer_input} is not a .jsonl or .json file")
        elif not Path(infer_input).expanduser().is_file():
            problems.append(f"infer.input={infer_input}: file not found")
    if data["columns"] and data["name"] not in ("custom", "hf") and not data["sources"]:
        problems.append(
            f"dataset.columns renames the keys of custom files; dataset={data['name']} has none "
            "(use dataset=custom or dataset=hf)"
        )
    for i, source in enumerate(data["sources"]):
        key = f"dataset.sources[{i}]"
        name = source.get("name")
        if name not in CHOICES["dataset.name"]:
            valid = ", ".join(CHOICES["dataset.name"])
            problems.append(f"{key}.name={_show(name)} is not a valid dataset; valid: {valid}")
        if source.get("n") is not None and source.get("ratio") is not None:
            problems.append(f"{key} sets both n and ratio; give one of them")
        if source.get("n") is not None and (not isinstance(source["n"], int) or source["n"] < 1):
            problems.append(f"{key}.n={source['n']} must be a positive integer")
        ratio = source.get("ratio")
        if ratio is not None and (not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
            problems.append(f"{key}.ratio={ratio} must be a number in (0, 1]")
    return problems


def _check_family(tree: dict) -> list[str]:
    model = tree["model"]
    from pipeline.families import families_that, get_family, video_settings  # the family's module only
    from pipeline.families.base import FamilyError

    family = get_family(model["family"])
    capabilities = family.capabilities
    problems = []
    if "processor_kwargs" not in capabilities.config_keys and model["processor_kwargs"]:
        problems.append(
            f"model.processor_kwargs is for transformers-native families; {capabilities.display_name} takes "
            + " and ".join(f"model.{key}" for key in capabilities.config_keys)
        )
    try:
        get_family(family.name, family.settings_from_config(OmegaConf.create(model)))
    except FamilyError as err:
        problems.append(f"model.processor_kwargs: {err}")
    try:
        get_family(family.name, None, video=video_settings(OmegaConf.create(model)))
    except FamilyError as err:
        problems.append(str(err))
    # What only some families can do: refused before any work starts, naming the families that can.
    uses = set(tree["stages"])
    trains = bool(uses & set(TRAINING_STAGES))
    needs = [
        ("trainer.compile=true", "compiles", trains and tree["trainer"]["compile"] is True),
        (
            "trainer.compile_vision=true",
            "compiles_vision",
            trains and tree["trainer"]["compile_vision"] is True,
        ),
        ("trainer.packing=true", "packs", trains and tree["trainer"]["packing"] is True),
        ("dataset.truncation=truncate", "truncates", tree["dataset"]["truncation"] != "delete"),
        ("model.fused_kernels=liger", "fuses_kernels", trains and model["fused_kernels"] == "liger"),
        (
            f"model.linear_attention={model['linear_attention']}",
            "linear_attention",
            model["linear_attention"] != "auto",
        ),
        (
            f"trainer.patch_weight={tree['trainer']['patch_weight']}",
            "counts_patches",
            trains and tree["trainer"]["patch_weight"] not in ("auto", 0, 0.0),
        ),
    ]
    for what, can, used in needs:
        if used and not getattr(capabilities, can):
            able = ", ".join(f"model.family={name}" for name in families_that(can))
            problems.append(
                f"{what} runs for {able} only; {capabilities.display_name}, model.family={family.name} does "
                "not take it"
            )
    return problems


def objective_problems(objective: str, generate: bool, written: Collection[str] | None = None) -> list[str]:
    """Return a problem when eval will not write the metric `objective`: before it runs, whether it can
    (generation metrics need eval.generate); with `written` (the metrics it wrote), whether it did."""
    if written is not None:
        if objective in written:
            return []
        hint = " (written only when some reference holds a number)" if objective == "numeric_accuracy" else ""
        if objective in PREFERENCE_METRICS:
            hint = " (written only when the held-out rows are preference pairs)"
        wrote = ", ".join(sorted(written))
        return [f"eval.objective={objective} is not among the metrics eval wrote: {wrote}{hint}"]
    available = LOSS_METRICS + (GENERATION_METRICS if generate else ()) + PREFERENCE_METRICS
    if objective in available:
        return []
    hint = " (generation metrics need eval.generate=true)" if objective in GENERATION_METRICS else ""
    return [f"eval.objective={objective} is not a metric eval writes{hint}; valid: {', '.join(available)}"]


FREEZE_KEYS = ("freeze_vision", "freeze_resampler", "freeze_llm")


def _check_schedule(tree: dict) -> list[str]:
    """Returns the problem of a floor rate for a schedule that does not decay by cosine."""
    optim = tree["optim"]
    if optim["min_lr_rate"] > 0 and optim["scheduler"] != "cosine":
        return [
            f"optim.min_lr_rate={optim['min_lr_rate']} is the floor of the cosine schedule; with "
            f"optim.scheduler={optim['scheduler']} set optim.min_lr_rate=0 or optim.scheduler=cosine"
        ]
    return []


def _check_lora(tree: dict) -> list[str]:
    lora = tree["lora"]
    quantization = tree["model"]["quantization"]
    if lora["name"] == "none" and quantization != "none" and "sft" in tree["stages"]:
        return [
            f"model.quantization={quantization} trains adapters on a frozen quantized base: choose lora=qkv or "
            "lora=all (full fine-tuning, lora=none, updates the base weights themselves)"
        ]
    if quantization != "none":
        from pipeline.families import quantization as quantized_base
        from pipeline.families.base import FamilyError

        try:
            quantized_base.check(quantization)  # bitsandbytes installed
        except FamilyError as err:
            return [str(err)]
    if lora["name"] == "none":
        if lora["bias"] != "none":
            return [
                f"lora.bias={lora['bias']} applies to LoRA only; full fine-tuning (lora=none) trains every bias "
                "of the parts not frozen"
            ]
        variants = [f"lora.{key}=true" for key in ("use_dora", "use_rslora") if lora[key]]
        if normal_init(lora["init_weights"]) != "true":
            variants.append(f"lora.init_weights={lora['init_weights']}")
        if tree["optim"]["loraplus_lr_ratio"] is not None:
            variants.append(f"optim.loraplus_lr_ratio={tree['optim']['loraplus_lr_ratio']:g}")
        return [
            f"{variant} applies to LoRA only (lora=qkv or lora=all); lora=none is full fine-tuning"
            for variant in variants
        ]
    problems = _check_lora_init(tree)
    # As ms-swift (`freeze_parameters` is for --sft_type full): with LoRA only the adapters train.
    return problems + [
        f"lora.{key}=true applies to full fine-tuning (lora=none) only; with lora={lora['name']} only the "
        "adapters train: choose what they cover with lora.target_modules"
        for key in FREEZE_KEYS
        if lora[key]
    ]


def _check_early_stopping(tree: dict) -> list[str]:
    """Returns the problem of early stopping in a training run that holds out no validation rows (the
    training loop refuses one whose split comes out empty too)."""
    patience, dataset = tree["trainer"]["early_stopping_patience"], tree["dataset"]
    training = any(s in TRAINING_STAGES for s in tree["stages"])
    if patience is None or not training or dataset["test_ratio"] > 0 or dataset["val_path"] is not None:
        return []
    return [
        f"trainer.early_stopping_patience={patience} watches an evaluation metric, and dataset.test_ratio=0 "
        "without dataset.val_path holds out no validation rows: set one of them, or "
        "trainer.early_stopping_patience=null"
    ]


def last_round_only(loss_scale: str, pairs: bool) -> bool:
    """Returns whether dataset.loss_scale puts the loss on each row's final response alone: `pairs` for
    preference pairs (auto: yes) or rows trained or scored on their answers (auto: every round's)."""
    return loss_scale == "last_round" or (loss_scale == "auto" and pairs)


# the losses preference.loss_mix may weigh: those of the answers' implicit rewards, and `sft`
MIXABLE_LOSSES: tuple[str, ...] = (*REWARD_LOSSES, "sft")


def nll_weight(
    loss_type: str, rpo_alpha: float | None, cpo_alpha: float, mix: Mapping[str, float] | None = None
) -> float:
    """Returns the weight of the preference loss's term on the chosen answer's mean token negative
    log-likelihood: preference.rpo_alpha for DPO's losses, cpo_alpha for cpo and simpo, 1 for orpo (its own),
    `sft`'s weight in a loss_mix."""
    if isinstance(mix, Mapping) and mix:  # a malformed one is the config check's to report
        return float(mix.get("sft", 0.0))
    if loss_type == "orpo":
        return 1.0
    if loss_type in ("cpo", "simpo"):
        return float(cpo_alpha)
    return float(rpo_alpha or 0.0)


def eval_stat_names(stage: str, preference: Mapping[str, Any]) -> tuple[str, ...]:
    """Returns the metrics the training stage's periodic evaluation reports (`loss` first), without `eval_`;
    `preference`: the preference config node (dpo reports `nll` where its loss has that term)."""
    if stage == "dpo" and preference["loss_type"] == "kto":
        return ("loss", *KTO_STATS)
    nll = stage == "dpo" and nll_weight(
        preference["loss_type"], preference["rpo_alpha"], preference["cpo_alpha"], preference["loss_mix"]
    )
    return ("loss", *TRAINING_EVAL_STATS[stage], *(("nll",) if nll else ()))


def best_metric_name(value: str) -> str:
    """Returns trainer.metric_for_best_model as the evaluation reports it (`eval_<name>`)."""
    return value if value.startswith("eval_") else f"eval_{value}"


def _check_best_metric(tree: dict) -> list[str]:
    """Returns the problem of a trainer.metric_for_best_model that the run's training stage does not report."""
    value = tree["trainer"]["metric_for_best_model"]
    stage = next((s for s in tree["stages"] if s in TRAINING_STAGES), None)
    if stage is None:
        return []
    names = eval_stat_names(stage, tree["preference"])
    if best_metric_name(value).removeprefix("eval_") in names:
        return []
    return [f"trainer.metric_for_best_model={value!r}: the {stage} stage evaluates {', '.join(names)}"]


def _check_lora_init(tree: dict) -> list[str]:
    """Returns the problems of lora.init_weights: its value, and what an adapter started from the base weights
    (pissa, olora: the base becomes the residual) cannot go with."""
    lora, value = tree["lora"], tree["lora"]["init_weights"]
    problem = init_problem(value)
    if problem:
        return [problem]
    if not is_residual(value):
        return []
    problems = []
    if lora["use_dora"]:
        problems.append(
            f"lora.init_weights={value} with lora.use_dora=true: DoRA's magnitudes are taken from the residual "
            "base, so its checkpoints could not be written as a LoRA of the original model; choose one"
        )
    quantization = tree["model"]["quantization"]
    if quantization != "none":
        problems.append(
            f"lora.init_weights={value} with model.quantization={quantization}: the residual base would be "
            "quantized again at every start, so a resumed run would not continue the weights it stopped with; "
            "use lora.init_weights=true with a quantized base"
        )
    if "dpo" in tree["stages"] and tree["preference"]["reference"] == "no_adapter":
        problems.append(
            f"lora.init_weights={value} with preference.reference=no_adapter: the policy with its adapter turned "
            "off is the residual base rather than the model; use preference.reference=cached (auto picks it: "
            "the starting model's log-probabilities, computed before training)"
        )
    return problems


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_serve_key(serve: dict) -> list[str]:
    """Returns the problems of the server's key settings: an empty key (an unset shell variable in
    `serve.api_key=$KEY` gives one) would let every client in, so it is refused rather than taken as "no key"."""
    key, env = serve["api_key"], serve["api_key_env"]
    if key is not None and env is not None:
        return [
            "serve.api_key and serve.api_key_env are both set; keep one (serve.api_key_env keeps the key out of "
            "the command line and the run folder)"
        ]
    if key is not None and not str(key).strip():
        return [
            "serve.api_key is empty (an unset shell variable in serve.api_key=$KEY gives that), which would let "
            "every client in; give the key, set serve.api_key_env=<variable> to read it from the environment, "
            "or leave serve.api_key=null for a server without a key"
        ]
    if key == REDACTED:
        return [
            f"serve.api_key={REDACTED} is the placeholder run folders record in place of the key; give the key "
            "itself, or serve.api_key_env=<variable>"
        ]
    if env is not None and not ENV_NAME.match(str(env)):
        return [f"serve.api_key_env={_show(env)} is not an environment variable name, e.g. PIPELINE_API_KEY"]
    return []


def serve_api_key(serve: DictConfig | dict, environ: Mapping[str, str] | None = None) -> str | None:
    """Returns the key the server asks for (None: no key): `serve.api_key`, or the value of the environment
    variable `serve.api_key_env` names; raises ConfigError for an empty key or a variable unset or empty."""
    serve = dict(serve)
    problems = _check_serve_key(serve)
    if problems:
        raise ConfigError(problems)
    env = serve["api_key_env"]
    if env is None:
        return serve["api_key"]
    environ = os.environ if environ is None else environ
    value = environ.get(str(env), "")
    if not value.strip():
        state = "is empty" if str(env) in environ else "is not set"
        raise ConfigError(
            f"serve.api_key_env={env} but ${env} {state}; export {env}=<key> before starting the server, "
            "or set serve.api_key_env=null to serve without a key"
        )
    return value.strip()  # a newline from a key file would never match the header, which is stripped


def validate(cfg: DictConfig) -> None:
    """Return None when `cfg` is usable; raise ConfigError naming every bad key and what it accepts."""
    tree = _to_plain(cfg)
    problems = _check_unknown_keys(tree)
    if problems:
        raise ConfigError(problems)
    problems = _check_stages(list(tree["stages"]))
    problems += _check_choices(tree)
    problems += _check_ranges(tree)
    problems += _check_lora(tree)
    problems += _check_schedule(tree)
    problems += _check_early_stopping(tree)
    problems += _check_best_metric(tree)
    problems += _check_serve_key(tree["serve"])
    if not problems and "serve" in tree["stages"]:
        try:
            serve_api_key(tree["serve"])
        except ConfigError as err:
            problems += err.problems
    if "eval" in tree["stages"]:
        problems += objective_problems(tree["eval"]["objective"], tree["eval"]["generate"])
    if not problems:
        problems += _check_ckpt(tree)
        problems += _check_model(tree)
        problems += _check_dataset(tree)
        problems += _check_family(tree)
    if problems:
        raise ConfigError(problems)


def resolve_device(cfg: DictConfig | str) -> torch.device:
    """Return the torch device named by `cfg.device` (or a device string); auto = the first GPU if any."""
    import torch

    name = cfg if isinstance(cfg, str) else str(cfg.device)
    if not DEVICE_PATTERN.match(name):
        raise ConfigError(f"device={name} is not valid; valid: auto, cpu, cuda, cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            raise ConfigError(f"device={name} but {count} CUDA device(s) are visible; use device=auto or cpu")
    return torch.device(name)


def resolve_dtype(cfg: DictConfig | str, device: torch.device) -> torch.dtype:
    """Return the model dtype: `model.dtype`, or for auto bf16 (else fp16) on CUDA and fp32 on CPU."""
    import torch

    name = cfg if isinstance(cfg, str) else str(cfg.model.dtype)
    if name in DTYPE_NAMES:
        return dtype_named(name)
    if name != "auto":
        raise ConfigError(
            f"model.dtype={name} is not a valid choice; valid: {', '.join(CHOICES['model.dtype'])}"
        )
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_named(name: str) -> torch.dtype:
    """Returns the torch dtype of one of DTYPE_NAMES (torch's own name of it); raises KeyError for others."""
    import torch

    if name not in DTYPE_NAMES:
        raise KeyError(name)
    return getattr(torch, name)
