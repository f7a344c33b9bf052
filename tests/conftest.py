"""Suite-wide: the known-harmless library warnings filtered from the one list the CLI and the demo use, and a
small built-in corpus."""

import pytest

from megatron_refine.warnings import filterwarnings_lines


def pytest_configure(config):
    for entry in filterwarnings_lines():
        config.addinivalue_line("filterwarnings", entry)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """200 documents of the built-in corpus in 8 shards."""
    from megatron_refine.data import write_builtin_corpus

    path = tmp_path_factory.mktemp("corpus")
    write_builtin_corpus(path, 200, seed=0, shard_size=25, progress=False)
    return str(path)
