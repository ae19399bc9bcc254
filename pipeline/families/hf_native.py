"""The shared base of families that transformers implements: its own model, processor and chat template.

A family module subclasses `HFNativeFamily` and states only facts about its model: the config class's
model_type, the chat template, the end-of-turn marker, how pixel tensors of several conversations are
joined, the module names of its parts, and the tiny twin's sizes. Everything else (loading, encoding with
labels on the assistant turns, batching, generation, saving) is the same code for every such family.

Labels come from the family's own chat template: the assistant turn i covers the text between the
rendering of messages[:i] with the generation prompt and the rendering of messages[:i + 1], up to and
including the end-of-turn marker. The tokens are the processor's own (image placeholders expanded by it);
the processor's replacement offsets map those character spans onto the expanded text.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset as TorchDataset
from transformers.generation.streamers import BaseStreamer

from pipeline.families.generation_settings import GenerationSettings
from pipeline.utils.io import atomic_dir

from . import chunked_loss, kernels, packing, quantization, vision_attention, vision_compile
from .base import (
    IGNORE_INDEX,
    IMAGE_TAG,
    PAIR_KEYS,
    PAIRS,
    VIDEO_TAG,
    Bundle,
    Capabilities,
    Checkpointing,
    ContextLengthError,
    EncodedSample,
    Family,
    FamilyError,
    ImageSource,
    LossSums,
    Message,
    RowLike,
    SequenceLogps,
    Video,
    VideoInfo,
    checkpointed_layers,
    load_video,
    messages_from_row,
    pad_batch,
    row_images,
    row_video_refs,
    shared_halves,
    unwrapped,
    with_lora_variant,
)
from .checkpoints import MODEL_CONFIG, adapter_base, checkpoint_kind
from .layer_compile import compile_for_training
from .sharding import gathers_anywhere, most_of_each_over_ranks
from .step_decoding import HFStepDecoder
from .tiny_tokenizer import train_bpe_tokenizer

# Files a hub download of an HF-native checkpoint needs (weights, configs, tokenizer, template).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def resolve_hf_folder(path: str, allow_download: bool, family: str) -> Path:
    """Returns a local model folder for a folder path or a hub id (downloaded only when allowed)."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / MODEL_CONFIG).is_file():
            raise FamilyError(f"{local}: no config.json; expected a {family} model folder")
        return local
    if local.exists():
        raise FamilyError(f"{local} is a file; model.path must be a model folder or a hub id")
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise FamilyError(f"model folder {local} does not exist")
    if not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FamilyError(
            f"model {path!r} is not a local folder and downloads are off. Download it on a machine with "
            f"network (`huggingface-cli download {path} --local-dir <folder>`), then set "
            f"model.path=<folder>; or set model.trust_hub=true to download from the hub"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=HUB_PATTERNS))


_MEDIA_TAGS = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})")


def to_hf_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Returns the messages in transformers' content-list form, each <image> tag an image item and each
    <video> tag a video item."""
    out = []
    for message in messages:
        content: list[dict[str, str]] = []
        for part in _MEDIA_TAGS.split(message["content"]):
            if part == IMAGE_TAG:
                content.append({"type": "image"})
            elif part == VIDEO_TAG:
                content.append({"type": "video"})
            elif part:
                content.append({"type": "text", "text": part})
        out.append({"role": message["role"], "content": content})
    return out


def stream_metadata(info: VideoInfo, indices: Sequence[int] | None = None) -> Any:
    """Returns transformers' VideoMetadata of a video stream's header (and of the frames taken, `indices`):
    what the video processors sample by and derive timestamps and frame rates from."""
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(
        total_num_frames=info.frames,
        fps=info.fps,
        duration=info.duration,
        width=info.width,
        height=info.height,
        frames_indices=None if indices is None else list(indices),
    )


def keeps_logits(model: nn.Module) -> bool:
    """Returns whether the transformers model under any PEFT / DDP / DeepSpeed wrapper takes
    `logits_to_keep` (positions whose logits lm_head computes)."""
    return _forward_takes(type(unwrapped(model)), "logits_to_keep")


def selects_positions(model: nn.Module) -> str | None:
    """How only the supervised positions reach lm_head: "kwarg" where the forward takes `logits_to_keep`,
    "hook" where it does not but the model names its output head (a forward pre-hook on the head picks the
    positions: MiniCPM-V 4.6, whose full logits over a 4096-token row are 4 GB in fp32), None: every
    position."""
    if keeps_logits(model):
        return "kwarg"
    core = unwrapped(model)
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    return "hook" if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def positions_through(model: nn.Module, keep: torch.Tensor | slice) -> Iterator[None]:
    """Inside, the model's output head computes its outputs at positions `keep` of its input [B, T, D] only
    (for a model that `selects_positions` by "hook")."""

    def pick(module: nn.Module, args: tuple) -> tuple:
        return (args[0][:, keep], *args[1:])

    handle = unwrapped(model).get_output_embeddings().register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def last_position_only(model: nn.Module) -> contextlib.AbstractContextManager:
    """Returns a context inside which a forward without `logits_to_keep` (a model that `selects_positions` by
    "hook") puts only the last position through its head: a left-padded prompt's prefill then makes one row
    of logits per prompt, not one per prompt position (MiniCPM-V 4.6: 248,320 words each). A null context
    for the other models (they are asked for `logits_to_keep` itself)."""
    if selects_positions(model) == "hook":
        return positions_through(model, slice(-1, None))
    return contextlib.nullcontext()


@functools.cache
def _forward_takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def tower_calls(inputs: Mapping[str, Any]) -> int:
    """Returns how many times a forward on these inputs calls the vision tower: once for its images and once
    for its videos."""
    return int("pixel_values" in inputs) + int("pixel_values_videos" in inputs)


def _tensors(value: Any) -> list[torch.Tensor]:
    """Returns the tensors in `value`: one tensor, or lists and tuples of them nested (Qwen3-VL's per-layer
    features hold a tuple per image in a list per layer)."""
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return [value] if isinstance(value, torch.Tensor) else []


def _twice(features: Any) -> Any:
    """Returns per-image features (a tuple or list of tensors, or one tensor of every image's rows) followed by
    themselves: the same images for the rejected answers as for the chosen ones."""
    if isinstance(features, torch.Tensor):
        return torch.cat([features, features])
    return type(features)([*features, *features])


def generate_options(settings: Any) -> dict[str, Any]:
    """Returns the keyword arguments of `generate` for GenerationSettings (the sampling values only when
    sampling); max_new_tokens goes separately."""
    options: dict[str, Any] = {"do_sample": settings.do_sample}
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    if settings.repetition_penalty != 1.0:
        options["repetition_penalty"] = settings.repetition_penalty
    return options


def eos_token_ids(model: nn.Module) -> frozenset[int]:
    """Returns the token ids the model's `generate` stops at (its generation config's eos_token_id)."""
    eos = model.generation_config.eos_token_id
    return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


def model_positions(model: nn.Module) -> int | None:
    """Returns the language model's number of positions (None when its config does not say)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


