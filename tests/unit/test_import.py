"""`import galvatron` stays light: nothing heavy imported, no process group started.
(Its time is measured by benchmarks/import_time.py, not here.)"""

import subprocess
import sys

CHECK = """
import sys, galvatron
heavy = [m for m in ("torch", "transformers", "ray", "deepspeed", "galvatron.strategies", "galvatron.runtime",
                     "galvatron.profiler", "galvatron.launch", "torch.distributed.tensor") if m in sys.modules]
import torch.distributed as dist
print(heavy, dist.is_initialized())
"""


def test_import_is_light() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False"
