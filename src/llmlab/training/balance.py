"""Expert balancing for MoE models during training (DeepSeek-V3 §2.1.2), used by TrainStep.

* Auxiliary-loss-free: after every optimizer step, each routed expert's selection bias moves by
  gamma toward equal load, b_i += gamma * sign(mean_j load_j - load_i), where load_i counts the
  (token, expert) assignments of the whole step: every micro-batch and, under --parallel, every rank
  (summed with one all-reduce, so all ranks apply the same update and keep the same bias). The bias
  only changes which experts are chosen, never the weights of their outputs, so it biases no
  gradient (unlike an auxiliary loss).
* The optional sequence-wise balance loss: alpha * sum over MoE layers of L_bal (llmlab.model.moe),
  added to the training loss.
* Statistics for the log and metrics.jsonl, per MoE layer: `expert_load`, the step's max/mean
  expert load (1.0: perfectly even), and, where a capacity factor applies, `expert_dropped`, the
  fraction of assignments dropped.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from llmlab.model.moe import MoE

Reduce = Callable[[torch.Tensor], torch.Tensor]


class ExpertBalance:
    def __init__(self, model: torch.nn.Module, bias_rate: float = 0.0, aux_weight: float = 0.0,
                 all_reduce_sum: Optional[Reduce] = None):
        self.layers = [m for m in model.modules() if isinstance(m, MoE)]
        self.bias_rate, self.aux_weight = bias_rate, aux_weight
        self.all_reduce_sum = all_reduce_sum or (lambda t: t)
        self.capacity = any(m.capacity_factor is not None for m in self.layers)
        for m in self.layers:  # what the forwards must record for this balancer (see MoE)
            m.record_load, m.record_balance_loss = True, aux_weight > 0

    def aux_loss(self) -> Optional[torch.Tensor]:
        """alpha * sum of the layers' balance losses from the forward just run (None when off)."""
        if self.aux_weight <= 0 or not self.layers:
            return None
        return self.aux_weight * sum(m.balance_loss for m in self.layers)

    def discard(self) -> None:
        """Forget what the forwards since the last step recorded: loads, and the balance losses
        (which would otherwise keep their autograd graphs, and the activations in them, alive)."""
        for m in self.layers:
            m.load_log.clear()
            m.balance_loss = None

    @torch.no_grad()
    def step(self) -> dict[str, list[float]]:
        """After the optimizer step: sum the step's loads (micro-batches, then ranks), move each bias
        by +-gamma, return the statistics ({} for a model without MoE layers)."""
        if not self.layers:
            return {}
        logs = [m.load_log for m in self.layers]
        if any(not log for log in logs):  # no training forward since the last step: nothing to learn from
            self.discard()
            return {}
        loads = torch.stack([torch.stack(log).sum(dim=0) for log in logs])  # (layers, 2, E): routed, dropped
        self.discard()
        loads = self.all_reduce_sum(loads).double()
        routed, dropped = loads[:, 0], loads[:, 1]
        mean = routed.mean(dim=-1, keepdim=True)
        if self.bias_rate > 0:
            for m, sign in zip(self.layers, torch.sign(mean - routed)):
                m.router.bias.add_(sign.to(m.router.bias), alpha=self.bias_rate)
        stats = {"expert_load": [round(v, 4) for v in (routed.max(dim=-1).values / mean[:, 0]).tolist()]}
        if self.capacity:
            stats["expert_dropped"] = [round(v, 5) for v in (dropped.sum(-1) / routed.sum(-1)).tolist()]
        return stats


def describe(stats: dict[str, list[float]]) -> str:
    """', expert load max/mean 1.08 1.21' (per MoE layer) for a log line; '' without MoE statistics."""
    if not stats.get("expert_load"):
        return ""
    text = ", expert load max/mean " + " ".join(f"{v:.2f}" for v in stats["expert_load"])
    if "expert_dropped" in stats:
        text += ", dropped " + " ".join(f"{100 * v:.1f}%" for v in stats["expert_dropped"])
    return text
