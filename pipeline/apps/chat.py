"""The `Chat` API: one model, one conversation at a time, answered whole or streamed.

    chat = Chat.from_pretrained("/models/MiniCPM-V-2", ckpt="outputs/.../sft/best")
    response, history = chat.infer("Describe the image.", images=["cat.png"])
    response, history = chat.infer("What colour is it?", history=history)   # the image stays
    response, history = chat.infer("What is 2 + 3?")                         # a new conversation, no image

History is a list of [query, response] pairs; each call returns it with the new pair appended. A call
continues the conversation when it passes the history the previous call returned; any other history (or none)
starts a new conversation, without the earlier one's image. A conversation holds at most one image (the
model takes one): it goes where a query's `<image>` tag is, else before the first query, and a different
image later in the same conversation is an error. The terminal chat is pipeline.apps.chat_cli.

The other families (Qwen2.5-VL, Qwen3-VL, MiniCPM-V 4.6) chat through `FamilyChat`, the same interface with up
to the family's max_images images per conversation: `images` of a call are that turn's, placed where its
query's `<image>` tags are, else before its query. `Chat.from_pretrained` picks the class by the folder's
config.json model_type.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from pipeline.apps.generation import generation_settings, load_inference_bundle
from pipeline.data.images import load_image
from pipeline.families.base import Bundle
from pipeline.families.minicpm_v2.bundle import ModelBundle
from pipeline.families.minicpm_v2.collate import Sample, collate_for_generation
from pipeline.families.minicpm_v2.generation import GenerationSettings, generate
from pipeline.families.minicpm_v2.prompting import batch_to_device, encode_prompt, prompt_limit

if TYPE_CHECKING:
    from pipeline.families.base import Family

_REPLACEMENT_CHAR = "\ufffd"  # what a partly generated multi-byte character decodes to

ImageRef = str | os.PathLike | Image.Image


class _Stop(Exception):
    """Raised inside the generation thread when the reader of a stream has gone away."""


_DONE = object()


def chat_for(family: Family, bundle: Any, **options: Any) -> Chat | FamilyChat:
    """Returns the chat over a loaded bundle of `family` (`options`: generation, system, seed, image_cache)."""
    if family.name == "minicpm_v2":
        return Chat(bundle, **options)
    return FamilyChat(family, bundle, **options)


def _texts(
    tokens: Iterator[int], decode: Callable[[list[int]], str], eos_ids: Collection[int]
) -> Iterator[str]:
    """Yields the decoded answer each time it grows (up to the first end token), then the whole answer."""
    ids: list[int] = []
    shown: str | None = None
    for token in tokens:
        if token in eos_ids:
            break
        ids.append(token)
        # Decode all ids every step: a character split over several byte tokens only appears once whole.
        text = decode(ids)
        if len(text) > len(shown or "") and not text.endswith(_REPLACEMENT_CHAR):
            shown = text
            yield text
    text = decode(ids)
    if text != shown:
        yield text


class _Conversing:
    """What both chats share: the bundle and settings they answer with, and `infer` as the last step of
    `infer_stream`."""

    def __init__(
        self,
        bundle: Any,
        generation: Mapping[str, Any] | GenerationSettings | None,
        system: str | None,
        image_cache: Path | None,
    ) -> None:
        self.bundle = bundle
        self.settings = generation_settings(generation)
        self.system = system
        self.image_cache = image_cache

    def infer_stream(
        self,
        query: str,
        images: ImageRef | Sequence[ImageRef] | None = None,
        history: Sequence[Sequence[str]] | None = None,
        system: str | None = None,
    ) -> Iterator[tuple[str, list[list[str]]]]:
        raise NotImplementedError

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


class Chat(_Conversing):
    """One model, one conversation at a time: `infer` answers a query, `infer_stream` yields the answer as it grows."""

    max_images = 1  # images per conversation

    def __init__(
        self,
        bundle: ModelBundle,
        generation: Mapping[str, Any] | GenerationSettings | None = None,
        system: str | None = None,
        seed: int | None = None,
        image_cache: Path | None = None,
    ) -> None:
        super().__init__(bundle, generation, system, image_cache)
        self.device = bundle.core.llm.lm_head.weight.device
        self.generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        self.max_prompt_length = prompt_limit(bundle, self.settings.max_new_tokens)
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
    ) -> Chat | FamilyChat:
        """Returns a Chat over the model at `model_path`, with the checkpoint `ckpt` (adapter or merged) if given
        (a FamilyChat when the folder holds another family's model).

        `load_options` go to load_inference_bundle (build_if_missing, allow_download, max_slice_nums, ...).
        """
        bundle, family = load_inference_bundle(model_path, ckpt, device=device, dtype=dtype, **load_options)
        return chat_for(family, bundle, generation=generation, system=system, seed=seed)

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
        for text in _texts(self._token_stream(sample), tok.decode, (tok.eos_id,)):
            yield text, self._continue(history, query, text)

    def _continue(self, history: list[list[str]], query: str, response: str) -> list[list[str]]:
        """Returns the history with the new pair, remembered as this conversation's (a copy goes out)."""
        self._history = [*history, [query, response]]
        return [list(pair) for pair in self._history]

    def _token_stream(self, sample: Sample) -> Iterator[int]:
        """Yields each generated token id as soon as it is chosen (generation runs in a worker thread)."""
        batch = batch_to_device(collate_for_generation([sample], self.bundle.tokenizer.pad_id), self.device)

        def run(put: Callable[[int], None], stop: threading.Event) -> None:
            def on_step(step_tokens: torch.Tensor) -> None:
                if stop.is_set():
                    raise _Stop
                put(int(step_tokens[0]))

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

        return _threaded_tokens(run)


def _threaded_tokens(run: Callable[[Callable[[int], None], threading.Event], None]) -> Iterator[int]:
    """Yields the token ids `run(put, stop)` puts, as soon as it puts them; `run` generates in a worker thread
    and ends at its next step (raising _Stop) once `stop` is set, when the reader has stopped early."""
    tokens: queue.Queue = queue.Queue()
    stop = threading.Event()
    threads = torch.get_num_threads()

    def work() -> None:
        torch.set_num_threads(threads)  # a new thread starts with OpenMP's default team size
        try:
            run(tokens.put, stop)
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
        stop.set()
        worker.join()


class _QueueStreamer:
    """Hands on each token the family's `generate` makes (the first call, the prompt, is skipped); stops
    generation once the reader has gone."""

    def __init__(self, put: Callable[[int], None], stop: threading.Event) -> None:
        self.put_token = put
        self.stop = stop
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.stop.is_set():
            raise _Stop
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.put_token(int(token))

    def end(self) -> None:
        pass


class FamilyChat(_Conversing):
    """Chat's interface for a transformers-native family: answers through the family's own `generate`, with up
    to the family's max_images images per conversation, each in the turn that gave it."""

    def __init__(
        self,
        family: Family,
        bundle: Bundle,
        generation: Mapping[str, Any] | GenerationSettings | None = None,
        system: str | None = None,
        seed: int | None = None,
        image_cache: Path | None = None,
    ) -> None:
        from pipeline.families.hf_native import eos_token_ids, model_positions

        super().__init__(bundle, generation, system, image_cache)
        self.family = family
        self.max_images = family.max_images
        self.device = family.device_of(bundle)
        self.positions = model_positions(bundle.core)
        if self.positions is not None and self.settings.max_new_tokens >= self.positions:
            raise ValueError(
                f"max_new_tokens={self.settings.max_new_tokens} leaves no room for a prompt: the model takes "
                f"{self.positions} positions in all"
            )
        self.eos_ids = eos_token_ids(bundle.core)
        self._seeds = torch.Generator().manual_seed(seed) if seed is not None else None
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation: its images and history (a new conversation starts)."""
        self._loaded: dict[str, Image.Image] = {}  # the conversation's images read so far, by path or URL
        self._images: list[Image.Image] = []  # the conversation's images, in order
        self._turn_images: list[int] = []  # how many of them each turn gave
        self._history: list[list[str]] | None = None

    def load_image(self, ref: ImageRef) -> Image.Image:
        """Returns the image `ref` (path, URL or PIL image) names; raises ImageLoadError naming the path or URL."""
        if isinstance(ref, Image.Image):
            return ref.convert("RGB")
        key = str(ref)
        if key not in self._loaded:
            self._loaded[key] = load_image(key, cache_dir=self.image_cache)
        return self._loaded[key]

    def set_image(self, ref: ImageRef | None) -> Image.Image | None:
        """Returns the image `ref` names (checked readable, not yet given to any turn); None gives None."""
        return None if ref is None else self.load_image(ref)

    def _messages(
        self, history: list[list[str]], query: str, turn_images: list[int], system: str | None
    ) -> list[dict[str, str]]:
        """Returns the conversation's messages, each turn's images tagged before its query when it has no tag."""
        from pipeline.families.base import IMAGE_TAG

        messages = [{"role": "system", "content": system}] if system else []
        turns = [*history, [query, None]]
        for (turn_query, response), count in zip(turns, turn_images, strict=True):
            if count and IMAGE_TAG not in turn_query:
                turn_query = IMAGE_TAG * count + turn_query
            messages.append({"role": "user", "content": turn_query})
            if response is not None:
                messages.append({"role": "assistant", "content": response})
        return messages

    def infer_stream(
        self,
        query: str,
        images: ImageRef | Sequence[ImageRef] | None = None,
        history: Sequence[Sequence[str]] | None = None,
        system: str | None = None,
    ) -> Iterator[tuple[str, list[list[str]]]]:
        """Yields (response so far, history with the new pair) each time the decoded response grows; `images`
        are this turn's. The last value holds the whole response; it equals what `infer` returns."""
        history = [list(pair) for pair in (history or [])]
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query must be a non-empty string")
        if images is None:
            refs: list[ImageRef] = []
        elif isinstance(images, str | os.PathLike | Image.Image):
            refs = [images]
        else:
            refs = list(images)
        if not (history and history == self._history):
            self.reset()  # a new conversation: a history given from elsewhere carries no images
            self._turn_images = [0] * len(history)
        total = len(self._images) + len(refs)
        if total > self.max_images:
            raise ValueError(
                f"model.family={self.family.name} takes at most {self.max_images} images per conversation; "
                f"this one would hold {total}: start a new conversation for more"
            )
        conversation_images = [*self._images, *(self.load_image(ref) for ref in refs)]
        turn_images = [*self._turn_images, len(refs)]
        system = self.system if system is None else system
        messages = self._messages(history, query, turn_images, system or None)
        processor = self.bundle.processor
        sample = self.family.encode(processor, messages, conversation_images, generation=True)
        if self.positions is not None and len(sample) + self.settings.max_new_tokens > self.positions:
            raise ValueError(
                f"the conversation is too long: its prompt of {len(sample)} tokens and max_new_tokens="
                f"{self.settings.max_new_tokens} exceed the model's {self.positions} positions; start a new "
                "conversation, or lower max_new_tokens"
            )

        def decode(ids: list[int]) -> str:  # as the family's generate decodes
            return processor.tokenizer.decode(ids, skip_special_tokens=True)

        for text in _texts(self._token_stream(sample), decode, self.eos_ids):
            self._images, self._turn_images = conversation_images, turn_images
            self._history = [*history, [query, text]]
            yield text, [list(pair) for pair in self._history]

    def _seed(self) -> int | None:
        """Returns the seed an answer samples with: the next of the chat's seeds (None: greedy, or no seed)."""
        if not self.settings.do_sample or self._seeds is None:
            return None
        return int(torch.randint(2**62, (1,), generator=self._seeds))

    def _token_stream(self, sample: Any) -> Iterator[int]:
        """Yields each generated token id as soon as `generate` makes it (it runs in a worker thread)."""
        from pipeline.families.hf_native import generate_options, seeded_sampling

        processor = self.bundle.processor
        batch = self.family.collate_for_generation(processor, [sample])

        def run(put: Callable[[int], None], stop: threading.Event) -> None:
            with seeded_sampling(self._seed(), self.device):
                self.family.generate(
                    self.bundle.model,
                    processor,
                    batch,
                    max_new_tokens=self.settings.max_new_tokens,
                    streamer=_QueueStreamer(put, stop),
                    **generate_options(self.settings),
                )

        return _threaded_tokens(run)
