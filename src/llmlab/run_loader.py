"""Loading a run or checkpoint to generate from (`llmlab sample`, `eval`, `serve`), every way it
can be unusable refused in one line before any work."""
from __future__ import annotations

from typing import Optional

from llmlab.errors import LlmlabError


def load_run(run_dir: str, device: str, runtime: Optional[dict] = None):
    """Model + tokenizer of a run for sample / eval / serve, every way they can be unusable checked first:
    device, config, memory, weights that are not finite, a tokenizer that does not fit the model.
    `runtime`: changes to how the run's model runs (llmlab.runtime)."""
    from llmlab.checkpoint import load, resolve_checkpoint
    from llmlab.device import resolve_device
    from llmlab.tokenizer import load_tokenizer
    from llmlab.training.dcp import is_sharded

    dev = resolve_device(device)  # before loading anything: fails fast on a device this machine lacks
    directory = resolve_checkpoint(run_dir)
    if is_sharded(directory):
        raise LlmlabError(f"{directory} is a sharded (--parallel) checkpoint: `llmlab convert {directory} "
                          "--out DIR` writes a single one to use here")
    tok = load_tokenizer(directory)
    model = load(directory, device=dev, runtime=runtime)
    check_usable(model, tok, directory)
    return model, tok


def check_usable(model, tok, where) -> None:
    """A tokenizer whose ids the model has (else a prompt could index past the embedding), weights
    that are all finite: refused in one line, whichever way the model was loaded."""
    import torch

    from llmlab.tokenizer import check_fits

    check_fits(tok, model.config.vocab_size, where)
    with torch.no_grad():
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise LlmlabError(f"{where} has NaN/inf weights ({bad[0]}, {len(bad)} tensor(s)); "
                          "use an earlier checkpoint (e.g. best/) or retrain")
