"""The terminal chat, like `swift infer`: queries on stdin, streamed answers, images per conversation.

    python -m pipeline.apps.chat_cli --model .cache/<tiny twin>    # python -m pipeline.training.twin builds it
    python -m pipeline.apps.chat_cli --model /models/MiniCPM-V-2 --ckpt outputs/<exp>/<time>/sft/checkpoint-40
    python -m pipeline.apps.chat_cli --model /models/Qwen2.5-VL-3B-Instruct

The folder's config.json model_type picks the family. Images are asked for one path or URL per prompt until an
empty line, up to the family's images per conversation: at every query, or only at a conversation's first
query where the family's images open it (capabilities.image_placement "first_query": MiniCPM-V-2).

Commands: `clear` (new conversation), `exit`/`quit`, `multi-line` (end input with `#`), `single-line`,
`reset-system` (a new system prompt, and with it a new conversation, as `swift infer`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from pipeline.apps.chat import Chat
from pipeline.apps.generation import load_inference_bundle
from pipeline.data.images import ImageLoadError
from pipeline.families import family_of_folder
from pipeline.families.checkpoints import CheckpointError
from pipeline.families.generation_settings import GenerationSettings
from pipeline.runinfo import load_run_config

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


def _ask_images(chat: Chat, stdin: TextIO, stdout: TextIO, room: int) -> tuple[bool, list[str]]:
    """Returns (got an answer, this query's image references): one per prompt until an empty line or `room`
    images; asks again while a path or URL cannot be read."""
    refs: list[str] = []
    while len(refs) < room:
        line = _read_line(stdin, stdout, IMAGE_PROMPT)
        if line is None:
            return False, refs
        ref = line.strip().strip("'\"")
        if not ref:
            break
        try:
            chat.load_image(ref)
        except ImageLoadError as exc:
            stdout.write(f"cannot use the image ({exc}); give another path or URL, or press Enter for none\n")
            continue
        refs.append(ref)
    return True, refs


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
    if chat.max_images > 1:
        stdout.write(
            f"images: up to {chat.max_images} per conversation, one path or URL per prompt, "
            "an empty line when done\n"
        )
    history: list[list[str]] = []
    image_refs: list[str] = []  # the conversation's images
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
            history, image_refs = [], []
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
            # as `swift infer`: another system prompt starts another conversation
            history, image_refs = [], []
            chat.reset()
            stdout.write(f"system prompt {'set' if system else 'cleared'} (new conversation)\n")
            continue
        if not command:
            stdout.write("(empty query ignored: type a question, or `exit` to quit)\n")
            continue
        # each query may bring images while the conversation has room for them; where the family's images
        # open the conversation's first query, only that query asks
        room = chat.max_images - len(image_refs if history else [])
        if chat.image_placement == "first_query" and history:
            room = 0
        answered, given = _ask_images(chat, stdin, stdout, room) if room > 0 else (True, [])
        if not answered:
            break
        try:
            response, new_history = _answer(chat, query, given, history, system, stdout, stream)
        except (ValueError, ImageLoadError) as exc:
            stdout.write(f"\nerror: {exc}\n{SEPARATOR}\n")
            continue
        image_refs = [*(image_refs if history else []), *given]
        history = new_history
        turns += 1
        if record is not None:
            record(
                {
                    "system": system,
                    "query": query,
                    "response": response,
                    "history": history[:-1],
                    "images": list(image_refs),
                }
            )
        stdout.write(f"{SEPARATOR}\n")
    stdout.flush()
    return turns


def _answer(
    chat: Chat,
    query: str,
    images: list[str],
    history: list,
    system: str | None,
    stdout: TextIO,
    stream: bool,
) -> tuple[str, list[list[str]]]:
    """Returns (response, new history) after writing the answer, piece by piece when streaming."""
    images = images or None
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
        prog="python -m pipeline.apps.chat_cli",
        description="Chat with a vision-language model (base, LoRA checkpoint or merged model) of any family.",
    )
    parser.add_argument("--model", help="base model folder (default: model.path of the run that made --ckpt)")
    parser.add_argument(
        "--ckpt", help="LoRA or merged checkpoint folder, or a run folder (default: the base model)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--system", default=None, help="system prompt")
    defaults = GenerationSettings()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
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
    try:
        family = family_of_folder(model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    generation = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
    }
    try:
        bundle, family = load_inference_bundle(
            model, args.ckpt, family=family, device=args.device, dtype=args.dtype
        )
        chat = Chat(family, bundle, generation=generation, system=args.system, seed=args.seed)
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
