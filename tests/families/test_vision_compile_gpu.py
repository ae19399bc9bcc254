"""GPU check of the HF-native families' compiled vision blocks (`pytest -m gpu` on a CUDA machine): in bf16 over torch's
varlen kernel, the blocks trace one graph per kind of block with no graph break, and train as the eager
tower."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from pipeline.families import get_family, vision_attention
from pipeline.families.base import Bundle
from tests.families.test_families import nonzero_adapter
from tests.families.test_vision_compile import FIRST, FIRST_4_6, QWEN_VLS, batch_of
from tests.helpers import loss_and_grads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", [*QWEN_VLS, "minicpm_v4_6"])
def test_compiled_vision_blocks_trace_whole_over_the_varlen_kernel(family_twin, name):
    if not vision_attention.kernel_runs(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch's varlen kernel does not run on this card / torch")
    family = get_family(name)
    folder = family_twin(name)
    model, processor = family.load(folder, torch.bfloat16, "cuda")
    vision_attention.enable(model)
    model = nonzero_adapter(family, model, "all", seed=0)
    model.train()
    sizes = FIRST_4_6 if name == "minicpm_v4_6" else FIRST
    batch = family.to_device(batch_of(family, processor, sizes, seed=0), "cuda")
    eager_loss, _ = loss_and_grads(family, model, batch)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    tower = model.get_base_model().get_submodule(family.vision_tower)
    family.compile_vision(Bundle(model, processor, folder, "base"), backend=counter)
    loss, _ = loss_and_grads(family, model, batch)
    if name == "minicpm_v4_6":  # the tiny tower: one layer before its window merger, one after
        assert counter.frame_count == len(family.vision_blocks(tower)) == 2
    else:
        full = set(getattr(tower, "fullatt_block_indexes", None) or range(len(tower.blocks)))
        assert counter.frame_count == len({(i in full, i == 0) for i in range(len(tower.blocks))})
    assert not torch._dynamo.utils.counters["graph_break"], list(torch._dynamo.utils.counters["graph_break"])
    assert float(loss) == pytest.approx(float(eager_loss), rel=1e-2)
