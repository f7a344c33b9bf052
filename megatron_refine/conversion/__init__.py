"""Checkpoint conversion with Hugging Face formats: DeltaNet <-> fla's `delta_net`, Gated DeltaNet <-> fla's
`gated_deltanet`, LaCT <-> the authors' `lact_swiglu` (with modeling code of ours shipped in the export), hybrids of
Gated DeltaNet and attention layers <-> transformers' Qwen3.5 text model `qwen3_5_text` (a vision-language `qwen3_5`
folder imports its language model)."""

from megatron_refine.conversion.hf import MAX_SHARD_BYTES, export_to_hf, import_from_hf

__all__ = ["MAX_SHARD_BYTES", "export_to_hf", "import_from_hf"]
