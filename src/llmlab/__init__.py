"""llmlab: build, train, sample and compare small LLMs, rung by rung.

Stable API: `Transformer(config, runtime)` / `ModelConfig` (what the weights are) / `Runtime` (how
they run), `preset_config(name, **sizes)`, `preset_runtime(name)`, `preset_model(name, **sizes)`,
`load(path, runtime=..., **overrides)`, `generate(model, idx, max_new_tokens, ...)`,
`from_hf(path_or_model)`, `to_hf(model, out_dir)`.
"""
from llmlab.checkpoint import load
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.generation import generate, stream
from llmlab.model import GPT, Transformer
from llmlab.presets import PRESETS, preset_config, preset_model, preset_runtime
from llmlab.runtime import Runtime

__version__ = "0.1.0"


def from_hf(path_or_model, **overrides):
    """An llmlab Transformer from a Hugging Face GPT-2 / Llama / Qwen2 / DeepSeek-V2 directory or model."""
    from llmlab.hf import from_hf as _from_hf

    return _from_hf(path_or_model, **overrides)


def to_hf(model, out_dir):
    """Write `model` as a Hugging Face directory that AutoModelForCausalLM loads."""
    from llmlab.hf import to_hf as _to_hf

    return _to_hf(model, out_dir)


__all__ = ["Transformer", "GPT", "ModelConfig", "Runtime", "LlmlabError", "PRESETS", "preset_config",
           "preset_runtime", "preset_model", "load", "generate", "stream", "from_hf", "to_hf"]
