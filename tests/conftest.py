"""Shared test setup: offline, quiet, deterministic, tiny models built from configs."""

from __future__ import annotations

import os

# Set before transformers / datasets are imported anywhere: tests never touch the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

import pytest  # noqa: E402


def make_tiny_llama(
    seed: int = 0,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    tie_word_embeddings: bool = False,
):
    """A randomly initialised LlamaForCausalLM small enough to train in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_llama():
    """Factory fixture: ``tiny_llama(seed=0, num_hidden_layers=2, ...)``."""
    return make_tiny_llama


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models on a shared 2-core box thrash with more."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
