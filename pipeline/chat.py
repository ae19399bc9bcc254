"""The `Chat` API: one model, one conversation at a time, answered whole or streamed.

    chat = Chat.from_pretrained("/models/MiniCPM-V-2", ckpt="outputs/.../sft/best")
    response, history = chat.infer("Describe the image.", images=["cat.png"])
    response, history = chat.infer("What colour is it?", history=history)   # the image stays
    response, history = chat.infer("What is 2 + 3?")                         # a new conversation, no image

History is a list of [query, response] pairs; each call returns it with the new pair appended. A call
continues the conversation when it passes the history the previous call returned; any other history (or none)
starts a new conversation, without the earlier one's image. A conversation holds at most one image (the
model takes one): it goes where a query's `<image>` tag is, else before the first query, and a different
image later in the same conversation is an error. The terminal chat is pipeline.chat_cli.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.data.images import load_image
from pipeline.inference import (
    batch_to_device,
    encode_prompt,
    generation_settings,
    load_inference_bundle,
    prompt_limit,
)
from pipeline.models.bundle import ModelBundle
from pipeline.models.collate import Sample, collate_for_generation
from pipeline.models.generation import GenerationSettings, generate

_REPLACEMENT_CHAR = "\ufffd"  # what a partly generated multi-byte character decodes to

ImageRef = str | os.PathLike | Image.Image


class _Stop(Exception):
    """Raised inside the generation thread when the reader of a stream has gone away."""


_DONE = object()


def other_family(model: str) -> str | None:
    """Returns why the chat refuses the model folder (a model_type other than MiniCPM-V-2's), else None.

    Read from config.json only, before any weight loads."""
    config = Path(model).expanduser() / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None  # a missing or broken folder is the loader's to report
    if model_type in (None, MINICPM_V2_MODEL_TYPE):
        return None
    return (
        f"{model} holds a {model_type!r} model; the chat runs MiniCPM-V-2 ({MINICPM_V2_MODEL_TYPE!r}) only. "
        "Answer with another family in batch: python -m pipeline stages=[infer] model=<its config> "
        "infer.input=<file.jsonl>"
    )


MINICPM_V2_MODEL_TYPE = "minicpmv"


class Chat:
    """One model, one conversation at a time: `infer` answers a query, `infer_stream` yields the answer as it grows."""

    def __init__(
        self,
        bundle: ModelBundle,
        generation: Mapping[str, Any] | GenerationSettings | None = None,
        system: str | None = None,
        seed: int | None = None,
        image_cache: Path | None = None,
    ) -> None:
        self.bundle = bundle
        self.settings = generation_settings(generation)
        self.system = system
        self.image_cache = image_cache
        self.device = bundle.core.llm.lm_head.weight.device
        self.generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        self.max_prompt_length = prompt_limit(bundle, self.settings)
        self._image_ref: ImageRef | None = None
        self._image: Image.Image | None = None
        self._history: list[list[str]] | None = None  # what the last call returned: the conversation so far

    @classmethod
    def from_pretrained(
        cls,
        model_path: str,
        ckpt: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        generation: dict | None = None,
        system: str | None = None,
        seed: int | None = None,
        **load_options: Any,
    ) -> Chat:
        """Returns a Chat over the model at `model_path`, with the checkpoint `ckpt` (adapter or merged) if given.

        `load_options` go to load_inference_bundle (build_if_missing, allow_download, max_slice_nums, ...).
        """
        problem = other_family(model_path)
        if problem:
            raise ValueError(problem)
        bundle = load_inference_bundle(model_path, ckpt, device=device, dtype=dtype, **load_options)
        return cls(bundle, generation=generation, system=system, seed=seed)

    # ----- the conversation's image
    def reset(self) -> None:
        """Forgets the conversation: its image and history (a new conversation starts)."""
        self._image_ref = None
        self._image = None
        self._history = None

    def set_image(self, ref: ImageRef | None) -> Image.Image | None:
        """Returns the image that `ref` (path, URL or PIL image) names, kept as the conversation's image.

        Raises ImageLoadError naming the path or URL when it cannot be read; the kept image is then unchanged.
        """
        if ref is None:
            self._image_ref = self._image = None
            return None
        if isinstance(ref, Image.Image):
            image = ref.convert("RGB")
        elif self._image is not None and self._image_ref == ref:
            return self._image
        else:
            image = load_image(ref, cache_dir=self.image_cache)
        self._image_ref, self._image = ref, image
        return image

    def _same_image(self, ref: ImageRef) -> bool:
        if isinstance(ref, Image.Image):
            return ref is self._image_ref
        return not isinstance(self._image_ref, Image.Image) and str(ref) == str(self._image_ref)

    def _conversation_image(
        self, images: ImageRef | Sequence[ImageRef] | None, history: list[list[str]]
    ) -> Image.Image | None:
        if images is not None and not isinstance(images, str | os.PathLike | Image.Image):
            images = list(images)
            if len(images) > 1:
                raise ValueError(f"MiniCPM-V-2 takes one image per conversation; got {len(images)} images")
            images = images[0] if images else None
        continuing = bool(history) and history == self._history
        if not continuing:
            # a new conversation: nothing of the earlier one carries over (an image given again is kept loaded)
            keep = images is not None and self._image is not None and self._same_image(images)
            image_ref, image = self._image_ref, self._image
            self.reset()
            if keep:
                self._image_ref, self._image = image_ref, image
        elif images is not None and self._image is not None and not self._same_image(images):
            raise ValueError(
                f"this conversation already has an image ({self._image_ref}); MiniCPM-V-2 takes one image "
                "per conversation: start a new conversation (history=None) for another image"
            )
        if images is not None:
            return self.set_image(images)
        return self._image

    # ----- answering
    def infer_stream(
        self,
        query: str,
        images: ImageRef | Sequence[ImageRef] | None = None,
        history: Sequence[Sequence[str]] | None = None,
        system: str | None = None,
    ) -> Iterator[tuple[str, list[list[str]]]]:
        """Yields (response so far, history with the new pair) each time the decoded response grows.

        The last value holds the whole response; it equals what `infer` returns for the same call.
        """
        history = [list(pair) for pair in (history or [])]
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query must be a non-empty string")
        image = self._conversation_image(images, history)
        system = self.system if system is None else system
        sample = encode_prompt(self.bundle, query, history, system or None, image, self.max_prompt_length)
        tok = self.bundle.tokenizer
        ids: list[int] = []
        shown: str | None = None
        for token in self._token_stream(sample):
            if token == tok.eos_id:
                break
            ids.append(token)
            # Decode all ids every step: a character split over several byte tokens only appears once whole.
            text = tok.decode(ids)
            if len(text) > len(shown or "") and not text.endswith(_REPLACEMENT_CHAR):
                shown = text
                yield text, self._continue(history, query, text)
        text = tok.decode(ids)
        if text != shown:
            yield text, self._continue(history, query, text)

    def _continue(self, history: list[list[str]], query: str, response: str) -> list[list[str]]:
        """Returns the history with the new pair, remembered as this conversation's (a copy goes out)."""
        self._history = [*history, [query, response]]
        return [list(pair) for pair in self._history]

    def infer(
        self,
        query: str,
        images: ImageRef | Sequence[ImageRef] | None = None,
        history: Sequence[Sequence[str]] | None = None,
        system: str | None = None,
    ) -> tuple[str, list[list[str]]]:
        """Returns (response, history with [query, response] appended)."""
        response, new_history = "", []
        for step in self.infer_stream(query, images, history, system):
            response, new_history = step
        return response, new_history

    def _token_stream(self, sample: Sample) -> Iterator[int]:
        """Yields each generated token id as soon as it is chosen (generation runs in a worker thread)."""
        batch = batch_to_device(collate_for_generation([sample], self.bundle.tokenizer.pad_id), self.device)
        tokens: queue.Queue = queue.Queue()
        stop = threading.Event()
        threads = torch.get_num_threads()

        def on_step(step_tokens: torch.Tensor) -> None:
            if stop.is_set():
                raise _Stop
            tokens.put(int(step_tokens[0]))

        def work() -> None:
            # a new thread starts with OpenMP's default team size, not the caller's setting
            torch.set_num_threads(threads)
            try:
                generate(
                    self.bundle.core,
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["pixel_values"],
                    batch["image_bound"],
                    settings=self.settings,
                    eos_token_id=self.bundle.tokenizer.eos_id,
                    pad_token_id=self.bundle.tokenizer.pad_id,
                    on_step=on_step,
                    generator=self.generator,
                )
                tokens.put(_DONE)
            except _Stop:
                tokens.put(_DONE)
            except BaseException as exc:  # handed to the reader, which raises it in its own thread
                tokens.put(exc)

        worker = threading.Thread(target=work, name="chat-generate", daemon=True)
        worker.start()
        try:
            while True:
                item = tokens.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # the reader stopped early: end generation at its next step
            worker.join()
