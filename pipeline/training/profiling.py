"""torch.profiler over a few optimizer steps of a training run (`trainer.profile_steps`).

The first steps of a run are skipped (data workers starting, compile and CUDA-graph recording, the
allocator warming up), one more is a profiler warm-up, then `steps` optimizer steps are recorded: CPU and,
on a GPU, CUDA activity. Written into `sft/profile/` when the recording ends:

    ops.txt      the operators by self time (CUDA on a GPU, else CPU), top 60, then the same by CPU time
    trace.json   the timeline, for chrome://tracing or https://ui.perfetto.dev

Only the main process profiles.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from pipeline.utils.io import atomic_write_text

SKIPPED_STEPS = 2  # not recorded: the run's start
WARMUP_STEPS = 1  # recorded by the profiler, then thrown away
TOP_OPS = 60


class StepProfiler:
    """Profiles optimizer steps; call `step()` after each one and `close()` at the end (or use `with`)."""

    def __init__(self, steps: int, folder: Path, device: torch.device, enabled: bool = True) -> None:
        self.folder = Path(folder)
        self.on_cuda = device.type == "cuda"
        self.written = False
        self._prof = None
        if steps <= 0 or not enabled:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_cuda else [])
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=SKIPPED_STEPS, warmup=WARMUP_STEPS, active=steps, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,
        )
        self._prof.__enter__()

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()

    def close(self) -> None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.__exit__(None, None, None)

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, prof) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        averages = prof.key_averages()
        first = "self_cuda_time_total" if self.on_cuda else "self_cpu_time_total"
        text = (
            f"torch.profiler over {prof.step_num - SKIPPED_STEPS - WARMUP_STEPS} optimizer step(s) after "
            f"{SKIPPED_STEPS + WARMUP_STEPS} unrecorded ones; sorted by {first}\n\n"
            + averages.table(sort_by=first, row_limit=TOP_OPS)
            + "\n\nsorted by cpu_time_total (where the Python and launch time goes)\n\n"
            + averages.table(sort_by="cpu_time_total", row_limit=TOP_OPS)
        )
        atomic_write_text(self.folder / "ops.txt", text)
        trace = self.folder / "trace.json"
        partial = trace.with_name(f".trace.json.{os.getpid()}.tmp")
        prof.export_chrome_trace(str(partial))
        os.replace(partial, trace)  # never a half-written timeline
        self.written = True


def compile_counts() -> tuple[int, int]:
    """Returns (graphs traced, graph breaks) by torch.compile in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0)), int(sum(counters["graph_break"].values()))


def compile_stats(since: tuple[int, int] = (0, 0)) -> dict[str, int]:
    """Returns what torch.compile did since the counts `since` (compile_counts()): `compiled_graphs` (graphs
    traced) and `graph_breaks` (places a traced function fell back to Python); empty where it did neither
    (a function that breaks before any graph falls back to Python whole: graphs 0, breaks > 0).
    A compiled layer that breaks runs as several graphs, each with its own guards, wrappers and backward, and
    no fusion across them: the numbers show whether the compiled step is whole."""
    graphs, breaks = compile_counts()
    if (graphs, breaks) == since:
        return {}
    return {"compiled_graphs": graphs - since[0], "graph_breaks": breaks - since[1]}


# how torch.compile names the break at a torch.compiler.disable'd function (one kept out of the graph on purpose)
DELIBERATE_BREAK = "torch.compiler.disable()"


# where torch.compile's reason names the function it would not trace ("Developer debug context: module: fla.x,
# qualname: f, skip reason: ...")
_SKIPPED_FUNCTION = re.compile(r"module: ([\w.]+), qualname: ([\w.<>]+)")


def graph_break_reasons(limit: int | None = 3) -> list[str]:
    """Returns the first line of the most frequent graph-break reasons in this process, with the function a
    break would not trace where the reason names it (for the log; every one with limit=None)."""
    from torch._dynamo.utils import counters

    reasons = sorted(counters["graph_break"].items(), key=lambda item: -item[1])[:limit]
    lines = []
    for reason, count in reasons:
        line = f"{count}x {reason.strip().splitlines()[0][:200]}"
        where = _SKIPPED_FUNCTION.search(reason)
        lines.append(f"{line} ({where.group(1)}.{where.group(2)})" if where else line)
    return lines


def deliberate(reasons: list[str]) -> bool:
    """Returns whether every graph-break reason is a function kept out of the graph on purpose
    (torch.compiler.disable: a kernel that runs as it is), so the code around it compiled whole."""
    return bool(reasons) and all(DELIBERATE_BREAK in reason for reason in reasons)
