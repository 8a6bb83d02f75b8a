import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    """Under pytest-xdist, each worker gets its share of the cores as torch threads.

    The suite runs one worker per core (run.sh); a worker that kept torch's default (all cores)
    would oversubscribe the machine and stall in OpenMP barriers. Tests that compare thread
    counts set theirs explicitly.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
