"""The profiler on CPU: schemas and fits (exact, synthetic), memory tracking, profiles of the
reference models and a Hugging Face model, the calibration the cost model consumes, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from galvatron.launch.cli import main
from galvatron.launch.cmd_profile import gpt_config
from galvatron.profiler.calibrate import (
    ProfiledPerf,
    Rates,
    calibrated_spec,
    fit_rates,
    overlapped_step_time,
    profile_step_time,
    profiled_perf,
)
from galvatron.profiler.cluster import discover_gpus
from galvatron.profiler.fitting import relative_nnls
from galvatron.profiler.measure import LiveBytes
from galvatron.profiler.model import ProfileOptions, profile_model, summary
from galvatron.profiler.schema import (
    ClusterProfile,
    CollectiveProfile,
    CommPoint,
    DeviceInfo,
    Fit,
    LayerProfile,
    Measurement,
    ModelProfile,
    OptimizerProfile,
    PhaseTimes,
    ProfileError,
    load_profile,
)
from galvatron.strategies.cost import DatasheetPerf, Group, cost_plan
from galvatron.strategies.hardware import load_cluster

from galvatron.errors import ConfigError
from galvatron.models import GPT, GPTConfig
from galvatron.plan import DType, LayerStrategy, Plan, Recompute
from galvatron.spec import LayerKind, ModelSpec
from galvatron.spec_config import load_model_config

TINY = ProfileOptions(micro_batches=(1, 2), seq_lens=(8, 16), warmup=0, repeats=1)
DENSE = GPTConfig(layers=2, hidden=32, heads=4, seq_len=16)
MOE = GPTConfig(layers=2, hidden=32, heads=4, seq_len=16, experts=4, top_k=2, moe_every=2)


@pytest.fixture(scope="module")
def dense_profile() -> ModelProfile:
    torch.manual_seed(0)
    return profile_model(GPT(DENSE), options=TINY, name="dense", progress=False)


@pytest.fixture(scope="module")
def moe_profile() -> ModelProfile:
    torch.manual_seed(0)
    return profile_model(GPT(MOE), options=TINY, name="moe", progress=False)


# ----------------------------------------------------------------------------- fits and schema
class TestFits:
    def test_recovers_time_law(self) -> None:
        law = (2e-3, 5e-7, 3e-10)
        points = [(mb, s, law[0] + law[1] * mb * s + law[2] * mb * s * s) for mb in (1, 2, 4) for s in (64, 256)]
        fit = Fit.of(points)
        assert fit.coefficients == pytest.approx(law, rel=1e-6)
        assert fit(8, 1024) == pytest.approx(law[0] + law[1] * 8192 + law[2] * 8192 * 1024, rel=1e-6)
        assert fit.max_rel_error < 1e-9

    def test_one_sequence_length_leaves_out_the_quadratic_term(self) -> None:
        fit = Fit.of([(mb, 128, 1.0 + 0.5 * mb) for mb in (1, 2, 4)])
        assert fit.coefficients[2] == 0.0
        assert fit(3, 128) == pytest.approx(2.5)

    def test_never_negative(self) -> None:
        # decreasing data: the best non-negative law is a constant, never a negative slope
        coef, _ = relative_nnls([[1.0, float(x)] for x in (1, 2, 3)], [3.0, 2.0, 1.0])
        assert min(coef) >= 0.0 and coef[1] == 0.0


def _synthetic_layer(key: str = "attention") -> LayerProfile:
    spec = ModelSpec.from_config(DENSE.to_model_config()).blocks[0]
    rows = [Measurement(micro_batch=mb, seq_len=s, recompute=mode, forward_s=1e-3 * mb * s / 64,
                        backward_s=2e-3 * mb * s / 64 * (1.5 if mode is Recompute.FULL else 1.0),
                        activation_bytes=1000.0 * mb * s, temporary_bytes=10.0 * mb * s)
            for mb in (1, 2) for s in (32, 64) for mode in (Recompute.NONE, Recompute.FULL)]
    return LayerProfile(key=key, kind=spec.kind, module="Block", spec=spec, params=spec.params,
                        param_bytes=4 * spec.params, attention_flops_per_token_per_seq=4 * spec.hidden,
                        measurements=tuple(rows))


def test_overlapped_step_time_takes_the_slower_side_per_phase() -> None:
    """Host-bound blocks beside a device-bound head: each phase lasts max(host sum, device sum),
    shorter than the sum of per-layer maxima; with one side dominating everywhere, both agree."""
    spec = ModelSpec.from_config(DENSE.to_model_config())

    def layer(key: str, kind: LayerKind, host: float, device: float, params: int) -> LayerProfile:
        rows = tuple(Measurement(micro_batch=mb, seq_len=16, recompute=Recompute.NONE, forward_s=max(host, device),
                                 backward_s=2 * max(host, device), activation_bytes=1.0, host_forward_s=host,
                                 host_backward_s=2 * host, device_forward_s=device, device_backward_s=2 * device)
                     for mb in (1, 2))
        return LayerProfile(key=key, kind=kind, module=key, spec=None, params=params, param_bytes=4 * params,
                            measurements=rows)

    block = spec.blocks[0]
    head = next(x for x in spec.layers if x.kind is LayerKind.HEAD)
    emb = next(x for x in spec.layers if x.kind is LayerKind.EMBEDDING)

    def profile(block_host: float, block_device: float) -> ModelProfile:
        layers = (layer("attention", block.kind, block_host, block_device, block.params),
                  layer("head", LayerKind.HEAD, 1e-4, 5e-3, head.params),
                  layer("embedding", LayerKind.EMBEDDING, 1e-4, 1e-4, emb.params))
        return ModelProfile(model="m", device=DeviceInfo(type="cuda", name="gpu"), dtype=DType.BF16, layers=layers)

    mixed = profile(block_host=2e-3, block_device=5e-4)  # blocks host-bound, head device-bound
    blocks = spec.num_blocks
    host, device = blocks * 2e-3 + 1e-4 + 1e-4, blocks * 5e-4 + 5e-3 + 1e-4
    assert overlapped_step_time(mixed, spec, 1, 16, "none") == pytest.approx(3 * max(host, device))
    assert overlapped_step_time(mixed, spec, 1, 16, "none") < profile_step_time(mixed, spec, 1, 16, "none")
    device_bound = profile(block_host=1e-4, block_device=2e-3)
    assert overlapped_step_time(device_bound, spec, 1, 16, "none") == pytest.approx(
        profile_step_time(device_bound, spec, 1, 16, "none"))
    unsplit = [dataclasses.replace(m, host_forward_s=None, host_backward_s=None, device_forward_s=None,
                                   device_backward_s=None) for m in mixed.layers[0].measurements]
    older = dataclasses.replace(mixed, layers=(dataclasses.replace(mixed.layers[0], measurements=tuple(unsplit)),
                                               *mixed.layers[1:]))
    assert overlapped_step_time(older, spec, 1, 16, "none") is None


class TestSchema:
    def test_model_profile_round_trip(self, tmp_path: Path) -> None:
        profile = ModelProfile(model="m", device=DeviceInfo(type="cpu", name="cpu"), dtype=DType.BF16,
                               layers=(_synthetic_layer(),), optimizer=OptimizerProfile.of("adamw", [(10, 1.0),
                                                                                                    (20, 1.5)]))
        path = profile.save(tmp_path / "p.yaml")
        assert ModelProfile.load(path) == profile
        assert load_profile(path) == profile
        assert "schema_version: 1" in path.read_text()

    def test_measured_points_exact_fit_elsewhere(self) -> None:
        layer = _synthetic_layer()
        assert layer.times(2, 64, "none").forward == pytest.approx(2e-3)
        assert layer.times(4, 64, "none").forward == pytest.approx(4e-3, rel=1e-6)  # fitted: linear in tokens
        assert layer.activation_bytes(3, 64) == pytest.approx(1000.0 * 192, rel=1e-6)
        with pytest.raises(ProfileError, match="recompute=selective was not profiled"):
            layer.times(1, 32, "selective")

    def test_refuses_newer_and_unknown(self, tmp_path: Path) -> None:
        data = ClusterProfile(backend="gloo", world_size=2, nodes=1, ranks_per_node=2).to_dict()
        with pytest.raises(ProfileError, match="schema_version 99"):
            ClusterProfile.from_dict({**data, "schema_version": 99})
        with pytest.raises(ProfileError, match="unknown field 'bogus'"):
            ClusterProfile.from_dict({**data, "bogus": 1})
        with pytest.raises(ProfileError, match="expected a model_profile"):
            ModelProfile.from_dict(data)
        bad = tmp_path / "bad.yaml"
        bad.write_text("kind: nonsense\n")
        with pytest.raises(ProfileError, match="kind must be"):
            load_profile(bad)

    def test_collective_curve(self) -> None:
        # alpha-beta law: 10 us + bytes / 100 GB/s of bus bandwidth, all-reduce on 4 ranks
        law = [CommPoint(bytes=b, time_s=1e-5 + b * 1.5 / 100e9) for b in (1 << 10, 1 << 20, 1 << 26)]
        c = CollectiveProfile(op="all_reduce", group_size=4, placement="intra", points=tuple(law))
        assert c.latency_s == pytest.approx(law[0].time_s)
        assert c.busbw_gbps == pytest.approx(100.0, rel=0.01)
        assert c.time(1 << 20) == pytest.approx(law[1].time_s)
        assert law[0].time_s < c.time(1 << 23) < law[2].time_s
        assert c.time(1 << 28) == pytest.approx(1e-5 + (1 << 28) * 1.5 / 100e9, rel=0.01)


# -------------------------------------------------------------------------------------- memory
def test_live_bytes_follows_storages() -> None:
    x, weight = torch.ones(1000), torch.nn.Parameter(torch.ones(10))
    live = LiveBytes(ignore={x.untyped_storage().data_ptr()})
    with live:
        kept = x * 2
        temp = x + 1
        del temp
        cast = weight.to(torch.float16)  # an autocast-style copy of a parameter: not an activation
    assert live.live == kept.untyped_storage().nbytes() == 4000
    assert live.peak == 8000
    assert cast.dtype == torch.float16


# ------------------------------------------------------------------------- real model profiles
class TestModelProfile:
    def test_dense(self, dense_profile: ModelProfile, tmp_path: Path) -> None:
        p = dense_profile
        assert p.keys == ("embedding", "head", "attention")
        block = p.layer("attention")
        assert block.count == 2 and block.params == sum(x.numel() for x in GPT(DENSE).blocks[0].parameters())
        assert len(block.measurements) == 2 * 2 * 3 and set(block.recompute_modes) == set(Recompute)
        for m in block.measurements:
            assert m.forward_s > 0 and m.backward_s > 0
            assert m.split and m.host_forward_s == m.device_forward_s  # one clock on CPU
        none = {(m.micro_batch, m.seq_len): m.activation_bytes for m in block.measurements
                if m.recompute is Recompute.NONE}
        full = {(m.micro_batch, m.seq_len): m.activation_bytes for m in block.measurements
                if m.recompute is Recompute.FULL}
        assert none[(2, 16)] == 2 * none[(1, 16)] == 4 * none[(1, 8)]  # kept bytes scale with tokens
        assert full[(1, 16)] == 16 * DENSE.hidden * 4  # full recompute keeps the block's output only
        assert all(full[k] < none[k] for k in none)
        assert p.optimizer is not None and len(p.optimizer.points) == 2 and p.optimizer.step_time(1e6) > 0
        assert ModelProfile.load(p.save(tmp_path / "dense.yaml")) == p
        assert "attention" in summary(p)

    def test_moe(self, moe_profile: ModelProfile) -> None:
        p = moe_profile
        assert set(p.keys) == {"embedding", "head", "moe", "attention"}
        assert p.layer("moe").spec.experts == 4 and p.layer("moe").count == 1
        for layer in (p.layer("moe"), p.layer("attention")):
            for mode in Recompute:
                measured = any(m.recompute is mode for m in layer.measurements)
                noted = any(f"block {0 if layer.key == 'moe' else 1} " in n and mode.value in n for n in p.notes)
                assert measured or noted, (layer.key, mode)

    def test_hugging_face_llama(self) -> None:
        transformers = pytest.importorskip("transformers")
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16))
        options = ProfileOptions(micro_batches=(1,), seq_lens=(8,), recompute=("full",), warmup=0, repeats=1,
                                 optimizer=False)
        p = profile_model(model, options=options, progress=False)
        assert p.keys == ("embedding", "head", "attention") and not p.notes
        assert p.layer("attention").spec.kv_heads == 2
        assert p.layer("head").measurements[0].activation_bytes > 0


# ------------------------------------------------------------------------------- calibration
def _profile_from_rates(rates: Rates) -> ModelProfile:
    """A profile whose layer times are exactly what the cost model computes with ``rates``."""
    from galvatron.strategies.cost import CostOptions, LayerContext, layer_cost

    spec = ModelSpec.from_config({**DENSE.to_model_config(), "seq_len": 64})
    perf = ProfiledPerf(base=DatasheetPerf(load_cluster("8xH100")), rates=rates)
    layers = []
    for key, layer in (("embedding", spec.layers[0]), ("attention", spec.blocks[0]), ("head", spec.layers[-1])):
        rows = []
        modes = tuple(Recompute) if layer.is_block else (Recompute.NONE,)
        for mb in (1, 2, 4):
            for s in (16, 64):
                for mode in modes:
                    at = dataclasses.replace(layer, attention_flops_per_token=layer.attention_flops_per_token * s / 64)
                    ctx = LayerContext(perf=perf, options=CostOptions(), dtype=rates.dtype, seq_len=s, causal=True,
                                       micro_batch=mb, stage_devices=1)
                    c = layer_cost(ctx, at, LayerStrategy(recompute=mode))
                    rows.append(Measurement(micro_batch=mb, seq_len=s, recompute=mode, forward_s=c.fwd,
                                            backward_s=c.bwd, activation_bytes=1.0))
        layers.append(LayerProfile(key=key, kind=layer.kind, module=key, spec=layer, params=layer.params,
                                   param_bytes=4 * layer.params,
                                   attention_flops_per_token_per_seq=layer.attention_flops_per_token / 64,
                                   measurements=tuple(rows)))
    ctx = LayerContext(perf=perf, options=CostOptions(), dtype=rates.dtype, seq_len=1, causal=True, micro_batch=1,
                       stage_devices=1)
    steps = [(n, layer_cost(ctx, dataclasses.replace(spec.blocks[0], params=n, expert_params=0),
                            LayerStrategy()).optim) for n in (10**6, 4 * 10**6)]
    return ModelProfile(model="synthetic", device=DeviceInfo(type="cuda", name="GPU"), dtype=rates.dtype,
                        layers=tuple(layers), hidden=spec.hidden, vocab=spec.vocab,
                        optimizer=OptimizerProfile.of("adamw", steps))


class TestCalibration:
    def test_fit_recovers_the_rates(self) -> None:
        truth = Rates(dtype=DType.BF16, matmul=1 / 600e12, kernel=6e-6, attention_fwd=1 / 400e12,
                      attention_bwd=1 / 300e12, memory=1 / 2.5e12, median_rel_error=0.0, max_rel_error=0.0, points=0)
        profile = _profile_from_rates(truth)
        spec = ModelSpec.from_config(DENSE.to_model_config())
        # the memory rate from the optimizer step, the rest fitted with it; or all five fitted together
        for prof in (profile, dataclasses.replace(profile, optimizer=None)):
            fitted = fit_rates(prof, spec)
            for term in ("matmul", "kernel", "attention_fwd", "attention_bwd", "memory"):
                assert getattr(fitted, term) == pytest.approx(getattr(truth, term), rel=1e-4), term
            assert fitted.max_rel_error < 1e-6

    def test_measured_collectives_replace_the_datasheet(self) -> None:
        points = tuple(CommPoint(bytes=b, time_s=2e-5 + b / 50e9) for b in (1 << 10, 1 << 20, 1 << 24))
        cluster = ClusterProfile(backend="nccl", world_size=4, nodes=1, ranks_per_node=4, collectives=(
            CollectiveProfile(op="all_gather", group_size=4, placement="intra", points=points),
            CollectiveProfile(op="p2p", group_size=2, placement="intra", points=points)))
        base = profiled_perf(load_cluster("8xH100")).base
        perf = profiled_perf(load_cluster("8xH100"), cluster_profile=cluster)
        assert perf.collective_time("all_gather", 1 << 20, Group(size=4, per_node=8)) == pytest.approx(points[1].time_s)
        # 8 ranks move (7/8) / (3/4) of the bus volume of 4 ranks: read off the 4-rank curve there
        eight = perf.collective_time("all_gather", 1 << 20, Group(size=8, per_node=8))
        assert eight == pytest.approx(cluster.collectives[0].time((1 << 20) * 7 / 6)) and eight > points[1].time_s
        assert perf.p2p_time(1 << 24, inter_node=False) == pytest.approx(points[2].time_s)
        # not measured: the datasheet answers (inter-node group, all-reduce)
        inter = Group(size=16, per_node=8)
        assert perf.collective_time("all_gather", 1 << 20, inter) == base.collective_time("all_gather", 1 << 20, inter)
        assert perf.collective_time("all_reduce", 1 << 20, Group(4, 8)) == base.collective_time(
            "all_reduce", 1 << 20, Group(4, 8))

    def test_cost_model_accepts_a_real_profile(self, dense_profile: ModelProfile) -> None:
        spec = ModelSpec.from_config(DENSE.to_model_config())
        perf = profiled_perf(load_cluster("8xH100"), model_profile=dense_profile)
        for mode in Recompute:
            plan = Plan.uniform(spec.num_blocks, global_batch_size=2, dtype="fp32", recompute=mode)
            cost = cost_plan(plan, spec, perf)
            assert math.isfinite(cost.step_time_s) and cost.step_time_s > 0
            direct = profile_step_time(dense_profile, spec, 2, spec.seq_len, mode)
            assert direct > 0
            # on CPU host and device time are one clock: the overlapped step is the plain sum
            assert overlapped_step_time(dense_profile, spec, 2, spec.seq_len, mode) == pytest.approx(direct)
            # with host and device timed apart, the cost model charges each pass the slower side
            assert cost.step_time_s == pytest.approx(
                overlapped_step_time(dense_profile, spec, 2, spec.seq_len, mode), rel=1e-2)
        times = perf.layer_times(spec.blocks[0], 2, 16, "full")
        host, device = dense_profile.layer("attention").split_times(2, 16, "full")
        assert times == PhaseTimes(forward=device.forward, backward=device.backward, host_forward=host.forward,
                                   host_backward=host.backward)
        fits = dense_profile.layer("attention").fits[Recompute.FULL]
        split = perf.layer_times(spec.blocks[0], 2, 16, "full", tp=2)
        fit = fits["device_forward_s"]
        assert split.forward == pytest.approx(fit.coefficients[0] + (fit(2, 16) - fit.coefficients[0]) / 2)
        assert split.host_forward == pytest.approx(fits["host_forward_s"](2, 16))  # the host issues it all
        kept = calibrated_spec(spec, dense_profile).blocks[0].activation_bytes_per_token
        assert kept == pytest.approx(dense_profile.layer("attention").activation_bytes(2, 16) / 32 / 2)

    def test_shared_cores_stretch_the_measured_compute(self, dense_profile: ModelProfile) -> None:
        spec = ModelSpec.from_config(DENSE.to_model_config())
        alone = profiled_perf(load_cluster("8xH100"), model_profile=dense_profile, spec=spec)
        shared = profiled_perf(load_cluster("8xH100"), model_profile=dense_profile, spec=spec, compute_scale=2.0)
        one, two = alone.layer_times(spec.blocks[0], 2, 16, "none"), shared.layer_times(spec.blocks[0], 2, 16, "none")
        assert two.forward == pytest.approx(2 * one.forward) and two.backward == pytest.approx(2 * one.backward)
        assert two.host_forward == pytest.approx(2 * one.host_forward)
        assert shared.optimizer_step_time(1e6) == pytest.approx(2 * alone.optimizer_step_time(1e6))
        assert shared.matmul_time(1e12, "fp32") == pytest.approx(2 * alone.matmul_time(1e12, "fp32"))
        assert shared.memory_time(1e9) == pytest.approx(2 * alone.memory_time(1e9))
        # communication is measured as it runs: not stretched
        g = Group(size=2, per_node=8)
        assert shared.collective_time("all_reduce", 1 << 20, g) == alone.collective_time("all_reduce", 1 << 20, g)
        plan = Plan.uniform(spec.num_blocks, global_batch_size=2, dtype="fp32")
        assert cost_plan(plan, spec, shared).step_time_s == pytest.approx(2 * cost_plan(plan, spec, alone).step_time_s,
                                                                       rel=1e-6)
        with pytest.raises(ProfileError, match="compute_scale"):
            ProfiledPerf(base=alone.base, compute_scale=0.0)

    def test_measured_interference_replaces_the_default(self) -> None:
        from galvatron.profiler.schema import Overlap
        from galvatron.strategies.cost import CostOptions

        overlap = Overlap(compute_slowdown=1.9, comm_slowdown=2.0, matmul_size=256, message_bytes=1 << 20,
                          group_size=4, interference=0.9)
        cluster = ClusterProfile(backend="gloo", world_size=4, nodes=1, ranks_per_node=4, overlap=overlap)
        options = CostOptions()
        measured = profiled_perf(load_cluster("8xH100"), cluster_profile=cluster).measured_options(options)
        assert (measured.overlap_interference, measured.overlap_comm_slowdown) == (0.9, 2.0)
        old = dataclasses.replace(cluster, overlap=dataclasses.replace(overlap, interference=None))
        assert profiled_perf(load_cluster("8xH100"), cluster_profile=old).measured_options(options) == options
        timed = dataclasses.replace(old, pipeline_action_s=1.5e-3)
        assert profiled_perf(load_cluster("8xH100"), cluster_profile=timed).measured_options(
            options) == dataclasses.replace(options, pipeline_action_s=1.5e-3)
        assert profiled_perf(load_cluster("8xH100")).measured_options(options) == options

    def test_search_accepts_a_profile(self, dense_profile: ModelProfile) -> None:
        from galvatron.strategies.search import search

        spec = ModelSpec.from_config(DENSE.to_model_config())
        perf = profiled_perf(load_cluster("8xH100"), model_profile=dense_profile)
        result = search(spec, perf, world_size=1)
        assert result.best.step_time_s > 0


# ------------------------------------------------------------------------------ cluster runner
def test_pipeline_pairs_ping_at_once() -> None:
    from types import SimpleNamespace

    from galvatron.profiler.cluster import _Runner

    one_node = SimpleNamespace(per_node=4, nodes=1, world=4, node_of=[0, 0, 0, 0])
    assert _Runner._pairs(one_node) == [([(0, 1), (2, 3)], "intra")]
    two_nodes = SimpleNamespace(per_node=3, nodes=2, world=6, node_of=[0, 0, 0, 1, 1, 1])
    assert _Runner._pairs(two_nodes) == [([(0, 1), (3, 4)], "intra"), ([(0, 3)], "inter")]
    alone = SimpleNamespace(per_node=1, nodes=2, world=2, node_of=[0, 1])
    assert _Runner._pairs(alone) == [([(0, 1)], "inter")]


def test_groups_measured_at_once_keep_the_slower_time() -> None:
    from galvatron.profiler.cluster import merge_collectives

    def curve(op: str, size: int, *times: float) -> CollectiveProfile:
        points = tuple(CommPoint(bytes=1 << (10 + 2 * i), time_s=t) for i, t in enumerate(times))
        return CollectiveProfile(op=op, group_size=size, placement="intra", points=points)

    merged = merge_collectives([[curve("all_reduce", 2, 1.0, 5.0), curve("all_reduce", 4, 3.0, 3.0)],
                                [curve("all_reduce", 2, 2.0, 4.0)], []])
    assert merged == [curve("all_reduce", 2, 2.0, 5.0), curve("all_reduce", 4, 3.0, 3.0)]


# ------------------------------------------------------------------------------------- NVML, CLI
def test_no_nvml_means_no_gpus() -> None:
    gpus, topology, notes = discover_gpus()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpus == () and topology == () and notes


class _FakeNVML:
    """Two GPUs on one NVSwitch (links to a bus id that is no GPU's), the pynvml API subset used."""

    class NVMLError(Exception):
        pass

    NVML_NVLINK_MAX_LINKS = 4
    NVML_FEATURE_ENABLED = 1

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: return 2
    def nvmlDeviceGetHandleByIndex(self, i: int) -> int: return i
    def nvmlDeviceGetName(self, h: int) -> bytes: return b"NVIDIA H100 80GB HBM3"
    def nvmlDeviceGetMemoryInfo(self, h: int) -> object: return type("M", (), {"total": 80 << 30})()
    def nvmlDeviceGetPciInfo(self, h: int) -> object: return type("P", (), {"busId": f"0000:0{h}:00.0"})()
    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int: return 1 if link < 3 else 0
    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> object:
        return type("P", (), {"busId": "0000:99:00.0"})()
    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: int) -> int: return 5
    def nvmlDeviceGetMaxPcieLinkWidth(self, h: int) -> int: return 16

    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        raise self.NVMLError("not reached: NVLink first")


