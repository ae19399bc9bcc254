"""Talking to MiniCPM-V-2: the `Chat` API (one conversation, streamed or not), batched generation over rows,
and the interactive command line (like `swift infer`).

    python -m pipeline.chat --model .cache/minicpm_v2_tiny
    python -m pipeline.chat --model /models/MiniCPM-V-2 --ckpt outputs/<exp>/<time>/sft/checkpoint-40

    chat = Chat.from_pretrained("/models/MiniCPM-V-2", ckpt="outputs/.../sft/best")
    response, history = chat.infer("Describe the image.", images=["cat.png"])
    response, history = chat.infer("What colour is it?", history=history)   # the image stays

History is a list of [query, response] pairs; each call returns it with the new pair appended. A
conversation holds one image, placed before its first query: the image given with the first query is kept
for the later rounds of that conversation.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline.config import BASE_CKPT, resolve_device, resolve_dtype
from pipeline.data.images import ImageLoadError, load_image
from pipeline.data.rows import Row
from pipeline.models.bundle import ModelBundle, load_bundle
from pipeline.models.checkpoint import CheckpointError
from pipeline.models.collate import Sample, collate_for_generation, encode_example
from pipeline.models.generation import GenerationSettings, generate
from pipeline.runinfo import load_run_config, resolve_ckpt
from pipeline.twin import model_folder

log = logging.getLogger(__name__)

GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
USER_PROMPT = "<<< "
MULTI_LINE_PROMPT = "<<<[M] "
SYSTEM_PROMPT = "<<<[system] "
IMAGE_PROMPT = "Input a media path or URL <<< "
SEPARATOR = "-" * 50
COMMANDS_HELP = (
    "commands: `clear` new conversation, `exit`/`quit`, `multi-line` (end each query with `#`), "
    "`single-line`, `reset-system`"
)
_LINE_COMMANDS = ("exit", "quit", "clear", "single-line", "reset-system")
_REPLACEMENT_CHAR = "\ufffd"  # what a partly generated multi-byte character decodes to

ImageRef = str | os.PathLike | Image.Image


def generation_settings(values: Mapping[str, Any] | GenerationSettings | None = None) -> GenerationSettings:
    """Returns the generation settings from a mapping of GENERATION_KEYS (greedy, 256 new tokens by default)."""
    if isinstance(values, GenerationSettings):
        return values
    values = dict(values or {})
    unknown = sorted(set(values) - set(GENERATION_KEYS))
    if unknown:
        raise ValueError(
            f"unknown generation setting(s) {', '.join(unknown)}; valid: {', '.join(GENERATION_KEYS)}"
        )
    return GenerationSettings(**values)


def load_inference_bundle(
    model_path: str,
    ckpt: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    build_if_missing: bool = False,
    allow_download: bool = False,
    max_slice_nums: int | None = None,
    slice_mode: bool | None = None,
) -> ModelBundle:
    """Returns the model (base, adapter or merged checkpoint) in eval mode on `device`, with its tokenizer.

    `ckpt` may be a checkpoint folder, an earlier run folder (its sft/best, else sft/last), "base" or None
    (= the model at `model_path`). A missing folder or an adapter of another base raises CheckpointError.
    """
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtype(str(dtype), device)
    if ckpt is not None and str(ckpt) != BASE_CKPT:
        # A run folder is resolved to its checkpoint; a missing path is left to load_bundle's CheckpointError.
        ckpt = resolve_ckpt(ckpt) if Path(ckpt).expanduser().exists() else Path(ckpt).expanduser()
    else:
        ckpt = None
    bundle = load_bundle(
        model_folder(model_path, build_if_missing),
        ckpt=ckpt,
        dtype=dtype,
        device=device,
        allow_download=allow_download,
        max_slice_nums=max_slice_nums,
        slice_mode=slice_mode,
    )
    bundle.model.eval()
    log.info("loaded %s model from %s%s", bundle.kind, bundle.base_path, f" + {ckpt}" if ckpt else "")
    return bundle


def prompt_limit(bundle: ModelBundle, settings: GenerationSettings) -> int:
    """Returns the longest prompt that leaves room for max_new_tokens within the model's positions."""
    limit = int(bundle.core.config.max_position_embeddings) - settings.max_new_tokens
    if limit < 2:
        raise ValueError(
            f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt: the model takes "
            f"{bundle.core.config.max_position_embeddings} positions in all"
        )
    return limit


def encode_prompt(
    bundle: ModelBundle,
    query: str,
    history: Sequence[Sequence[str]] = (),
    system: str | None = None,
    image: Image.Image | None = None,
    max_length: int = 4096,
    where: str = "the conversation",
) -> Sample:
    """Returns the generation prompt (ending with <AI>) of a conversation; raises when it exceeds max_length."""
    sample = encode_example(
        bundle.tokenizer,
        bundle.processor,
        query,
        None,
        history=history,
        system=system,
        image=image,
        max_length=max_length,
        truncation="delete",
    )
    if sample is None:
        raise ValueError(
            f"{where} is too long: its prompt exceeds {max_length} tokens (the model's positions less "
            "max_new_tokens); start a new conversation, shorten the history, or lower max_new_tokens"
        )
    return sample


