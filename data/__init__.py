"""Data layer: token sources (stdlib, .bin token files, text, blended Megatron indexed datasets)
and the distributed batch sampler."""

from data.batch_sampler import DistributedBatchSampler, SampleRows, validation_batches
from data.build import build_token_source
from data.token_source import TokenSource

__all__ = [
    "DistributedBatchSampler",
    "SampleRows",
    "TokenSource",
    "build_token_source",
    "validation_batches",
]
