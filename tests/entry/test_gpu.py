"""GPU checks (`pytest -m gpu` on a CUDA machine): the compiled training path and the CUDA-graph decode on
the tiny twin give what the plain paths give, and the whole pipeline runs on the card."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.families.minicpm_v2.checkpoint import check_checkpoint
from pipeline.families.minicpm_v2.generation import GenerationSettings, generate
from pipeline.families.minicpm_v2.modeling import MiniCPMV
from pipeline.stages import sft
from pipeline.training.plan import TOWER_CARD_GIB
from tests.helpers import eval_losses, losses_by_step, run_stage, twin_config
from tests.stages.test_sft import SHORT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
REPO = Path(__file__).resolve().parents[2]


def run_sft(twin: Path, folder: Path, *overrides: str) -> Path:
    cfg = twin_config(twin, *SHORT, "device=cuda", "trainer.mixed_precision=bf16", *overrides)
    run_stage(sft, cfg, folder)
    return folder / "sft"


def test_compiled_training_steps_equal_the_plain_ones_on_cuda(pretrained_twin, tmp_path):
    plain = run_sft(pretrained_twin, tmp_path / "plain", "trainer.compile=false")
    compiled = run_sft(pretrained_twin, tmp_path / "compiled", "trainer.compile=true")
    a, b = losses_by_step(plain), losses_by_step(compiled)
    assert sorted(a) == sorted(b) and len(a) == 6
    for step in a:  # bf16 autocast; the compiled layers fuse differently, so rounding differs a little
        assert b[step] == pytest.approx(a[step], rel=3e-2, abs=2e-2), (step, a, b)
    ea, eb = eval_losses(plain), eval_losses(compiled)
    assert sorted(ea) == sorted(eb)
    for step in ea:  # evaluation inside training runs the plain layers
        assert eb[step] == pytest.approx(ea[step], rel=3e-2, abs=2e-2), (step, ea, eb)


@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_decode_equals_the_eager_loop(pretrained_twin, batch):
    model = MiniCPMV.from_pretrained(pretrained_twin).to("cuda", torch.float32).eval()
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(200, model.config.vocab_size - 1, (batch, 40), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding on the first row
    ids[0, :5] = 0
    outs = {}
    with torch.no_grad():
        for name, static, graph in (("eager", False, False), ("static", True, False), ("graph", True, True)):
            outs[name] = generate(
                model,
                ids.cuda(),
                mask.cuda(),
                settings=GenerationSettings(max_new_tokens=24),
                eos_token_id=-1,
                static=static,
                cuda_graph=graph,
            )
    assert outs["eager"].shape == (batch, 24)
    assert torch.equal(outs["static"], outs["eager"])
    assert torch.equal(outs["graph"], outs["eager"])


def test_the_whole_pipeline_runs_on_cuda_with_compile(pretrained_twin, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "+experiment=lora_qkv",
        f"model.path={pretrained_twin}",
        "device=cuda",
        "trainer.compile=true",
        "trainer.max_steps=8",
        "tracking=none",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "sft" / "summary.json").read_text())
    assert summary["global_step"] == 8
    assert (run / "eval" / "metrics.json").is_file()
    merged = Path(json.loads((run / "merge" / "merge_info.json").read_text())["output"])
    assert any(merged.glob("*.safetensors"))
    results = [json.loads(line) for line in (run / "infer" / "results.jsonl").read_text().splitlines()]
    assert results and all(isinstance(r["response"], str) and r["query"] for r in results)


@pytest.mark.parametrize(
    ("engine", "experiment", "family"),
    [("fsdp", "lora_qkv", "minicpm_v2"), ("fsdp", "full", "minicpm_v2"), ("deepspeed_zero3", "lora_qkv", "minicpm_v2"),
     ("deepspeed_zero3", "full", "minicpm_v2"), ("fsdp", "lora_all", "qwen2_5_vl"), ("fsdp", "full", "minicpm_v4_6")],
)  # fmt: skip
def test_sharded_run_resumes_like_an_uninterrupted_one(
    pretrained_twin, family_twin, tmp_path, engine, experiment, family
):
    # accelerate's own FSDP2 wrapping (in the loaded model's own units, the config naming none) or DeepSpeed
    # engine on every card of the machine: the checkpoint gathers the shards, and a run resumed from it
    # repeats the uninterrupted run's losses
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    gpus = torch.cuda.device_count()
    twin = pretrained_twin if family == "minicpm_v2" else family_twin(family)
    model = [] if family == "minicpm_v2" else [f"model={family}_tiny"]

    def launch(run: Path) -> None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "bench" / "accelerate" / f"{engine}.yaml"), "--num_processes", str(gpus), "-m", "pipeline",
               f"+experiment={experiment}", *model, f"model.path={twin}", "device=cuda", "tracking=none",
               "stages=[sft]", "trainer.max_steps=6", "trainer.save_steps=3", "trainer.logging_steps=1",
               "trainer.eval_steps=100", "trainer.max_eval_samples=4", "lora.dropout=0",
               f"hydra.run.dir={run}"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch(whole)
    kind = "FSDP" if engine == "fsdp" else "DEEPSPEED"
    log = (whole / "run.log").read_text()
    assert f"engine: {kind}, {gpus} process(es)" in log
    if engine == "fsdp":
        assert "FSDP units: " in log
    assert (whole / "sft" / "checkpoint-3").is_dir() and (whole / "sft" / "checkpoint-6").is_dir()
    # the resumed run: the same folder as it was after step 3
    shutil.copytree(whole, resumed, symlinks=True)
    shutil.rmtree(resumed / "sft" / "checkpoint-6")
    launch(resumed)
    a, b = losses_by_step(whole / "sft"), losses_by_step(resumed / "sft")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in range(4, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-3), (step, a, b)
    if experiment == "full" and family == "minicpm_v2":
        check_checkpoint(
            whole / "sft" / "checkpoint-6", MiniCPMV.config_class.from_pretrained(pretrained_twin)
        )


def launch_default(
    twin: Path, experiment: str, run: Path, budget: int | str, *extra: str
) -> dict[int, float]:
    """Runs 4 steps of `experiment` with trainer=default on the GPU (no dropout, a checkpoint and an
    evaluation every 2 steps) into `run`; returns its train losses by step."""
    cmd = [sys.executable, "-m", "pipeline", f"+experiment={experiment}", f"model.path={twin}",
           "trainer=default", "device=cuda", "tracking=none", "stages=[sft]", "trainer.max_steps=4",
           "trainer.save_steps=2", "trainer.eval_steps=2", "trainer.logging_steps=1",
           "trainer.max_eval_samples=8", "lora.dropout=0", f"trainer.micro_batch_tokens={budget}",
           f"hydra.run.dir={run}", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses_by_step(run / "sft")


@pytest.mark.parametrize("experiment", ["lora_qkv", "lora_all", "full"])
@pytest.mark.parametrize("budget", [4096, 0])
def test_compile_with_trainer_default_settings_through_the_entry_point(
    pretrained_twin, tmp_path, experiment, budget
):
    """trainer=default (16 rows a step: batch 1 x grad-accum 16, gradient checkpointing) with compile and
    CUDA graphs, on the demo set's sliced, unsliced and variable-length rows, evaluation inside training
    and a resume: the losses follow the plain run's within bf16 rounding, and the resumed run repeats them."""

    def launch(run: Path, *extra: str) -> dict[int, float]:
        return launch_default(pretrained_twin, experiment, run, budget, *extra)

    plain = launch(tmp_path / "plain", "trainer.compile=false")
    compiled = launch(tmp_path / "compiled", "trainer.compile=true")
    assert sorted(plain) == sorted(compiled) == [1, 2, 3, 4]
    for step in plain:
        assert compiled[step] == pytest.approx(plain[step], rel=3e-2, abs=2e-2), (step, plain, compiled)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "compiled", resumed, symlinks=True)
    shutil.rmtree(resumed / "sft" / "checkpoint-4")
    again = launch(resumed, "trainer.compile=true")
    for step in (3, 4):
        assert again[step] == pytest.approx(compiled[step], rel=1e-2), (step, compiled, again)


