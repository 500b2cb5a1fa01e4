"""ORPO, SimPO and CPO losses on a fixed batch of log-probs: equal to the papers' formulas written out in plain
Python, and to trl's own (experimental) implementations on the same numbers."""

import math
import types
import warnings

import pytest
import torch

from martlet.train.rlhf_losses import cpo_loss, orpo_loss, simpo_loss

# three pairs: summed log-probs of chosen and rejected replies and their token counts
CHOSEN = [-12.0, -30.5, -7.25]
REJECTED = [-15.0, -28.0, -9.5]
N_CHOSEN = [6, 20, 5]
N_REJECTED = [7, 18, 4]


def tensors():
    return (torch.tensor(CHOSEN, dtype=torch.float64), torch.tensor(REJECTED, dtype=torch.float64),
            torch.tensor(N_CHOSEN), torch.tensor(N_REJECTED))


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def nll() -> float:
    return -sum(CHOSEN) / sum(N_CHOSEN)


def mean(xs):
    return sum(xs) / len(xs)


def test_orpo_matches_the_paper():
    beta = 0.25
    loss, chosen_r, rejected_r, extras = orpo_loss(*tensors(), beta=beta)
    ratios = []
    for c, r, nc, nr in zip(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED):
        pc, pr = math.exp(c / nc), math.exp(r / nr)  # length-normalised likelihoods
        ratios.append(logsigmoid(math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))))
    assert loss.item() == pytest.approx(nll() - beta * mean(ratios), rel=1e-9)
    assert chosen_r.tolist() == pytest.approx([beta * c / n for c, n in zip(CHOSEN, N_CHOSEN)])
    assert rejected_r.tolist() == pytest.approx([beta * r / n for r, n in zip(REJECTED, N_REJECTED)])
    assert extras["nll_loss"].item() == pytest.approx(nll())


def test_simpo_matches_the_paper():
    beta, gamma = 2.0, 0.7
    loss, chosen_r, rejected_r, _ = simpo_loss(*tensors(), beta=beta, gamma=gamma)
    expected = mean([-logsigmoid(beta * c / nc - beta * r / nr - gamma)
                     for c, r, nc, nr in zip(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED)])
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert (chosen_r - rejected_r).tolist() == pytest.approx(
        [beta * (c / nc - r / nr) for c, r, nc, nr in zip(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED)])
    with_sft, *_ = simpo_loss(*tensors(), beta=beta, gamma=gamma, alpha=0.5)  # CPO-SimPO
    assert with_sft.item() == pytest.approx(expected + 0.5 * nll(), rel=1e-9)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_cpo_matches_the_paper(loss_type):
    beta, alpha = 0.1, 1.0
    loss, *_ = cpo_loss(*tensors(), beta=beta, alpha=alpha, loss_type=loss_type)
    terms = []
    for c, r, nc, nr in zip(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED):
        if loss_type == "sigmoid":
            terms.append(-logsigmoid(beta * c - beta * r))  # CPO eq. 3
        elif loss_type == "hinge":
            terms.append(max(0.0, 1 - beta * (c - r)))
        else:
            terms.append((c / nc - r / nr - 1 / (2 * beta)) ** 2)
    assert loss.item() == pytest.approx(mean(terms) + alpha * nll(), rel=1e-9)


def _log1mexp(x: float) -> float:
    """log(1 - exp(x)) for x < 0 in float64, by the branch that is exact there (Maechler 2012)."""
    return math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x))


def test_orpo_is_stable_near_certainty():
    """log(1 - p) for p -> 1 and p -> 0 in float32: the log odds and the loss equal the formula worked out in
    float64. Near p = 1 (log p = -1e-7, -2e-7) a naive log1p(-exp(x)) rounds exp(x) and is off by ~0.3."""
    chosen = torch.tensor([-1e-7, -80.0], dtype=torch.float32)
    rejected = torch.tensor([-2e-7, -81.0], dtype=torch.float32)
    beta = 1.0
    loss, _, _, extras = orpo_loss(chosen, rejected, torch.tensor([1, 1]), torch.tensor([1, 1]), beta=beta)
    log_odds = [(c - r) - (_log1mexp(c) - _log1mexp(r)) for c, r in zip(chosen.double().tolist(),
                                                                        rejected.double().tolist())]
    assert log_odds[0] == pytest.approx(math.log(2), abs=1e-6) and log_odds[1] == pytest.approx(1.0, abs=1e-6)
    expected = -sum(chosen.double().tolist()) / 2 - beta * mean([logsigmoid(x) for x in log_odds])
    assert torch.isfinite(loss)
    assert extras["log_odds_ratio"].item() == pytest.approx(mean(log_odds), abs=1e-5)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


# the same numbers through trl's implementations (trl.experimental is used by these tests only) -------------
def _trl_self(**kw):
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device="cpu"), alpha=0.0, label_smoothing=0.0, **kw)


@pytest.fixture(scope="module")
def trl_experimental():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
    return types.SimpleNamespace(cpo=CPOTrainer.cpo_loss, orpo=ORPOTrainer.odds_ratio_loss)


def test_orpo_equals_trl(trl_experimental):
    c, r, nc, nr = tensors()
    losses, chosen_r, rejected_r, *_ = trl_experimental.orpo(_trl_self(beta=0.25), c / nc, r / nr)
    trl_loss = nll() - losses.mean()  # trl: policy_nll_loss - losses.mean()
    ours, our_c, our_r, _ = orpo_loss(c, r, nc, nr, beta=0.25)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-7)
    assert our_c.tolist() == pytest.approx(chosen_r.tolist()) and our_r.tolist() == pytest.approx(rejected_r.tolist())


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_cpo_and_simpo_equal_trl(trl_experimental, loss_type):
    c, r, nc, nr = tensors()
    beta, gamma, alpha = (2.0, 0.7, 0.0) if loss_type == "simpo" else (0.1, 0.0, 1.0)
    averaged = loss_type in ("ipo", "simpo")  # trl's CPOTrainer averages per token for these
    args = (c / nc, r / nr) if averaged else (c, r)
    losses, chosen_r, rejected_r = trl_experimental.cpo(_trl_self(beta=beta, loss_type=loss_type, simpo_gamma=gamma),
                                                        *args)
    trl_loss = losses.mean() + alpha * nll()  # trl: losses.mean() + cpo_alpha * policy_nll_loss
    if loss_type == "simpo":
        ours, our_c, our_r, _ = simpo_loss(c, r, nc, nr, beta=beta, gamma=gamma)
    else:
        ours, our_c, our_r, _ = cpo_loss(c, r, nc, nr, beta=beta, alpha=alpha, loss_type=loss_type)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-7)
    assert our_c.tolist() == pytest.approx(chosen_r.tolist()) and our_r.tolist() == pytest.approx(rejected_r.tolist())


def test_gradients_push_chosen_up_and_rejected_down():
    for fn, kw in ((orpo_loss, dict(beta=0.1)), (simpo_loss, dict(beta=2.0, gamma=0.5)),
                   (cpo_loss, dict(beta=0.1, alpha=0.0))):
        c, r, nc, nr = tensors()
        c.requires_grad_(True)
        r.requires_grad_(True)
        fn(c, r, nc, nr, **kw)[0].backward()
        assert (c.grad < 0).all() and (r.grad > 0).all(), fn.__name__
