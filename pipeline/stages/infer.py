"""infer: answer queries with the fine-tuned model, in a batch over a file or the held-out rows, or as a chat.

    python -m pipeline stages=[infer] ckpt=outputs/<exp>/<time>                      # held-out rows
    python -m pipeline stages=[infer] infer.ckpt=<ckpt>-merged infer.input=queries.jsonl
    python -m pipeline stages=[infer] ckpt=outputs/<exp>/<time> infer.interactive=true   # chat on the terminal

Which weights: infer.ckpt, else this run's merged model, else this run's (or `ckpt`'s) checkpoint, else the
base model. infer.input is a .jsonl (or .json list) in any row format of the custom dataset (query/response,
messages, ShareGPT, Alpaca); the response is optional there and, when given, is written as the label. Reads: model, dataset, infer, seed. Writes run_dir/infer/results.jsonl,
one row per answer {system, query, response, label, history, images} (interactive: one row per turn), and
run_dir/infer/timing.json {load_s, generate_s, rows}: the model's load and the generation, timed apart.
Returns {"infer": results path}.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.apps.chat import Chat
from pipeline.apps.chat_cli import run_chat
from pipeline.apps.generation import (
    GENERATION_KEYS,
    generate_for_rows,
    generation_settings,
    load_inference_bundle,
)
from pipeline.config import resolve_device
from pipeline.data.images import ImageFiles
from pipeline.data.prepare import RawRows, read_dataset, split_dataset
from pipeline.data.rows import DatasetError, Row
from pipeline.data.validate import check_videos, image_count_problems, record_to_row, video_count_problems
from pipeline.families import family_from_config, image_limit, video_limit
from pipeline.families.base import Bundle, Family, VideoLimits
from pipeline.families.generation_settings import GenerationSettings
from pipeline.stages.state import RunState
from pipeline.utils.io import append_jsonl, atomic_write_json, atomic_write_text
from pipeline.utils.memory import advice_on_out_of_memory, halved, resolution_knob

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
TIMING_FILE = "timing.json"  # seconds spent loading the model and generating, apart


class _InvalidJson(str):
    """A line of the input file that is not JSON (its parse error), kept in line order with the records."""


def settings_from_config(cfg: DictConfig) -> GenerationSettings:
    """Returns the generation settings of the infer section (greedy unless infer.do_sample)."""
    return generation_settings({key: cfg.infer[key] for key in GENERATION_KEYS})


def read_infer_input(
    path: str | Path, limit: tuple[int, str] | None = None, videos: VideoLimits | None = None
) -> tuple[list[Row], list[str | None]]:
    """Returns the rows of a custom-format .jsonl/.json file and their labels (None where no response is given);
    `limit` is (images per conversation, model name) of the family that answers them, `videos` what it takes
    of videos (their headers are checked too).

    Raises DatasetError naming the file, line and problem of every unusable record.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise DatasetError(f"infer.input={path}: unsupported file type '{path.suffix}'; use .jsonl or .json")
    if not path.is_file():
        raise DatasetError(f"infer.input={path}: file not found")
    records: list[tuple[str, object]] = []
    text = path.read_text(encoding="utf-8-sig")  # a leading byte order mark is not part of the data
    problems: list[str] = []
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    records.append(
                        (f"{path}:{number}", _InvalidJson(f"invalid JSON: {exc.msg} (column {exc.colno})"))
                    )
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: a .json input file must hold a list of row objects")
        records = [(f"{path}:item {n}", record) for n, record in enumerate(data, start=1)]
    rows: list[Row] = []
    labels: list[str | None] = []
    for origin, record in records:
        if isinstance(record, _InvalidJson):
            problems.append(f"{origin}: {record}")
            continue
        parsed = record_to_row(record, origin, path.parent.resolve(), need_response=False)
        if isinstance(parsed, Row) and limit is not None and len(parsed.images) > limit[0]:
            parsed = [problem.reason for _, problem in image_count_problems([parsed], *limit)]
        if isinstance(parsed, Row) and parsed.videos:
            found = video_count_problems([parsed], videos) if videos is not None else []
            found = found or check_videos([parsed], limits=videos)
            parsed = [problem.reason for _, problem in found] or parsed
        if isinstance(parsed, Row):
            rows.append(parsed)
            labels.append(parsed.response or None)
        else:
            problems += [f"{origin}: {reason}" for reason in parsed]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise DatasetError(f"infer.input={path} has {len(problems)} problem(s): {shown}")
    if not rows:
        raise DatasetError(
            f'infer.input={path} holds no rows; expected {{"query": ..., "images": [...]}} lines'
        )
    return rows, labels


