"""The Hugging Face modeling code shipped in every LaCT export (`lact_swiglu`, loaded with trust_remote_code).

Self-contained on purpose: an export is read by users without megatron-refine installed, so these files import
only torch and transformers, and each other relatively. tests/conversion/test_lact_hf.py checks them against the
Megatron model.
"""
