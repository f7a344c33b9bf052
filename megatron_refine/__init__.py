"""megatron-refine: fast-weight language models (DeltaNet, LaCT) trained with REFINE on Megatron-core."""

__version__ = "0.1.0"
