"""Tensor parallelism (with and without sequence parallelism) under ``torch.compile(wrapped)`` on 2
gloo ranks, against single-process training (see test_runtime_harness): the compiled model's forward
and backward, collectives included, are exact, and dense models trace into one graph without breaks.
The MoE model breaks the graph at its routing (``nonzero``); its vocabulary-parallel embedding must
survive dynamo's re-trace (``tensor.apply_vocab_parallel_embedding``).

The backend is ``aot_eager``: dynamo and AOTAutograd as under inductor, without inductor's C++
code generation (inductor: 41 s for three steps of the GPT under tp2 on 2 CPU cores)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_harness import Case, check, uniform

pytestmark = pytest.mark.slow

WORLD = 2
CASES = [
    Case("gpt-tp", "gpt", uniform(WORLD, tp=2), compile="aot_eager"),
    Case("gpt-tp-sp", "gpt", uniform(WORLD, tp=2, sp=True), compile="aot_eager"),
    Case("llama-tp-sp", "llama", uniform(WORLD, tp=2, sp=True), compile="aot_eager"),
    Case("odd-vocab-tp-sp", "gpt-tied-odd-vocab", uniform(WORLD, tp=2, sp=True), compile="aot_eager"),
]
MOE = Case("moe-tp", "gpt-moe", uniform(WORLD, tp=2), compile="aot_eager")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compiled_tensor_parallel_matches_single_process(case: Case) -> None:
    result = check("tp-compile", WORLD, CASES, case)
    assert (result["graph_breaks"], result["graphs"]) == (0, 1)


def test_compiled_tensor_parallel_with_graph_breaks_matches_single_process() -> None:
    """In a launch of its own: after other compiled models in the process, AOTAutograd fails on this
    one ("tangents_2 was invalid, but is output"), a torch error not yet understood."""
    assert check("tp-compile-moe", WORLD, [MOE], MOE)["graph_breaks"] > 0
