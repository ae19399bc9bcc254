"""The `Chat` API: one model of any family, one conversation at a time, answered whole or streamed.

    chat = Chat.from_pretrained("/models/MiniCPM-V-2", ckpt="outputs/.../sft/best")
    response, history = chat.infer("Describe the image.", images=["cat.png"])
    response, history = chat.infer("What colour is it?", history=history)   # the image stays
    response, history = chat.infer("What is 2 + 3?")                         # a new conversation, no image

History is a list of [query, response] pairs; each call returns it with the new pair appended. A call
continues the conversation when it passes the history the previous call returned; any other history (or none)
starts a new conversation, without the earlier one's images. A conversation holds up to the family's
`capabilities.max_images` images (MiniCPM-V-2: one; the others: 16); more is an error naming the family and
its limit. Where they go is the family's `capabilities.image_placement`:

- "inline" (Qwen2.5-VL, Qwen3-VL, MiniCPM-V 4.6): a call's `images` are that turn's, placed where its
  query's `<image>` tags are, else before its query;
- "first_query" (MiniCPM-V-2): the conversation's images open its first query (or go where a query's
  `<image>` tag is); an image the conversation already holds, given again, is that same image.

`Chat.from_pretrained` picks the family by the folder's config.json model_type. Everything here goes through
the family interface (encode_chat, stream_tokens, end_ids, decode): greedy answers equal the family's
batched generation. The terminal chat is pipeline.apps.chat_cli.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.apps.generation import generation_settings, load_inference_bundle
from pipeline.data.images import ImageFiles, load_image
from pipeline.families import family_of_folder
from pipeline.families.base import (
    IMAGE_TAG,
    VIDEO_TAG,
    Bundle,
    EncodedPrompt,
    Family,
    FamilyError,
    Video,
    load_video,
)
from pipeline.families.generation_settings import GenerationSettings

_REPLACEMENT_CHAR = "\ufffd"  # what a partly generated multi-byte character decodes to
_SHOWN_REFS = 3  # images an error names before "..."

ImageRef = str | os.PathLike | Image.Image

_DONE = object()


def _texts(
    tokens: Iterator[int], decode: Callable[[list[int]], str], end_ids: Collection[int]
) -> Iterator[str]:
    """Yields the decoded answer each time it grows (up to the first end token), then the whole answer."""
    ids: list[int] = []
    shown: str | None = None
    for token in tokens:
        if token in end_ids:
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


def _threaded_tokens(run: Callable[[Callable[[int], None], threading.Event], None]) -> Iterator[int]:
    """Yields the token ids `run(put, stop)` puts, as soon as it puts them; `run` generates in a worker thread
    and ends once `stop` is set, which it is when the reader stops early."""
    tokens: queue.Queue = queue.Queue()
    stop = threading.Event()
    threads = torch.get_num_threads()

    def work() -> None:
        torch.set_num_threads(threads)  # a new thread starts with OpenMP's default team size
        try:
            run(tokens.put, stop)
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


def _ref_key(ref: ImageRef) -> str | int:
    """Returns what identifies an image reference: its path or URL, or a PIL image's identity."""
    return id(ref) if isinstance(ref, Image.Image) else str(ref)


def _ref_name(ref: ImageRef) -> str:
    return "an image given as a PIL image" if isinstance(ref, Image.Image) else str(ref)


