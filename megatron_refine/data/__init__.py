"""Data: tokenizers, the built-in synthetic corpus, tokenized webdataset shards, the packed and per-document loaders,
and prompt / answer data for post-training and test-time training."""

from megatron_refine.data.batch import Batch
from megatron_refine.data.corpus import generate_documents
from megatron_refine.data.loader import DocumentLoader, DocumentLoaderState, LoaderState, PackedLoader
from megatron_refine.data.preprocess import preprocess, write_builtin_corpus
from megatron_refine.data.prompt_answer import PromptAnswerDataset, PromptAnswerLoader, parquet_to_jsonl
from megatron_refine.data.shards import DataError, ShardedDataset
from megatron_refine.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer, tokenizer_from_metadata

__all__ = [
    "Batch",
    "ByteTokenizer",
    "DataError",
    "DocumentLoader",
    "DocumentLoaderState",
    "HFTokenizer",
    "LoaderState",
    "PackedLoader",
    "PromptAnswerDataset",
    "PromptAnswerLoader",
    "ShardedDataset",
    "generate_documents",
    "load_tokenizer",
    "parquet_to_jsonl",
    "preprocess",
    "tokenizer_from_metadata",
    "write_builtin_corpus",
]
