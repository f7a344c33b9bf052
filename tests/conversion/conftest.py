import pytest

from megatron_refine.data import write_builtin_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """100 documents of the built-in corpus (byte tokenizer, vocabulary 257)."""
    path = tmp_path_factory.mktemp("corpus")
    write_builtin_corpus(path, 100, seed=0, shard_size=50, progress=False)
    return str(path)