@pytest.mark.parametrize("experiment", ["lora_all", "full"])
def test_vision_only_checkpointing_compiled_follows_every_block_checkpointed(
    pretrained_twin, tmp_path, experiment
):
    """model.gradient_checkpointing=vision with compile and CUDA graphs (the language model's layers
    replayed uncheckpointed, the tower's blocks recomputed) follows the eager run that checkpoints every
    block within bf16 rounding."""
    every = launch_default(pretrained_twin, experiment, tmp_path / "every", 4096, "trainer.compile=false",
                           "model.gradient_checkpointing=true")  # fmt: skip
    tower = launch_default(pretrained_twin, experiment, tmp_path / "tower", 4096, "trainer.compile=true",
                           "model.gradient_checkpointing=vision")  # fmt: skip
    assert sorted(every) == sorted(tower) == [1, 2, 3, 4]
    for step in every:
        assert tower[step] == pytest.approx(every[step], rel=3e-2, abs=2e-2), (step, every, tower)


def test_a_share_of_checkpointed_layers_compiled_follows_every_block_checkpointed(pretrained_twin, tmp_path):
    """Full fine-tuning with model.gradient_checkpointing=0.5, compiled with CUDA graphs (the first half of
    the language model's layers replayed under their checkpoint, the rest as they are) follows the eager run
    that checkpoints every block within bf16 rounding, on MiniCPM-V-2 and on Qwen2.5-VL's packed layers."""
    every = launch_default(pretrained_twin, "full", tmp_path / "every", 4096, "trainer.compile=false",
                           "model.gradient_checkpointing=true")  # fmt: skip
    half = launch_default(pretrained_twin, "full", tmp_path / "half", 4096, "trainer.compile=true",
                          "model.gradient_checkpointing=0.5")  # fmt: skip
    qwen_every, _ = _train_family_twin(tmp_path / "qwen-every", "qwen2_5_vl", "full",
                                       "trainer.compile=false", "model.gradient_checkpointing=true")  # fmt: skip
    qwen_half, log = _train_family_twin(tmp_path / "qwen-half", "qwen2_5_vl", "full",
                                        "model.gradient_checkpointing=0.5")  # fmt: skip
    assert "0.5 of the language model's layers" in log
    for reference, shared in ((every, half), (qwen_every, qwen_half)):
        assert sorted(reference) == sorted(shared) == [1, 2, 3, 4]
        for step in reference:
            assert shared[step] == pytest.approx(reference[step], rel=3e-2, abs=2e-2), (
                step,
                reference,
                shared,
            )


