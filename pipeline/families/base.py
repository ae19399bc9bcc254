"""The family interface: everything the stages, the chat and the server need from a vision-language model.

A family is one subclass of `Family` (one module, or one folder for MiniCPM-V-2's own implementation, under
pipeline/families/) plus one conf/model/*.yaml. Everything above pipeline/families/ speaks to this class and
never to a family by name: what a family can do beyond the common interface is stated in its `capabilities`
(compiles, packs, truncates, batches served requests, CUDA-graph decode, images per conversation and where
the chat and the server put them, its display name and its config keys), and a feature a family lacks is
refused naming the family and the key.

The interface, in the order a run uses it (every method is declared below, abstract where each family must
say it):

    loading      resolve, load, load_bundle -> Bundle (model, processor, base folder, kind)
    data         check_conversation, encode, token_counter, dataset (rows -> samples; images through an
                 ImageSource the data layer gives)
    training     prepare_training (LoRA presets / freeze groups), training_collate, eval_collate, loss_outputs
                 (LossSums), sequence_logps (each sample's summed log-probability: preference training),
                 checkpoint_writer / checkpoint_reader (full weights in the native layout),
                 compile_model, vision_attention_of, device_of, pad_id
    generation   prompt_limit, encode_row (a dataset row as a prompt), collate_for_generation, generate,
                 generate_batch
    chat, serve  encode_chat (a conversation as a prompt), stream_tokens (one prompt's tokens as they come),
                 end_ids, decode, batch_decoder (a BatchDecoder: several prompts decoded together, step by
                 step, where capabilities.batches_requests; a StepDecoder, which prompts join and leave
                 between steps, where capabilities.continuous_batching)
    merge        merge, dummy_samples, logits_fn, check_merged, save_merged, load_merged, weight_files
    twin         build_tiny (random weights; pipeline.training.twin pre-trains every family's twin)

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``; an
``<image>`` tag in a user message marks where an image goes (one tag per image, in order). Images without
any tag go at the start of the first user message, as ms-swift places them.
"""

from __future__ import annotations

import re
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset as TorchDataset

from pipeline.families import LORA_PRESETS
from pipeline.families.generation_settings import DECODE_MODES, GenerationSettings
from pipeline.families.lora_init import peft_init

if TYPE_CHECKING:  # peft loads when a model is wrapped or an adapter read, not for the config check
    from peft import LoraConfig, PeftModel

IGNORE_INDEX = -100  # the label of a position no loss is taken on (padding, prompts, images)
IMAGE_TAG = "<image>"  # where an image goes in a user message
# A training batch of preference pairs (pipeline/training/preference.py) holds, under PAIRS, how many pairs n
# it holds: samples i and n + i are pair i's chosen and rejected answer to the same prompt and images, so a
# family runs the vision tower once per pair (sequence_logps). PAIR_INDEX: each pair's number in its dataset.
PAIRS = "pairs"
PAIR_INDEX = "pair_index"
DESIRABLE = "desirable"  # kto: each row's label [n] bool
PAIR_KEYS = (PAIRS, PAIR_INDEX, DESIRABLE)

# what a trained vision-tower patch counts in the token budget where the tower's blocks are checkpointed, as a
# share of what it counts kept (Family.patch_weight): a kept block saves some 16-20 tensors of the patch's
# width for its backward (norms, q/k/v, attention, the MLP's two, LoRA's inputs), a checkpointed one only
# its input; an eighth leaves room for the one block recomputed at a time
CHECKPOINTED_PATCH_SHARE = 1 / 8
VIDEO_TAG = "<video>"  # where a video goes in a user message (ms-swift's tag)
ROLES = ("system", "user", "assistant")

Message = Mapping[str, str]
# model.gradient_checkpointing as the training plan resolved it: True (every block), False (none), "vision"
# (the vision tower's blocks only) or a share in (0, 1): the vision tower's blocks and that share of the
# language model's decoder layers, the first ones (checkpointed_layers)
Checkpointing = bool | str | float


class FamilyError(ValueError):
    """Input a family cannot take; the message names the family, the message index or key, and the limit."""


class ContextLengthError(FamilyError):
    """A generation prompt that, with the tokens asked for, does not fit the model's positions."""


IMAGE_PLACEMENTS = ("inline", "first_query")
COMPILED_SHAPES = ("padded", "packed")