@contextlib.contextmanager
def seeded_sampling(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seeds the global random state `generate` samples from with `seed` (None: left as it is), restoring
    the process's random state afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class _Stopped(Exception):
    """Raised from the streamer when the caller wants no more tokens: `generate` ends there."""


class _TokenStreamer(BaseStreamer):
    """Hands on each token `generate` makes (its first call, the prompt, is skipped); ends generation right
    after the token during which `stop` was set."""

    def __init__(self, on_token: Callable[[int], None], stop: threading.Event | None) -> None:
        self.on_token = on_token
        self.stop = stop
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.stop is not None and self.stop.is_set():
                raise _Stopped
            self.on_token(int(token))
        if self.stop is not None and self.stop.is_set():
            raise _Stopped

    def end(self) -> None:
        pass


def native_capabilities(display_name: str, **extra: Any) -> Capabilities:
    """Returns what every HF-native family can do (padding-free packing, layers compiled for packed rows,
    vision patches in the token budget, liger's fused kernels, served requests in a running batch; 16
    images, 4 videos), with the family's `extra`."""
    return Capabilities(
        display_name=display_name,
        **{
            "max_images": 16,
            "max_videos": 4,
            "packs": True,
            "packs_padding_free": True,
            "compiles": True,
            "compiled_shapes": "packed",
            "counts_patches": True,
            "fuses_kernels": True,
            "batches_requests": True,
            "continuous_batching": True,
            "cuda_graph_decode": True,
            **extra,
        },
    )


class HFNativeFamily(Family):
    """A family whose model, processor and chat template come from transformers."""

    model_type: ClassVar[str]  # config.json's model_type
    chat_template: ClassVar[str]  # the template the tiny twin carries (real checkpoints bring their own)
    end_of_turn: ClassVar[str]  # the marker that closes an assistant turn; labelled with the turn
    # How each pixel input of several conversations is joined into one batch: key -> concatenation dim.
    pixel_concat: ClassVar[dict[str, int]]
    # Per-token inputs the processor returns beside input_ids (padded with 0).
    token_input_keys: ClassVar[tuple[str, ...]] = ()
    # Keyword arguments apply_chat_template gets on every rendering (e.g. thinking off).
    template_kwargs: ClassVar[dict[str, Any]] = {}
    # (the oldest transformers that trains the family, why) where it is newer than the project's floor
    min_transformers: ClassVar[tuple[str, str] | None] = None
    # the language model's module (packed forwards hand their segments to it alone)
    language_model_name: ClassVar[str] = "model.language_model"

    # -- the model --------------------------------------------------------------------------------
    def resolve(self, path: str, allow_download: bool = False) -> Path:
        folder = resolve_hf_folder(path, allow_download, self.name)
        self.check_folder(folder)
        return folder

    def check_folder(self, folder: Path) -> None:
        """Raises FamilyError when `folder` holds another model type than this family's (no weights read)."""
        config = folder / MODEL_CONFIG
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError) as err:
            raise FamilyError(f"{config}: cannot be read as JSON ({err})") from err
        if model_type != self.model_type:
            raise FamilyError(
                f"{folder} holds a {model_type!r} model; model.family={self.name} expects {self.model_type!r}"
            )

    def check_transformers(self, version: str | None = None) -> None:
        """Raises FamilyError when the installed transformers (or `version`) is older than the family needs."""
        if self.min_transformers is None:
            return
        import transformers
        from packaging.version import Version

        have = version or transformers.__version__
        need, why = self.min_transformers
        if Version(have) < Version(need):
            raise FamilyError(
                f"{self.name} needs transformers>={need} ({why}); this environment has {have}: "
                f"pip install 'transformers>={need},<6'"
            )

    def processor_options(self) -> dict[str, Any]:
        """Returns the keyword arguments AutoProcessor.from_pretrained gets from the family's settings."""
        return dict(self.settings)

    def configure_processor(self, processor: Any) -> Any:
        """Returns the loaded processor with any setting from_pretrained cannot take applied."""
        return processor

    def load(
        self, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> tuple[nn.Module, Any]:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = Path(path)
        self.check_folder(folder)
        self.check_transformers()
        processor = self.configure_processor(
            AutoProcessor.from_pretrained(folder, **self.processor_options())
        )
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
        self._resolve_vision_attention(model, torch.device(device), dtype)
        return model.to(device).eval(), processor

    # -- encoding ---------------------------------------------------------------------------------
    def render(self, processor: Any, messages: Sequence[dict], generation_prompt: bool) -> str:
        """Returns the chat template's text for `messages`."""
        return processor.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt, **self.template_kwargs
        )

    def assistant_spans(self, processor: Any, messages: Sequence[dict], text: str) -> list[tuple[int, int]]:
        """Returns the [start, end) characters of every assistant turn in `text`, end-of-turn included."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(processor, messages[:i], generation_prompt=True)
            through = self.render(processor, messages[: i + 1], generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise FamilyError(
                    f"{self.name}: the chat template renders message {i} differently once later turns follow; "
                    "labels need a template whose earlier turns keep their text"
                )
            end = through.rfind(self.end_of_turn, len(before))
            spans.append((len(before), end + len(self.end_of_turn) if end >= 0 else len(through)))
        return spans

    def encode(
        self,
        processor: Any,
        conversation: Sequence[Message],
        images: Sequence[Image.Image] = (),
        generation: bool = False,
        videos: Sequence[Video] = (),
        last_round: bool = False,
    ) -> EncodedSample:
        """Encodes as Family.encode; `videos` hold frames already sampled (video_frame_picker), which the
        processor takes as they are with the stream's metadata (no decoding or sampling of its own)."""
        messages = self.prepare_messages(conversation, images, generation, videos)
        hf_messages = to_hf_messages(messages)
        text = self.render(processor, hf_messages, generation_prompt=generation)
        spans = [] if generation else self.assistant_spans(processor, hf_messages, text)
        if last_round:
            spans = spans[-1:]
        video_inputs: dict[str, Any] = {}
        if videos:
            video_inputs = dict(
                videos=[video.frames for video in videos],
                video_metadata=[stream_metadata(video.info, video.indices) for video in videos],
                do_sample_frames=False,
            )
        out = processor(
            text=[text],
            images=[list(images)] if images else None,
            return_text_replacement_offsets=True,
            return_tensors="pt",
            **video_inputs,
        )
        ids = out["input_ids"][0].tolist()
        labels = self._labels(processor, text, spans, out["text_replacement_offsets"][0], ids)
        if len(ids) > self.max_length:
            raise FamilyError(
                f"{self.name}: the conversation encodes to {len(ids)} tokens; this family takes "
                f"{self.limits().describe()}"
            )
        return EncodedSample(
            input_ids=ids,
            labels=labels,
            token_inputs={k: out[k][0].tolist() for k in self.token_input_keys if k in out},
            pixel_inputs={k: out[k] for k in self.pixel_concat if k in out},
        )

    def _labels(
        self,
        processor: Any,
        text: str,
        spans: Sequence[tuple[int, int]],
        replacements: Sequence[Mapping[str, Any]],
        ids: list[int],
    ) -> list[int]:
        """Returns ids inside the assistant spans and -100 elsewhere, on the processor's expanded text."""
        expanded, cursor, shifts = [], 0, []
        for rep in sorted(replacements, key=lambda r: r["span"][0]):
            start, end = rep["span"]
            expanded += [text[cursor:start], rep["replacement"]]
            shifts.append((end, len(rep["replacement"]) - (end - start)))
            cursor = end
        expanded.append(text[cursor:])
        full = "".join(expanded)

        def moved(pos: int) -> int:
            return pos + sum(delta for end, delta in shifts if end <= pos)

        enc = processor.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] != ids:
            raise FamilyError(
                f"{self.name}: the processor's tokens differ from its tokenizer's on the same text"
            )
        moved_spans = [(moved(s), moved(e)) for s, e in spans]
        labels = [IGNORE_INDEX] * len(ids)
        for k, (start, end) in enumerate(enc["offset_mapping"]):
            if end > start and any(s <= start and end <= e for s, e in moved_spans):
                labels[k] = ids[k]
        return labels

    # -- batching and generation --------------------------------------------------------------------
    def _join_pixels(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        out = {}
        for key, dim in self.pixel_concat.items():
            parts = [s.pixel_inputs[key] for s in samples if key in s.pixel_inputs]
            if parts:
                out[key] = torch.cat(parts, dim=dim)
        return out

    def collate_for_training(self, processor: Any, samples: Sequence[EncodedSample]) -> dict[str, Any]:
        batch = pad_batch(samples, processor.tokenizer.pad_token_id, left=False, with_labels=True)
        return {**batch, **self._join_pixels(samples)}

    def collate_for_generation(self, processor: Any, samples: Sequence[EncodedSample]) -> dict[str, Any]:
        batch = pad_batch(samples, processor.tokenizer.pad_token_id, left=True, with_labels=False)
        return {**batch, **self._join_pixels(samples)}

    # eval and infer (generate_batch) decode over transformers' static cache, their decode step compiled by
    # `generate` (mode reduce-overhead: replayed as CUDA graphs): None = on CUDA (as MiniCPM-V-2's own static
    # decode), True / False = always / never (never: the growing dynamic cache, eager)
    static_decode: ClassVar[bool | None] = None
    # model.decode=auto on CUDA compiles the static decode only for a job of at least this many batches (where
    # known): the compile costs 40-60 s once per process, each batch after it ~2.5 s less than the dynamic
    # cache (Qwen2.5-VL-3B / Qwen3-VL-4B at batch 16, 64 new tokens: break-even at about 16 batches; 200 rows,
    # 13 batches: dynamic 261 new tokens/s against 228 compiled, bench/RESULTS.md)
    static_min_batches: ClassVar[int] = 24
    # the static cache's length is the batch's longest prompt plus max_new_tokens rounded up to this, so that
    # batches of similar lengths reuse one compiled step (and one cache) instead of compiling their own
    static_cache_multiple: ClassVar[int] = 256

    def decodes_static(
        self, device: torch.device, model: nn.Module | None = None, batches: int | None = None
    ) -> bool:
        """Returns whether generate_batch decodes over a compiled static cache on `device`: model.decode
        (static / dynamic), else static_decode, else (auto) on CUDA for a job of unknown size or of at least
        static_min_batches `batches`; never for a quantized base (bitsandbytes' layers run eagerly) nor after
        the compiled decode failed once in this process (static_decode_failed)."""
        if self.static_decode_failed or (model is not None and quantization.is_quantized(model)):
            return False
        if self.decode_mode != "auto":
            return self.decode_mode == "static"
        if self.static_decode is not None:
            return self.static_decode
        return device.type == "cuda" and (batches is None or batches >= self.static_min_batches)

    # set when the compiled static-cache decode raised: the rest of the process decodes eagerly (a warning
    # says why), so that an eval or an infer run is never lost to the compiler
    static_decode_failed: ClassVar[bool] = False
    # the most rows a static decode of this family object has run (shorter batches are filled up to it)
    _static_rows: int = 0

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        processor: Any,
        batch: Mapping[str, Any],
        max_new_tokens: int = 64,
        static: bool = False,
        **settings: Any,
    ) -> list[str]:
        """Returns the answers of a left-padded batch through transformers' `generate`; `static`: over a static
        cache of a rounded length (static_cache_multiple), its decode step compiled (on CUDA: CUDA graphs)."""
        device = next(model.parameters()).device
        inputs = self.to_device(batch, device)
        settings.setdefault("do_sample", False)
        if static:
            multiple = self.static_cache_multiple
            length = inputs["input_ids"].shape[1] + max_new_tokens
            settings.update(cache_implementation="static", max_cache_len=-(-length // multiple) * multiple)
        # a forward without logits_to_keep (MiniCPM-V 4.6) would put every prompt position through the head at
        # prefill; generation reads the last one only (the batch is left-padded)
        with last_position_only(model):
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                pad_token_id=processor.tokenizer.pad_token_id,
                **settings,
            )
        new = output[:, inputs["input_ids"].shape[1] :]
        return processor.tokenizer.batch_decode(new, skip_special_tokens=True)

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self, model: nn.Module, processor: Any, folder: str | Path) -> Path:
        folder = Path(folder)
        with atomic_dir(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        return folder

    # -- the tiny twin ------------------------------------------------------------------------------
    tiny_special_tokens: ClassVar[dict[str, str]]  # bos/eos/pad/unk roles
    tiny_extra_special_tokens: ClassVar[dict[str, str]]  # named roles (image_token, ...)
    tiny_added_tokens: ClassVar[tuple[str, ...]] = ()  # other atomic tokens of the template
    # The std of the tiny twin's random weights (every part's config.initializer_range). The released
    # models' 0.02 leaves a model this narrow nearly flat (uniform attention, faint image features): its
    # pre-training (pipeline/training/twin.py) then hardly learns to read the image in 150 steps; at 0.1
    # (MiniCPM-V-2's own default) it does.
    tiny_initializer_range: ClassVar[float] = 0.1

    def tiny_config(self, tokenizer: Any) -> Any:
        """Returns the transformers config of the tiny twin, sized for the tokenizer's vocabulary."""
        raise NotImplementedError

    def tiny_processor(self, tokenizer: Any) -> Any:
        """Returns the tiny twin's processor (its image processor at a tiny resolution)."""
        raise NotImplementedError

    def build_tiny(self, folder: str | Path, seed: int = 0) -> Path:
        from transformers import AutoModelForImageTextToText

        tokenizer = train_bpe_tokenizer(
            self.tiny_special_tokens, self.tiny_extra_special_tokens, self.tiny_added_tokens
        )
        config = self.tiny_config(tokenizer)
        for part in (config, *(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))):
            if part is not None:
                part.initializer_range = self.tiny_initializer_range
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return self.save(model.eval(), self.tiny_processor(tokenizer), folder)

    # -- what the stages call ---------------------------------------------------------------------
    def base_folder(self, path: str | Path, allow_download: bool = False) -> Path:
        return self.resolve(str(path), allow_download).absolute()

    def load_bundle(
        self,
        path: str | Path,
        ckpt: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        allow_download: bool = False,
    ) -> Bundle:
        base = self.base_folder(path, allow_download)
        if ckpt is None:
            model, processor = self.load(base, dtype, device)
            return Bundle(model, processor, base, "base")
        ckpt = Path(ckpt)
        kind = checkpoint_kind(ckpt)
        if kind == "full":  # written in the native layout, processor included
            model, processor = self.load(ckpt, dtype, device)
            return Bundle(model, processor, base, "full")
        base = adapter_base(ckpt, base)
        model, processor = self.load(base, dtype, device)
        model = self.load_adapter(model, ckpt).to(device)
        return Bundle(model, processor, base, "adapter")

    def prepare_training(
        self, bundle: Bundle, lora: Any, gradient_checkpointing: Checkpointing, base_name: str
    ) -> nn.Module:
        model = bundle.model
        # encodes the blank image of the passes a process without images makes under a sharding engine
        # (balanced_vision), where one is needed
        self._blank_processor = bundle.processor
        if gradient_checkpointing:
            # transformers 5.x names it activation checkpointing (the old name warns of its removal)
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if gradient_checkpointing == "vision":  # the language model's layers run as they are
                for module in self.language_model(model).modules():
                    if hasattr(module, "gradient_checkpointing"):
                        module.gradient_checkpointing = False
            elif not isinstance(gradient_checkpointing, bool):  # a share: the first layers only
                layers = bundle.core.get_submodule(self.decoder_layers)
                for layer in list(layers)[checkpointed_layers(gradient_checkpointing, len(layers)) :]:
                    layer.gradient_checkpointing = False
            if lora.name != "none":
                model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
        if lora.name == "none":
            frozen = [
                group
                for group, on in (
                    ("vision", lora.freeze_vision),
                    ("projector", lora.freeze_resampler),
                    ("llm", lora.freeze_llm),
                )
                if on
            ]
            self.set_full_finetune(model, frozen)
            return model
        for p in model.parameters():
            p.requires_grad_(False)
        config = self.lora_config(
            model,
            lora.name,
            r=lora.r,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=list(lora.target_modules) if lora.target_modules else None,
            modules_to_save=list(lora.modules_to_save) or None,
            base_model_path=base_name,
        )
        config.bias = lora.bias
        return self.apply_lora(model, with_lora_variant(config, lora))

    # how the family's RMSNorm computes, for liger's fused kernels (kernels.NormKind; None: no fused kernels),
    # and the submodule of the loaded model whose norms and MLPs are fused ("": the whole model)
    fused_norm: ClassVar[kernels.NormKind | None] = None
    fused_target: ClassVar[str] = ""

    def check_kernels(self, device: torch.device, compiled: bool) -> None:
        kernels.resolve(self.fused_kernels, device, self.fused_norm, compiled)

    def apply_fused_kernels(self, bundle: Bundle, compiled: bool) -> bool:
        """Binds liger's fused norms and MLPs to the loaded model where model.fused_kernels resolves on
        (kernels.py); returns whether."""
        device = self.device_of(bundle)
        if not kernels.resolve(self.fused_kernels, device, self.fused_norm, compiled):
            return False
        assert self.fused_norm is not None
        norms, mlps = kernels.apply(self.fused_norm, bundle.core.get_submodule(self.fused_target))
        return norms > 0 and mlps > 0

    # where the language model's decoder layers are (under the unwrapped transformers model)
    decoder_layers: ClassVar[str] = "model.language_model.layers"
    # the vision tower whose blocks compile on padded patch sequences (vision_compile; None: none does),
    # and whether its blocks also attend by windows (Qwen2.5-VL)
    vision_tower: ClassVar[str | None] = None
    vision_windows: ClassVar[bool] = False

    def compile_model(self, bundle: Bundle, graphs: bool, vision: bool = False) -> int:
        """Compiles the language model's decoder layers for training steps with static shapes (packed rows
        of a few bucketed lengths; see layer_compile), and with `vision` the vision tower's blocks (its
        patch sequence padded to a few lengths; see vision_compile). No CUDA graphs (`graphs` must be
        false). Returns how many decoder layers."""
        if graphs:
            raise FamilyError(f"{self.name}: compiled layers are not replayed as CUDA graphs")
        if vision:
            self.compile_vision(bundle)
        return compile_for_training(bundle.core.get_submodule(self.decoder_layers))

    def compile_vision(self, bundle: Bundle, backend: Any = None) -> int:
        """Pads the vision tower's patch sequence to static shapes in training steps and compiles its blocks
        (one shared function; `backend`: torch.compile's, None: inductor); returns how many blocks."""
        if not self.capabilities.compiles_vision or self.vision_tower is None:
            raise FamilyError(f"trainer.compile_vision=true: {self.name}'s vision blocks do not compile")
        used = vision_attention.implementation(bundle.core)
        if used != vision_attention.VARLEN:
            raise FamilyError(
                f"trainer.compile_vision=true: {self.name}'s vision blocks compile over one variable-length "
                f"attention call per block (model.vision_attention=varlen); this tower attends by {used}"
            )
        tower = bundle.core.get_submodule(self.vision_tower)
        self.pad_vision_tower(tower)
        return compile_for_training(self.vision_blocks(tower), backend=backend, part="vision")

    def pad_vision_tower(self, tower: nn.Module) -> None:
        """Gives the vision tower a forward that pads its patch sequence to static shapes in training steps
        (the Qwen VLs' towers: vision_compile.pad_tower)."""
        vision_compile.pad_tower(tower, windows=self.vision_windows)

    def vision_blocks(self, tower: nn.Module) -> Sequence[nn.Module]:
        """Returns the vision tower's blocks that compile (`compile_vision`)."""
        return tower.blocks

    def compiles_vision_on(self, device: torch.device, dtype: torch.dtype) -> bool:
        return (
            self.capabilities.compiles_vision
            and vision_compile.available()
            and vision_attention.resolve(self.vision_attention, device, dtype)
        )

    def attend_in(self, bundle: Bundle, compute_dtype: torch.dtype) -> None:
        """Full fine-tuning loads fp32 weights, for which model.vision_attention=auto leaves transformers'
        attention (a Python loop over every image or window, one SDPA call each); under bf16 autocast the
        queries are bf16 and the variable-length kernel runs, so auto resolves by the compute dtype here.
        Outside autocast (eval) the same attention falls back to one SDPA call a piece, as transformers'."""
        self._resolve_vision_attention(bundle.core, self.device_of(bundle), compute_dtype)

    def _resolve_vision_attention(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        """Gives the vision tower the variable-length attention where model.vision_attention resolves to it
        for computing in `dtype` on `device` (setting it again is harmless); else leaves it as it is."""
        if vision_attention.resolve(self.vision_attention, device, dtype):
            vision_attention.enable(model)

    def vision_attention_of(self, bundle: Bundle) -> str | None:
        used = vision_attention.implementation(bundle.core)
        return "varlen" if used == vision_attention.VARLEN else str(used or "sdpa")

    def pad_id(self, bundle: Bundle) -> int:
        return bundle.processor.tokenizer.pad_token_id

    def device_of(self, bundle: Bundle) -> torch.device:
        return next(bundle.core.parameters()).device

    def _encode_row(
        self,
        processor: Any,
        row: RowLike,
        images: Sequence[Image.Image],
        generation: bool,
        videos: Sequence[Video] = (),
        last_round: bool = False,
    ) -> EncodedSample:
        """Returns a dataset row encoded (a generation prompt without its response when `generation`)."""
        response = None if generation else row.response
        conversation = messages_from_row(row.query, response, row.history, row.system)
        try:
            return self.encode(
                processor, conversation, images, generation=generation, videos=videos, last_round=last_round
            )
        except FamilyError as err:
            raise FamilyError(f"{row.origin}: {err}") from err

    def row_videos(self, processor: Any, row: RowLike, source: ImageSource) -> list[Video]:
        """Returns a row's videos with the frames the processor samples, decoded; an unreadable one raises an
        error that names the row."""
        refs = row_video_refs(row)
        if not refs:
            return []
        pick = self.video_frame_picker(processor)
        try:
            return [load_video(ref, source, pick) for ref in refs]
        except OSError as exc:
            raise type(exc)(f"{row.origin}: {exc}") from exc

    def _encode_row_from(
        self, processor: Any, row: RowLike, source: ImageSource, generation: bool, last_round: bool = False
    ) -> EncodedSample:
        """Returns a dataset row encoded with its images and videos read from `source`."""
        videos = self.row_videos(processor, row, source)
        return self._encode_row(processor, row, row_images(row, source), generation, videos, last_round)

    # True where the template holds one image token per image that the processor repeats once per image
    # token (the Qwen VLs): a row is then counted from its text and its images' header sizes alone
    counts_from_sizes: ClassVar[bool] = False

    def token_counter(
        self,
        bundle: Bundle,
        max_length: int,
        truncation: str,
        images: ImageSource,
        last_round: bool = False,  # these families never cut a row (no `truncates`): labels keep nothing
    ) -> Callable[[RowLike], int | None]:
        """Counts a row's tokens (over max_length for a row too long to keep: validation names both numbers):
        from the rendered text and the images' header sizes where the family allows (`counts_from_sizes`),
        else by encoding it. A row encoded to count it keeps its vision patches as `num_patches` (where its
        type has the field), so that the token budget (`patch_counter`) does not encode it a second time."""
        processor = bundle.processor

        def count(row: RowLike) -> int | None:
            n = self._count_from_sizes(processor, row, images) if self.counts_from_sizes else None
            if n is None:  # videos too: their timestamps and frame sizes are the processor's to lay out
                sample = self._encode_row_from(processor, row, images, generation=False)
                n = len(sample)
                if hasattr(row, "num_patches"):
                    row.num_patches = self.sample_patches(processor, sample)
            return n

        return count

    def _count_from_sizes(self, processor: Any, row: RowLike, images: ImageSource) -> int | None:
        """Returns a row's token count without decoding its images, or None when an image is not local yet (or
        the row has videos: those are encoded to count them)."""
        if row_video_refs(row):
            return None
        sizes = []
        for ref in row.images:
            size = images.size(ref)  # the header only
            if size is None:
                return None
            sizes.append((size[1], size[0]))  # (height, width)
        conversation = messages_from_row(row.query, row.response, row.history, row.system)
        try:
            messages = self.prepare_messages(conversation, row.images, generation=False)
        except FamilyError as err:
            raise FamilyError(f"{row.origin}: {err}") from err
        text = self.render(processor, to_hf_messages(messages), generation_prompt=False)
        n = len(processor.tokenizer(text)["input_ids"])
        if sizes:
            per_image = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
            n += sum(per_image) - len(sizes)  # each image token becomes that image's count
        return n

    def image_token_counter(self, bundle: Bundle, images: ImageSource) -> Callable[[RowLike], int] | None:
        """Counts a row's image tokens from its images' header sizes where the processor says how many tokens
        a size makes (`counts_from_sizes`); None otherwise."""
        if not self.counts_from_sizes:
            return None
        processor = bundle.processor

        def count(row: RowLike) -> int:
            sizes = [images.size(ref) for ref in row.images]  # the headers only
            hw = [(size[1], size[0]) for size in sizes if size is not None]
            return sum(processor._get_num_multimodal_tokens(image_sizes=hw).num_image_tokens) if hw else 0

        return count

    def patch_counter(self, bundle: Bundle, images: ImageSource) -> Callable[[RowLike], int]:
        """Counts the vision tower's patches of a row: from its images' header sizes where the processor
        says how many patches a size makes (`counts_from_sizes`), else from the encoded row's pixels: those
        that validation's token count kept (`num_patches`), or by encoding the row now."""
        processor = bundle.processor

        def count(row: RowLike) -> int:
            if not row.images and not row_video_refs(row):
                return 0
            known = getattr(row, "num_patches", None)
            if known is not None:
                return known
            if self.counts_from_sizes and not row_video_refs(row):
                sizes = [images.size(ref) for ref in row.images]  # the headers only
                if all(size is not None for size in sizes):
                    hw = [(size[1], size[0]) for size in sizes]
                    return sum(processor._get_num_multimodal_tokens(image_sizes=hw).num_image_patches)
            sample = self._encode_row_from(processor, row, images, generation=False)
            return self.sample_patches(processor, sample)

        return count

    def sample_patches(self, processor: Any, sample: EncodedSample) -> int:
        """Returns the vision tower's patches of an encoded sample: the rows of its pixel_values and
        pixel_values_videos (one per patch, the Qwen VLs' layout)."""
        return sum(
            int(sample.pixel_inputs[key].shape[0])
            for key in ("pixel_values", "pixel_values_videos")
            if key in sample.pixel_inputs
        )

    def dataset(
        self,
        bundle: Bundle,
        rows: Sequence[RowLike],
        max_length: int,
        truncation: str,
        images: ImageSource,
        last_round: bool = False,
    ) -> EncodedRows:
        return EncodedRows(rows, self, bundle.processor, max_length, images, last_round=last_round)

    def training_collate(
        self,
        bundle: Bundle,
        pad_to_multiple: int = 1,
        packed: bool = False,
        static: bool = False,
        segments: int | None = None,
    ) -> Callable:
        """Returns the collate of training micro-batches: right-padded, or with `packed` one row of every
        sample back to back (pipeline/families/packing.py), its length `pad_to_multiple`-rounded; `static`
        (compiled layers) or `segments` pad its cu_seq_lens to a fixed number of segments (packing.pack)."""
        from functools import partial

        collate = partial(self.collate_for_training, bundle.processor)
        if not packed:
            return collate
        return packing.PackedCollate(
            collate,
            self.packed_positions(bundle),
            self.pad_id(bundle),
            self.token_input_keys,
            pad_to_multiple,
            segments,
            static,
        )

    def packed_positions(self, bundle: Bundle) -> packing.Positions:
        """Returns `positions(padded) -> (R, B, L)`: the position rows the model gives every row of a
        right-padded batch, each as if alone (plain 0, 1, 2, ... here; the Qwen VLs' mRoPE rows)."""
        return packing.text_positions

    def language_model(self, model: nn.Module) -> nn.Module:
        """Returns the language model inside the (possibly wrapped) model."""
        return unwrapped(model).get_submodule(self.language_model_name)

    def prepare_packing(self, model: nn.Module) -> None:
        """Makes the model's language model exact on packed rows, once (enable_packing)."""
        language_model = self.language_model(model)
        if language_model.config._attn_implementation != packing.PACKED:
            self.enable_packing(language_model)

    def enable_packing(self, language_model: nn.Module) -> None:
        """Sets the language model's attention to `packing.PACKED` (SDPA on every unpacked batch)."""
        packing.enable(language_model)

    def eval_collate(self, bundle: Bundle) -> Callable:
        from functools import partial

        return partial(self.collate_for_training, bundle.processor)

    def loss_outputs(self, model: nn.Module, batch: Mapping[str, Any]) -> LossSums:
        """Returns the summed next-token loss, the supervised token count and the correct predictions.

        Only the positions whose next token is supervised in some row of the batch go through lm_head
        (`selects_positions`: the forward's `logits_to_keep` for the Qwen VLs, a pre-hook on the head for
        MiniCPM-V 4.6): a caption row supervises some 20 of its ~470 tokens, and the vocabulary is 151,936
        wide (248,320 for MiniCPM-V 4.6; the full fp32 logits of a 4096-token micro-batch alone are 2.5 and
        4 GB). Same sums as the full logits (tested).

        A packed row (packing.is_packed) runs without an attention mask and without a cache; its segments
        go to the language model alone (packing.packed_forward)."""
        with self.balanced_vision(model, 0, tower_calls(batch)):
            logits, labels, _ = self._supervised_logits(model, batch, dict(batch))
        mask = labels != IGNORE_INDEX
        if isinstance(logits, chunked_loss.HeadLosses):  # a long-answer batch, scored a chunk at a time
            return LossSums(loss_sum=logits.losses.sum(), num_tokens=mask.sum(), num_correct=logits.correct)
        loss_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        correct = ((logits.argmax(-1) == labels) & mask).sum()
        return LossSums(loss_sum=loss_sum, num_tokens=mask.sum(), num_correct=correct)

    @contextlib.contextmanager
    def balanced_vision(self, model: nn.Module, before: int, within: int) -> Iterator[torch.Tensor | float]:
        """Makes this process call the vision tower (and projector) as often as the process with the most,
        where a sharding engine gathers the tower's weights in its calls (FSDP, ZeRO-3), so that the
        processes' gathers pair up: `before` the tower calls this process makes before the model's forward
        (a pair batch's shared image features), `within` those the forward makes (after the input
        embeddings: images, videos). The missing ones are passes of a blank image, in the same places: those
        before it now (yielded as 0 x their output, for the caller to add to its loss), those within it
        added to the input embeddings as 0 x their output, so that the backward gathers as the others do.
        Yields 0.0 where nothing is missing or nothing is sharded."""
        core = unwrapped(model)
        tower = core.get_submodule(self.freeze_groups().vision[0])
        if not gathers_anywhere(tower):
            yield 0.0
            return
        device = next(core.parameters()).device
        most_before, most_within = most_of_each_over_ranks([before, within], device)
        missing_before, missing_within = most_before - before, most_within - within
        handle = None
        if missing_within > 0:

            def add_blank_passes(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
                return output + self._blank_passes(core, missing_within, device).to(output.dtype)

            handle = core.get_input_embeddings().register_forward_hook(add_blank_passes)
        try:
            yield self._blank_passes(core, missing_before, device) if missing_before > 0 else 0.0
        finally:
            if handle is not None:
                handle.remove()

    def _blank_passes(self, core: nn.Module, count: int, device: torch.device) -> torch.Tensor:
        """Returns 0 x the summed output of `count` passes of a blank image through the vision tower and
        projector (every output, Qwen3-VL's per-layer features too)."""
        blank = getattr(self, "_blank_pixels", None)
        if blank is None:
            processor = getattr(self, "_blank_processor", None)
            if processor is None:
                raise FamilyError(f"{self.name}: the vision tower's blank passes need prepare_training first")
            conversation = messages_from_row(IMAGE_TAG + "?", ".")
            blank = self._blank_pixels = self.encode(
                processor, conversation, [Image.new("RGB", (56, 56))]
            ).pixel_inputs
        term = torch.zeros((), device=device)
        for _ in range(count):
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in blank.items()}
            features = core.get_image_features(**inputs, return_dict=True)
            outputs = _tensors(features.pooler_output) + _tensors(
                getattr(features, "deepstack_features", None)
            )
            term = term + sum(out.float().sum() for out in outputs) * 0.0
        return term

    def token_sample_lengths(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """A packed row's tokens belong to the samples its segment boundaries (cu_seq_lens_q) give, its tail
        padding to none; padded rows as Family's."""
        if not packing.is_packed(batch):
            return super().token_sample_lengths(batch)
        bounds = batch["cu_seq_lens_q"].long().cpu()
        sizes = bounds.diff()
        lengths = torch.zeros(batch["input_ids"].shape, dtype=torch.long)
        lengths[0, : int(bounds[-1])] = sizes.repeat_interleave(sizes)
        return lengths

    def _supervised_logits(
        self, model: nn.Module, batch: Mapping[str, Any], inputs: dict[str, Any]
    ) -> tuple[torch.Tensor | chunked_loss.HeadLosses, torch.Tensor, torch.Tensor]:
        """Returns the fp32 logits [B, K, vocab] of the positions whose next token is supervised in some row
        (every position where the model cannot keep only some), their labels [B, K] and the positions [K]
        (indices into the shifted labels). `inputs` is what the model's forward gets (labels dropped here).
        Where those logits would be large (model.chunked_loss, chunked_loss.py), the head scores the
        positions a chunk at a time and their losses come back (HeadLosses) in place of the logits."""
        inputs.pop("labels", None)
        context: contextlib.AbstractContextManager = contextlib.nullcontext()
        if packing.is_packed(batch):
            segments = {k: inputs.pop(k) for k in packing.SEGMENT_KEYS}
            inputs.pop(packing.NUM_SAMPLES, None)
            inputs.pop("attention_mask", None)
            self.prepare_packing(model)
            context = packing.packed_forward(self.language_model(model), segments)
        targets = batch["labels"][:, 1:]
        with context:
            selects = selects_positions(model)
            if selects is not None:
                keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
                if keep.numel() == 0:  # nothing supervised: one position keeps the graph connected
                    keep = keep.new_zeros(1)
                keep_on_device = keep.to(batch["input_ids"].device)
                labels = targets[:, keep.to(targets.device)]
                head = unwrapped(model).get_output_embeddings()
                text_config = unwrapped(model).config.get_text_config()
                chunk = chunked_loss.chunk_positions(
                    self.chunked_loss,
                    labels.numel(),
                    text_config.vocab_size,
                    chunked_loss.holds_sharded_weights(model, head)
                    or chunked_loss.transforms_logits(text_config),
                )
                scoring = chunked_loss.head_losses(head, labels, chunk) if chunk else contextlib.nullcontext()
                with scoring as scores:
                    if selects == "kwarg":
                        out = model(**inputs, logits_to_keep=keep_on_device, use_cache=False)
                    else:
                        with positions_through(model, keep_on_device):
                            out = model(**inputs, use_cache=False)
                if scores is not None:
                    return scores, labels.to(scores.losses.device), keep.to(scores.losses.device)
                logits = out.logits.float()
                labels = labels.to(logits.device)
            else:
                logits = model(**inputs, use_cache=False).logits[:, :-1].float()
                labels = targets.to(logits.device)
                keep = torch.arange(labels.shape[1])
        return logits, labels, keep.to(logits.device)

    def sequence_logps(
        self, model: nn.Module, batch: Mapping[str, Any], image_features: Any = None
    ) -> SequenceLogps:
        """Each sample's summed log-probability of its supervised tokens (see Family.sequence_logps); in a
        packed row a position belongs to the sample its predicted token is in (cu_seq_lens)."""
        pairs = int(batch.get(PAIRS) or 0)
        inputs = {k: v for k, v in batch.items() if k not in PAIR_KEYS}
        shares = bool(pairs) and "pixel_values" in inputs  # the tower runs before the forward, once a pair
        before = int(shares and image_features is None)
        within = tower_calls(inputs) - int(shares)
        with self.balanced_vision(model, before, within) as balance:
            if shares:
                if image_features is None:
                    image_features = self._shared_image_features(model, inputs, pairs)
                inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
                inputs["mm_encoder_outputs"] = {"image": image_features}
            logits, labels, keep = self._supervised_logits(model, batch, inputs)
        if isinstance(logits, chunked_loss.HeadLosses):
            token_logps = -logits.losses
        else:
            token_logps = -F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view_as(labels)
        mask = labels != IGNORE_INDEX
        if packing.is_packed(batch):
            starts = batch["cu_seq_lens_q"].to(labels.device).long()
            owner = (torch.searchsorted(starts, keep + 1, right=True) - 1).expand_as(labels)
            samples = int(batch[packing.NUM_SAMPLES])
        else:
            owner = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
            samples = labels.shape[0]
        logps = token_logps.new_zeros(samples).index_add(0, owner[mask], token_logps[mask]) + balance
        tokens = token_logps.new_zeros(samples).index_add(0, owner[mask], torch.ones_like(token_logps[mask]))
        return SequenceLogps(logps=logps, tokens=tokens, image_features=image_features)

    def _shared_image_features(self, model: nn.Module, inputs: dict[str, Any], pairs: int) -> Any:
        """Returns the batch's image features (what the model takes as its precomputed encoder output,
        transformers' `mm_encoder_outputs`, in place of the pixels), computed once per pair: the vision tower
        (and projector) runs on the first half of every pixel input (the chosen answers' images; the rejected
        answers' are the same) and its output is repeated."""
        half = {}
        for key, dim in self.pixel_concat.items():
            if key in inputs:
                value = inputs[key]
                size = shared_halves(pairs, value.shape[dim], key)
                half[key] = value.narrow(dim if dim >= 0 else value.dim() + dim, 0, size)
        features = unwrapped(model).get_image_features(**half, return_dict=True)
        features.pooler_output = _twice(features.pooler_output)
        if getattr(features, "deepstack_features", None) is not None:  # Qwen3-VL's per-layer features
            features.deepstack_features = [_twice(layer) for layer in features.deepstack_features]
        return features

    def checkpoint_writer(self, bundle: Bundle) -> Callable:
        def write(model: nn.Module, folder: Path, state: Mapping[str, torch.Tensor]) -> None:
            model.save_pretrained(folder, state_dict=dict(state))
            bundle.processor.save_pretrained(folder)

        return write

    def checkpoint_reader(self, bundle: Bundle) -> Callable:
        """Returns `read(folder) -> state dict`: a full checkpoint's weights under the model's own names
        (save_pretrained may store them under the original checkpoint's names)."""

        def read(folder: Path) -> dict[str, torch.Tensor]:
            from transformers import AutoModelForImageTextToText

            dtype = next(bundle.core.parameters()).dtype
            return AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).state_dict()

        return read

    def prompt_limit(self, bundle: Bundle, max_new_tokens: int) -> int:
        positions = model_positions(bundle.core)
        if positions is None:
            return 1 << 30
        if positions - max_new_tokens < 2:
            raise ContextLengthError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt: the model takes "
                f"{positions} positions in all"
            )
        return positions - max_new_tokens

    def encode_row(
        self,
        bundle: Bundle,
        row: RowLike,
        images: Sequence[Image.Image],
        max_length: int,
        videos: Sequence[Video] = (),
    ) -> EncodedSample:
        sample = self._encode_row(bundle.processor, row, images, generation=True, videos=videos)
        if len(sample) > max_length:
            raise ContextLengthError(
                f"{row.origin} is too long: its prompt of {len(sample)} tokens exceeds {max_length} (the "
                "model's positions less max_new_tokens); shorten it or lower max_new_tokens"
            )
        return sample

    def encode_row_from(
        self, bundle: Bundle, row: RowLike, source: ImageSource, max_length: int
    ) -> EncodedSample:
        videos = self.row_videos(bundle.processor, row, source)
        return self.encode_row(bundle, row, row_images(row, source), max_length, videos)

    @torch.no_grad()
    def generate_batch(
        self,
        bundle: Bundle,
        samples: Sequence[EncodedSample],
        settings: Any,
        generator: torch.Generator | None = None,
        *,
        batches: int | None = None,
    ) -> list[str]:
        seed = None
        if settings.do_sample and generator is not None:
            seed = int(torch.randint(2**62, (1,), generator=generator))
        device = self.device_of(bundle)

        def decode(static: bool) -> list[str]:
            rows = list(samples)
            if static:
                # a compiled step is specialised to its batch's rows: a shorter batch (the last of a file) is
                # filled with copies of its last row up to the most rows decoded so far, so that it replays
                # the step compiled for them instead of compiling its own; the copies' answers are dropped
                self._static_rows = max(self._static_rows, len(rows))
                rows += [rows[-1]] * (self._static_rows - len(rows))
            with seeded_sampling(seed, device):
                return self.generate(
                    bundle.model,
                    bundle.processor,
                    self.collate_for_generation(bundle.processor, rows),
                    max_new_tokens=settings.max_new_tokens,
                    static=static,
                    **generate_options(settings),
                )

        if self.decodes_static(device, bundle.core, batches):
            try:
                return decode(static=True)[: len(samples)]
            except Exception as error:  # noqa: BLE001 - the compiler's failures have many types
                type(self).static_decode_failed = True
                warnings.warn(
                    f"{self.name}: the compiled static-cache decode failed ({type(error).__name__}: {error}); "
                    "decoding with transformers' dynamic cache from now on",
                    stacklevel=2,
                )
        return decode(static=False)

    # -- chat and serve -------------------------------------------------------------------------------
    def encode_chat(
        self,
        bundle: Bundle,
        messages: Sequence[Message],
        images: Sequence[Image.Image],
        max_length: int,
        videos: Sequence[Video] = (),
    ) -> EncodedSample:
        if messages and messages[-1].get("role") != "user":
            raise FamilyError(f"{self.name}: a generation prompt ends with a user message")
        sample = self.encode(bundle.processor, messages, list(images), generation=True, videos=videos)
        if len(sample) > max_length:
            raise ContextLengthError(
                f"the conversation is too long: its prompt of {len(sample)} tokens exceeds {max_length} (the "
                "model's positions less the tokens to generate); start a new conversation, shorten the "
                "history, or ask for fewer tokens"
            )
        return sample

    def end_ids(self, bundle: Bundle) -> frozenset[int]:
        return eos_token_ids(bundle.core)

    def decode(self, bundle: Bundle, ids: Sequence[int]) -> str:
        # as `generate` decodes its answers
        return bundle.processor.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream_tokens(
        self,
        bundle: Bundle,
        prompt: EncodedSample,
        settings: GenerationSettings,
        on_token: Callable[[int], None],
        stop: threading.Event | None = None,
        seed: int | None = None,
    ) -> None:
        batch = self.collate_for_generation(bundle.processor, [prompt])
        try:
            with seeded_sampling(seed if settings.do_sample else None, self.device_of(bundle)):
                self.generate(
                    bundle.model,
                    bundle.processor,
                    batch,
                    max_new_tokens=settings.max_new_tokens,
                    streamer=_TokenStreamer(on_token, stop),
                    **generate_options(settings),
                )
        except _Stopped:
            pass

    def batch_decoder(self, bundle: Bundle) -> HFStepDecoder:
        """Returns the running batch the server joins requests to (step_decoding.py)."""
        return HFStepDecoder(
            bundle.model,
            functools.partial(self.collate_for_generation, bundle.processor),
            self.generation_positions(bundle),
            self.end_ids(bundle),
            self.pad_id(bundle),
            keeps_logits(bundle.model),
            functools.partial(last_position_only, bundle.model),
        )

    def generation_positions(self, bundle: Bundle) -> packing.Positions:
        """Returns `positions(padded) -> (R, B, L)`: the position rows the model gives each prompt of a
        left-padded generation batch alone (those of packed rows: they are computed per row from its
        attention mask, so padding on either side leaves them alike)."""
        return self.packed_positions(bundle)

    def dummy_samples(self, bundle: Bundle, n: int, seed: int) -> list[EncodedSample]:
        """Returns `n` encoded conversations about seeded noise images, for checking a merge without data."""
        import random

        rng = random.Random(seed)
        samples = []
        for _ in range(n):
            side = 64
            image = Image.frombytes(
                "RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3))
            )
            conversation = messages_from_row("Describe the image.", "A field of coloured noise.")
            samples.append(self.encode(bundle.processor, conversation, [image]))
        return samples

    def logits_fn(self, bundle: Bundle, device: torch.device) -> Callable:
        """Returns `logits(model, sample)`: one sample's fp32 logits [T, vocab] on the CPU."""
        from functools import partial

        return partial(self._sample_logits, bundle.processor, device=device)

    def _sample_logits(
        self, processor: Any, model: nn.Module, sample: EncodedSample, device: torch.device
    ) -> torch.Tensor:
        batch = self.collate_for_training(processor, [sample])
        batch.pop("labels")
        inputs = self.to_device(batch, device)
        return model(**inputs).logits[0].float().cpu()

    def check_merged(self, model: nn.Module, base: Path) -> None:
        leftover = [k for k in model.state_dict() if "lora_" in k]
        if leftover:
            raise FamilyError(
                f"{self.name}: after merging, {len(leftover)} adapter keys remain, first: {leftover[:5]}"
            )

    def save_merged(
        self,
        model: nn.Module,
        bundle: Bundle,
        folder: Path,
        shard_bytes: int,
        dtype: torch.dtype,
        base: Path,
    ) -> None:
        model = model.to(dtype)
        with atomic_dir(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp, max_shard_size=shard_bytes)
            bundle.processor.save_pretrained(tmp)

    def load_merged(self, folder: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return self.load(folder, dtype, device)[0]

    def weight_files(self, folder: Path) -> list[str]:
        return sorted(p.name for p in Path(folder).glob("*.safetensors"))


class EncodedRows(TorchDataset):
    """Rows encoded on access (in DataLoader workers) by an HF-native family's processor and chat template."""

    def __init__(
        self,
        rows: Sequence[RowLike],
        family: HFNativeFamily,
        processor: Any,
        max_length: int,
        images: ImageSource,
        with_response: bool = True,
        last_round: bool = False,
    ) -> None:
        self.rows = list(rows)
        self.last_round = last_round  # labels on each row's final response alone
        self.family = family
        self.processor = processor
        self.max_length = max_length
        self.images = images
        self.with_response = with_response

    def __len__(self) -> int:
        return len(self.rows)

    def token_counts(self) -> list[int]:
        """Returns every row's encoded length (counted by validation, else by encoding the row now)."""
        counts = []
        for index, row in enumerate(self.rows):
            count = row.num_tokens if getattr(row, "num_tokens", None) is not None else len(self[index])
            counts.append(min(count, self.max_length))
        return counts

    def __getitem__(self, index: int) -> EncodedSample:
        row = self.rows[index]
        sample = self.family._encode_row_from(
            self.processor, row, self.images, generation=not self.with_response, last_round=self.last_round
        )
        if len(sample) > self.max_length:
            # Validation removed every row that does not fit, so this means the file changed since.
            raise ValueError(
                f"{row.origin}: encodes to {len(sample)} tokens, over max_length {self.max_length}"
            )
        return sample
