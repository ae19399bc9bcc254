"""GPU checks of the HF-native families' generation (`pytest -m gpu` on a CUDA machine), on their varied twins in
fp32: eval's and infer's decode over transformers' static cache, its step compiled into CUDA graphs by
`generate`, answers as the dynamic cache does (twice: the second batch reuses the compiled step); and the
server's running batch answers as alone on the GPU, with requests joining mid-decode."""

from __future__ import annotations

import pytest
import torch

from pipeline.families import get_family
from tests.apps.test_batched_generation import GREEDY, alone, prompts_of, run_joining, texts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
HF_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "minicpm_v4_6")


@pytest.fixture(scope="module", params=HF_FAMILIES)
def loaded(request, varied_twin):
    family = get_family(request.param)
    return family, family.load_bundle(varied_twin(family.name), dtype=torch.float32, device="cuda")


def test_the_compiled_static_decode_answers_as_the_dynamic_cache(loaded):
    family, bundle = loaded
    prompts = prompts_of(family, bundle)
    try:
        family.static_decode = False
        dynamic = family.generate_batch(bundle, prompts, GREEDY)
        family.static_decode = None  # the default: static on CUDA
        assert family.decodes_static(torch.device("cuda"))
        assert family.generate_batch(bundle, prompts, GREEDY) == dynamic
        assert family.generate_batch(bundle, prompts[1:], GREEDY) == dynamic[1:]  # a smaller batch, again
    finally:
        family.static_decode = None


def test_the_running_batch_answers_as_alone_on_the_gpu(loaded):
    family, bundle = loaded
    prompts = prompts_of(family, bundle)
    family.static_decode = False
    expected = alone(family, bundle, prompts)
    family.static_decode = None
    joined = run_joining(family.batch_decoder(bundle), prompts, GREEDY, [None] * 4, {0: 0, 1: 1, 2: 1, 3: 3})
    assert texts(family, bundle, dict(enumerate(joined)), range(4)) == expected