def test_nvml_topology_through_a_switch() -> None:
    gpus, topology, notes = discover_gpus(_FakeNVML())
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3"] * 2 and gpus[0].nvlinks == 3
    assert topology == (("X", "NV3"), ("NV3", "X")) and not notes


def test_cli_profile_model_and_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.yaml"
    assert main(["profile", "model", "--model", "gpt-tiny", "--micro-batches", "1", "--seq-lens", "8",
                 "--recompute", "none", "--warmup", "0", "--repeats", "1", "--no-optimizer", "--quiet",
                 "--out", str(out)]) == 0
    profile = ModelProfile.load(out)
    assert profile.model == "gpt-tiny" and profile.profiled_blocks == 2
    assert any("2 of 4 blocks" in n for n in profile.notes)
    assert "wrote" in capsys.readouterr().out
    cluster = tmp_path / "c.yaml"
    assert main(["profile", "cluster", "--nproc", "1", "--quiet", "--out", str(cluster)]) == 0
    assert ClusterProfile.load(cluster).collectives == ()
    capsys.readouterr()
    # simulate and search take the profiles in place of the datasheet
    plan_flags = ["--model", "gpt-tiny", "--cluster", "8xH100", "--dp", "8", "--global-batch", "8", "--json"]
    assert main(["simulate", *plan_flags]) == 0
    datasheet = json.loads(capsys.readouterr().out)
    assert main(["simulate", *plan_flags, "--model-profile", str(out)]) == 0
    measured = json.loads(capsys.readouterr().out)
    spec = ModelSpec.from_config("gpt-tiny")
    plan = Plan.from_dict(measured["plan"])
    expected = cost_plan(plan, spec, profiled_perf(load_cluster("8xH100"), model_profile=profile, spec=spec))
    assert measured["step_time_s"] == pytest.approx(expected.step_time_s) != datasheet["step_time_s"]
    points = tuple(CommPoint(bytes=b, time_s=1e-3 + b / 1e9) for b in (1 << 10, 1 << 20))
    slow = ClusterProfile(backend="nccl", world_size=8, nodes=1, ranks_per_node=8, collectives=tuple(
        CollectiveProfile(op=op, group_size=8, placement="intra", points=points)
        for op in ("all_reduce", "all_gather", "reduce_scatter")))
    slow.save(cluster)
    assert main(["search", "--model", "gpt-tiny", "--cluster", "8xH100", "--global-batch", "8", "--json",
                 "--cluster-profile", str(cluster), "--out", str(tmp_path / "plan.yaml")]) == 0
    found = json.loads(capsys.readouterr().out)
    slow_perf = profiled_perf(load_cluster("8xH100"), cluster_profile=slow)
    assert found["step_time_s"] == pytest.approx(cost_plan(Plan.load(tmp_path / "plan.yaml"), spec,
                                                           slow_perf).step_time_s)
    assert main(["profile", "model", "--model", "no-such-model", "--out", str(out)]) == 1
    assert "unknown model preset" in capsys.readouterr().err


