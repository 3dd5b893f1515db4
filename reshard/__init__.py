"""reshard: Hugging Face MoE checkpoints -> per-rank shards for any TP/EP/SP layout, and a runtime for them."""

from __future__ import annotations

__version__ = "0.1.0"
