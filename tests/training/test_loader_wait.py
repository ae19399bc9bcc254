"""data_wait_pct: the share of a logging window the loop spent waiting on the data loader, and the warning a
GPU run gets when its loader cannot keep up."""

from __future__ import annotations

import pytest
import torch

from pipeline.training.loop import DATA_WAIT_WARN_PCT, LoaderWait, loader_wait_warning


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_wait_is_the_time_inside_the_loaders_next_and_each_window_counts_its_own():
    clock = Clock()
    meter = LoaderWait(clock)

    def groups(waits):
        for seconds in waits:
            clock.now += seconds  # building the step's micro-batches
            yield [{"seconds": seconds}]

    source = groups([3.0, 1.0, 0.5])
    assert meter.next(source) == [{"seconds": 3.0}]
    clock.now += 1.0  # the step itself: not waiting
    assert meter.window_pct(elapsed=4.0) == 75.0
    meter.next(source)
    meter.next(source)
    assert meter.window_pct(elapsed=6.0) == 25.0  # 1.5 s of this window's 6
    with pytest.raises(StopIteration):
        meter.next(source)
    assert meter.waited == 4.5
    assert meter.window_pct(elapsed=1e-12) == 0.0
    clock.now += 2.0
    meter.waited += 2.0
    assert meter.window_pct(elapsed=1.0) == 100.0  # never above the window


def test_a_gpu_run_waiting_on_its_loader_is_told_which_knob_and_the_cpu_is_not():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    message = loader_wait_warning(46.4, 8, cuda)
    assert message is not None
    assert "46% of the steps' time" in message and "8 data worker(s)" in message
    assert "trainer.num_workers" in message and "CPU cores" in message
    assert loader_wait_warning(DATA_WAIT_WARN_PCT - 0.1, 8, cuda) is None
    assert loader_wait_warning(90.0, 0, cpu) is None  # the loop and the loader share the CPU's cores