def test_lora_all_on_a_large_card_trains_without_recompute_as_every_block_checkpointed_does(
    pretrained_twin, tmp_path
):
    """lora=all with trainer=default's auto on a card of 75 GiB or more: MiniCPM-V-2's tower budget (micro-
    batches of 2048 tokens, no checkpointing, compiled layers with CUDA graphs) follows the eager run that
    checkpoints every block in one micro-batch within bf16 rounding, and the log says what auto chose."""
    if torch.cuda.get_device_properties(0).total_memory < TOWER_CARD_GIB * 2**30:
        pytest.skip(f"auto keeps checkpointing below {TOWER_CARD_GIB} GiB")
    every = launch_default(pretrained_twin, "lora_all", tmp_path / "every", 16384, "trainer.compile=false",
                           "model.gradient_checkpointing=true")  # fmt: skip
    auto = launch_default(pretrained_twin, "lora_all", tmp_path / "auto", "auto")
    assert sorted(every) == sorted(auto) == [1, 2, 3, 4]
    for step in every:
        assert auto[step] == pytest.approx(every[step], rel=3e-2, abs=2e-2), (step, every, auto)
    log = (tmp_path / "auto" / "run.log").read_text()
    assert "gradient checkpointing: off" in log and "up to 2048 padded tokens" in log, log[-3000:]


