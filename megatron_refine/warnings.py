"""Library warnings known to be harmless here, filtered in one place: the CLI, every rank it starts (forkserver
ranks and torchrun ranks read `PYTHONWARNINGS`), the demo, the benchmarks, the recipes, and the test suite
(tests/conftest.py adds the same list to pytest's `filterwarnings`). Warnings this project raises are never in it.
A light module: importing it imports no library, so the filters are in place before megatron-core or fla speak.

`--verbose` (anywhere on the command line) or MEGATRON_REFINE_SHOW_WARNINGS=1 shows everything.
"""

from __future__ import annotations

import os
import re
import warnings

SHOW_ENV = "MEGATRON_REFINE_SHOW_WARNINGS"

# (message prefix, category, regex of the module the warning is attributed to, or ""): none says anything a user
# can act on.
LIBRARY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # megatron-core at import, on CPU machines and without TE / apex (the CUDA stack's optional pieces)
    ("Transformer Engine and Apex are not installed", UserWarning, ""),
    ("Apex is not installed", UserWarning, ""),
    # megatron-core 0.16.1's TransformerConfig on its own default cuda_graph_scope
    ("full scope is deprecated", UserWarning, ""),
    # fla at import on a machine without CUDA (its PyTorch references still run)
    ("Triton is not supported on current platform", UserWarning, ""),
    # torch's distributed checkpointing under megatron-core's dist checkpoints (ShardedTensor, load_state_dict)
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning, ""),
    ("`load_state_dict` is deprecated and will be removed", FutureWarning, ""),
    # deprecations inside the libraries' own code, not ours
    ("", DeprecationWarning, r"megatron(\.|$)"),
    ("", DeprecationWarning, r"torch\.jit(\.|$)"),
    ("", DeprecationWarning, r"leptonai(\.|$)"),
    ("", DeprecationWarning, r"fastapi(\.|$)"),
    ("", DeprecationWarning, r"pydantic(\.|$)"),
)


def showing_all() -> bool:
    return os.environ.get(SHOW_ENV, "") not in ("", "0")


def filter_library_warnings() -> None:
    """Ignore LIBRARY_WARNINGS in this process and in the processes it starts; with `showing_all`, take them out
    again (a parent that filtered them passes its PYTHONWARNINGS on to this process)."""
    # Child interpreters (the launcher's forkserver, torchrun's ranks) start from PYTHONWARNINGS, which matches
    # messages literally and modules exactly: the message prefixes above as `-W` entries.
    entries = [f"ignore:{m}:{c.__name__}:" for m, c, mod in LIBRARY_WARNINGS if m and ":" not in m and not mod]
    current = [e for e in os.environ.get("PYTHONWARNINGS", "").split(",") if e]
    if showing_all():
        ours = {re.escape(m) for m, _, _ in LIBRARY_WARNINGS if m}
        warnings.filters[:] = [f for f in warnings.filters
                               if not (f[0] == "ignore" and f[1] is not None and f[1].pattern in ours)]
        os.environ["PYTHONWARNINGS"] = ",".join(e for e in current if e not in entries)
        return
    for message, category, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category, module=module)
    os.environ["PYTHONWARNINGS"] = ",".join(dict.fromkeys(current + entries))


def filterwarnings_lines() -> list[str]:
    """The same list in pytest's `filterwarnings` syntax (action:message:category:module, regexes)."""
    return [f"ignore:{re.escape(m)}:{c.__name__}:{mod}" for m, c, mod in LIBRARY_WARNINGS]


__all__ = ["LIBRARY_WARNINGS", "SHOW_ENV", "filter_library_warnings", "filterwarnings_lines", "showing_all"]
