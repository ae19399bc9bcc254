"""Plain helpers the tests share (no fixtures: those are in tests/conftest.py): composed configs, JSON-lines
files, run folders and their logs, fresh interpreters, free ports, and twin folders built or copied."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from pipeline.config import register_configs

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
# the `lora` config node of lora=all at rank 4 without dropout, for Family.prepare_training in model-level tests
LORA_ALL = OmegaConf.create(
    {
        "name": "all",
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "target_modules": None,
        "modules_to_save": [],
        "bias": "none",
    }
)


# ----- configs


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Return the config `python -m pipeline <overrides>` would run with (no run folder is made)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="test"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def twin_config(twin: Path, *overrides: str) -> DictConfig:
    """The composed config for the model at `twin`, without tracking, with `overrides` after."""
    return compose_config([f"model.path={twin}", "tracking=none", *overrides])


def workdir_config(workdir: Path, *overrides: str) -> DictConfig:
    """The composed config for a folder holding the tiny twin (`tiny/`) and custom-format `train.jsonl` and
    `val.jsonl`, on the CPU, with `overrides` after."""
    return compose_config(
        [
            f"model.path={workdir / 'tiny'}",
            "dataset=custom",
            f"dataset.path={workdir / 'train.jsonl'}",
            f"dataset.val_path={workdir / 'val.jsonl'}",
            "device=cpu",
            *overrides,
        ]
    )


# ----- JSON-lines files


def write_rows(path: Path, rows: Sequence[object], bom: bool = False) -> Path:
    """Return `path` after writing `rows` to it as JSON lines (UTF-8, after a byte-order mark when `bom`): a
    string is written as it is (a line that is not JSON, say), anything else as its JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(
        (row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n" for row in rows
    )
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def read_rows(path: Path) -> list[dict]:
    """Return the records of the JSON-lines file at `path` (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----- run folders and their logs


def run_folders(root: Path) -> list[Path]:
    """Return the run folders (those holding a run.json) under `root`, sorted."""
    return sorted(p.parent for p in root.rglob("run.json"))


def log_records(sft_dir: Path) -> list[dict]:
    """Return the records of an sft folder's logging.jsonl (train steps, evaluations, the end)."""
    return read_rows(sft_dir / "logging.jsonl")


def losses_by_step(sft_dir: Path) -> dict[int, float]:
    """Return {step: train loss} from an sft folder's log."""
    return {r["step"]: r["loss"] for r in log_records(sft_dir) if "loss" in r}


def eval_losses(sft_dir: Path) -> dict[int, float]:
    """Return {step: eval loss} from an sft folder's log (step 0: the model before training)."""
    return {r["step"]: r["eval_loss"] for r in log_records(sft_dir) if "eval_loss" in r}


# ----- processes


def run_python(command: Sequence[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run `command` (a fresh interpreter, torchrun, accelerate ...) with this checkout importable, one
    thread per process and Hydra's short error messages; return it finished, output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_entry(args: Sequence[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run `python -m pipeline <args>` in a fresh interpreter started in `cwd` (see run_python)."""
    return run_python([sys.executable, "-m", "pipeline", *args], cwd, timeout)


def free_port() -> int:
    """A TCP port nobody listens on now (for a launcher's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----- twin folders (the shared, session-wide twins are conftest's fixtures)


def copy_twin(twin: Path, folder: Path) -> Path:
    """Return `folder` after copying the twin at `twin` there: a test's own copy of a shared twin, to write
    into or to lay out next to its data (a twin folder is a few MB, copied in milliseconds)."""
    return Path(shutil.copytree(twin, folder, symlinks=True))


def build_varied_twin(family, folder: Path) -> Path:
    """Builds `family`'s tiny twin at `folder` with its matrices redrawn at std 0.2 (seeded), so that greedy
    answers differ from prompt to prompt and are long enough to stream."""
    family.build_tiny(folder)
    model, processor = family.load(folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2, generator=generator)
    family.save(model, processor, folder)
    return folder


def run_state(cfg: DictConfig, **fields: object):
    """Returns the run state the entry point resolves from `cfg`, then `fields` (ckpt, merged, ...) as earlier
    stages of the same run would have left them."""
    from pipeline.stages.state import RunState

    state = RunState.resolve(cfg)
    state.update(fields)
    return state


def run_stage(stage, cfg: DictConfig, run_dir: Path, **fields: object) -> dict:
    """Runs a stage module's `run` as the entry point would, on run_state(cfg, **fields)."""
    return stage.run(cfg, run_dir, run_state(cfg, **fields))


class FileServer:
    """An HTTP server on localhost serving `files` (path -> bytes, 404 for anything else) on a thread, and
    `redirects` (path -> the Location of a 302); `hits` lists the paths asked for, `files` may change while it
    serves. Stop it with `close()`."""

    def __init__(self, files: dict[str, bytes], redirects: dict[str, str] | None = None) -> None:
        import http.server
        import threading

        owner = self
        self.files = dict(files)
        self.redirects = dict(redirects or {})
        self.hits: list[str] = []
        self.hosts: list[str | None] = []  # the Host header of each request

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits.append(self.path)
                owner.hosts.append(self.headers.get("Host"))
                if self.path in owner.redirects:
                    self.send_response(302)
                    self.send_header("Location", owner.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Trickle:
    """A server on localhost that answers every connection with `lead` at once, then one byte of an endless
    answer every `every` seconds until the client hangs up or `close()`; `open` counts the connections
    being answered now, `most` the most there were at once."""

    def __init__(self, lead: bytes = b"", every: float = 0.5) -> None:
        import threading

        self.lead, self.every = lead, every
        self.open = self.most = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(32)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/slow.png"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with self._lock:
            self.open += 1
            self.most = max(self.most, self.open)
        try:
            conn.recv(4096)  # the request
            if self.lead:
                conn.sendall(self.lead)
            answer = b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n" if not self.lead else b""
            position = 0
            while not self._stop.wait(self.every):
                conn.sendall(answer[position : position + 1] if position < len(answer) else b"\x00")
                position += 1
        except OSError:
            pass  # the client hung up
        finally:
            conn.close()
            with self._lock:
                self.open -= 1

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


# ----- Hugging Face datasets


def colour_image(k: int, size: tuple[int, int] = (40, 30)):
    """A small PIL image whose colour depends on k."""
    from PIL import Image

    return Image.new("RGB", size, ((k * 60) % 256, (k * 110) % 256, (k * 170) % 256))


def hf_caption_dataset(n: int, *, image_list: bool = False):
    """A datasets.Dataset of n query/response rows with a datasets.Image column ("image", or a list of one
    image "images" when `image_list`), built the ordinary way: from PIL images, which datasets stores as bytes."""
    import datasets

    image = datasets.Image()
    features = {"query": datasets.Value("string"), "response": datasets.Value("string")}
    columns = {
        "query": [f"what colour is picture {k}?" for k in range(n)],
        "response": [f"colour {k}" for k in range(n)],
    }
    if image_list:
        features["images"] = datasets.List(image)
        columns["images"] = [[colour_image(k)] for k in range(n)]
    else:
        features["image"] = image
        columns["image"] = [colour_image(k) for k in range(n)]
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def write_hf_dataset(dataset, folder: Path, form: str) -> Path:
    """Returns the path a dataset was written to in `form`: "parquet" (to_parquet) or "disk" (save_to_disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    if form == "parquet":
        dataset.to_parquet(str(folder / "train.parquet"))
        return folder / "train.parquet"
    dataset.save_to_disk(str(folder / "saved"))
    return folder / "saved"


# ----- videos


def write_test_video(
    path: str | os.PathLike, frames: int = 8, width: int = 64, height: int = 48, fps: int = 4, seed: int = 0
) -> Path:
    """Return `path` after writing a small video of moving coloured noise there (mpeg4, by PyAV)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(frames):
            image = np.roll(base, shift=3 * k, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def loss_and_grads(family, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (the summed loss, every parameter's gradient) of one backward pass of `batch` through the family's
    loss (mean over its tokens)."""
    model.zero_grad(set_to_none=True)
    sums = family.loss_outputs(model, batch)
    (sums.loss_sum / sums.num_tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sums.loss_sum.detach(), grads


@contextmanager
def step_fails_at(monkeypatch, step: int, message: str) -> Iterator[None]:
    """Within it, the training loop's micro-step after optimizer step `step` raises RuntimeError(message) (a
    crash mid-run); the real step is back after it."""
    from pipeline.training import loop

    real = loop.Trainer._step

    def failing(self, micro):
        if self.state.global_step == step:
            raise RuntimeError(message)
        return real(self, micro)

    monkeypatch.setattr(loop.Trainer, "_step", failing)
    try:
        yield
    finally:
        monkeypatch.setattr(loop.Trainer, "_step", real)