def _train_family_twin(run: Path, family: str, experiment: str, *extra: str) -> tuple[dict[int, float], str]:
    """Four steps of `experiment` on the family's tiny twin through the entry point on the GPU; returns the
    losses by step and the run's console output."""
    cmd = [sys.executable, "-m", "pipeline", f"+experiment={experiment}", f"model={family}_tiny",
           "trainer=default", "device=cuda", "tracking=none", "stages=[sft]", "trainer.max_steps=4",
           "trainer.logging_steps=1", "trainer.save_steps=100", "trainer.eval_steps=100", "lora.dropout=0",
           f"hydra.run.dir={run}", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses_by_step(run / "sft"), proc.stdout + proc.stderr


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "minicpm_v4_6"])
def test_varlen_vision_attention_of_other_families_through_the_entry_point(tmp_path, family):
    """trainer=default on an HF-native family's tiny twin in bf16: the default run (model.vision_attention
    auto = torch's variable-length FlashAttention kernel) follows transformers' own SDPA loop over the
    images within bf16 rounding, and each run's log says which it used."""
    plain, plain_log = _train_family_twin(
        tmp_path / "plain", family, "lora_qkv", "model.vision_attention=sdpa"
    )
    fast, fast_log = _train_family_twin(tmp_path / "fast", family, "lora_qkv")
    assert "vision attention: sdpa" in plain_log and "vision attention: varlen" in fast_log
    assert sorted(plain) == sorted(fast) == [1, 2, 3, 4]
    for step in plain:
        assert fast[step] == pytest.approx(plain[step], rel=3e-2, abs=2e-2), (step, plain, fast)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "minicpm_v4_6"])
def test_full_fine_tuning_attends_by_the_varlen_kernel_under_autocast(tmp_path, family):
    """Full fine-tuning holds fp32 weights under bf16 autocast: its vision tower attends by the
    variable-length kernel too (auto resolves by the compute dtype), within bf16 rounding of
    transformers' loop."""
    plain, plain_log = _train_family_twin(tmp_path / "plain", family, "full", "model.vision_attention=sdpa")
    fast, fast_log = _train_family_twin(tmp_path / "fast", family, "full")
    assert "vision attention: sdpa" in plain_log and "vision attention: varlen" in fast_log
    assert sorted(plain) == sorted(fast) == [1, 2, 3, 4]
    for step in plain:
        assert fast[step] == pytest.approx(plain[step], rel=3e-2, abs=2e-2), (step, plain, fast)


