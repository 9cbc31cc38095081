"""Host-bound layers: a profile that timed the host apart from the device makes each pass last as
long as the slower of the two summed over the layers (``strategies.cost.step.device_or_host``)."""

from __future__ import annotations

import pytest
from galvatron.profiler.schema import PhaseTimes
from galvatron.strategies.cost import DatasheetPerf, cost_plan
from galvatron.strategies.cost.step import FB, FWD, HOST_BWD, HOST_FWD, VECTOR_LEN, device_or_host
from galvatron.strategies.hardware import load_cluster

from galvatron.plan import Plan
from galvatron.spec import LayerSpec, ModelSpec

ONE_H100 = {"gpu": "H100-SXM", "gpus_per_node": 1, "nodes": 1, "name": "1xH100"}


def _sums(fwd: float, bwd: float, host_fwd: float, host_bwd: float) -> list[float]:
    sums = [0.0] * VECTOR_LEN
    sums[FB], sums[FWD], sums[HOST_FWD], sums[HOST_BWD] = fwd + bwd, fwd, host_fwd, host_bwd
    return sums


def test_each_pass_takes_the_slower_side() -> None:
    assert device_or_host(_sums(2.0, 4.0, 0.0, 0.0)) == 6.0  # host unknown: the device's time
    assert device_or_host(_sums(2.0, 4.0, 1.0, 1.0)) == 6.0  # host ahead
    assert device_or_host(_sums(2.0, 4.0, 3.0, 1.0)) == 7.0  # forward host-bound, backward not
    assert device_or_host(_sums(2.0, 4.0, 3.0, 5.0)) == 8.0


class _HostBoundBlocks(DatasheetPerf):
    """The datasheet, with every block measured at ``device`` seconds per pass on the device and
    ``host`` seconds to issue it."""

    def __init__(self, device: float, host: float) -> None:
        super().__init__(load_cluster(ONE_H100))
        self.device, self.host = device, host

    def layer_times(self, layer: LayerSpec, micro_batch: float, seq_len: int, recompute: str, tp: int = 1,
                    cp: int = 1) -> PhaseTimes | None:
        if not layer.is_block:
            return None
        return PhaseTimes(forward=self.device, backward=2 * self.device, host_forward=self.host,
                          host_backward=self.host)


def test_host_bound_blocks_set_the_step_time() -> None:
    spec = ModelSpec.from_config("gpt3-1.3b")
    plan = Plan.uniform(spec.num_blocks, global_batch_size=1, dtype="bf16")
    ahead = cost_plan(plan, spec, _HostBoundBlocks(device=0.010, host=0.001))
    bound = cost_plan(plan, spec, _HostBoundBlocks(device=0.010, host=0.025))
    blocks = spec.num_blocks
    # device-bound: forward and backward are the device's; host-bound: each pass is the host's sum
    # (the edges add their datasheet device time beside the host's, which they do not exceed)
    assert bound.step_time_s - ahead.step_time_s == pytest.approx(blocks * (0.025 - 0.010 + 0.025 - 0.020),
                                                                  rel=0.05)


def test_unaligned_gemms_run_at_the_measured_rate_unless_padded() -> None:
    """A 16-bit GEMM with a dimension that is not a multiple of 8 (a 50257-token head) runs at the
    GPU's measured unaligned rate on eager stacks; padded (fused stacks) and aligned ones do not."""
    h100, a100 = DatasheetPerf(load_cluster(ONE_H100)), DatasheetPerf(load_cluster("8xA100-80GB"))
    odd, even = (4096, 50257, 2048), (4096, 50304, 2048)
    slow = h100.gemm_time(*odd, "bf16", padded=False)
    assert slow == pytest.approx(2 * 4096 * 50257 * 2048 / 100e12, rel=0.05)  # 100 TFLOP/s forward
    assert h100.gemm_time(*odd, "bf16", padded=False, backward=True) < slow  # 145 TFLOP/s backward
    assert h100.gemm_time(*odd, "bf16") < slow / 4
    assert h100.gemm_time(*even, "bf16", padded=False) == h100.gemm_time(*even, "bf16")
    assert a100.gemm_time(*odd, "bf16", padded=False) == a100.gemm_time(*odd, "bf16")  # not measured there
