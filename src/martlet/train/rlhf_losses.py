"""Reference-free preference losses (ORPO, SimPO, CPO) from per-sequence log-probabilities.

Inputs are, per pair, the summed log-probability of the chosen and the rejected reply and their token counts.
Each function returns (loss, chosen_rewards, rejected_rewards, extras); the rewards are what the method's
paper treats as the implicit reward (beta times a log-probability), for logging. The batch loss is the mean
over pairs plus, where the method has one, a weighted SFT loss on the chosen replies (the mean negative
log-likelihood per chosen token in the batch). DPO and KTO losses come from trl's trainers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Loss = tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per chosen token: the SFT loss on the chosen replies."""
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, *, beta: float) -> Loss:
    """ORPO (Hong et al. 2024, eqs. 4-7): NLL(chosen) - beta * log sigmoid(log odds(yw) - log odds(yl)), where
    odds(y) = P(y|x) / (1 - P(y|x)) and log P is the per-token mean log-probability."""
    chosen = chosen_logps / chosen_tokens.clamp(min=1)
    rejected = rejected_logps / rejected_tokens.clamp(min=1)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll(chosen_logps, chosen_tokens)
    loss = nll - beta * ratio.mean()
    return loss, beta * chosen.detach(), beta * rejected.detach(), {"nll_loss": nll.detach(),
                                                                    "log_odds_ratio": log_odds.detach().mean()}


def simpo_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, *, beta: float, gamma: float,
               alpha: float = 0.0) -> Loss:
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|yw| log P(yw|x) - beta/|yl| log P(yl|x) - gamma);
    `alpha` > 0 adds alpha * NLL(chosen) (CPO-SimPO)."""
    chosen = chosen_logps / chosen_tokens.clamp(min=1)
    rejected = rejected_logps / rejected_tokens.clamp(min=1)
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    nll = chosen_nll(chosen_logps, chosen_tokens)
    loss = losses.mean() + alpha * nll if alpha else losses.mean()
    return loss, beta * chosen.detach(), beta * rejected.detach(), {"nll_loss": nll.detach()}


def cpo_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, *, beta: float, alpha: float,
             loss_type: str = "sigmoid") -> Loss:
    """CPO (Xu et al. 2024, eq. 3 + NLL): -log sigmoid(beta log P(yw|x) - beta log P(yl|x)) + alpha * NLL(yw);
    hinge: relu(1 - beta * diff); ipo: (diff_per_token - 1 / (2 beta))^2."""
    chosen, rejected = chosen_logps, rejected_logps
    if loss_type == "ipo":  # IPO compares per-token means
        chosen, rejected = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
        losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen - rejected))
    elif loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen - rejected))
    else:
        raise ValueError(f"unknown cpo loss type {loss_type!r}")
    nll = chosen_nll(chosen_logps, chosen_tokens)
    return losses.mean() + alpha * nll, beta * chosen.detach(), beta * rejected.detach(), {"nll_loss": nll.detach()}
