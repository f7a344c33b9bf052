"""Imported first by the launcher's forkserver (launch.PRELOAD_CPU / PRELOAD_CUDA): the known-harmless library
warnings and log records filtered before it imports torch and megatron-core, as the CLI filters them before its
own imports. PYTHONWARNINGS reaches a child interpreter's warnings but not its log records. Outside
megatron_refine.runtime, whose package imports megatron-core."""

from megatron_refine.warnings import filter_library_warnings

filter_library_warnings()