def test_spec_layers_map_to_profile(moe_profile: ModelProfile) -> None:
    spec = ModelSpec.from_config(MOE.to_model_config())
    kinds = [moe_profile.layer_for(layer).key if moe_profile.layer_for(layer) else None for layer in spec.layers]
    assert kinds == ["embedding", "moe", "attention", None, "head"]
    assert spec.layers[3].kind is LayerKind.NORM


@pytest.mark.parametrize("preset", ["gpt3-1.3b", "mixtral-8x7b"])
def test_presets_build_the_reference_gpt_they_describe(preset: str) -> None:
    with torch.device("meta"):
        model = GPT(gpt_config(load_model_config(preset)))
    assert sum(p.numel() for p in model.parameters()) == ModelSpec.from_config(preset).params


def test_architectures_the_reference_gpt_lacks_are_refused() -> None:
    with pytest.raises(ConfigError, match="first_dense"):
        gpt_config(load_model_config("deepseek-moe-16b"))


def test_pipeline_action_seconds_removes_the_extra_handoffs() -> None:
    """1 -> 4 chunks per rank over 4 micro-batches: 24 more actions and, per micro-batch, 6 more boundary
    ends each passing an activation and a gradient (48 p2p times) in the step-time difference; a
    difference the handoffs take whole is 0."""
    from galvatron.profiler.cluster import pipeline_action_seconds

    assert pipeline_action_seconds(0.03, 1e-4, 4, (1, 4)) == pytest.approx((0.03 - 48e-4) / 24)
    assert pipeline_action_seconds(0.03, 0.0, 2, (1, 3)) == pytest.approx(0.03 / 8)
    assert pipeline_action_seconds(0.004, 1e-4, 4, (1, 4)) == 0.0


def test_shared_cores_scale_takes_the_measured_sharing(tmp_path: Path) -> None:
    """CPU workers profiled alone are stretched by what the gloo profile measured sharing the cores
    does to compute, where it profiled as many workers on this node; otherwise (another worker
    count, no measurement, a profile saved before the field) by workers over cores. The field
    survives a save and load, and a profile without it loads as None."""
    import os

    from galvatron.profiler.calibrate import shared_cores_scale

    cores = len(os.sched_getaffinity(0))
    measured = ClusterProfile(backend="gloo", world_size=4, nodes=1, ranks_per_node=4, compute_sharing=2.13)
    assert shared_cores_scale(4, measured) == 2.13
    assert shared_cores_scale(8, measured) == max(1.0, 8 / cores)
    assert shared_cores_scale(4, None) == max(1.0, 4 / cores)
    assert shared_cores_scale(4, dataclasses.replace(measured, compute_sharing=0.9)) == 1.0
    assert ClusterProfile.load(measured.save(tmp_path / "c.yaml")) == measured
    old = {k: v for k, v in measured.to_dict().items() if k != "compute_sharing"}
    assert ClusterProfile.from_dict(old).compute_sharing is None