@dataclass(frozen=True)
class Capabilities:
    """What a family can do beyond the common interface: the stages, config checks, the chat and the server
    ask these ("can you pack?"), never the family's name."""

    display_name: str  # how logs, errors and the server name the model family ("MiniCPM-V-2")
    max_images: int  # images per conversation
    max_videos: int = 0  # videos per conversation (0: the family takes no video)
    # the model.video_* keys its frame sampling reads (Family.video_settings); () without video
    video_config_keys: tuple[str, ...] = ()
    compiles: bool = False  # trainer.compile: its blocks compile for training (compile_model)
    # The batches its compiled blocks take: "padded" = any batch (on a GPU replayed as CUDA graphs, batches
    # padded to a multiple of 128); "packed" = packed rows only, rounded up to a few static lengths
    compiled_shapes: str = "padded"
    # trainer.compile_vision: its vision tower's blocks compile too, on patch sequences padded to static
    # shapes (compile_model's `vision`; where its tower attends by variable-length attention)
    compiles_vision: bool = False
    # trainer.compile_vision=auto turns it on (where it measured faster); false: only =true does
    compiles_vision_by_default: bool = True
    packs: bool = False  # trainer.packing: several rows in one sequence without padding
    # its packed rows are attended by variable-length attention (no T x T mask): trainer.packing=auto
    # turns packing on for it on a GPU
    packs_padding_free: bool = False
    counts_patches: bool = False  # trainer.patch_weight: its token budget counts vision patches
    # trainer.micro_batch_tokens and model.gradient_checkpointing auto for LoRA that trains its vision tower,
    # on a card of at least trained_tower_card_gib: the budget of language-model tokens whose micro-batches
    # keep the tower's activations without checkpointing (its image tokens bound its patches); 0: every
    # block checkpointed
    trained_tower_budget: int = 0
    trained_tower_card_gib: int = 75
    # the largest model (parameters, from the model folder's safetensors headers) trained_tower_budget is
    # declared for: a larger one (or one whose size is not known before loading) checkpoints; 0: any size
    trained_tower_max_parameters: int = 0
    # model.gradient_checkpointing auto for LoRA that trains its vision tower beyond trained_tower_budget (on a
    # CUDA device, micro-batches of more than 1024 tokens): checkpoint the tower's blocks only and keep the
    # language model's activations, which the token budget bounds (its recompute is the step's cost);
    # false: every block checkpointed
    checkpoints_tower_only: bool = False
    fuses_kernels: bool = False  # model.fused_kernels: liger's fused norms and MLPs (apply_fused_kernels)
    # model.linear_attention: its language model has linear-attention layers (flash-linear-attention or not)
    linear_attention: bool = False
    truncates: bool = (
        False  # dataset.truncation other than `delete` (cut a too-long row instead of dropping it)
    )
    # serve: concurrent requests decode together in one batch (Family.batch_decoder); without it the server
    # answers one request at a time through Family.stream_tokens
    batches_requests: bool = False
    # serve: requests join and leave a running batch between decode steps (continuous batching: its
    # batch_decoder is a StepDecoder); without it a batch runs until every request in it has ended
    continuous_batching: bool = False
    # eval and infer (generate_batch) replay their decode steps as CUDA graphs over a static cache on a GPU
    cuda_graph_decode: bool = False
    # the model.* config keys its processor settings come from (see Family.settings_from_config)
    config_keys: tuple[str, ...] = ("processor_kwargs",)
    # Where the chat and the server put a conversation's images: "inline" tags each where it is given (a
    # chat turn's before its query, a request's where its image part stands); "first_query" gives them
    # untagged, and the family places them at the start of the first user message (a query's own <image>
    # tag, if any, places them there instead), so the chat asks for them when a conversation starts.
    image_placement: str = "inline"

    def __post_init__(self) -> None:
        if self.continuous_batching and not self.batches_requests:
            raise ValueError("continuous_batching needs batches_requests (a batch to join)")
        if self.compiled_shapes not in COMPILED_SHAPES:
            raise ValueError(
                f"compiled_shapes must be one of {COMPILED_SHAPES}, got {self.compiled_shapes!r}"
            )
        if self.image_placement not in IMAGE_PLACEMENTS:
            raise ValueError(
                f"image_placement must be one of {IMAGE_PLACEMENTS}, got {self.image_placement!r}"
            )

    def images_in_words(self) -> str:
        """Returns the images a conversation takes, in words ("one image", "at most 16 images")."""
        return "one image" if self.max_images == 1 else f"at most {self.max_images} images"

    def videos_in_words(self) -> str:
        """Returns the videos a conversation takes, in words ("no video", "at most 4 videos")."""
        if self.max_videos == 0:
            return "no video"
        return "one video" if self.max_videos == 1 else f"at most {self.max_videos} videos"


@dataclass
class Bundle:
    """What a stage works with: the model (PEFT-wrapped when an adapter is loaded), what encodes for it, the
    base folder it came from and which kind of checkpoint was loaded."""

    model: nn.Module
    processor: Any  # the family's own encoder (transformers' processor, or MiniCPM-V-2's image processor)
    base_path: Path  # the base model folder
    kind: str  # "base" | "adapter" | "full"

    @property
    def core(self) -> nn.Module:
        """Returns the model under any PEFT wrapper."""
        return peft_base(self.model)


class RowLike(Protocol):
    """A dataset row as the families read it (pipeline.data.rows.Row is one)."""

    query: str
    response: str | None
    history: Sequence[Sequence[str]]
    system: str | None
    images: Sequence[str]
    origin: str  # "file:line", for error messages
    # videos: Sequence[str] where the row has any (read through `row_video_refs`: not every row type has it)


class EncodedPrompt(Protocol):
    """A generation prompt as a family encodes it (its own type); the chat and the server read its length."""

    input_ids: list[int]


class ImageSource(Protocol):
    """Where a family's encoding gets a row's images: the data layer reads files, URLs and its caches."""

    def load(self, ref: str) -> Image.Image:
        """Returns the image `ref` names (RGB); raises an OSError naming it when it cannot be read."""

    def size(self, ref: str) -> tuple[int, int] | None:
        """Returns (width, height) from the image's header, or None when it is not local yet."""

    def video_info(self, ref: str) -> VideoInfo:
        """Returns the video's stream header (frames, fps, duration, size); raises an OSError naming it."""

    def video_frames(self, ref: str, indices: Sequence[int]) -> Any:
        """Returns the frames at `indices` (in that order, repeats allowed) as a uint8 array (T, H, W, 3);
        raises an OSError naming the video when it cannot be decoded."""


@dataclass(frozen=True)
class VideoInfo:
    """A video's stream header: what frame sampling and the up-front check read, without decoding."""

    frames: int  # frames in the stream
    fps: float  # its average frame rate
    duration: float  # seconds
    width: int
    height: int


@dataclass
class Video:
    """A video as a family encodes it: the sampled frames (uint8 array (T, H, W, 3)), which frames of the
    stream they are, and its header (the processors derive timestamps from both)."""

    frames: Any
    indices: list[int]
    info: VideoInfo


@dataclass(frozen=True)
class VideoLimits:
    """What a family takes of videos, for data validation before any model loads."""

    model: str  # the display name errors use ("Qwen2.5-VL (model.family=qwen2_5_vl)")
    max_videos: int  # per conversation; 0 = no video
    sampling: str  # how frames are sampled, in words, with the keys that set it

    def describe(self) -> str:
        """Returns the limits as one sentence for error messages."""
        if self.max_videos == 0:
            return f"{self.model} takes no video (only Qwen2.5-VL, Qwen3-VL and MiniCPM-V 4.6 do)"
        return f"{self.model} takes at most {self.max_videos} video(s) per conversation; {self.sampling}"


@dataclass(frozen=True)
class FamilyLimits:
    """What a family accepts, stated for data validation before any model loads."""

    max_images: int  # images per conversation
    max_length: int  # tokens per encoded conversation, image tokens included

    def describe(self) -> str:
        """Returns the limits as one sentence for error messages and docs."""
        return f"at most {self.max_images} image(s) per conversation and {self.max_length} tokens"


@dataclass
class EncodedSample:
    """One encoded conversation: ids, unshifted labels, per-token extras and the pixel inputs."""

    input_ids: list[int]
    labels: list[int]
    # Inputs with one value per token (e.g. Qwen2.5-VL's mm_token_type_ids), padded like input_ids.
    token_inputs: dict[str, list[int]] = field(default_factory=dict)
    # Image tensors as the family's processor returns them for this one conversation.
    pixel_inputs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class LossSums:
    """A forward's training loss as the loop needs it: summed over the supervised tokens, with their count."""

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    num_correct: torch.Tensor


