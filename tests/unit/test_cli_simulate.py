"""``galvatron simulate`` and ``galvatron search`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from galvatron.launch.cli import main

from galvatron.plan import Plan

REQUIRED = {"step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_gib", "plans_costed", "plan",
            "stages"}


def test_simulate_plan_flags_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--model", "llama2-7b", "--cluster", "8xA100-80GB", "--tp", "2", "--zero", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert REQUIRED <= set(out)
    assert Plan.from_dict(out["plan"]).world_size == 8
    assert {"compute_s", "comm_s", "bubble_s", "memory_gib"} <= set(out["stages"][0])


def test_simulate_over_memory_says_where_and_by_how_much(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--model", "llama2-7b", "--cluster", "8xA100-80GB", "--micro-batch", "16"]) == 1
    err = capsys.readouterr().err
    assert "over by" in err and "stage 0" in err and "Traceback" not in err


def test_simulate_bad_degrees_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--model", "llama2-7b", "--cluster", "8xA100-80GB", "--tp", "3"]) == 1
    assert "does not divide" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--sp", "ring"], "--sp ring is a kind of context parallelism: give --cp > 1"),
    (["--vpp", "2"], "--vpp 2 interleaves pipeline stages: give --pp > 1"),
    (["--fp8-params"], "--fp8-params describes how FP8 plans run: give --dtype fp8"),
])
def test_simulate_flags_that_do_nothing_alone_are_errors(flags: list[str], message: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A context-parallel kind without --cp, or virtual stages without a pipeline, would cost a plan
    that is not what the flags ask for (a plain dp8 plan, or 2 chunks on one device group)."""
    assert main(["simulate", "--model", "llama2-7b", "--cluster", "8xA100-80GB", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_search_writes_a_loadable_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.yaml"
    assert main(["search", "--model", "gpt-tiny", "--cluster", "8xA100-80GB", "--global-batch", "16",
                 "--uniform", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "search_time_s" in result and result["plans_costed"] > 1
    assert Plan.load(out).validate(8).to_dict() == result["plan"]


def test_simulate_expert_tp_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """--etp sets the plan's expert TP (MoE Parallel Folding); folding over TP ranks without SP is refused."""
    flags = ["simulate", "--model", "mixtral-8x7b", "--cluster", "1024xH100", "--tp", "2", "--ep", "8", "--etp", "1"]
    assert main([*flags, "--sp", "megatron", "--zero", "1", "--json"]) == 0
    strategy = Plan.from_dict(json.loads(capsys.readouterr().out)["plan"]).stages[0].groups[0].strategy
    assert (strategy.tp, strategy.ep, strategy.etp, strategy.expert_tp) == (2, 8, 1, 1)
    assert main(flags) == 1
    assert ".sp: expert TP 1 differs from tp 2" in capsys.readouterr().err


def test_simulate_costs_a_plan_as_the_backend_runs_it(capsys: pytest.CaptureFixture[str]) -> None:
    """``--backend``: the native runtime (eager autocast kernels, fp32 parameters, op-level selective
    recomputation keeping GEMM outputs) and Megatron-Core (fused kernels, fp32 copy in the optimizer,
    attention-core recomputation) cost the same plan differently."""
    base = ["simulate", "--model", "gpt3-1.3b", "--cluster", "8xH100", "--dp", "8", "--recompute", "selective",
            "--json"]
    out = {}
    for backend in ("native", "megatron"):
        assert main([*base, "--backend", backend]) == 0
        out[backend] = json.loads(capsys.readouterr().out)
    assert out["native"]["step_time_s"] > out["megatron"]["step_time_s"]  # unfused kernels, elementwise redone
    assert out["native"]["peak_memory_gib"] < out["megatron"]["peak_memory_gib"]  # keeps only GEMM outputs


@pytest.mark.parametrize(("argv", "message"), [
    (["simulate", "--backend", "megatron", "--tp", "2", "--dtype", "fp8"],
     "fp8 is not executed by the megatron backend"),
    (["simulate", "--backend", "deepspeed", "--tp", "2"], "is not executed by the deepspeed backend"),
    (["search", "--backend", "deepspeed", "--dtype", "fp8", "--global-batch", "16"],
     "--dtype fp8 is not executed by the deepspeed backend"),
])
def test_backend_refuses_what_it_cannot_run(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--backend X`` costs plans as X runs them: a plan X cannot execute (Megatron and DeepSpeed do not run
    galvatron's fp8 plans; DeepSpeed has no tensor parallelism) is a clear error, not a number."""
    assert main([*argv, "--model", "llama3-8b", "--cluster", "8xH100"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_simulate_attention_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    """``--attention-kernel`` costs attention on that kernel (FlashAttention-2 runs at about half cuDNN's
    rate on an H100); a kernel the GPU's database entry lacks is a clear error."""
    flags = ["simulate", "--model", "llama3-8b", "--cluster", "8xH100", "--zero", "3", "--recompute", "selective",
             "--global-batch", "16", "--json"]
    times = {}
    for kernel in (None, "cudnn", "flash2"):
        assert main(flags + (["--attention-kernel", kernel] if kernel else [])) == 0
        times[kernel] = json.loads(capsys.readouterr().out)["step_time_s"]
    assert times[None] == times["cudnn"] < times["flash2"]
    assert main(["simulate", "--model", "llama3-8b", "--cluster", "8xA100-80GB", "--attention-kernel", "cudnn"]) == 1
    err = capsys.readouterr().err
    assert "no attention kernel 'cudnn'" in err and "flash2" in err and "Traceback" not in err


def test_simulate_transformer_engine_stack_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """``--tp-comm-overlap`` hides TP collectives behind GEMMs, ``--overlap-p2p`` interleaved pipeline handoffs
    behind chunks; ``--dtype fp8`` with ``--fp8-scaling current``
    reads each quantized tensor once more than delayed scaling; ``--fp8-params`` drops the FP8 weight copies."""
    flags = ["simulate", "--model", "llama3-8b", "--cluster", "8xH100", "--tp", "4", "--sp", "megatron",
             "--global-batch", "16", "--zero", "1", "--json"]
    out = {}
    for name, extra in (("bf16", []), ("overlap", ["--tp-comm-overlap"]), ("fp8", ["--dtype", "fp8"]),
                        ("p2p", ["--pp", "2", "--vpp", "2", "--tp", "2"]),
                        ("p2p overlap", ["--pp", "2", "--vpp", "2", "--tp", "2", "--overlap-p2p"]),
                        ("current", ["--dtype", "fp8", "--fp8-scaling", "current"]),
                        ("params", ["--dtype", "fp8", "--fp8-params"])):
        assert main(flags + extra) == 0
        out[name] = json.loads(capsys.readouterr().out)
    assert out["overlap"]["step_time_s"] < out["bf16"]["step_time_s"]
    assert out["fp8"]["step_time_s"] < out["current"]["step_time_s"]
    assert out["params"]["peak_memory_gib"] < out["fp8"]["peak_memory_gib"]
    assert out["p2p overlap"]["step_time_s"] < out["p2p"]["step_time_s"]


def test_simulate_traces_a_plans_memory_on_fake_tensors(capsys: pytest.CaptureFixture[str]) -> None:
    """``--trace-memory`` runs the plan's steps on fake tensors as rank 0: the allocated peak holds at
    least the rank's parameters, gradients and Adam states; the reserve is at least the allocated peak."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    assert main(["simulate", "--model", "gpt-tiny", "--cluster", "8xA100-80GB", "--tp", "2", "--zero", "1",
                 "--backend", "native", "--trace-memory", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    traced = out["traced_memory"]
    static = sum(out["stages"][0]["memory_gib"][k] for k in ("params", "grads", "optimizer"))
    assert traced["allocated_peak_gib"] > static > 0
    assert traced["reserved_peak_gib_default"] >= traced["allocated_peak_gib"]
    assert traced["least_memory_gib_expandable_segments"] >= traced["allocated_peak_gib"]
    assert not dist.is_initialized()  # its fake process group is gone
    assert main(["simulate", "--model", "gpt-tiny", "--cluster", "8xA100-80GB", "--pp", "2", "--trace-memory"]) == 1
    assert "without pipeline parallelism" in capsys.readouterr().err
    assert main(["simulate", "--model", "gpt-tiny", "--cluster", "8xA100-80GB", "--zero", "2", "--offload",
                 "--trace-memory"]) == 1
    assert "without CPU offload" in capsys.readouterr().err


@pytest.mark.parametrize("allocator", ["expandable", "default"])
def test_search_with_trace_memory_reports_the_best_plan_that_fits(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, allocator: str) -> None:
    """``search --trace-memory`` traces the best plans in order: one whose least memory under the run's
    allocator (``--allocator``) is over the usable memory gives way to the next that fits, which is
    reported first and written by ``--out``. The other allocator's needs do not decide."""
    from galvatron.launch import cmd_simulate

    traced_plans: list[Plan] = []
    other = "default" if allocator == "expandable" else "expandable_segments"
    mode = cmd_simulate.ALLOCATOR_MODES[allocator]

    def trace(model: str, spec: object, plan: Plan, world: int) -> dict:
        traced_plans.append(plan)
        need = 1e6 if len(traced_plans) == 1 else 1.0  # the best plan needs more than any GPU under `allocator`
        return {"allocated_peak_gib": 0.5, "events": 1, "seconds": 0.0,
                **{f"reserved_peak_gib_{m}": 1e6 for m in ("default", "expandable_segments")},
                f"least_memory_gib_{mode}": need, f"least_memory_gib_{other}": 1e6 - need}

    monkeypatch.setattr(cmd_simulate, "trace_memory", trace)
    out_file = tmp_path / "plan.yaml"
    assert main(["search", "--model", "gpt-tiny", "--cluster", "8xA100-80GB", "--no-pp", "--trace-memory", "--json",
                 "--allocator", allocator, "--out", str(out_file)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(traced_plans) == 2 and traced_plans[0] != traced_plans[1]
    assert Plan.from_dict(out["plan"]) == traced_plans[1] == Plan.load(out_file)
    candidates = out["traced_memory"]["candidates"]
    assert [(c["fits"], c["least_memory_gib"], c["allocator"]) for c in candidates] == [
        (False, 1e6, allocator), (True, 1.0, allocator)]


def test_search_with_trace_memory_traces_the_best_plan(capsys: pytest.CaptureFixture[str]) -> None:
    """A real trace of the searched plan (the reference GPT on fake tensors): it fits, so it stays first."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    assert main(["search", "--model", "gpt-tiny", "--cluster", "8xA100-80GB", "--no-pp", "--backend", "native",
                 "--trace-memory"]) == 0
    out = capsys.readouterr().out
    assert "traced search plan #1" in out and "fits" in out and "reserved peak" in out
