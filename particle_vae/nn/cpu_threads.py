"""Run a model function on several inputs at once, one CPU thread each."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

from particle_vae.nn.precision import autocast_state

Result = TypeVar("Result")


def map_in_cpu_threads(function: Callable[[torch.Tensor], Result], inputs: Sequence[torch.Tensor]) -> list[Result]:
    """``[function(x) for x in inputs]`` with ``torch.get_num_threads()`` threads working on
    different inputs, each running its torch operations on one thread.

    For many small, independent CPU computations (the encoder on a few images)
    this beats splitting every operation across the threads: no synchronisation
    after each operation, and the single-threaded steps (NumPy copies, small
    operations) run side by side. Grad mode and CPU autocast (both thread-local
    in torch) are carried into the workers. ``torch.set_num_threads`` is global,
    so the thread count is set back when the work is done.

    Args:
        function: called on each input from a worker thread; must not depend on thread-local state
            other than grad mode and autocast.
        inputs: tensors (or anything ``function`` takes).
    Returns:
        the results in input order.
    """
    threads = torch.get_num_threads()
    if threads <= 1 or len(inputs) <= 1:
        return [function(x) for x in inputs]
    grad = torch.is_grad_enabled()
    autocast, autocast_dtype = autocast_state("cpu")

    def work(x):
        torch.set_num_threads(1)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
            return function(x)

    try:
        with ThreadPoolExecutor(min(threads, len(inputs))) as pool:
            return list(pool.map(work, inputs))
    finally:
        torch.set_num_threads(threads)
