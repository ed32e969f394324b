"""Modules built on sumto's constraints."""

from sumto.nn.weighted_sum import WeightedSum

__all__ = ["WeightedSum"]
