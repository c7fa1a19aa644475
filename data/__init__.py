"""Data layer: token sources (stdlib, .bin token files, text) and the distributed batch sampler."""

from data.batch_sampler import DistributedBatchSampler, validation_batches
from data.build import build_token_source
from data.token_source import TokenSource

__all__ = ["DistributedBatchSampler", "TokenSource", "build_token_source", "validation_batches"]
