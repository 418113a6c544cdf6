"""DeepSeekMoE: shared + fine-grained routed SwiGLU experts, top-k routing, and the bookkeeping that
auxiliary-loss-free balancing needs (mlp="moe"; DeepSeekMoE arXiv 2401.06066, DeepSeek-V2 §2.2,
DeepSeek-V3 §2.1.2).

    h = shared(x) + sum_{i in topk(s + b)} g_i * expert_i(x)

* scores s = sigmoid(x W_r^T) (V3) or softmax(x W_r^T) (V2), computed in fp32 (autocast off: the
  choice of experts is a discrete decision that bf16 rounding would flip);
* the selection uses s + b, where b is the per-expert balancing bias (a buffer, not a parameter: no
  gradient reaches it; llmlab.training.balance moves it by +-gamma a step toward equal load); the
  weights g use s alone: g_i = s_i (V2), or s_i / sum_{j in topk} s_j (V3's normalisation), times
  routed_scaling_factor;
* group-limited routing (V2's device-limited idea, V3's node-limited): experts are split into
  n_group groups, a group is scored by its best expert (softmax, V2) or the sum of its two best
  (sigmoid, V3), and only the topk_group best groups are eligible;
* optional capacity (V2's token dropping, training only): an expert keeps at most
  ceil(cf * tokens * k / E) assignments, those with the highest scores; the others get weight 0.
  The dispatch below has static shapes, so it still computes the dropped rows: capacity changes the
  training dynamics, not the cost.

Dispatch: the N*k (token, expert) assignments are sorted by expert, so each expert's rows are
contiguous and one grouped matmul (llmlab.model.expert_mm) runs every expert; the outputs are put
back in assignment order and summed over each token's k experts. Nothing reads a tensor on the host.

Per forward in training mode each layer records its expert loads (`load_log`, summed and cleared by
llmlab.training.balance after the optimizer step) and its sequence-wise balance loss
(`balance_loss`, V3 eq. 17-20), which training adds with weight alpha. Activation checkpointing
reruns the forward in backward and so records every layer's load twice: a uniform factor, which
changes neither the sign of the load error nor max/mean.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.config import ModelConfig
from llmlab.model.expert_mm import expert_matmul
from llmlab.model.layers import SwiGLU
from llmlab.registry import register


class Router(nn.Module):
    """Token -> k experts and their weights. `bias` is the selection-only balancing bias (V3's
    e_score_correction_bias): a persistent buffer, saved in model.safetensors."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.k = config.routed_experts, config.experts_per_token
        self.score, self.normalize, self.scale = config.router_score, config.normalize_topk, config.routed_scale
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.n_embd))
        self.register_buffer("bias", torch.zeros(self.n_experts))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        self.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> weights (N, k), chosen experts (N, k), all scores (N, E) in fp32."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.score == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.bias  # selection only: the bias never enters the weights
        if self.n_group is not None:
            choice = self._eligible_groups(choice)
        chosen = choice.topk(self.k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, chosen, scores

    def _eligible_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """-inf on the experts outside each token's topk_group best groups."""
        groups = choice.view(choice.shape[0], self.n_group, -1)  # (N, G, E/G)
        if self.score == "sigmoid":  # V3: a group's two best experts
            group_score = groups.topk(2, dim=-1).values.sum(dim=-1)
        else:  # V2: its best expert
            group_score = groups.max(dim=-1).values
        best = group_score.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
        return groups.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)


class Experts(nn.Module):
    """E SwiGLU experts as two stacked weights, laid out as transformers' DeepseekV2/V3Experts:
    fc (E, 2I, D), gate rows first then up (our SwiGLU's fused layout); proj (E, D, I). No biases.
    `impl` picks the grouped matmul ("auto", "grouped" or the "loop" reference; tests set it)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, d, i = config.routed_experts, config.n_embd, config.expert_size
        self.fc = nn.Parameter(torch.empty(e, 2 * i, d))
        self.proj = nn.Parameter(torch.empty(e, d, i))
        self.residual_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2's scaled init of residual projections
        self.impl = "auto"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.fc, std=0.02)
        nn.init.normal_(self.proj, std=self.residual_std)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """x (M, D) rows sorted by expert, offs (E,) int32 end of each expert's rows -> (M, D)."""
        gate, up = expert_matmul(x, self.fc.transpose(1, 2), offs, self.impl).chunk(2, dim=-1)
        return expert_matmul(F.silu(gate) * up, self.proj.transpose(1, 2), offs, self.impl)


