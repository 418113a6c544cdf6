"""llmlab: build, train, sample and compare small LLMs, rung by rung.

Stable API: `Transformer` / `ModelConfig`, `preset_config(name, **sizes)`, `load(path, **overrides)`,
`generate(model, idx, max_new_tokens, ...)`, `from_hf(path_or_model)`, `to_hf(model, out_dir)`.
"""
from llmlab.checkpoint import load
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.generation import generate, stream
from llmlab.model import GPT, Transformer
from llmlab.presets import PRESETS, preset_config

__version__ = "0.1.0"


def from_hf(path_or_model, **overrides):
    """An llmlab Transformer from a Hugging Face GPT-2 / Llama / Qwen2 / DeepSeek-V2 directory or model."""
    from llmlab.hf import from_hf as _from_hf

    return _from_hf(path_or_model, **overrides)


def to_hf(model, out_dir):
    """Write `model` as a Hugging Face directory that AutoModelForCausalLM loads."""
    from llmlab.hf import to_hf as _to_hf

    return _to_hf(model, out_dir)


__all__ = ["Transformer", "GPT", "ModelConfig", "LlmlabError", "PRESETS", "preset_config", "load",
           "generate", "stream", "from_hf", "to_hf"]
