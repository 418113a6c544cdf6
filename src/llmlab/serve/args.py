"""The settings of `llmlab serve`, declared once as dataclass fields: the CLI's flags are derived
from them (llmlab.settings.add_flags), as sample's are from SampleArgs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llmlab.errors import LlmlabError
from llmlab.settings import setting as _

API_KEY_ENV = "LLMLAB_API_KEY"


@dataclass
class ServeArgs:
    host: str = _("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network: set --api-key)",
                  metavar="ADDR")
    port: int = _(8000, "TCP port (0: any free port, printed at start)")
    max_batch: int = _(16, "most requests decoded together (cache rows)")
    max_queue: int = _(64, "most requests waiting for a row; past it a request gets 429 with Retry-After")
    max_len: Optional[int] = _(None, "tokens of one sequence (prompt + output)", none="the model's block_size")
    cache_blocks: Optional[int] = _(None, "blocks in the paged cache's pool; fewer than max_batch full sequences "
                                          "need makes admission wait for free blocks",
                                    none="max_batch sequences of max_len")
    block_size: Optional[int] = _(None, "tokens per block of the paged cache (a power of two)",
                                  none="the run's runtime (64)")
    batch_invariant: bool = _(True, "decode every row of the batch each step, so a request's tokens do not depend on "
                                    "what else runs (off: only the running rows, faster with few requests)")
    api_key: Optional[str] = _(None, f"every endpoint but /health and the page needs `Authorization: Bearer KEY` "
                                     f"(also read from {API_KEY_ENV})", none="no key", metavar="KEY")
    model_name: Optional[str] = _(None, "the model id clients send and /v1/models lists",
                                  none="the run directory's name", metavar="NAME")
    max_body: int = _(1 << 20, "largest request body in bytes (413 past it)")
    drain_s: float = _(30.0, "on SIGTERM, seconds in-flight requests get to finish before they are cancelled")
    device: str = _("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", metavar="NAME")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise LlmlabError(f"--port must be in [0, 65535], got {self.port}")
        for name in ("max_batch", "max_queue", "max_body"):
            if getattr(self, name) < 1:
                raise LlmlabError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_len", "cache_blocks", "block_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LlmlabError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not self.drain_s >= 0:
            raise LlmlabError(f"--drain-s must be >= 0, got {self.drain_s}")
        if self.api_key is not None and not self.api_key.strip():
            raise LlmlabError("--api-key is empty; give a key, or leave the flag out for no key")