@dataclass
class SequenceLogps:
    """Each sample's log-probability of its supervised tokens (an answer given its prompt), summed, and how many
    tokens that is; in the batch's sample order."""

    logps: torch.Tensor  # [samples], fp32
    tokens: torch.Tensor  # [samples]
    # What the vision tower and projector made of the batch's images, in the form the family's
    # sequence_logps takes back (`image_features`) to score the same batch again without them; None
    # where the family hands none back (a batch without images; the HF-native families' outside pairs).
    image_features: Any = None


def shared_halves(pairs: int, total: int, what: str) -> int:
    """Returns half of `total` (the chosen answers' share of a pair batch's images), refusing an odd one."""
    if total % 2:
        raise FamilyError(f"a batch of {pairs} preference pairs holds {total} {what}, not two equal halves")
    return total // 2


@dataclass(frozen=True)
class FreezeGroups:
    """Top-level parameter name prefixes of each part: what `lora=none` freeze switches act on."""

    vision: tuple[str, ...]
    projector: tuple[str, ...]
    llm: tuple[str, ...]

    def of(self, name: str) -> str | None:
        """Returns the group whose longest prefix holds the parameter name, or None outside every group.

        The longest prefix wins, so a projector nested inside the vision module (Qwen2.5-VL's
        `model.visual.merger`) is its own group."""
        best, best_len = None, -1
        for group in ("vision", "projector", "llm"):
            for prefix in getattr(self, group):
                if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                    best, best_len = group, len(prefix)
        return best


