"""One owner of the checkpoint format: outside `training/checkpoint_format.py` no module of the package names a
checkpoint's folders, marker or checksums file, writes the marker, or reaches into torch DCP's private helpers
(the converters stream through the format module's reader and writer)."""

import re
from pathlib import Path

import megatron_refine

PACKAGE = Path(megatron_refine.__file__).parent
OWNER = PACKAGE / "training" / "checkpoint_format.py"
# What knowing the on-disk layout looks like in code.
LAYOUT = {
    "names a checkpoint folder": re.compile(r"""f["']iter_\{"""),
    "names the marker": re.compile(r"""["']latest_checkpointed_iteration\.txt["']"""),
    "names the checksums file": re.compile(r"""["']checksums\.sha256["']"""),
    "writes the marker": re.compile(r"MARKER\b[^\n]*(write_text|\.tmp)"),
    "uses torch DCP's private helpers": re.compile(r"from torch\.distributed\.checkpoint[\w.]* import [^\n]*\b_[a-z]"),
}


def test_only_the_format_module_knows_the_layout():
    found = [f"{path.relative_to(PACKAGE)}:{text[: m.start()].count(chr(10)) + 1} {what}"
             for path in sorted(PACKAGE.rglob("*.py")) if path != OWNER
             for text in [path.read_text()] for what, pattern in LAYOUT.items() for m in pattern.finditer(text)]
    assert found == []
    owner = OWNER.read_text()
    assert all(pattern.search(owner) for what, pattern in LAYOUT.items() if what != "writes the marker")
