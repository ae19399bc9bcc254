"""trainer.profile_steps: torch.profiler over a few optimizer steps of a run, written into sft/profile/."""

from __future__ import annotations

import json
import threading

from tests.helpers import REPO_ROOT, log_records, run_entry


def test_profile_steps_write_the_ops_table_and_the_timeline(pretrained_twin, tmp_path):
    # (without trainer.profile_steps no profile folder is written: tests/stages/test_sft.py)
    steps = 2
    run = tmp_path / "run"
    args = ["+experiment=lora_qkv", f"model.path={pretrained_twin}", "tracking=none", "stages=[sft]",
            "device=cpu", "trainer.max_steps=6", "trainer.logging_steps=1", "trainer.eval_steps=100",
            "trainer.max_eval_samples=2", f"trainer.profile_steps={steps}", f"hydra.run.dir={run}"]  # fmt: skip
    proc = run_entry(args, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = run / "sft" / "profile"
    ops = (folder / "ops.txt").read_text()
    assert ops.startswith("torch.profiler over 2 optimizer step(s) after 3 unrecorded ones")
    # the model's own work is in the table: matmuls of the LLM and the optimizer's update
    assert "aten::mm" in ops or "aten::addmm" in ops or "aten::linear" in ops
    assert "Self CPU" in ops
    trace = json.loads((folder / "trace.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert sum(name.startswith("ProfilerStep#") for name in names) == 2  # the recorded steps only
    # every planned step still ran and was logged
    logged = log_records(run / "sft")
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # and each step's record says how much of it waited on the data loader
    assert all(0.0 <= r["data_wait_pct"] <= 100.0 for r in logged if "loss" in r)


def test_graph_break_reasons_tell_a_function_kept_out_of_the_graph_from_a_real_break():
    """The training log warns about graph breaks, but not about functions kept out of the graph on purpose
    (torch.compiler.disable: fla's kernels, the packed linear-attention fallback)."""
    import torch

    from pipeline.training.profiling import deliberate, graph_break_reasons

    @torch.compiler.disable
    def outside(x):
        return x + 1

    def kept_out(x):
        return outside(x * 2) * 3

    def broken(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y * 3

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.compile(kept_out, backend="eager")(torch.ones(2))
    assert deliberate(graph_break_reasons())
    torch.compile(broken, backend="eager")(torch.ones(2))
    assert not deliberate(graph_break_reasons()) and not deliberate([])

    def untraceable(x):  # a C function Dynamo skips: the warning names it
        threading.get_ident()
        return x * 3

    torch._dynamo.utils.counters.clear()
    torch.compile(untraceable, backend="eager")(torch.ones(2))
    (reason,) = graph_break_reasons()
    assert reason.startswith("1x ") and reason.endswith(" (_thread.get_ident)")