def test_served_greedy_answers_are_the_same_alone_and_batched_on_cuda(pretrained_twin):
    """The server's batches decode over the static cache and its CUDA graph; fp32 keeps the rounding alike."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from pipeline.apps.generation import load_inference_bundle
    from pipeline.apps.serve.app import ServerThread, create_app
    from tests.apps.test_serve import MODEL, ask, options, png_data_url
    from tests.helpers import free_port

    bundle, family = load_inference_bundle(str(pretrained_twin), device="cuda", dtype="float32")
    app = create_app(bundle, options(max_batch_size=8), MODEL, family)
    server = ServerThread(app, "127.0.0.1", free_port())
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
        questions = [
            f"Question {i}: {'what colour is it' if i % 2 else 'what is 2 plus ' + str(i)}?" for i in range(8)
        ]
        images = [png_data_url((30 * i, 200 - 20 * i, 90)) if i % 3 else None for i in range(8)]
        alone = [
            ask(client, q, im).choices[0].message.content for q, im in zip(questions, images, strict=True)
        ]
        app.state.worker.batches.clear()
        with ThreadPoolExecutor(8) as pool:
            together = list(
                pool.map(lambda i: ask(client, questions[i], images[i]).choices[0].message.content, range(8))
            )
        assert max(app.state.worker.batches) > 1
        assert together == alone
    finally:
        server.stop()


def _graph_twin(pretrained_twin, monkeypatch) -> tuple:
    """Returns (bundle, family, prompts, settings, captures) of the twin on CUDA in fp32: four chat prompts,
    24 greedy tokens, and the StaticDecoder objects whose CUDA graph is captured from then on."""
    from pipeline.apps.generation import load_inference_bundle
    from pipeline.families.minicpm_v2 import generation

    captures = []
    capture = generation.StaticDecoder._capture

    def counted(self):
        captures.append(self)
        capture(self)

    monkeypatch.setattr(generation.StaticDecoder, "_capture", counted)
    bundle, family = load_inference_bundle(str(pretrained_twin), device="cuda", dtype="float32")
    questions = ["What is 2 plus 3?", "Name a colour.", "Count to four.", "Describe a square."]
    limit = family.prompt_limit(bundle, 24)
    prompts = [family.encode_chat(bundle, [{"role": "user", "content": q}], [], limit) for q in questions]
    return bundle, family, prompts, GenerationSettings(max_new_tokens=24), captures


def _eager(bundle, samples, settings) -> torch.Tensor:
    """Returns the eager loop's tokens [B, new] for `samples` decoded as one batch (no static cache, no graph)."""
    from pipeline.families.minicpm_v2.collate import collate_for_generation

    tok = bundle.tokenizer
    inputs = collate_for_generation(samples, tok.pad_id)
    return generate(
        bundle.core,
        inputs["input_ids"].cuda(),
        inputs["attention_mask"].cuda(),
        inputs["pixel_values"],
        inputs["image_bound"],
        settings=settings,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        static=False,
        cuda_graph=False,
    ).cpu()


def test_the_chat_and_the_servers_batches_decode_through_the_cuda_graph(pretrained_twin, monkeypatch):
    """MiniCPM-V-2 behind the family interface: its batch decoder (the server's batches) and stream_tokens (the
    chat) decode over the static cache replayed as a CUDA graph; their tokens equal the eager loop's."""
    bundle, family, prompts, settings, captures = _graph_twin(pretrained_twin, monkeypatch)
    steps: list[list[int]] = []
    family.batch_decoder(bundle).decode(prompts, settings, None, lambda tokens: steps.append(tokens) or True)
    assert len(captures) == 1  # the batch decoded through the graph
    assert torch.equal(torch.tensor(steps).T, _eager(bundle, prompts, settings))
    streamed: list[int] = []
    family.stream_tokens(bundle, prompts[0], settings, streamed.append)
    assert len(captures) == 1  # the chat's one prompt replayed the batch's graph (its first row)
    assert streamed == _eager(bundle, prompts[:1], settings)[0, : len(streamed)].tolist()


def test_requests_joining_the_servers_running_batch_decode_through_the_cuda_graph(
    pretrained_twin, monkeypatch
):
    """MiniCPM-V-2's running batch on CUDA: requests that join mid-decode (needing more rows, so the rows move to
    a larger decoder and a new graph) answer as each alone over the eager loop."""
    from tests.apps.test_batched_generation import run_joining

    bundle, family, prompts, settings, captures = _graph_twin(pretrained_twin, monkeypatch)
    end = bundle.tokenizer.eos_id
    expected = []
    for prompt in prompts:  # each alone, up to its end id
        ids = _eager(bundle, [prompt], settings)[0].tolist()
        expected.append(ids[: ids.index(end) + 1] if end in ids else ids)
    family.batch_decoder(bundle).decode(prompts[:1], settings, None, lambda tokens: True)  # a one-row graph
    captures.clear()
    at = {0: 0, 1: 2, 2: 2, 3: 5}  # one alone, two joining it (four rows: a larger decoder), then the last
    joined = run_joining(family.batch_decoder(bundle), prompts, settings, [None] * 4, at)
    assert len(captures) == 1  # the one-row decoder's graph was captured before: only the grown one's
    assert joined == expected