@register("mlp", "moe")
class MoE(nn.Module):
    """shared(x) + the weighted sum of each token's k routed experts (see the module docstring)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)
        n_shared = config.shared_experts
        self.shared = SwiGLU(config, hidden=n_shared * config.expert_size) if n_shared else None
        self.capacity_factor = config.moe_capacity_factor
        self.dropout = nn.Dropout(config.dropout)
        # What a training forward records, for whoever balances the experts (llmlab.training.balance
        # turns these on): nothing by default, so a plain training loop keeps no per-step tensors and
        # builds no balance-loss graph it never uses.
        self.record_load = self.record_balance_loss = False
        self.load_log: list[torch.Tensor] = []  # (2, E) [routed, dropped] counts per forward
        self.balance_loss: Optional[torch.Tensor] = None  # the last forward's L_bal

    def idle_params(self) -> int:
        """Routed-expert parameters a token does not run through (for num_active_params)."""
        per_expert = self.experts.fc[0].numel() + self.experts.proj[0].numel()
        return (self.router.n_experts - self.router.k) * per_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        weights, chosen, scores = self.router(flat)  # (N, k), (N, k), (N, E)
        n_experts, k = scores.shape[1], chosen.shape[1]
        expert = chosen.reshape(-1)  # (N*k,) assignment a = token a // k
        counts = torch.zeros(n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, expert, torch.ones_like(expert))
        ends = counts.cumsum(0)
        weight = weights.reshape(-1)
        dropping = self.training and self.capacity_factor is not None
        if dropping:  # best-scored first within each expert: sort by score, then (stably) by expert
            by_score = scores.gather(1, chosen).reshape(-1).argsort(descending=True, stable=True)
            order = by_score[expert[by_score].argsort(stable=True)]
        else:
            order = expert.argsort(stable=True)
        w_sorted = weight[order]
        if dropping:
            capacity = math.ceil(self.capacity_factor * b * t * k / n_experts)
            e_sorted = expert[order]
            rank = torch.arange(order.shape[0], device=x.device) - (ends - counts)[e_sorted]
            w_sorted = w_sorted * (rank < capacity)
            dropped = (counts - capacity).clamp(min=0)
        else:
            dropped = torch.zeros_like(counts)
        rows = self.experts(flat[order // k], ends.to(torch.int32)) * w_sorted.unsqueeze(1).to(flat.dtype)
        # back to assignment order (a permutation: no two rows collide), then sum each token's k experts
        routed = torch.empty_like(rows).index_copy_(0, order, rows).view(b * t, k, d).sum(dim=1)
        if self.training and self.record_load:
            self.load_log.append(torch.stack([counts, dropped]).detach())
        if self.training and self.record_balance_loss:
            self.balance_loss = self._balance_loss(scores, chosen, b, t)
        out = self.dropout(routed.view(b, t, d))
        return out + self.shared(x) if self.shared is not None else out

    @staticmethod
    def _balance_loss(scores: torch.Tensor, chosen: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """V3's sequence-wise balance loss, mean over sequences: sum_i f_i P_i with
        f_i = E/(k T) * (tokens of the sequence sent to i), P_i = mean_t s'_{i,t}, s' = s / sum_j s_j.
        Equal to 1 when load and scores are uniform."""
        n_experts, k = scores.shape[1], chosen.shape[1]
        share = scores / scores.sum(dim=-1, keepdim=True)
        p = share.view(b, t, n_experts).mean(dim=1)  # (B, E)
        hits = torch.zeros(b, n_experts, device=scores.device).scatter_add_(
            1, chosen.reshape(b, t * k), torch.ones(b, t * k, device=scores.device))
        f = hits * n_experts / (k * t)
        return (f * p).sum(dim=-1).mean()