def read_inputs(cfg: DictConfig) -> tuple[list[Row], list[str | None]] | RawRows:
    """Returns the rows of infer.input and their labels, else the dataset's rows (to split once tokenized)."""
    if cfg.infer.input is not None:
        return read_infer_input(cfg.infer.input, image_limit(cfg.model), video_limit(cfg.model))
    return read_dataset(cfg.dataset, cfg.seed, image_limit(cfg.model), video_limit(cfg.model))


def input_rows(
    cfg: DictConfig, family: Family, bundle: Bundle, infer_dir: Path, inputs: tuple | RawRows | None = None
) -> tuple[list[Row], list[str | None]]:
    """Returns the rows to answer (infer.input, else the held-out split) and their labels, at most max_samples.

    `inputs` is what read_inputs returned (read before the model loaded); None reads them now.
    """
    inputs = read_inputs(cfg) if inputs is None else inputs
    if not isinstance(inputs, RawRows):
        rows, labels = inputs
    else:
        splits = split_dataset(
            inputs,
            cfg.dataset,
            cfg.seed,
            family.token_counter(bundle, cfg.dataset.max_length, cfg.dataset.truncation, ImageFiles()),
            problems_path=infer_dir / "dataset_problems.jsonl",
        )
        if not splits.val:
            raise DatasetError(
                f"dataset {cfg.dataset.name} has no held-out rows to answer: set infer.input=<file.jsonl>, "
                "dataset.val_path=<file> or dataset.test_ratio > 0"
            )
        rows, labels = splits.val, [row.response for row in splits.val]
    limit = cfg.infer.max_samples
    if limit is not None:
        rows, labels = rows[:limit], labels[:limit]
    return rows, labels


def result_record(row: Row, response: str, label: str | None) -> dict:
    """Returns one results.jsonl row."""
    return {
        "system": row.system,
        "query": row.query,
        "response": response,
        "label": label,
        "history": [list(pair) for pair in row.history],
        "images": list(row.images),
        **({"videos": list(row.videos)} if row.videos else {}),
    }


def run(cfg: DictConfig, run_dir: Path, state: RunState) -> dict:
    """Answers queries and returns {"infer": path of results.jsonl}."""
    infer_dir = Path(run_dir) / "infer"
    infer_dir.mkdir(parents=True, exist_ok=True)
    results = infer_dir / RESULTS_FILE
    device = resolve_device(cfg)
    ckpt = state.weights_for("infer", cfg)
    settings = settings_from_config(cfg)
    inputs = None if cfg.infer.interactive else read_inputs(cfg)  # read and checked before the weights
    started = time.perf_counter()
    bundle, family = load_inference_bundle(
        state.model_path,
        ckpt,
        family=family_from_config(cfg.model),
        device=device,
        dtype=str(cfg.model.dtype),
        allow_download=cfg.model.trust_hub,
        quantization=cfg.model.quantization,
    )
    load_s = time.perf_counter() - started
    log.info("infer with %s", ckpt if ckpt is not None else f"the base model {bundle.base_path}")

    if cfg.infer.interactive:
        chat = Chat(family, bundle, generation=settings, system=cfg.dataset.system, seed=cfg.seed)
        turns = run_chat(
            chat,
            sys.stdin,
            sys.stdout,
            stream=cfg.infer.stream,
            record=lambda turn: append_jsonl(results, {**turn, "label": None}),
        )
        log.info("infer: %d turn(s) recorded in %s", turns, results)
        return {"infer": results}

    rows, labels = input_rows(cfg, family, bundle, infer_dir, inputs)
    generator = torch.Generator(family.device_of(bundle)).manual_seed(int(cfg.seed))
    started = time.perf_counter()
    spent: dict[str, float] = {}
    knobs = [
        halved("infer.batch_size", cfg.infer.batch_size),
        halved("infer.max_new_tokens", settings.max_new_tokens),
        *resolution_knob(family.resolution_setting),
    ]
    with advice_on_out_of_memory(f"in the infer stage ({len(rows)} rows)", knobs):
        responses = generate_for_rows(
            family,
            bundle,
            rows,
            settings,
            cfg.infer.batch_size,
            generator=generator,
            desc="infer",
            timing=spent,
        )
    timing = {
        "load_s": round(load_s, 3),
        "generate_s": round(time.perf_counter() - started, 3),
        **spent,
        "rows": len(rows),
    }
    atomic_write_json(infer_dir / TIMING_FILE, timing)
    log.info(
        "infer: model loaded in %.1f s; %d row(s) answered in %.1f s", load_s, len(rows), timing["generate_s"]
    )
    lines = [
        json.dumps(result_record(row, response, label), ensure_ascii=False)
        for row, response, label in zip(rows, responses, labels, strict=True)
    ]
    atomic_write_text(results, "".join(line + "\n" for line in lines))
    for row, response in list(zip(rows, responses, strict=True))[:3]:
        log.info("query: %s\nresponse: %s", row.query, response)
    log.info("infer: %d answer(s) written to %s", len(rows), results)
    return {"infer": results}