def check_messages(
    family: str, conversation: Sequence[Message], image_tag: str = IMAGE_TAG
) -> list[dict[str, str]]:
    """Returns the messages as plain dicts, checking their form and roles (an optional system message first,
    then user and assistant alternating from a user one; image tags only in user messages)."""
    messages: list[dict[str, str]] = []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping) or set(message) - {"role", "content"} or "role" not in message:
            raise FamilyError(
                f"{family}: message {i} must be {{'role': ..., 'content': ...}}, got {message!r}"
            )
        role, content = message["role"], message.get("content", "")
        if role not in ROLES:
            raise FamilyError(f"{family}: message {i} has role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise FamilyError(f"{family}: message {i} content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise FamilyError(f"{family}: message {i} is a system message; only the first message may be one")
        if role != "user" and image_tag in content:
            raise FamilyError(f"{family}: message {i} ({role}) holds {image_tag}; images go in user messages")
        if role != "user" and VIDEO_TAG in content:
            raise FamilyError(f"{family}: message {i} ({role}) holds {VIDEO_TAG}; videos go in user messages")
        messages.append({"role": role, "content": content})
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns or turns[0] != "user":
        raise FamilyError(
            f"{family}: a conversation needs a user message first (after an optional system one)"
        )
    for k in range(1, len(turns)):
        if turns[k] == turns[k - 1]:
            raise FamilyError(
                f"{family}: two {turns[k]} messages in a row; user and assistant must alternate"
            )
    return messages


def normalise_conversation(
    family: str, conversation: Sequence[Message], n_images: int, image_tag: str = IMAGE_TAG, n_videos: int = 0
) -> list[dict[str, str]]:
    """Returns the messages as plain dicts with every image (and video) tagged, checking roles and tag counts;
    untagged ones open the first user message, images before videos."""
    messages = check_messages(family, conversation, image_tag)
    first = next((m for m in messages if m["role"] == "user"), None)
    for tag, count, what in ((VIDEO_TAG, n_videos, "video"), (image_tag, n_images, "image")):
        tags = sum(m["content"].count(tag) for m in messages)
        if tags == 0 and count and first is not None:
            first["content"] = tag * count + first["content"]
        elif tags != count:
            raise FamilyError(f"{family}: the conversation has {tags} {tag} tag(s) but {count} {what}(s)")
    return messages


def messages_from_row(
    query: str, response: str | None, history: Sequence[Sequence[str]] = (), system: str | None = None
) -> list[dict[str, str]]:
    """Returns the messages of an ms-swift row (query, response, [query, response] history, system);
    response None leaves the conversation open for generation."""
    messages = [{"role": "system", "content": system}] if system else []
    for past_query, past_response in history:
        messages += [{"role": "user", "content": past_query}, {"role": "assistant", "content": past_response}]
    messages.append({"role": "user", "content": query})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def unwrapped(model: nn.Module) -> nn.Module:
    """Returns the family's model under any PEFT / DDP / DeepSpeed wrapper."""
    core = model
    while hasattr(core, "module") and isinstance(core.module, nn.Module):
        core = core.module
    return peft_base(core)


def peft_base(model: nn.Module) -> nn.Module:
    """Returns the model under a PEFT wrapper, else `model` (before peft is imported no model can be wrapped:
    it is not loaded to ask)."""
    peft = sys.modules.get("peft")
    return model.get_base_model() if peft is not None and isinstance(model, peft.PeftModel) else model


def checkpointed_layers(checkpointing: Checkpointing, count: int) -> int:
    """Returns how many of a language model's `count` decoder layers, the first ones, `checkpointing`
    recomputes in the backward: all for True, none for False and "vision", and for a share in (0, 1) that
    share of them rounded, at least one and at most all but one. Every kept layer holds its activations
    until the backward; every checkpointed one only its input, and runs its forward twice."""
    if isinstance(checkpointing, bool):
        return count if checkpointing else 0
    if isinstance(checkpointing, str):
        return 0
    return min(max(round(checkpointing * count), 1), count - 1) if count > 1 else count


def with_lora_variant(config: LoraConfig, lora: Any) -> LoraConfig:
    """Returns the PEFT LoraConfig with the variant the `lora` config node asks for: DoRA (lora.use_dora),
    rank-stabilised scaling (lora.use_rslora) and how the adapter starts (lora.init_weights); PEFT computes,
    saves, loads and merges them."""
    config.use_dora = bool(lora.get("use_dora", False))
    config.use_rslora = bool(lora.get("use_rslora", False))
    config.init_lora_weights = peft_init(lora.get("init_weights", "true"))
    return config


def row_video_refs(row: Any) -> list[str]:
    """Returns a row's video references ([] for a row type without videos)."""
    return list(getattr(row, "videos", None) or ())


def load_video(ref: str, source: ImageSource, pick: Callable[[VideoInfo], Sequence[int]]) -> Video:
    """Returns the video `ref` with the frames `pick` chooses from its header (the family's sampling)."""
    info = source.video_info(ref)
    indices = [int(i) for i in pick(info)]
    return Video(source.video_frames(ref, indices), indices, info)


def row_images(row: RowLike, images: ImageSource) -> list[Image.Image]:
    """Returns a row's images, loaded; an unreadable one raises an error that names the row."""
    try:
        return [images.load(ref) for ref in row.images]
    except OSError as exc:
        raise type(exc)(f"{row.origin}: {exc}") from exc


class BatchDecoder(ABC):
    """Several encoded prompts decoded together, one step at a time: what a family that batches served
    requests (capabilities.batches_requests) gives the server, whose worker decides after each step whether
    the batch goes on."""

    @abstractmethod
    def decode(
        self,
        prompts: Sequence[EncodedPrompt],
        settings: GenerationSettings,
        seeds: Sequence[int] | None,
        on_step: Callable[[list[int]], bool],
    ) -> None:
        """Generates for `prompts` as one batch, up to settings.max_new_tokens: after each step `on_step`
        gets the token id each prompt's answer chose (in prompt order; a row that has reached an end id gets
        padding after it) and returns whether to go on; decoding also ends once every row has reached an end
        id. With `seeds` (one per prompt, when sampling) a row samples from its own seed, so its answer is
        the same alone or in any batch."""


class StepDecoder(BatchDecoder):
    """A running batch that prompts join and leave between decode steps (continuous batching): what a family
    with capabilities.continuous_batching gives the server. Every row decodes under the settings of `start`
    (greedy, or sampling alike) up to its own max_new_tokens; rows are named by the ids `add` returns.

    `decode` (a fixed batch, the BatchDecoder contract) runs on these steps."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id  # what `decode` hands on for a row that has ended

    @abstractmethod
    def start(self, settings: GenerationSettings) -> None:
        """Empties the batch; the rows added next decode under `settings` (its max_new_tokens is unused:
        each row brings its own)."""

    @abstractmethod
    def add(
        self, prompts: Sequence[EncodedPrompt], max_new_tokens: Sequence[int], seeds: Sequence[int | None]
    ) -> list[int]:
        """Prefills `prompts` (together) and joins them to the batch; returns their row ids. A row samples from
        its own seed (None: the process's random state), so that its answer is the same alone or joined to
        any batch at any step. On an error the batch is left as it was."""

    @abstractmethod
    def step(self) -> dict[int, int]:
        """Chooses the next token of every row and returns {row id: token id}; a row whose token is an end id,
        or its max_new_tokens-th, leaves the batch."""

    @abstractmethod
    def drop(self, rows: Sequence[int]) -> None:
        """Removes rows from the batch (ended by the caller: a stop string, a client gone); ids no longer in
        the batch are ignored."""

    @property
    @abstractmethod
    def rows(self) -> list[int]:
        """Returns the ids of the rows in the batch, in the order they joined."""

    def decode(
        self,
        prompts: Sequence[EncodedPrompt],
        settings: GenerationSettings,
        seeds: Sequence[int] | None,
        on_step: Callable[[list[int]], bool],
    ) -> None:
        self.start(settings)
        try:
            n = len(prompts)
            ids = self.add(prompts, [settings.max_new_tokens] * n, list(seeds) if seeds else [None] * n)
            while self.rows:
                chosen = self.step()
                if not on_step([chosen.get(row, self.pad_id) for row in ids]):
                    break
        finally:
            self.start(settings)  # the cache goes with the rows


class Family(ABC):
    """One model family: loading, encoding, batching, training targets, saving, generation and its tiny twin."""

    name: ClassVar[str]  # the registry's name (model.family)
    model_type: ClassVar[str]  # config.json's model_type of the family's checkpoints
    capabilities: ClassVar[Capabilities]
    # Default limit; a family may narrow it from its settings (e.g. the processor's max length).
    max_length: ClassVar[int] = 2048

    # The resolution settings the family's processor takes from the config (see settings_from_config).
    setting_keys: ClassVar[tuple[str, ...]] = ()
    # The config key to lower when images take too much memory, and what it bounds (the dataset summary
    # names it): fewer pixels or slices per image, fewer image tokens.
    resolution_setting: ClassVar[str] = ""

    # The peak learning rate of the tiny twin's pre-training (pipeline/training/twin.py: one recipe for
    # every family); a family whose twin learns at another one states it here.
    twin_pretrain_lr: ClassVar[float] = 3e-3

    # Batch keys that stay on the host when a batch moves to the model's device (`to_device`): small integer
    # tables the model reads element by element in Python (per-image patch grids), where each read of a
    # device tensor would be a stream sync.
    host_inputs: ClassVar[frozenset[str]] = frozenset()

    def to_device(self, batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
        """Returns the batch with its tensors on `device`, except `host_inputs` (the model moves what it needs
        of those itself; lists of tensors are the model's to move)."""
        return {
            key: value.to(device, non_blocking=True)
            if isinstance(value, torch.Tensor) and key not in self.host_inputs
            else value
            for key, value in batch.items()
        }

    def token_sample_lengths(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Returns, for each token of a collated training batch [B, T], the length of the sample it belongs to
        (0 on padding): NEFTune's scale (trainer.neftune_noise_alpha). This base reads padded rows, one sample
        a row (attention_mask); a family that packs rows overrides it."""
        mask = batch["attention_mask"].long()
        return mask * mask.sum(1, keepdim=True)

    def __init__(
        self,
        settings: Mapping[str, Any] | None = None,
        vision_attention: str = "auto",
        *,
        fused_kernels: str = "auto",
        linear_attention: str = "auto",
        decode: str = "auto",
        chunked_loss: str = "auto",
        video: Mapping[str, Any] | None = None,
    ):
        self.settings = dict(settings or {})
        # the model.video_* settings that are set (video_fps, video_max_frames, video_max_pixels; None values
        # dropped: the processor's default); keys the family does not read are refused
        self.video_settings = {key: value for key, value in (video or {}).items() if value is not None}
        unread = sorted(set(self.video_settings) - set(self.capabilities.video_config_keys))
        if unread:
            takes = ", ".join(f"model.{key}" for key in self.capabilities.video_config_keys)
            raise FamilyError(
                f"{', '.join(f'model.{key}' for key in unread)}: {self.label} does not read "
                + (f"it; it reads {takes}" if takes else "it; it takes no video")
            )
        # how an HF-native family's vision tower attends (model.vision_attention; see vision_attention.py)
        self.vision_attention = vision_attention
        self.fused_kernels = fused_kernels  # model.fused_kernels (kernels.py)
        self.linear_attention = linear_attention  # model.linear_attention (linear_attention.py)
        if decode not in DECODE_MODES:
            raise FamilyError(f"model.decode={decode} is not a decode mode; valid: {', '.join(DECODE_MODES)}")
        self.decode_mode = decode  # model.decode: auto | static | dynamic (generate_batch's cache)
        # model.chunked_loss: auto | off, the loss of many supervised positions a chunk at a time, each
        # chunk's logits recomputed in the backward (chunked_loss.py)
        self.chunked_loss = chunked_loss
        unknown = sorted(set(self.settings) - set(self.setting_keys))
        if unknown:
            valid = ", ".join(self.setting_keys) or "none"
            raise FamilyError(
                f"{self.name}: unknown processor setting(s) {', '.join(unknown)}; valid: {valid}"
            )

    @property
    def label(self) -> str:
        """Returns how the chat's and the server's errors name the family: "Qwen2.5-VL
        (model.family=qwen2_5_vl)"."""
        return f"{self.capabilities.display_name} (model.family={self.name})"

    @property
    def max_images(self) -> int:
        """Returns the images a conversation may hold (capabilities.max_images)."""
        return self.capabilities.max_images

    @classmethod
    def settings_from_config(cls, model: Any) -> dict[str, Any]:
        """Returns the processor settings of a `model` config node: model.processor_kwargs by default; a family
        whose capabilities name other keys reads those."""
        return dict(model.processor_kwargs)

    # -- limits and validation (no model needed) ---------------------------------------------------
    def limits(self) -> FamilyLimits:
        """Returns the limits data validation states for this family."""
        return FamilyLimits(max_images=self.max_images, max_length=self.max_length)

    def check_conversation(
        self, conversation: Sequence[Message], images: Sequence[Any], videos: Sequence[Any] = ()
    ) -> list[dict[str, str]]:
        """Returns the normalised messages; raises FamilyError when they break the family's rules."""
        limits = self.limits()
        if len(images) > limits.max_images:
            raise FamilyError(
                f"{self.name}: {len(images)} images in one conversation; this family takes "
                f"{limits.describe()}"
            )
        if len(videos) > self.capabilities.max_videos:
            raise FamilyError(
                f"{self.label}: {len(videos)} video(s) in one conversation; {self.video_limits().describe()}"
            )
        return normalise_conversation(self.name, conversation, len(images), n_videos=len(videos))

    def prepare_messages(
        self,
        conversation: Sequence[Message],
        images: Sequence[Any],
        generation: bool,
        videos: Sequence[Any] = (),
    ) -> list[dict[str, str]]:
        """Returns the checked messages to render: a generation prompt drops a final assistant message, a
        training conversation must end with one."""
        messages = self.check_conversation(conversation, images, videos)
        if generation and messages[-1]["role"] == "assistant":
            return messages[:-1]
        if not generation and messages[-1]["role"] != "assistant":
            raise FamilyError(f"{self.name}: a training conversation must end with an assistant message")
        return messages

    # -- video (families with capabilities.max_videos) ----------------------------------------------
    def video_limits(self) -> VideoLimits:
        """Returns what the family takes of videos, for data validation and errors."""
        return VideoLimits(self.label, self.capabilities.max_videos, self.video_sampling())

    def video_sampling(self) -> str:
        """Returns how the family samples a video's frames, in words, naming the config keys that set it."""
        return ""

    def video_frame_picker(self, processor: Any) -> Callable[[VideoInfo], Sequence[int]]:
        """Returns `pick(info)`: the indices of the frames the family's processor samples from a video with
        that header (under the model.video_* settings)."""
        raise FamilyError(f"{self.label} takes no video; {self.video_limits().describe()}")

    # -- the model --------------------------------------------------------------------------------
    @abstractmethod
    def resolve(self, path: str, allow_download: bool = False) -> Path:
        """Returns the local folder for a folder path or a hub id (downloaded only when allowed)."""

    @abstractmethod
    def load(
        self, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> tuple[nn.Module, Any]:
        """Returns (model, processor) from a local folder in the family's native layout."""

    @abstractmethod
    def encode(
        self,
        processor: Any,
        conversation: Sequence[Message],
        images: Sequence[Image.Image] = (),
        generation: bool = False,
        last_round: bool = False,
    ) -> EncodedSample:
        """Returns the encoded conversation; labels are the assistant turns only, the last one alone with
        `last_round` (none with generation=True, where a final assistant message, if any, is dropped and the
        generation prompt appended)."""

    @abstractmethod
    def collate_for_training(self, processor: Any, samples: Sequence[EncodedSample]) -> dict[str, Any]:
        """Returns a right-padded batch the model's forward takes, labels included."""

    @abstractmethod
    def collate_for_generation(self, processor: Any, samples: Sequence[EncodedSample]) -> dict[str, Any]:
        """Returns a left-padded batch of prompts the family's `generate` takes."""

    @abstractmethod
    def generate(
        self,
        model: nn.Module,
        processor: Any,
        batch: Mapping[str, Any],
        max_new_tokens: int = 64,
        **settings: Any,
    ) -> list[str]:
        """Returns the decoded new text of each prompt in the batch."""

    # -- what trains ----------------------------------------------------------------------------
    @abstractmethod
    def freeze_groups(self) -> FreezeGroups:
        """Returns the parameter name prefixes of the vision tower, the projector and the language model."""

    @abstractmethod
    def lora_target_names(self, model: nn.Module, preset: str) -> list[str]:
        """Returns the full names of the modules a LoRA preset targets (`qkv` or `all`)."""

    def lora_config(
        self,
        model: nn.Module,
        preset: str,
        r: int,
        alpha: float,
        dropout: float,
        target_modules: Sequence[str] | None = None,
        modules_to_save: Sequence[str] | None = None,
        base_model_path: str | None = None,
    ) -> LoraConfig:
        """Returns the PEFT LoraConfig for a preset, or for explicit target modules (names or regexes)."""
        if target_modules:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            pattern = "|".join(f"(?:{t})" for t in target_modules)
            hits = [
                n
                for n in names
                if re.fullmatch(pattern, n) or any(n.endswith(f".{t}") for t in target_modules)
            ]
            if not hits:
                raise FamilyError(
                    f"{self.name}: lora.target_modules {list(target_modules)} match no linear layer; "
                    f"examples: {names[:3]}"
                )
        elif preset in LORA_PRESETS:
            hits = self.lora_target_names(model, preset)
        else:
            raise FamilyError(f"{self.name}: lora preset must be one of {list(LORA_PRESETS)}, got {preset!r}")
        from peft import LoraConfig

        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules="|".join(re.escape(n) for n in hits),
            modules_to_save=list(modules_to_save) if modules_to_save else None,
            bias="none",
        )
        config.base_model_name_or_path = base_model_path
        return config

    def apply_lora(self, model: nn.Module, config: LoraConfig) -> PeftModel:
        """Returns the PEFT-wrapped model; only the LoRA weights require grad."""
        from peft import get_peft_model

        return get_peft_model(model, config)

    def load_adapter(self, model: nn.Module, folder: str | Path, trainable: bool = False) -> PeftModel:
        """Returns the base model with the LoRA adapter of a PEFT folder (what `save_pretrained` of the
        wrapped model wrote) applied; an adapter of another base model is refused naming both."""
        from peft import PeftModel

        try:
            return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
        except RuntimeError as err:  # size mismatch
            raise FamilyError(f"{self.name}: adapter {folder} does not fit this base model: {err}") from err

    def parameter_parts(self, model: nn.Module) -> dict[int, str | None]:
        """Returns id(parameter) -> its part (vision, projector or llm; None outside them) of the model as it
        trains, LoRA-wrapped or not (optim.vit_lr / optim.aligner_lr)."""
        core = peft_base(model)
        groups = self.freeze_groups()
        return {id(param): groups.of(name) for name, param in core.named_parameters()}

    def images_outside_adapter(self, model: nn.Module) -> bool:
        """True when no parameter of the vision tower or the projector trains and the adapter wraps none of
        their layers: the image features are then the same with the adapter disabled, so a reference that
        disables it (preference.reference=no_adapter) can take the policy's."""
        groups = self.freeze_groups()
        for name, param in peft_base(model).named_parameters():
            if groups.of(name) in ("vision", "projector") and (param.requires_grad or ".lora_" in name):
                return False
        return True

    def set_full_finetune(self, model: nn.Module, frozen: Sequence[str] = ()) -> None:
        """Makes every parameter trainable except those of the frozen groups (vision, projector, llm)."""
        groups = self.freeze_groups()
        unknown = [g for g in frozen if g not in ("vision", "projector", "llm")]
        if unknown:
            raise FamilyError(
                f"{self.name}: unknown freeze group(s) {unknown}; valid: vision, projector, llm"
            )
        for name, param in model.named_parameters():
            param.requires_grad_(groups.of(name) not in frozen)
        if not any(p.requires_grad for p in model.parameters()):
            raise FamilyError(f"{self.name}: freezing {list(frozen)} leaves nothing to train")

    # -- checkpoints ----------------------------------------------------------------------------
    @abstractmethod
    def save(self, model: nn.Module, processor: Any, folder: str | Path) -> Path:
        """Writes the model and its processor to `folder` (atomically) in the family's native layout."""

    def merge(self, model: PeftModel, processor: Any, folder: str | Path) -> Path:
        """Folds the adapter into the base weights and writes the standalone model to `folder`."""
        merged = model.merge_and_unload(safe_merge=True)
        return self.save(merged, processor, folder)

    @abstractmethod
    def build_tiny(self, folder: str | Path, seed: int = 0) -> Path:
        """Writes the family's tiny twin (tiny sizes, offline tokenizer, real chat template) to `folder`."""

    # -- what the stages call ---------------------------------------------------------------------
    @abstractmethod
    def load_bundle(
        self,
        path: str | Path,
        ckpt: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        allow_download: bool = False,
    ) -> Bundle:
        """Returns the base model at `path` (a folder or hub id), or with the checkpoint `ckpt` (an adapter
        folder on its recorded base, or a full model folder), in the family's processor."""

    @abstractmethod
    def base_folder(self, path: str | Path, allow_download: bool = False) -> Path:
        """Returns the absolute local base folder of `path` (a hub id is downloaded only when allowed)."""

    @abstractmethod
    def prepare_training(
        self, bundle: Bundle, lora: Any, gradient_checkpointing: Checkpointing, base_name: str
    ) -> nn.Module:
        """Returns the model to train: LoRA of the `lora` config node's preset or targets applied (PEFT), or
        every parameter trainable but the frozen groups (lora=none); activation checkpointing switched on
        when asked (True: every block; "vision": the vision tower's blocks only; a share: the vision
        tower's blocks and the first checkpointed_layers of the language model's decoder layers)."""

    @abstractmethod
    def token_counter(
        self,
        bundle: Bundle,
        max_length: int,
        truncation: str,
        images: ImageSource,
        last_round: bool = False,
    ) -> Callable[[RowLike], int | None]:
        """Returns `count(row)`: the row's encoded length (image tokens included, read from image headers
        where the family can) as it will be trained, i.e. after `truncation` cut it; a row that cannot be kept
        under max_length gets its full length, which is over max_length (validation reports both numbers).
        `last_round`: the loss is on the final answer alone, so a cut that leaves it no token keeps nothing."""

    def image_token_counter(self, bundle: Bundle, images: ImageSource) -> Callable[[RowLike], int] | None:
        """Returns `count(row)`: the tokens the language model sees for the row's images, from their header
        sizes; None where the family cannot count them without encoding (the dataset summary then says so)."""
        return None

    def patch_counter(self, bundle: Bundle, images: ImageSource) -> Callable[[RowLike], int] | None:
        """Returns `count(row)`: the patches the vision tower processes for the row's images, or None where
        the family's token budget counts language-model tokens only (not capabilities.counts_patches)."""
        return None

    def patch_weight(self, bundle: Bundle, tower_checkpointed: bool = False) -> float:
        """Returns what one vision-tower patch counts as in the token budget (trainer.patch_weight auto): a
        patch's FLOPs relative to a language-model token's in a training step, which its kept activations
        follow. The tower's parameters that a patch passes through (`patch_share`) over the language model's
        (without its embeddings); a third of that where no parameter of the tower trains (lora=qkv: the
        tower runs forward only, 2 FLOPs a parameter against a trained token's 6, and keeps no activations
        for a backward); CHECKPOINTED_PATCH_SHARE of it where the tower trains with its blocks checkpointed
        (`tower_checkpointed`: they keep their inputs only, so the budget's language-model tokens, not the
        patches, bound the micro-batch's memory). Families without `patch_counter` count no patch."""
        if not self.capabilities.counts_patches:
            return 0.0
        groups = self.freeze_groups()
        vision = 0.0
        llm = 0
        trains = False
        for name, param in bundle.core.named_parameters():
            group = groups.of(name)
            if group == "vision":
                vision += param.numel() * self.patch_share(bundle, name)
                trains = trains or param.requires_grad
            elif group == "llm" and "embed_tokens" not in name and not name.startswith("lm_head"):
                llm += param.numel()
        ratio = vision / llm if llm else 0.0
        if not trains:
            return ratio / 3
        return ratio * CHECKPOINTED_PATCH_SHARE if tower_checkpointed else ratio

    def patch_share(self, bundle: Bundle, name: str) -> float:
        """Returns the share of the tower's patches that pass through its parameter `name` (1: every patch;
        a tower that merges patches part way counts its later blocks at the merged share)."""
        return 1.0

    @abstractmethod
    def dataset(
        self,
        bundle: Bundle,
        rows: Sequence[RowLike],
        max_length: int,
        truncation: str,
        images: ImageSource,
        last_round: bool = False,
    ) -> TorchDataset:
        """Returns a dataset that encodes the rows on access (in DataLoader workers), with `token_counts()`;
        its labels are on every round's response, or on each row's last one alone with `last_round`."""

    @abstractmethod
    def training_collate(
        self, bundle: Bundle, pad_to_multiple: int = 1, packed: bool = False, static: bool = False
    ) -> Callable[[list[Any]], dict[str, Any]]:
        """Returns the collate of training micro-batches (right-padded, or packed where capabilities.packs);
        `static`: for compiled layers, batches whose shapes depend on their rounded length alone."""

    @abstractmethod
    def eval_collate(self, bundle: Bundle) -> Callable[[list[Any]], dict[str, Any]]:
        """Returns the collate of evaluation batches (the loss over held-out rows)."""

    @abstractmethod
    def loss_outputs(self, model: nn.Module, batch: Mapping[str, Any]) -> LossSums:
        """Returns one forward's summed next-token loss, supervised token count and correct predictions."""

    @abstractmethod
    def sequence_logps(
        self, model: nn.Module, batch: Mapping[str, Any], image_features: Any = None
    ) -> SequenceLogps:
        """Returns each sample's summed next-token log-probability over its supervised tokens, for a batch of
        training_collate (right-padded or packed). In a batch of preference pairs (batch[PAIRS] = n) samples i
        and n + i share their images: the vision tower runs on the first n samples' images only and its
        features serve both. `image_features`: what an earlier call on the same batch returned in
        SequenceLogps.image_features, used in place of running the vision tower and projector again (the
        reference's pass when the adapter leaves them untouched: images_outside_adapter)."""

    @abstractmethod
    def checkpoint_writer(
        self, bundle: Bundle
    ) -> Callable[[nn.Module, Path, Mapping[str, torch.Tensor]], None]:
        """Returns `write(model, folder, state)`: full weights (lora=none) in the family's native layout."""

    @abstractmethod
    def checkpoint_reader(self, bundle: Bundle) -> Callable[[Path], dict[str, torch.Tensor]]:
        """Returns `read(folder)`: the state dict of a full checkpoint `checkpoint_writer` wrote, under the
        model's own parameter names (resume)."""

    @abstractmethod
    def device_of(self, bundle: Bundle) -> torch.device:
        """Returns the device the loaded model's inputs go to."""

    @abstractmethod
    def pad_id(self, bundle: Bundle) -> int:
        """Returns the padding token id."""

    def compile_model(self, bundle: Bundle, graphs: bool, vision: bool = False) -> int:
        """Compiles the loaded model's blocks in place for training (where capabilities.compiles); with
        `graphs` they replay as CUDA graphs; with `vision` the vision tower's blocks too (where
        compiles_vision_on). Returns how many blocks."""
        raise FamilyError(
            f"trainer.compile=true: {self.capabilities.display_name} (model.family={self.name}) does not compile"
        )

    def load_quantized(
        self,
        path: str | Path,
        ckpt: str | Path | None = None,
        *,
        quantization: str,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        allow_download: bool = False,
    ) -> Any:
        """`load_bundle` with the language model quantized where model.quantization asks (nf4 | int8: its linear
        layers in bitsandbytes' 4- or 8-bit layers, computing in `dtype`): loaded on the CPU and quantized on
        its way to `device`, so the device never holds the full-precision language model (quantization.py)."""
        if quantization == "none":
            return self.load_bundle(path, ckpt, dtype=dtype, device=device, allow_download=allow_download)
        bundle = self.load_bundle(path, ckpt, dtype=dtype, device="cpu", allow_download=allow_download)
        self.quantize(bundle, quantization, dtype, torch.device(device))
        self.attend_in(bundle, dtype)  # what loading on the CPU resolved, again on `device`
        return bundle

    def quantize(self, bundle: Any, choice: str, compute_dtype: torch.dtype, device: torch.device) -> int:
        """Gives the loaded model (on the CPU) a quantized language model and moves it to `device`; returns
        how many layers were quantized (quantization.py)."""
        from . import quantization

        return quantization.quantize(bundle.core, self.freeze_groups().llm, choice, compute_dtype, device)

    def packs_padding_free_on(self, device: torch.device) -> bool:
        """Whether trainer.packing=auto packs this family's rows on `device` (capabilities.packs_padding_free;
        a family whose packed rows need a kernel that fails on the device says no)."""
        return self.capabilities.packs_padding_free

    def compiles_vision_on(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether compile_model can compile the vision tower's blocks for weights of `dtype` on `device`
        (capabilities.compiles_vision, and a tower that attends by variable-length attention there)."""
        return False

    def check_kernels(self, device: torch.device, compiled: bool) -> None:
        """Refuses, before any weight loads, a kernel choice (model.fused_kernels) that cannot run on `device`
        (a family without fused kernels: config validation refuses `liger` already)."""
        return None

    def apply_fused_kernels(self, bundle: Bundle, compiled: bool) -> bool:
        """Applies fused training kernels to the loaded model where model.fused_kernels and the device allow
        (capabilities.fuses_kernels); `compiled`: whether its layers will be compiled. Returns whether."""
        return False

    def attend_in(self, bundle: Bundle, compute_dtype: torch.dtype) -> None:
        """Tells the loaded model the dtype its training computes in (TrainingPlan.compute_dtype), where that
        differs from its weights' (full fine-tuning's fp32 weights under bf16 autocast): a vision attention
        that auto resolved by the weights' dtype resolves again by it. Default: nothing to do."""
        return None

    def vision_attention_of(self, bundle: Bundle) -> str | None:
        """Returns how the loaded model's vision tower attends ("varlen", "sdpa"), or None where the family
        has no choice of it (MiniCPM-V-2's own tower)."""
        return None

    # -- generation (eval, infer, chat and serve share these) ------------------------------------------
    @abstractmethod
    def prompt_limit(self, bundle: Bundle, max_new_tokens: int) -> int:
        """Returns the longest prompt that leaves room for `max_new_tokens` within the model's positions;
        raises ValueError when none does."""

    @abstractmethod
    def encode_row(self, bundle: Bundle, row: RowLike, images: Sequence[Image.Image], max_length: int) -> Any:
        """Returns a row's generation prompt (its response left out) encoded, ready for
        collate_for_generation; raises an error naming the row when it exceeds `max_length` tokens."""

    def encode_row_from(self, bundle: Bundle, row: RowLike, source: ImageSource, max_length: int) -> Any:
        """Returns encode_row's prompt with the row's images (and videos, where the family takes them) read
        from `source`; a family without video refuses a row that has some, naming it."""
        if row_video_refs(row):
            raise FamilyError(f"{row.origin}: {self.video_limits().describe()}")
        return self.encode_row(bundle, row, row_images(row, source), max_length)

    @abstractmethod
    def generate_batch(
        self,
        bundle: Bundle,
        samples: Sequence[Any],
        settings: Any,
        generator: torch.Generator | None = None,
        *,
        batches: int | None = None,
    ) -> list[str]:
        """Returns the decoded answer of each encoded prompt (one batch, left-padded on the family's device)
        under the generation settings (pipeline.families.generation_settings.GenerationSettings). `batches`:
        how many batches the whole job holds, where known (model.decode=auto weighs a decode warm-up against
        it)."""

    # -- chat and serve: one conversation's prompt, its tokens as they come ------------------------------
    @abstractmethod
    def encode_chat(
        self, bundle: Bundle, messages: Sequence[Message], images: Sequence[Image.Image], max_length: int
    ) -> EncodedPrompt:
        """Returns the generation prompt of a conversation (an optional system message, then user and
        assistant messages alternating, ending with the user's), its images placed at their <image> tags
        (untagged ones at the start of the first user message; see Capabilities.image_placement), encoded for
        stream_tokens and batch_decoder. Raises ContextLengthError when the prompt exceeds `max_length`
        tokens (prompt_limit: the model's positions less the tokens to generate), FamilyError when the
        family refuses the conversation (roles, tags, images)."""

    @abstractmethod
    def end_ids(self, bundle: Bundle) -> frozenset[int]:
        """Returns the token ids that end an answer (the end of the assistant's turn)."""

    @abstractmethod
    def decode(self, bundle: Bundle, ids: Sequence[int]) -> str:
        """Returns the text of generated token ids (no end id among them), as generate_batch decodes."""

    @abstractmethod
    def stream_tokens(
        self,
        bundle: Bundle,
        prompt: EncodedPrompt,
        settings: GenerationSettings,
        on_token: Callable[[int], None],
        stop: threading.Event | None = None,
        seed: int | None = None,
    ) -> None:
        """Generates the answer to one encoded prompt, handing each token id to `on_token` as soon as it is
        chosen (an end id too, after which generation ends); ends at settings.max_new_tokens, or right after
        the token during which `stop` was set. When sampling, `seed` makes the answer repeatable (None: the
        process's random state); greedy answers equal generate_batch's."""

    def batch_decoder(self, bundle: Bundle) -> BatchDecoder:
        """Returns the decoder of several prompts at once that serving batches with; a family states
        capabilities.batches_requests where it has one (the others are served one request at a time through
        stream_tokens)."""
        raise FamilyError(
            f"{self.label} does not batch requests; its answers stream one at a time (stream_tokens)"
        )

    # -- merge ------------------------------------------------------------------------------------
    @abstractmethod
    def dummy_samples(self, bundle: Bundle, n: int, seed: int) -> list[Any]:
        """Returns `n` seeded encoded conversations, to compare logits before and after a merge without data."""

    @abstractmethod
    def logits_fn(self, bundle: Bundle, device: torch.device) -> Callable[[nn.Module, Any], torch.Tensor]:
        """Returns `logits(model, sample)`: one sample's fp32 logits [T, vocab] on the CPU."""

    @abstractmethod
    def check_merged(self, model: nn.Module, base: Path) -> None:
        """Raises FamilyError when the merged model's weights do not match the base layout (adapter keys left,
        keys missing)."""

    @abstractmethod
    def save_merged(
        self, model: nn.Module, bundle: Bundle, folder: Path, shard_bytes: int, dtype: torch.dtype, base: Path
    ) -> None:
        """Writes the merged model to `folder` (atomically) in the native layout, with the base's side files."""

    @abstractmethod
    def load_merged(self, folder: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """Returns the model a merged folder holds (to verify it by its logits)."""

    @abstractmethod
    def weight_files(self, folder: Path) -> list[str]:
        """Returns the names of a model folder's weight files."""


def pad_batch(
    samples: Sequence[EncodedSample], pad_id: int, left: bool, with_labels: bool
) -> dict[str, torch.Tensor]:
    """Returns input_ids, attention_mask, per-token inputs (and labels) padded to the longest sample."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    length = max(len(s) for s in samples)
    batch = len(samples)
    out = {
        "input_ids": torch.full((batch, length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((batch, length), dtype=torch.long),
    }
    if with_labels:
        out["labels"] = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for key in samples[0].token_inputs:
        out[key] = torch.zeros((batch, length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s)
        start = length - n if left else 0
        where = slice(start, start + n)
        out["input_ids"][i, where] = torch.tensor(s.input_ids, dtype=torch.long)
        out["attention_mask"][i, where] = 1
        if with_labels:
            out["labels"][i, where] = torch.tensor(s.labels, dtype=torch.long)
        for key, values in s.token_inputs.items():
            out[key][i, where] = torch.tensor(values, dtype=torch.long)
    return out
