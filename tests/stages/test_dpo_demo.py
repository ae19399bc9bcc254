"""The preference demo teaches something: dpo from the pre-trained twin on the bundled pairs lifts the held-out
preference accuracy to 0.9 or more, moves its greedy answers from the bare colour to the chosen sentence (some
of them with dpo's defaults, nearly all with the SFT term on the chosen answer), and the run ends with the
before/after table."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_entry, run_folders


def demo_run(tmp_path, *extra: str) -> tuple[str, dict, list[dict]]:
    """Runs dpo then eval on the bundled preference demo through the entry point; returns its output, the
    before/after comparison and the dpo stage's logged records."""
    out = tmp_path / "out"
    args = [
        "+experiment=dpo",
        "stages=[dpo,eval]",
        "model.gradient_checkpointing=false",
        f"output_root={out}",
        *extra,
    ]
    proc = run_entry(args, tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_folders(out)
    comparison = json.loads((run_dir / "eval" / "comparison.json").read_text())
    records = [json.loads(line) for line in (run_dir / "dpo" / "logging.jsonl").read_text().splitlines()]
    return proc.stdout, comparison, records


# Without an SFT term, how many greedy answers end on the chosen sentence after 60 steps depends on the CPU's
# float kernels (0.96 of the held-out rows on one machine, 0.42 on an AVX-512-FP16 one; data/README.md); the
# preference accuracy does not. With preference.rpo_alpha=1.0 most of them move: 0.96-1.00 over seeds 1, 2, 42
# on the AVX-512-FP16 machine; 1.00, 1.00 and 0.75 on an AVX-512-BF16 one.
@pytest.mark.parametrize(("extra", "min_exact"), [((), 0.0), (("preference.rpo_alpha=1.0",), 0.5)])
def test_dpo_on_the_preference_demo_lifts_the_preference_accuracy_and_moves_the_answers(
    pretrained_twin, tmp_path, extra, min_exact
):
    stdout, comparison, records = demo_run(tmp_path, *extra)
    base, tuned = comparison["base"], comparison["finetuned"]
    # below chance: half the pairs reject the twin's own answer, the bare colour (data/README.md)
    assert base["pref_accuracy"] <= 0.5, comparison
    assert tuned["pref_accuracy"] >= 0.9, comparison
    assert tuned["pref_margin"] > base["pref_margin"] + 5, comparison
    # greedy answers: the bare colour before (no exact match), the chosen sentence after
    assert base["exact_match"] == 0.0, comparison
    assert tuned["exact_match"] > min_exact, comparison
    table = stdout[stdout.index("before/after fine-tuning") :]
    assert "pref_accuracy" in table and "exact_match" in table and "fine-tuned" in table
    last = [r for r in records if "eval_rewards/accuracies" in r][-1]
    assert last["eval_rewards/accuracies"] >= 0.9 and last["eval_rewards/margins"] > 0


def test_kto_on_the_preference_demo_read_as_labelled_rows_lifts_the_preference_accuracy(
    pretrained_twin, tmp_path
):
    # each pair two labelled rows; KTO's loss, 1 - sigmoid, pulls more gently than DPO's: 60 steps lift the
    # held-out preference accuracy from 0.04 to 0.50, 120 to 0.96 (this project's CPU)
    _, comparison, records = demo_run(tmp_path, "preference.loss_type=kto", "trainer.max_steps=120")
    base, tuned = comparison["base"], comparison["finetuned"]
    assert base["pref_accuracy"] <= 0.5 and tuned["pref_accuracy"] >= 0.8, comparison
    assert tuned["pref_margin"] > base["pref_margin"] + 5, comparison
    last = [r for r in records if "eval_kl" in r][-1]
    # desirable up, undesirable down
    assert last["eval_rewards/chosen"] > 0 > last["eval_rewards/rejected"], last
