"""The settings of `llmlab sample` and `llmlab eval`, and of how a saved model runs, declared once
as dataclass fields: the CLI's flags are derived from them (llmlab.settings.add_flags), as
`llmlab train`'s are from TrainArgs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from llmlab.runtime import CACHE_KINDS, DTYPES
from llmlab.settings import setting as _


_RUN = "the run's own"


@dataclass
class RuntimeArgs:
    """How to run a saved model (llmlab.runtime.Runtime); unset: as the run was saved."""
    attention: Optional[str] = _(None, "attention implementation: manual, sdpa or flash_mla (MLA runs)", none=_RUN,
                                 metavar="NAME")
    cache: Optional[str] = _(None, "cache kind for generation", none=_RUN, choices=CACHE_KINDS)
    compile: Optional[bool] = _(None, "torch.compile the cached one-token decode step (seconds to compile "
                                      "first, then faster tokens)", none=_RUN)
    dtype: Optional[str] = _(None, "run the weights in this dtype", none=_RUN, choices=DTYPES)

    def changes(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class SampleArgs:
    prompt: Optional[str] = _(None, "text to continue", none="the start of a text", metavar="TEXT")
    max_new_tokens: int = _(200, "tokens to generate")
    temperature: float = _(0.8, "sampling temperature (0 is greedy)")
    top_k: Optional[int] = _(None, "sample among the k most likely tokens", none="all")
    top_p: Optional[float] = _(None, "sample among the most likely tokens holding this probability", none="1")
    seed: Optional[int] = _(None, "random seed", none="fresh entropy")
    device: str = _("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", metavar="NAME")


@dataclass
class EvalArgs:
    data: Optional[str] = _(None, "evaluate on this data's validation split", none="the run's data", metavar="PATH")
    max_tokens: int = _(200_000, "evaluate at most this many tokens")
    device: str = _("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", metavar="NAME")


def split(ns, *classes) -> list:
    """One instance of each dataclass, from the parsed flags named after its fields."""
    values = vars(ns)
    return [cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}) for cls in classes]
