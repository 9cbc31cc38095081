"""How much `import galvatron` adds to `import torch` (fresh interpreters, interleaved, medians).

    python benchmarks/import_time.py [--runs 15] [--out benchmarks/results/import_time.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SNIPPETS = {"torch": "import torch", "torch+galvatron": "import torch, galvatron"}


def timed(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    samples: dict[str, list[float]] = {name: [] for name in SNIPPETS}
    timed("import torch, galvatron")  # warm the file cache
    for _ in range(args.runs):
        for name, code in SNIPPETS.items():
            samples[name].append(timed(code))
    med = {name: statistics.median(v) for name, v in samples.items()}
    result = {
        "command": " ".join(["python", *sys.argv]),
        "median_s": med,
        "added_s": med["torch+galvatron"] - med["torch"],
        "runs": args.runs,
        "python": sys.version.split()[0],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