class Chat:
    """One model, one conversation at a time: `infer` answers a query, `infer_stream` yields the answer as it
    grows. Works over any family through its interface."""

    def __init__(
        self,
        family: Family,
        bundle: Bundle,
        generation: Mapping[str, Any] | GenerationSettings | None = None,
        system: str | None = None,
        seed: int | None = None,
        image_cache: Path | None = None,
    ) -> None:
        self.family = family
        self.bundle = bundle
        self.settings = generation_settings(generation)
        self.system = system
        self.image_cache = image_cache
        self.max_images = family.max_images  # images per conversation
        self.image_placement = family.capabilities.image_placement
        # raises ValueError when max_new_tokens leaves no room for a prompt
        self.max_prompt_length = family.prompt_limit(bundle, self.settings.max_new_tokens)
        self.end_ids = family.end_ids(bundle)
        # the seeds answers sample with, one drawn per answer (None: the process's random state)
        self._seeds = torch.Generator().manual_seed(seed) if seed is not None else None
        self.reset()

    @classmethod
    def from_pretrained(
        cls,
        model_path: str,
        ckpt: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        generation: Mapping[str, Any] | GenerationSettings | None = None,
        system: str | None = None,
        seed: int | None = None,
        **load_options: Any,
    ) -> Chat:
        """Returns a Chat over the model at `model_path` (its family picked by the folder's config.json
        model_type), with the checkpoint `ckpt` (adapter or merged) if given.

        `load_options` go to load_inference_bundle (allow_download).
        """
        family = family_of_folder(model_path)
        bundle, family = load_inference_bundle(
            model_path, ckpt, family=family, device=device, dtype=dtype, **load_options
        )
        return cls(family, bundle, generation=generation, system=system, seed=seed)

    # ----- the conversation's images
    def reset(self) -> None:
        """Forgets the conversation: its images and history (a new conversation starts)."""
        self._loaded: dict[str | int, Image.Image] = {}  # images read so far, by path or URL
        self._images: list[tuple[ImageRef, Image.Image]] = []  # the conversation's images, in order
        self._turn_images: list[int] = []  # how many of them each turn gave
        self._videos: list[Video] = []  # the conversation's videos (their sampled frames), in order
        self._turn_videos: list[int] = []  # how many of them each turn gave
        self._history: list[list[str]] | None = None  # what the last call returned: the conversation so far

    def load_image(self, ref: ImageRef) -> Image.Image:
        """Returns the image `ref` (path, URL or PIL image) names, RGB; raises ImageLoadError naming the path
        or URL when it cannot be read. A path or URL is read once per conversation."""
        if isinstance(ref, Image.Image):
            return ref.convert("RGB")
        key = _ref_key(ref)
        if key not in self._loaded:
            self._loaded[key] = load_image(str(ref), cache_dir=self.image_cache)
        return self._loaded[key]

    def _start(self, history: list[list[str]], refs: list[ImageRef]) -> None:
        """Starts a new conversation on `history` (given from elsewhere, it carries no images); images this
        call gives again stay loaded."""
        keys = {_ref_key(ref) for ref in refs}
        kept = {key: image for key, image in self._loaded.items() if key in keys}
        self.reset()
        self._loaded.update(kept)
        self._turn_images = [0] * len(history)
        self._turn_videos = [0] * len(history)

    def load_video(self, ref: str | os.PathLike) -> Video:
        """Returns the video `ref` (path or URL) names with the frames the family samples, decoded; raises
        FamilyError for a family without video, VideoLoadError naming the path or URL."""
        if self.family.capabilities.max_videos == 0:
            raise FamilyError(self.family.video_limits().describe())
        pick = self.family.video_frame_picker(self.bundle.processor)
        return load_video(str(ref), ImageFiles(self.image_cache), pick)

    def _new_images(self, refs: list[ImageRef]) -> list[ImageRef]:
        """Returns the images of `refs` this turn adds: all of them inline; where the images open the first
        query, those the conversation does not hold yet."""
        if self.image_placement == "inline":
            return refs
        held = {_ref_key(ref) for ref, _ in self._images}
        return [ref for ref in refs if _ref_key(ref) not in held]

    def _too_many(self, total: int) -> ValueError:
        held = ""
        if self._images:
            names = [_ref_name(ref) for ref, _ in self._images[:_SHOWN_REFS]]
            more = ", ..." if len(self._images) > _SHOWN_REFS else ""
            held = f" (it already has {', '.join(names)}{more})"
        return ValueError(
            f"{self.family.label} takes {self.family.capabilities.images_in_words()} per conversation; this "
            f"one would hold {total}{held}: start a new conversation (history=None) for more"
        )

    def _messages(
        self,
        history: list[list[str]],
        query: str,
        turn_images: list[int],
        system: str | None,
        turn_videos: list[int] | None = None,
    ) -> list[dict[str, str]]:
        """Returns the conversation's messages; inline, each turn's images (then videos) are tagged before its
        query when the query has no tag of its own."""
        messages = [{"role": "system", "content": system}] if system else []
        turns = [*history, [query, None]]
        videos = turn_videos or [0] * len(turns)
        for (turn_query, response), count, video_count in zip(turns, turn_images, videos, strict=True):
            if video_count and VIDEO_TAG not in turn_query:
                turn_query = VIDEO_TAG * video_count + turn_query
            if self.image_placement == "inline" and count and IMAGE_TAG not in turn_query:
                turn_query = IMAGE_TAG * count + turn_query
            messages.append({"role": "user", "content": turn_query})
            if response is not None:
                messages.append({"role": "assistant", "content": response})
        return messages

    # ----- answering
    def infer_stream(
        self,
        query: str,
        images: ImageRef | Sequence[ImageRef] | None = None,
        history: Sequence[Sequence[str]] | None = None,
        system: str | None = None,
        videos: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    ) -> Iterator[tuple[str, list[list[str]]]]:
        """Yields (response so far, history with the new pair) each time the decoded response grows; `images`
        and `videos` (paths or URLs; families with capabilities.max_videos) are this turn's. The last value
        holds the whole response; it equals what `infer` returns."""
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
            self._start(history, refs)
        new = self._new_images(refs)
        total = len(self._images) + len(new)
        if total > self.max_images:
            raise self._too_many(total)
        video_refs = (
            [] if videos is None else [videos] if isinstance(videos, str | os.PathLike) else list(videos)
        )
        if len(self._videos) + len(video_refs) > self.family.capabilities.max_videos:
            raise ValueError(
                f"{self.family.label} takes {self.family.capabilities.videos_in_words()} per conversation; "
                "start a new conversation (history=None) for more"
            )
        conversation_images = [*self._images, *((ref, self.load_image(ref)) for ref in new)]
        turn_images = [*self._turn_images, len(new)]
        conversation_videos = [*self._videos, *(self.load_video(ref) for ref in video_refs)]
        turn_videos = [*self._turn_videos, len(video_refs)]
        system = self.system if system is None else system
        messages = self._messages(history, query, turn_images, system or None, turn_videos)
        video_inputs = {"videos": conversation_videos} if conversation_videos else {}
        prompt = self.family.encode_chat(
            self.bundle,
            messages,
            [image for _, image in conversation_images],
            self.max_prompt_length,
            **video_inputs,
        )
        for text in _texts(self._token_stream(prompt), self._decode, self.end_ids):
            self._images, self._turn_images = conversation_images, turn_images
            self._videos, self._turn_videos = conversation_videos, turn_videos
            self._history = [*history, [query, text]]
            yield text, [list(pair) for pair in self._history]

    def infer(
        self,
        query: str,
        images: ImageRef | Sequence[ImageRef] | None = None,
        history: Sequence[Sequence[str]] | None = None,
        system: str | None = None,
        videos: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    ) -> tuple[str, list[list[str]]]:
        """Returns (response, history with [query, response] appended)."""
        response, new_history = "", []
        for step in self.infer_stream(query, images, history, system, videos):
            response, new_history = step
        return response, new_history

    def _decode(self, ids: list[int]) -> str:
        return self.family.decode(self.bundle, ids)

    def _seed(self) -> int | None:
        """Returns the seed an answer samples with: the next of the chat's seeds (None: greedy, or none)."""
        if not self.settings.do_sample or self._seeds is None:
            return None
        return int(torch.randint(2**62, (1,), generator=self._seeds))

    def _token_stream(self, prompt: EncodedPrompt) -> Iterator[int]:
        """Yields each generated token id as soon as it is chosen (generation runs in a worker thread)."""
        seed = self._seed()

        def run(put: Callable[[int], None], stop: threading.Event) -> None:
            self.family.stream_tokens(self.bundle, prompt, self.settings, put, stop, seed)

        return _threaded_tokens(run)
