"""Reserved memory predicted without a GPU: the training step traced on fake tensors, then replayed
through the caching-allocator simulator, against the same steps measured on a GPU.

``benchmarks/reserved_memory.py`` measured the allocated and reserved peaks of torchtitan's published
Llama 3.1 8B FSDP runs and of ``galvatron.wrap`` runs on one H200, with the allocator's event trace.
Here the same steps run on a CPU under ``FakeTensorMode`` (shapes only: the 8B step takes seconds and
no memory), :class:`galvatron.profiler.memory_trace.AllocationTracer` logs every storage they create
and release (with FSDP2's side streams), and :mod:`galvatron.strategies.cost.allocator` replays the
log under the default allocator and with expandable segments.

    python benchmarks/fake_memory.py --out-dir benchmarks/results/fake_memory          # CPU, all cases
    python benchmarks/fake_memory.py --case titan8b-w8 --out-dir DIR                  # one case
    python benchmarks/fake_memory.py --record native-mb1-none --out FILE.json.gz      # GPU: the op log
                                                                                      # of a real run

``--record`` runs the case on the GPU with the same tracer on real tensors, so that a fake log can be
compared with a real one op by op (``--compare FILE.json.gz`` lists the (op, size) allocation counts
that differ).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from galvatron.profiler.memory_trace import Allocation, AllocationTracer, trace_steps
from galvatron.strategies.cost.allocator import memory_needs
from reserved_memory import GIB, NATIVE_CASES, PLAN_CASES, TITAN_CASES, case_trainer

MEASURED = Path(__file__).resolve().parent / "results" / "reserved_memory"
STEPS = 3  # as reserved_memory.py measured: the reserve settles in the second step


def trace(case: str) -> list[Allocation]:
    """The fake run's events: the case's tensors that exist before the first step, then ``STEPS`` steps.
    torchtitan pins FlashAttention, whose CPU kernel keeps what the GPU's does; galvatron.wrap's
    attention takes the GPU's pick (cuDNN on an H100)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    tracer = AllocationTracer(fake_mode)
    step, tensors = case_trainer(case, fake_mode, tracer)
    return trace_steps(step, fake_mode, tensors, STEPS, attention=None if case in TITAN_CASES else "cudnn",
                       tracer=tracer)


def predict(case: str, out_dir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    events = trace(case)
    traced = time.perf_counter() - start
    replay_events = [e[:4] for e in events]
    row: dict[str, Any] = {"case": case, "trace_seconds": round(traced, 1), "events": len(events)}
    for mode in ("default", "expandable"):
        needs = memory_needs(replay_events, expandable_segments=mode == "expandable")
        measured_path = MEASURED / f"{case}.{mode}.json"
        measured = json.loads(measured_path.read_text()) if measured_path.exists() else None
        row[mode] = {
            "allocated_gib": needs.stats.allocated_peak / GIB, "reserved_gib": needs.stats.reserved_peak / GIB,
            "least_memory_gib": needs.least_memory / GIB,
            "reserved_by_stream_gib": {str(k): v / GIB for k, v in needs.stats.reserved_by_stream.items()},
            "measured_allocated_gib": measured and max(measured["first_step"]["allocated_gib"],
                                                       measured["steady_allocated_gib"]),
            "measured_reserved_gib": measured and max(measured["first_step"]["reserved_gib"],
                                                      measured["steady_reserved_gib"]),
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{case}.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row), flush=True)
    return row


def summarize(out_dir: Path) -> None:
    """``out_dir/summary.md``: each case's prediction against its measurement."""
    lines = ["# Reserved memory from a fake-tensor trace", "",
             "`python benchmarks/fake_memory.py --out-dir benchmarks/results/fake_memory` "
             f"({time.strftime('%Y-%m-%d')}, CPU only). Predicted: the step traced on fake tensors "
             "(`galvatron.profiler.memory_trace`), replayed through `strategies.cost.allocator`. "
             "Measured: benchmarks/results/reserved_memory (one H200; the `-meta` cases one H100; the "
             "allocator's own peaks).", "",
             "| case | allocator | allocated GiB: predicted / measured (err) "
             "| reserved GiB: predicted / measured (err) | trace s |", "|---|---|---|---|---|"]
    errors: dict[str, list[float]] = {"allocated": [], "reserved": []}
    for path in sorted(out_dir.glob("*.json")):
        row = json.loads(path.read_text())
        for mode in ("default", "expandable"):
            r = row[mode]
            cells = []
            for key in ("allocated", "reserved"):
                pred, meas = r[f"{key}_gib"], r[f"measured_{key}_gib"]
                err = pred / meas - 1
                errors[key].append(abs(err))
                cells.append(f"{pred:.2f} / {meas:.2f} ({err:+.1%})")
            lines.append(f"| {row['case']} | {mode} | {cells[0]} | {cells[1]} | {row['trace_seconds']} |")
    lines += ["", "Mean absolute error: allocated "
              f"{sum(errors['allocated']) / len(errors['allocated']):.2%} (max {max(errors['allocated']):.2%}), "
              f"reserved {sum(errors['reserved']) / len(errors['reserved']):.2%} "
              f"(max {max(errors['reserved']):.2%})."]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def record(case: str, out: Path) -> None:
    """GPU: the case's real steps under the same tracer; the op log and its per-op histogram."""
    step, tensors = case_trainer(case)
    events = trace_steps(step, None, tensors, STEPS, attention=None)
    torch.cuda.synchronize()
    by_op = Counter((e.op, e.size) for e in events if e.action == "alloc")
    with gzip.open(out, "wt") as f:
        json.dump({"case": case, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                   "max_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
                   "events": [list(e) for e in events],
                   "by_op": [[op, size, n] for (op, size), n in sorted(by_op.items())]}, f)
    print(case, "allocated", torch.cuda.max_memory_allocated() / GIB, "reserved",
          torch.cuda.max_memory_reserved() / GIB, flush=True)


def compare(recorded: Path) -> int:
    """The (op, bytes) allocation counts where a fake trace and a ``--record``ed real run differ."""
    real = json.loads(gzip.open(recorded, "rt").read())
    counts = Counter({(op, size): n for op, size, n in real["by_op"]})
    fake = Counter((e.op, e.size) for e in trace(real["case"]) if e.action == "alloc")
    differ = sorted(k for k in counts.keys() | fake.keys() if counts[k] != fake[k])
    print(f"{real['case']}: {sum(counts.values())} allocations on {real['device']}, {sum(fake.values())} traced; "
          f"{len(differ)} (op, size) counts differ")
    for op, size in differ:
        print(f"  {size:>12} B  {op or '(adopted)':60} real {counts[op, size]:5}  fake {fake[op, size]:5}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cases = [*TITAN_CASES, *NATIVE_CASES, *PLAN_CASES]
    parser.add_argument("--case", choices=cases, action="append", help="only these cases (default: all)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/fake_memory"))
    parser.add_argument("--record", choices=cases, help="GPU: log a real run's allocations by op")
    parser.add_argument("--out", type=Path, help="--record's output (.json.gz)")
    parser.add_argument("--compare", type=Path, metavar="OPS_JSON_GZ",
                        help="CPU: where a fake trace's allocations differ from a --record'ed run's, by op")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args.compare)
    if args.record:
        record(args.record, args.out or Path(f"{args.record}.ops.json.gz"))
        return 0
    if args.case and len(args.case) == 1:
        predict(args.case[0], args.out_dir)
        return 0
    for case in args.case or cases:  # one process each: a case initializes its process group
        subprocess.run([sys.executable, __file__, "--case", case, "--out-dir", str(args.out_dir)], check=True)
    summarize(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
