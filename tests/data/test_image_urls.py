"""Image URLs and images that break later: checked up front like local files, fetched once into the cache,
and a batch that cannot be built during training saves the steps done before it stops."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data import images
from pipeline.data.rows import DatasetError
from pipeline.stages import sft
from pipeline.training.checkpoints import list_checkpoints
from pipeline.training.loop import TrainingError
from tests.helpers import FileServer, Trickle, run_stage, workdir_config, write_rows


def _png(size: tuple[int, int] = (40, 30), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def files_server():
    """An image server on localhost serving /red.png and /blue.png (404 for anything else)."""
    served = FileServer({"/red.png": _png(), "/blue.png": _png((50, 20), "blue")})
    yield served
    served.close()


@pytest.fixture
def server(files_server) -> str:
    return files_server.url


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture(autouse=True)
def quick_downloads(tmp_path, monkeypatch):
    """Short timeouts and a fresh URL cache for every test."""
    monkeypatch.setattr(images, "URL_CACHE_DIR", tmp_path / "url-cache")
    monkeypatch.setattr(images, "TIMEOUT_S", 0.3)
    monkeypatch.setattr(images, "RETRIES", 1)


def _workdir(tmp_path: Path, twin: Path, train: list[dict], val: list[dict]) -> Path:
    (tmp_path / "tiny").symlink_to(twin)
    Image.new("RGB", (40, 30), "green").save(tmp_path / "green.png")
    write_rows(tmp_path / "train.jsonl", train)
    write_rows(tmp_path / "val.jsonl", val)
    return tmp_path


def _cfg(workdir: Path, *overrides: str):
    return workdir_config(
        workdir,
        "stages=[sft]",
        "trainer.max_steps=4",
        "trainer.batch_size=1",
        "trainer.save_steps=100",
        "trainer.eval_steps=100",
        "trainer.max_eval_samples=1",
        "model.gradient_checkpointing=false",
        *overrides,
    )


def _rows(images_: list[str]) -> list[dict]:
    return [
        {"query": f"colour {i}?", "response": "a colour", "images": [ref]} for i, ref in enumerate(images_)
    ]


def test_a_404_and_a_silent_server_are_reported_as_file_line_before_training(
    tmp_path, tiny_twin, server, silent_server
):
    train = _rows(["green.png", f"{server}/gone.png", f"{silent_server}/x.png", "green.png"])
    workdir = _workdir(tmp_path, tiny_twin, train, _rows(["green.png"]))
    with pytest.raises(DatasetError) as caught:
        run_stage(sft, _cfg(workdir), tmp_path / "run")
    message = str(caught.value)
    assert f"{workdir / 'train.jsonl'}:2: image {server}/gone.png: download failed" in message
    assert "404" in message
    assert (
        f"{workdir / 'train.jsonl'}:3: image {silent_server}/x.png: download failed after 2 attempt(s)"
        in (message)
    )
    assert "no answer within 0.3 s" in message
    assert not (tmp_path / "run" / "sft").exists() or not list_checkpoints(tmp_path / "run" / "sft")


def test_a_bad_url_row_is_skipped_with_on_error_skip(tmp_path, tiny_twin, server, silent_server):
    train = _rows([f"{server}/red.png", f"{server}/gone.png", f"{silent_server}/x.png", "green.png"] * 2)
    workdir = _workdir(tmp_path, tiny_twin, train, _rows(["green.png"]))
    out = run_stage(sft, _cfg(workdir, "dataset.on_error=skip"), tmp_path / "run")
    assert out["sft"]["train_rows"] == 4 and out["sft"]["global_step"] == 4
    problems = (tmp_path / "run" / "sft" / "dataset_problems.jsonl").read_text()
    assert problems.count("download failed") == 4


def test_a_working_url_is_downloaded_once_for_validation_training_and_evaluation(
    files_server, tmp_path, tiny_twin, server
):
    red, blue = f"{server}/red.png", f"{server}/blue.png"
    workdir = _workdir(tmp_path, tiny_twin, _rows([red, blue, red, "green.png"]), _rows([blue]))
    out = run_stage(sft, _cfg(workdir, "trainer.eval_steps=2"), tmp_path / "run")
    assert out["sft"]["global_step"] == 4  # 4 steps of batch 1: every training row read once at least
    assert sorted(files_server.hits) == ["/blue.png", "/red.png"]
    cached = sorted(p.name for p in (tmp_path / "url-cache").iterdir())
    assert cached == sorted(images.url_cache_path(u, Path(".")).name for u in (red, blue))


def test_a_download_cut_off_while_writing_leaves_nothing_in_the_cache(tmp_path, server, monkeypatch):
    import pipeline.utils.io as io_module

    def disk_fails(fd):
        raise OSError("I/O error while writing")

    with monkeypatch.context() as patch:
        patch.setattr(io_module.os, "fsync", disk_fails)
        with pytest.raises(OSError, match="I/O error"):
            images.load_image(f"{server}/red.png")
    assert list((tmp_path / "url-cache").iterdir()) == []  # no half-written image, no temp file
    assert images.load_image(f"{server}/red.png").size == (40, 30)
    assert [p.name for p in (tmp_path / "url-cache").iterdir()] == [
        images.url_cache_path(f"{server}/red.png", Path(".")).name
    ]


def test_an_image_that_breaks_during_training_saves_a_checkpoint_then_names_the_row(
    tmp_path, tiny_twin, monkeypatch
):
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (40, 30), "red").save(tmp_path / f"{name}.png")
    workdir = _workdir(tmp_path, tiny_twin, _rows(["a.png", "b.png", "c.png", "d.png"]), _rows(["green.png"]))
    real_load = images.ImageFiles.load
    loads = {"n": 0}

    def load_then_break(self, ref):
        loads["n"] += 1
        if loads["n"] == 4:  # step 0's eval reads 1 image, steps 1 and 2 one each, step 3 breaks
            raise images.ImageLoadError(f"{ref}: cannot decode image (truncated)")
        return real_load(self, ref)

    with monkeypatch.context() as patch:
        patch.setattr(images.ImageFiles, "load", load_then_break)
        with pytest.raises(TrainingError) as caught:
            run_stage(sft, _cfg(workdir), tmp_path / "run")
    message = str(caught.value)
    sft_dir = tmp_path / "run" / "sft"
    assert [p.name for p in list_checkpoints(sft_dir)] == ["checkpoint-2"]
    assert message.startswith("the batch of step 3 could not be built: ")
    assert f"{workdir / 'train.jsonl'}:" in message and "cannot decode image (truncated)" in message
    assert f"newest checkpoint: {sft_dir / 'checkpoint-2'}" in message
    out = run_stage(sft, _cfg(workdir), tmp_path / "run")  # the same command resumes and finishes
    assert out["sft"]["resumed_from"].endswith("checkpoint-2") and out["sft"]["global_step"] == 4


def test_a_url_that_serves_no_image_is_not_kept_in_the_cache(files_server, tmp_path, server):
    files_server.files["/page.png"] = b"<html>not found</html>"
    with pytest.raises(images.ImageLoadError, match="cannot decode image.*dropped from the cache"):
        images.load_image(f"{server}/page.png")
    assert list((tmp_path / "url-cache").iterdir()) == []
    files_server.files["/page.png"] = _png()  # fixed on the server: the next use downloads it again
    assert images.load_image(f"{server}/page.png").size == (40, 30)


def test_a_dataset_url_that_trickles_is_cut_at_the_deadline_and_private_hosts_are_allowed(server):
    # a row's URL is the user's own, as trusted as a local path: loopback is fetched (the server's URLs are
    # not: tests/apps/test_serve_urls.py)
    assert images.load_image(f"{server}/red.png").size == (40, 30)
    source = Trickle(b"HTTP/1.0 200 OK\r\n\r\n", every=0.1)  # each read gets a byte well within the timeout
    try:
        with pytest.raises(images.ImageLoadError, match="download failed after 1 attempt.*took over 1 s"):
            images.fetch_url(source.url, timeout=0.3, deadline=1.0, retries=0)
    finally:
        source.close()
