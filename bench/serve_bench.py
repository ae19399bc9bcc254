"""Serving benchmark: requests/s and tokens/s of `python -m pipeline stages=[serve]` at 1, 8 and 32 concurrent
clients, against the same requests served one at a time, in one run against one server.

    python bench/serve_bench.py                                   # the tiny twin (a CPU smoke check)
    python bench/serve_bench.py --requests 128 --max-tokens 128 -- model=minicpm_v2 model.path=/models/MiniCPM-V-2
    python -m bench.serve_bench --model qwen2_5_vl --work /tmp/w  # Qwen2.5-VL-3B's sizes, random weights
    python -m bench.serve_bench --model qwen2_5_vl --tiny         # its tiny twin on the CPU

Everything after `--` goes to the entry point as overrides (default: ckpt=base on the tiny twin); `--model`
serves a model folder bench/entry_bench.py writes (full-size random weights, or `--tiny`'s twin) under `--work`. Each request
is one image (448x448 PNG as a data: URL, a different colour each) and a different question, answered
greedily with max_tokens; the server's batch limit is the largest concurrency. "one at a time" sends each
request after the previous answer (no batching possible); each concurrency level sends all requests through
that many clients. Tokens are the completion tokens the server reports in `usage`. `same answers` counts the
answers equal to the one-at-a-time answer of the same request (greedy decoding: all of them, up to the
numerics of batched kernels in low precision).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from pipeline.utils.io import atomic_write_json

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = (
    "What colour is the picture?",
    "Describe the image in one sentence.",
    "How many objects are there?",
    "What is shown here?",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_requests(n: int, max_tokens: int, side: int) -> list[dict]:
    """Returns n chat requests, each with its own question and image."""
    requests = []
    for i in range(n):
        buffer = io.BytesIO()
        colour = ((37 * i) % 256, (91 * i + 60) % 256, (153 * i + 120) % 256)
        Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        text = f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"
        content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
        requests.append(
            {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}
        )
    return requests


def start_server(port: int, overrides: list[str], batch: int, max_tokens: int, out: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "stages=[serve]",
        f"serve.port={port}",
        f"serve.max_batch_size={batch}",
        f"serve.max_new_tokens={max_tokens}",
        f"output_root={out}",
        *(overrides or ["ckpt=base"]),
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = open(out / "server.log", "w")  # noqa: SIM115 (kept open while the server runs)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until_up(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s; see {log}")


def send(client: httpx.Client, url: str, request: dict) -> dict:
    start = time.perf_counter()
    reply = client.post(f"{url}/v1/chat/completions", json=request, timeout=600)
    reply.raise_for_status()
    body = reply.json()
    return {
        "text": body["choices"][0]["message"]["content"],
        "tokens": body["usage"]["completion_tokens"],
        "latency": time.perf_counter() - start,
    }


def measure(url: str, requests: list[dict], clients: int) -> tuple[dict, list[str]]:
    """Returns the row of one level and its answers; clients=0 means one at a time."""
    start = time.perf_counter()
    with httpx.Client() as client:
        if clients == 0:
            results = [send(client, url, r) for r in requests]
        else:
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(lambda r: send(client, url, r), requests))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    latencies = sorted(r["latency"] for r in results)
    row = {
        "clients": "one at a time" if clients == 0 else clients,
        "requests": len(requests),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(requests) / wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "completion_tokens": tokens,
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_max_s": round(latencies[-1], 3),
    }
    return row, [r["text"] for r in results]


def same_prefix(answers: list[str], reference: list[str]) -> float:
    """Returns the mean share of each reference answer that `answers` repeats from its start."""
    shares = []
    for answer, ref in zip(answers, reference, strict=True):
        common = len(os.path.commonprefix([answer, ref]))
        shares.append(common / max(len(ref), 1))
    return round(statistics.fmean(shares), 3)


def bench_server(
    overrides: list[str],
    n_requests: int = 64,
    max_tokens: int = 64,
    concurrency: list[int] | tuple[int, ...] = (1, 8, 32),
    warmup: int = 4,
    image_side: int = 448,
    startup_timeout: float = 600,
    repeat_serial: bool = True,
) -> dict:
    """Returns the rows of one server (started with `overrides`): the requests one at a time, then through
    each number of concurrent clients; the server's log is kept in a temporary folder named in the result."""
    requests = make_requests(n_requests, max_tokens, image_side)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    started = time.perf_counter()
    process = start_server(port, overrides, max(concurrency), max_tokens, work)
    rows = []
    try:
        wait_until_up(url, process, startup_timeout, work / "server.log")
        up_s = time.perf_counter() - started
        warm = make_requests(warmup, max_tokens, image_side)
        measure(url, warm, 0)
        measure(url, warm, len(warm))  # warm the batched shapes (and, on a GPU, the graph capture) too
        serial, reference = measure(url, requests, 0)
        rows.append({**serial, "vs_one_at_a_time": 1.0, "same_answers": len(requests), "same_prefix": 1.0})
        # a second pass one at a time: how far repeated greedy answers agree on this device (the floor the
        # batched rows are read against; random weights in bf16 leave near-ties that flip)
        for clients in [0, *concurrency] if repeat_serial else concurrency:
            row, answers = measure(url, requests, clients)
            if clients == 0:
                row["clients"] = "one at a time, again"
            row["vs_one_at_a_time"] = round(row["requests_per_s"] / serial["requests_per_s"], 2)
            row["tokens_vs_one_at_a_time"] = round(row["tokens_per_s"] / serial["tokens_per_s"], 2)
            row["same_answers"] = sum(a == b for a, b in zip(answers, reference, strict=True))
            row["same_prefix"] = same_prefix(answers, reference)
            rows.append(row)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    import torch

    return {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "overrides": overrides or ["ckpt=base"],
        "max_tokens": max_tokens,
        "image_side": image_side,
        "server_up_s": round(up_s, 1),
        "server_log": str(work / "server.log"),
        "rows": rows,
    }


