"""Profile fidelity on one GPU (issue 7, Done-when): profile a 1B-class reference GPT, then compare the
cost model's step-time prediction from that profile with the measured step time of the real model.

1. Profile GPT-3 XL (``configs/models/gpt3-1.3b.yaml``: d=2048, 24 layers, vocab 50257, learned
   positions, tied embeddings) with ``galvatron profile model``'s code path: the reference GPT built
   with one block, micro-batches 1,2,4,8 x sequences 512,1024,2048 x recompute none/selective/full.
   Target: under 2 minutes.
2. For each configuration (micro-batch, sequence length, recompute; two of them off the profiled grid)
   time real training steps of the full 24-layer model (bf16, SDPA attention, fused AdamW), through
   ``galvatron.wrap`` with a one-GPU plan (``--runtime plain``: the bare model under bf16 autocast).
3. Predict each step three ways: the cost model (``cost_plan``) with the profile
   (``profiled_perf``: primitive rates fitted to the profile) — the number ``simulate`` would print;
   the profile's per-layer times summed (``profile_step_time``: what a cost model using
   ``ProfiledPerf.layer_times`` would print); and the cost model on datasheet numbers, for reference.
   Target: the cost model with the profile within 5% median absolute error.

    python benchmarks/profile_fidelity.py --out benchmarks/results/profile_fidelity.json
    python benchmarks/profile_fidelity.py --smoke --out /tmp/fidelity.json     # CPU, seconds: checks the script

Writes the JSON and a markdown table beside it (``.md``), both holding the command; the profile YAML
goes beside them too. Uses torch and galvatron only.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from galvatron.launch.cmd_profile import gpt_config
from galvatron.profiler.calibrate import overlapped_step_time, profile_step_time, profiled_perf
from galvatron.profiler.model import ProfileOptions, lm_loss, profile_model, summary
from galvatron.profiler.schema import ModelProfile
from galvatron.strategies.cost import CostOptions, cost_plan
from galvatron.strategies.hardware import gpu_for_device, load_cluster

from galvatron.backends import capabilities
from galvatron.errors import ConfigError, GalvatronError
from galvatron.models import GPT, GPTConfig
from galvatron.plan import Plan, Recompute
from galvatron.runtime.recompute import apply_recompute
from galvatron.spec import ModelSpec
from galvatron.spec_config import load_model_config

# (micro-batch, sequence length, recompute); (3, 2048) and (16, 512) lie off the profiled grid
CONFIGS = [
    (1, 2048, "none"), (2, 2048, "none"), (3, 2048, "none"), (4, 1024, "none"), (8, 512, "none"),
    (2, 2048, "selective"), (4, 1024, "selective"), (4, 2048, "selective"),
    (1, 2048, "full"), (4, 2048, "full"), (8, 2048, "full"), (16, 512, "full"),
]
SMOKE_CONFIGS = [(1, 32, "none"), (2, 16, "none"), (2, 32, "full"), (3, 32, "selective")]


NATIVE = CostOptions(**capabilities("native").cost_options())
"""How galvatron's native runtime runs a plan (eager autocast kernels, fp32 parameters, eager loss)."""

@dataclass
class Setup:
    """The model, the grid and the machine of one run."""

    cfg: GPTConfig
    name: str
    options: ProfileOptions
    configs: list[tuple[int, int, str]]
    device: torch.device
    steps: int
    warmup: int
    gpu: str


def setup(args: argparse.Namespace) -> Setup:
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if args.smoke:
        torch.set_num_threads(1)  # a shared CPU: OpenMP threads spinning against each other distort everything
        cfg = GPTConfig(vocab=128, seq_len=32, layers=4, hidden=64, heads=4, position="learned",
                        tied_embeddings=True, bias=True)
        options = ProfileOptions(micro_batches=(1, 2), seq_lens=(16, 32), warmup=1, repeats=2)
        return Setup(cfg=cfg, name="gpt-smoke", options=options, configs=SMOKE_CONFIGS, device=device, steps=2,
                     warmup=1, gpu="H100-SXM")
    cfg = gpt_config(load_model_config(args.model))
    options = ProfileOptions(micro_batches=(1, 2, 4, 8), seq_lens=(512, 1024, 2048), warmup=2, repeats=5)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    try:
        gpu = gpu_for_device(name)
    except ConfigError:  # a CPU run, or a GPU the database lacks: cost it as the H100 SXM
        gpu = "H100-SXM"
    return Setup(cfg=cfg, name=args.model, options=options, configs=CONFIGS, device=device, steps=args.steps,
                 warmup=args.warmup, gpu=gpu)


