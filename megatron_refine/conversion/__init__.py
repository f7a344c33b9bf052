"""Checkpoint conversion with Hugging Face formats: DeltaNet <-> fla's `delta_net`, Gated DeltaNet <-> fla's
`gated_deltanet`, LaCT <-> the authors' `lact_swiglu` (with modeling code of ours shipped in the export)."""

from megatron_refine.conversion.hf import MAX_SHARD_BYTES, export_to_hf, import_from_hf

__all__ = ["MAX_SHARD_BYTES", "export_to_hf", "import_from_hf"]
