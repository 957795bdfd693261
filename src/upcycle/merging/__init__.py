"""Merging methods for task vectors, in memory and streamed from safetensors files."""

from upcycle.merging.methods import MERGE_METHODS, MergeMethod, merge_task_vectors
from upcycle.merging.streaming import merge_safetensors_files

__all__ = ["MERGE_METHODS", "MergeMethod", "merge_safetensors_files", "merge_task_vectors"]