def response_ids(ids: Sequence[int], eos_id: int) -> list[int]:
    """Returns the generated ids before the first eos (the eos and any padding after it dropped)."""
    out = []
    for token in ids:
        if int(token) == eos_id:
            break
        out.append(int(token))
    return out


def _batch_to_device(batch: dict, device: torch.device) -> dict:
    batch = dict(batch)
    batch["input_ids"] = batch["input_ids"].to(device)
    batch["attention_mask"] = batch["attention_mask"].to(device)
    return batch


def generate_for_rows(
    bundle: ModelBundle,
    rows: Sequence[Row],
    settings: GenerationSettings,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    image_cache: Path | None = None,
    desc: str = "generate",
) -> list[str]:
    """Returns one generated response per row (in row order), prompting each with its query, history and image.

    Rows are batched by prompt length (left-padded); images are loaded one batch at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = prompt_limit(bundle, settings)
    tok = bundle.tokenizer
    device = bundle.core.llm.lm_head.weight.device
    # Lengths without loading images: similar lengths share a batch so little compute goes to padding.
    order = sorted(
        range(len(rows)), key=lambda i: (len(rows[i].history), len(rows[i].query), bool(rows[i].images))
    )
    outputs: list[str] = [""] * len(rows)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for indices in tqdm(batches, desc=desc, unit="batch", leave=False):
        samples = []
        for i in indices:
            row = rows[i]
            try:
                image = load_image(row.images[0], cache_dir=image_cache) if row.images else None
            except ImageLoadError as exc:
                raise ImageLoadError(f"{row.origin}: {exc}") from exc
            samples.append(
                encode_prompt(bundle, row.query, row.history, row.system, image, limit, where=row.origin)
            )
        batch = _batch_to_device(collate_for_generation(samples, tok.pad_id), device)
        new = generate(
            bundle.core,
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["image_bound"],
            settings=settings,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            generator=generator,
        )
        for i, ids in zip(indices, new.tolist(), strict=True):
            outputs[i] = tok.decode(response_ids(ids, tok.eos_id))
    return outputs


class _Stop(Exception):
    """Raised inside the generation thread when the reader of a stream has gone away."""


_DONE = object()


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
        bundle = load_inference_bundle(model_path, ckpt, device=device, dtype=dtype, **load_options)
        return cls(bundle, generation=generation, system=system, seed=seed)

    # ----- the conversation's image
    def reset(self) -> None:
        """Forgets the conversation's image (a new conversation starts)."""
        self._image_ref = None
        self._image = None

    def set_image(self, ref: ImageRef | None) -> Image.Image | None:
        """Returns the image that `ref` (path, URL or PIL image) names, kept as the conversation's image.

        Raises ImageLoadError naming the path or URL when it cannot be read; the kept image is then unchanged.
        """
        if ref is None:
            self.reset()
            return None
        if isinstance(ref, Image.Image):
            image = ref.convert("RGB")
        elif self._image is not None and self._image_ref == ref:
            return self._image
        else:
            image = load_image(ref, cache_dir=self.image_cache)
        self._image_ref, self._image = ref, image
        return image

    def _conversation_image(
        self, images: ImageRef | Sequence[ImageRef] | None, history: Sequence
    ) -> Image.Image | None:
        if images is not None and not isinstance(images, str | os.PathLike | Image.Image):
            images = list(images)
            if len(images) > 1:
                raise ValueError(f"MiniCPM-V-2 takes one image per conversation; got {len(images)} images")
            images = images[0] if images else None
        if images is not None:
            return self.set_image(images)
        if not history:
            self.reset()  # a new conversation without an image
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
                yield text, [*history, [query, text]]
        text = tok.decode(ids)
        if text != shown:
            yield text, [*history, [query, text]]

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
        batch = _batch_to_device(collate_for_generation([sample], self.bundle.tokenizer.pad_id), self.device)
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


# ----- the interactive command line
def _read_line(stdin: TextIO, stdout: TextIO, prompt: str) -> str | None:
    """Returns one input line without its newline, or None at end of input."""
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    if not line:
        stdout.write("\n")
        return None
    return line.rstrip("\r\n")


def _read_multi_line(stdin: TextIO, stdout: TextIO) -> str | None:
    """Returns the lines up to one ending with `#` (the `#` removed), or None at end of input with none read."""
    lines: list[str] = []
    prompt = MULTI_LINE_PROMPT
    while True:
        line = _read_line(stdin, stdout, prompt)
        if line is None:
            return "\n".join(lines) if lines else None
        prompt = ""
        if not lines and line.strip().lower() in _LINE_COMMANDS:
            return line  # a command needs no closing `#`
        if line.rstrip().endswith("#"):
            lines.append(line.rstrip()[:-1])
            return "\n".join(lines)
        lines.append(line)


