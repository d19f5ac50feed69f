"""On a CUDA GPU (marked `gpu`; `python -m pytest -m gpu tests/test_gpu_dropout_recompute.py`
on the GPU machine): the Stage C prior's dropout blocks, recomputed inside their inductor
graphs on CUDA, with and without CUDA graphs, back-propagate through the forward's masks.
The same finite-difference check as tests/test_compile.py's CPU test: CUDA's random numbers
in a recomputed region go through another path (graph-safe RNG state under CUDA graphs)."""

from __future__ import annotations

import pytest
import torch

from job.speedups.compile import apply_regional_compile, begin_step
from test_compile import _directional_derivatives, _dropout_prior

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_dropout_blocks_recompute_inside_on_cuda(cuda_graphs: bool) -> None:
    prior = _dropout_prior().cuda()
    apply_regional_compile(prior, cuda_graphs=cuda_graphs, recompute_inside=1.0)
    analytic, numeric = _directional_derivatives(prior, begin_step)
    assert analytic == pytest.approx(numeric, rel=1e-5)
