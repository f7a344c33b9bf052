import pytest

from megatron_refine.data import write_builtin_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """200 documents of the built-in corpus in 8 shards."""
    path = tmp_path_factory.mktemp("corpus")
    write_builtin_corpus(path, 200, seed=0, shard_size=25, progress=False)
    return str(path)
