"""The torchrun runtime: load one rank's shards and run the parallel MoE model.

For programs that bring their own training loop:

    from reshard.runtime import load_local_tensors, load_dtensors
"""

from __future__ import annotations

from reshard.runtime.load import load_dtensors, load_local_tensors, load_parallel_model

__all__ = ["load_dtensors", "load_local_tensors", "load_parallel_model"]