# ------------------------------------------------------------------------------------ profile
def profile(s: Setup) -> tuple[ModelProfile, float]:
    """Profile the model built with as few blocks as hold one of each kind; wall seconds included
    building it."""
    start = time.perf_counter()
    reduced = dataclasses.replace(s.cfg, layers=2)
    with torch.device(s.device):
        model = GPT(reduced)
    result = profile_model(model, options=s.options, device=s.device, name=s.name)
    seconds = time.perf_counter() - start
    del model
    _free(s.device)
    return result, seconds


# ----------------------------------------------------------------------------- real training
class Trainer:
    """One full model under one recompute mode: ``step(tokens, targets)`` trains one step."""

    def __init__(self, s: Setup, mode: str, runtime: str) -> None:
        dtype = "bf16" if s.device.type == "cuda" else "fp32"
        self.runtime, self.note = runtime, ""
        if runtime == "wrap":
            try:
                self._wrap(_build(s), s, mode, dtype)
                return
            except (GalvatronError, RuntimeError) as err:
                self.note = f"galvatron.wrap failed ({type(err).__name__}: {err}); timed the plain model"
                self.runtime = "plain"
                _free(s.device)
        self._plain(_build(s), s, mode, dtype)

    def _wrap(self, model: torch.nn.Module, s: Setup, mode: str, dtype: str) -> None:
        import galvatron

        plan = Plan.uniform(s.cfg.layers, global_batch_size=1, dtype=dtype, recompute=mode)
        wrapped = galvatron.wrap(model, plan=plan)
        opt = wrapped.optimizer(torch.optim.AdamW, lr=1e-5, fused=s.device.type == "cuda")

        def step(tokens: torch.Tensor, targets: torch.Tensor) -> None:
            wrapped.train_step((tokens, targets), lm_loss)
            opt.step()
            opt.zero_grad(set_to_none=True)

        self.model, self.step = wrapped, step

    def _plain(self, model: torch.nn.Module, s: Setup, mode: str, dtype: str) -> None:
        for block in model.blocks:
            apply_recompute(block, Recompute(mode))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=s.device.type == "cuda")
        low = torch.bfloat16 if dtype == "bf16" else None

        def step(tokens: torch.Tensor, targets: torch.Tensor) -> None:
            with torch.autocast(s.device.type, dtype=low or torch.float32, enabled=low is not None):
                loss = lm_loss(model(tokens), targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        self.model, self.step = model, step


def _build(s: Setup) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(s.device):
        return GPT(s.cfg)


def measure_steps(trainer: Trainer, s: Setup, mb: int, seq: int) -> dict[str, Any]:
    """Median step seconds and the peak memory of one configuration (or the error that stopped it)."""
    gen = torch.Generator().manual_seed(mb * 100_000 + seq)
    tokens = torch.randint(0, s.cfg.vocab, (mb, seq + 1), generator=gen).to(s.device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    times = []
    _free(s.device)  # the allocator's cache then holds this configuration's blocks only (reserved peak)
    try:
        for i in range(s.warmup + s.steps):
            if i == s.warmup and s.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(s.device)
            start = time.perf_counter()
            trainer.step(x, y)
            _sync(s.device)
            if i >= s.warmup:
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        _free(s.device)
        return {"error": "out of memory"}
    except (GalvatronError, RuntimeError) as err:  # one broken configuration must not lose the others
        _free(s.device)
        return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"}
    cuda = s.device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else None  # the caching allocator's peak
    return {"measured_s": statistics.median(times), "step_times_s": times, "peak_memory_gib": peak,
            "peak_reserved_gib": reserved}


# -------------------------------------------------------------------------------- prediction
class Predictor:
    """Step seconds by the cost model with the profile, by the profile's layer sum, and by the cost
    model on datasheet numbers (the GPU of the database closest to this one)."""

    def __init__(self, prof: ModelProfile, s: Setup) -> None:
        self.prof, self.s = prof, s
        self.cluster = load_cluster({"gpu": s.gpu, "gpus_per_node": 1, "nodes": 1, "name": f"1x{s.gpu}"})
        spec = ModelSpec.from_config({**s.cfg.to_model_config(), "name": s.name})
        self.perf = profiled_perf(self.cluster, model_profile=prof, spec=spec)
        print(f"calibrated rates: {self.perf.rates.describe(self.cluster.gpu.peak_flops(prof.dtype.value))}")

    def __call__(self, mb: int, seq: int, mode: str) -> dict[str, float]:
        s, prof = self.s, self.prof
        spec = ModelSpec.from_config({**s.cfg.to_model_config(), "seq_len": seq, "name": s.name})
        plan = Plan.uniform(spec.num_blocks, global_batch_size=mb, dtype=prof.dtype.value, recompute=mode)
        with_profile = cost_plan(plan, spec, self.perf, NATIVE)
        datasheet = cost_plan(plan, spec, self.cluster, NATIVE)
        return {"cost_model_s": with_profile.step_time_s,
                "layer_sum_s": profile_step_time(prof, spec, mb, seq, mode),
                "overlapped_s": overlapped_step_time(prof, spec, mb, seq, mode),
                "datasheet_s": datasheet.step_time_s, "predicted_peak_gib": with_profile.peak_memory_gib}


def run(args: argparse.Namespace) -> dict[str, Any]:
    s = setup(args)
    prof, profile_s = profile(s)
    print(summary(prof), flush=True)
    predict = Predictor(prof, s)
    rows: list[dict[str, Any]] = []
    notes: list[str] = list(prof.notes)
    for mode in ("none", "selective", "full"):
        configs = [c for c in s.configs if c[2] == mode]
        if not configs:
            continue
        try:
            trainer = Trainer(s, mode, args.runtime)
        except (GalvatronError, RuntimeError) as err:
            notes.append(f"recompute={mode}: could not build the model ({type(err).__name__}: {err})")
            rows += [{"micro_batch": mb, "seq_len": seq, "recompute": mode, "runtime": args.runtime,
                      "error": "model not built"} for mb, seq, _ in configs]
            _free(s.device)
            continue
        if trainer.note:
            notes.append(trainer.note)
            print(trainer.note, flush=True)
        for mb, seq, _ in configs:
            row: dict[str, Any] = {"micro_batch": mb, "seq_len": seq, "recompute": mode, "runtime": trainer.runtime}
            row.update(measure_steps(trainer, s, mb, seq))
            row.update(predict(mb, seq, mode))
            _add_errors(row)
            rows.append(row)
            print(_row_line(row), flush=True)
        del trainer
        _free(s.device)
    return {"profile_s": profile_s, "rows": rows, "notes": notes, "profile": prof, "setup": s}


PREDICTIONS = ("cost_model", "layer_sum", "overlapped", "datasheet")


def _add_errors(row: dict[str, Any]) -> None:
    if "measured_s" in row:
        for key in PREDICTIONS:
            if row.get(f"{key}_s") is not None:
                row[f"{key}_error"] = row[f"{key}_s"] / row["measured_s"] - 1


def replay(args: argparse.Namespace) -> dict[str, Any]:
    """The predictions of today's code for the measurements of an earlier run (its JSON and the
    profile YAML beside it): no GPU needed; measured times and memory are the run's own."""
    earlier = json.loads(Path(args.replay).read_text())
    prof = ModelProfile.load(Path(args.replay).with_suffix(".profile.yaml"))
    env = earlier["env"]
    s = Setup(cfg=gpt_config(load_model_config(env["model"])), name=env["model"], options=ProfileOptions(),
              configs=CONFIGS, device=torch.device("cpu"), steps=0, warmup=0, gpu=env["gpu_in_database"])
    predict = Predictor(prof, s)
    rows = []
    for old in earlier["rows"]:
        row = {k: v for k, v in old.items() if not (k.endswith("_s") or k.endswith("_error"))
               or k in ("measured_s", "step_times_s")}
        if "measured_s" in old:
            row.update(predict(old["micro_batch"], old["seq_len"], old["recompute"]))
            _add_errors(row)
        rows.append(row)
        print(_row_line(row), flush=True)
    return {"profile_s": earlier["profile_s"], "rows": rows, "notes": earlier.get("notes", []), "profile": prof,
            "setup": s, "replayed_from": {"file": args.replay, "command": earlier.get("command"), "env": env}}


# ------------------------------------------------------------------------------------ report
def _stats(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    errors = [abs(r[f"{key}_error"]) for r in rows if f"{key}_error" in r]
    if not errors:
        return {}
    return {"median_abs_error": statistics.median(errors), "mean_abs_error": statistics.mean(errors),
            "max_abs_error": max(errors)}


def _row_line(r: dict[str, Any]) -> str:
    head = f"mb={r['micro_batch']:>2} seq={r['seq_len']:>5} {r['recompute']:<9}"
    if "measured_s" not in r:
        return f"{head} {r.get('error')}"
    return (f"{head} measured {r['measured_s'] * 1e3:8.1f} ms | cost model {r['cost_model_s'] * 1e3:8.1f} ms "
            f"({r['cost_model_error']:+.1%}) | layer sum {r['layer_sum_s'] * 1e3:8.1f} ms ({r['layer_sum_error']:+.1%})"
            f" | datasheet {r['datasheet_s'] * 1e3:8.1f} ms ({r['datasheet_error']:+.1%})")


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Command: `{result['command']}`", "", f"Environment: {json.dumps(result['env'])}", "",
             f"Profiling took **{result['profile_s']:.1f} s** (target < 120 s; model build included).", "",
             "| mb | seq | recompute | runtime | measured ms | cost model ms (err) | layer sum ms (err) | "
             "overlapped ms (err) | datasheet ms (err) | peak GiB meas / pred |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "measured_s" not in r:
            lines.append(f"| {r['micro_batch']} | {r['seq_len']} | {r['recompute']} | {r['runtime']} | "
                         f"{r.get('error')} | | | | | |")
            continue
        peak = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "-"
        predicted = " | ".join(f"{r[k + '_s'] * 1e3:.1f} ({r[k + '_error']:+.1%})" if r.get(k + "_s") is not None
                               else "-" for k in PREDICTIONS)
        lines.append(f"| {r['micro_batch']} | {r['seq_len']} | {r['recompute']} | {r['runtime']} | "
                     f"{r['measured_s'] * 1e3:.1f} | {predicted} | {peak} / {r['predicted_peak_gib']:.1f} |")
    lines += ["", "| prediction | median abs error | mean abs error | max abs error |", "|---|---|---|---|"]
    for key, stats in result["errors"].items():
        if stats:
            lines.append(f"| {key} | {stats['median_abs_error']:.1%} | {stats['mean_abs_error']:.1%} | "
                         f"{stats['max_abs_error']:.1%} |")
    lines += ["", f"Targets: profile < 120 s: **{result['targets']['profile_under_2_min']}**; cost model median "
              f"abs error < 5%: **{result['targets']['cost_model_median_under_5pct']}**.", ""]
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON path; the .md table and the profile YAML go beside it")
    parser.add_argument("--model", default="gpt3-1.3b", help="model preset or YAML (reference GPT architecture)")
    parser.add_argument("--runtime", choices=["wrap", "plain"], default="wrap",
                        help="time steps through galvatron.wrap (default) or the plain model")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration (median kept)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script in seconds")
    parser.add_argument("--replay", metavar="RESULTS_JSON",
                        help="no measuring: today's predictions for an earlier run's measurements (its JSON, "
                             "with the .profile.yaml beside it)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = replay(args) if args.replay else run(args)
    prof: ModelProfile = result.pop("profile")
    s: Setup = result.pop("setup")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.save(out.with_suffix(".profile.yaml"))
    result["errors"] = {key: _stats(result["rows"], key) for key in PREDICTIONS}
    median = result["errors"]["cost_model"].get("median_abs_error")
    result["targets"] = {"profile_under_2_min": result["profile_s"] < 120,
                         "cost_model_median_under_5pct": median is not None and median < 0.05}
    result["command"] = " ".join(["python", *sys.argv]) if argv is None else " ".join(["python", __file__, *argv])
    result["env"] = result.get("replayed_from", {}).get("env") or {
                     "torch": torch.__version__, "device": prof.device.name, "cuda": torch.version.cuda,
                     "model": s.name, "layers": s.cfg.layers, "hidden": s.cfg.hidden, "dtype": prof.dtype.value,
                     "gpu_in_database": s.gpu, "wall_s": time.perf_counter() - started}
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