def _ask_image(chat: Chat, stdin: TextIO, stdout: TextIO) -> tuple[bool, str | None]:
    """Returns (got an answer, image reference or None); asks again while the path or URL cannot be read."""
    while True:
        line = _read_line(stdin, stdout, IMAGE_PROMPT)
        if line is None:
            return False, None
        ref = line.strip().strip("'\"")
        if not ref:
            chat.reset()
            return True, None
        try:
            chat.set_image(ref)
        except ImageLoadError as exc:
            stdout.write(f"cannot use the image ({exc}); give another path or URL, or press Enter for none\n")
            continue
        return True, ref


def run_chat(
    chat: Chat,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    stream: bool = True,
    record: Callable[[dict], None] | None = None,
) -> int:
    """Returns the number of answered turns after an interactive chat on stdin/stdout (ends at exit or EOF).

    `record` receives every turn as {system, query, response, history, images}.
    """
    stdout.write(COMMANDS_HELP + "\n")
    history: list[list[str]] = []
    image_ref: str | None = None
    system = chat.system
    multi_line = False
    turns = 0
    while True:
        query = _read_multi_line(stdin, stdout) if multi_line else _read_line(stdin, stdout, USER_PROMPT)
        if query is None:
            break
        command = query.strip().lower()
        if command in ("exit", "quit"):
            break
        if command == "clear":
            history, image_ref = [], None
            chat.reset()
            stdout.write("(new conversation)\n")
            continue
        if command == "multi-line":
            multi_line = True
            stdout.write("multi-line input: end each query with `#`; `single-line` goes back\n")
            continue
        if command == "single-line":
            multi_line = False
            continue
        if command == "reset-system":
            line = _read_line(stdin, stdout, SYSTEM_PROMPT)
            if line is None:
                break
            system = line.strip() or None
            stdout.write(f"system prompt {'set' if system else 'cleared'}\n")
            continue
        if not command:
            stdout.write("(empty query ignored: type a question, or `exit` to quit)\n")
            continue
        if not history:
            answered, image_ref = _ask_image(chat, stdin, stdout)
            if not answered:
                break
        try:
            response, history = _answer(chat, query, image_ref, history, system, stdout, stream)
        except (ValueError, ImageLoadError) as exc:
            stdout.write(f"\nerror: {exc}\n{SEPARATOR}\n")
            continue
        turns += 1
        if record is not None:
            record(
                {
                    "system": system,
                    "query": query,
                    "response": response,
                    "history": history[:-1],
                    "images": [image_ref] if image_ref else [],
                }
            )
        stdout.write(f"{SEPARATOR}\n")
    stdout.flush()
    return turns


def _answer(
    chat: Chat,
    query: str,
    image_ref: str | None,
    history: list,
    system: str | None,
    stdout: TextIO,
    stream: bool,
) -> tuple[str, list[list[str]]]:
    """Returns (response, new history) after writing the answer, piece by piece when streaming."""
    images = [image_ref] if image_ref else None
    response, new_history = "", history
    if stream:
        printed = 0
        for step in chat.infer_stream(query, images, history, system):
            response, new_history = step
            if len(response) > printed:
                stdout.write(response[printed:])
                stdout.flush()
                printed = len(response)
    else:
        response, new_history = chat.infer(query, images, history, system)
        stdout.write(response)
    stdout.write("\n")
    return response, new_history


def _model_from_run(ckpt: str | None) -> str | None:
    """Returns model.path of the run that produced `ckpt`, or None."""
    if not ckpt or not Path(ckpt).exists():
        return None
    cfg = load_run_config(ckpt)
    return str(cfg.model.path) if cfg is not None and "model" in cfg else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.chat",
        description="Chat with MiniCPM-V-2 (base, LoRA checkpoint or merged model).",
    )
    parser.add_argument("--model", help="base model folder (default: model.path of the run that made --ckpt)")
    parser.add_argument(
        "--ckpt", help="LoRA or merged checkpoint folder, or a run folder (default: the base model)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.3)
    parser.add_argument("--top-p", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--no-stream", action="store_true", help="print each answer once it is complete")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit code after a chat session on the terminal (1 with a one-line error when loading fails)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    model = args.model or _model_from_run(args.ckpt)
    if model is None:
        print(
            "error: give --model <base model folder> (or --ckpt inside a run folder that records it)",
            file=sys.stderr,
        )
        return 2
    generation = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
    }
    try:
        bundle = load_inference_bundle(model, args.ckpt, device=args.device, dtype=args.dtype)
        chat = Chat(bundle, generation=generation, system=args.system, seed=args.seed)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        run_chat(chat, sys.stdin, sys.stdout, stream=not args.no_stream)
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
