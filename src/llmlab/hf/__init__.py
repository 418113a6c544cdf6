"""Hugging Face interop: GPT-2, Llama, Qwen2 and DeepSeek-V2/V3 (MLA, dense or MoE: see
llmlab/hf/deepseek.py) checkpoints <-> the generic llmlab Transformer.

    config.py    configs both ways (GPT-2, Llama, Qwen2; RoPE and YaRN)
    deepseek.py  DeepSeek-V2/V3: config, weight rows, the rope channel layout, MoE
    weights.py   the weight tables and their application both ways
    convert.py   folders and models: loading (safetensors only), from_hf, to_hf, `llmlab convert`

Conversion is two small steps: the HF config becomes a ModelConfig (or the reverse), and the weights
are renamed by one table per architecture. A table row is (our name, HF name(s), transposed?):

* GPT-2 stores its linears as `Conv1D`, weight [in, out], so each is transposed to nn.Linear's
  [out, in]. Its c_attn is already one fused [q | k | v] projection, the same layout as our `qkv`.
* Llama / Qwen2 keep q_proj, k_proj, v_proj separate; our fused `qkv` is their row concatenation
  (q: n_head*hd rows, then k and v: n_kv_head*hd rows each). gate_proj and up_proj concatenate into
  our fused SwiGLU `fc` (gate rows first). HF's rotate_half RoPE is the half-split layout our
  RotaryPositions uses, so q/k rows need no permutation.

A bias that exists on one side only is filled with zeros when the other side lacks it (e.g. a
bias=False nanoGPT exported as GPT-2, which always has biases): the function is unchanged. A bias
that would have to be dropped while non-zero is an error, never a silent loss. Zero-size tensors
(DeepSeek's shared experts when there are none) carry nothing and need no counterpart.

Only safetensors are read (HF's loader is called with use_safetensors=True) and written
(save_pretrained writes safetensors in transformers 5.x). `transformers` is imported lazily.
"""
from llmlab.hf.config import config_from_hf, config_to_hf, rope_fields, rope_parameters
from llmlab.hf.convert import _save_hf_tokenizer  # noqa: F401 - the tokenizer export, for tests
from llmlab.hf.convert import check_hf_dir, convert_from_hf, convert_to_hf, from_hf, to_hf, weight_files

__all__ = ["from_hf", "to_hf", "config_from_hf", "config_to_hf", "convert_from_hf", "convert_to_hf",
           "check_hf_dir", "weight_files", "rope_fields", "rope_parameters"]