def table(result: dict) -> str:
    """Returns the rows of `bench_server` as a text table."""
    lines = [
        f"{'clients':>20} {'req/s':>8} {'tok/s':>9} {'x serial':>8} {'p50 s':>7} {'same':>6} {'prefix':>6}"
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['clients']!s:>20} {row['requests_per_s']:>8.2f} {row['tokens_per_s']:>9.1f} "
            f"{row['vs_one_at_a_time']:>8.2f} {row['latency_p50_s']:>7.2f} {row['same_answers']:>3}/{row['requests']} "
            f"{row.get('same_prefix', 1.0):>6.3f}"
        )
    return "\n".join(lines)


# --model: the model folders bench/entry_bench.py writes (full-size random weights, or --tiny's twins)
MODELS = {"minicpm_v2": "minicpm_v2", "qwen2_5_vl": "qwen2_5_vl_3b"}


def model_overrides(model: str, work: Path, tiny: bool) -> list[str]:
    """Returns the entry-point overrides serving `model` (MODELS) from a folder under `work`, written there
    when absent: the full-size random-weight model (bench/entry_bench.py), or with `tiny` its tiny twin on
    the CPU."""
    from bench.entry_bench import write_family_model, write_model

    if model == "minicpm_v2":
        folder = write_model(work / ("tiny" if tiny else "minicpm_v2_random"), tiny)
    else:
        folder = write_family_model(work / f"{model}_{'tiny' if tiny else 'random'}", model, tiny)
    config = f"{model}_tiny" if tiny else MODELS[model]
    return [f"model={config}", f"model.path={folder}", "ckpt=base", *(["device=cpu"] if tiny else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image-side", type=int, default=448)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--warmup", type=int, default=4, help="requests sent before measuring")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--model", choices=sorted(MODELS), help="serve this model, written under --work")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "serve-bench-work")
    parser.add_argument("--tiny", action="store_true", help="with --model: its tiny twin on the CPU")
    parser.add_argument("--out", default="bench/serve-results.json")
    parser.add_argument("overrides", nargs="*", help="entry-point overrides (after --)")
    args = parser.parse_args()

    overrides = list(args.overrides)
    if args.model:
        overrides = model_overrides(args.model, args.work, args.tiny) + overrides
    result = bench_server(
        overrides,
        args.requests,
        args.max_tokens,
        args.concurrency,
        args.warmup,
        args.image_side,
        args.startup_timeout,
    )
    print(table(result))
    atomic_write_json(args.out, result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
