"""Empirical differential-privacy audit of a mechanism with a canary.

Run a randomised mechanism ``M`` many times on two neighbouring inputs ``x0`` and ``x1`` (e.g. a
client's update without and with a canary), and try to tell the outputs apart with a threshold
test on a scalar statistic. If ``M`` is (ε, δ)-DP, *every* test's false-positive rate FPR and
false-negative rate FNR satisfy ``1 − δ − FPR ≤ e^ε · FNR`` and ``1 − δ − FNR ≤ e^ε · FPR``
(Kairouz et al. 2015), so

    ε ≥ ε_LB = max( ln((1 − δ − FPR) / FNR), ln((1 − δ − FNR) / FPR), 0 ).

:func:`audit_mechanism` turns finitely many trials into a **statistically valid** ε_LB:

1. The threshold (and the direction of the test) is chosen on one half of the trials only.
2. FPR and FNR are measured on the other, held-out half and replaced by their Clopper–Pearson
   upper bounds. Both bounds come from the *two-sided* interval at ``confidence`` (0.95 by
   default), i.e. each is a one-sided upper bound at level ``(1 + confidence) / 2``; by the union
   bound both hold at once with probability ≥ ``confidence``, and then so does ``ε ≥ ε_LB``.

What an audit proves
    With probability ≥ ``confidence`` over the audit's own randomness, the mechanism *as run* is
    not (ε, δ)-DP for any ε < ε_LB. If ε_LB exceeds the ε an accountant reports for it
    (:attr:`AuditResult.violated`), the mechanism or its accounting is broken: noise too small,
    sensitivity not enforced, noise reused across trials, a wrong formula, a bug.

What it does not prove
    A small ε_LB proves nothing about privacy. One statistic and one pair of inputs are only one
    attack; a mechanism can pass every audit and still leak. Finite samples also cannot see the
    rare tail events that δ accounts for, so even a perfect mechanism's ε_LB sits well below its
    true ε (e.g. Gaussian noise with z = 1 at δ = 1e-5: true ε ≈ 4.38, audited ≈ 1.2 with 2 000
    and ≈ 1.8 with 20 000 trials). Use the audit as a test that can fail, never as a privacy guarantee.

The default statistic is the projection of the output onto the unit direction ``x1 − x0``: the
likelihood-ratio (optimal) test for isotropic Gaussian noise, and for additive Laplace noise in
one dimension.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy.stats import beta as _beta

from privfl.defenses.base import Defense, RoundContext
from privfl.progress import progress_bar
from privfl.seeding import torch_seeded
from privfl.updates import flatten, unflatten

__all__ = [
    "AuditResult",
    "audit_defense",
    "audit_mechanism",
    "choose_threshold",
    "clopper_pearson",
    "epsilon_lower_bound",
]

Tensor = torch.Tensor

#: Largest number of output entries one call of a batched mechanism is asked for (memory bound).
_MAX_BATCH_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return c


def _cp_upper(successes: np.ndarray, trials: int, confidence: float) -> np.ndarray:
    """Vectorised upper end of the two-sided Clopper–Pearson interval (1 where successes == trials)."""
    k = np.asarray(successes, dtype=np.float64)
    alpha = 1.0 - confidence
    full = k >= trials
    upper = _beta.ppf(1.0 - alpha / 2.0, k + 1.0, np.where(full, 1.0, trials - k))
    return np.where(full, 1.0, upper)


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval (Clopper & Pearson 1934).

    ``(B(α/2; k, n−k+1), B(1−α/2; k+1, n−k))`` with ``α = 1 − confidence`` and ``B`` the beta
    quantile; the lower end is 0 when ``k = 0`` and the upper end 1 when ``k = n``. The interval
    covers the true success probability with probability ≥ ``confidence`` for every p (it is
    conservative), and each end alone is a one-sided bound at level ``1 − α/2``.

    Raises:
        ValueError: ``trials < 1``, ``successes`` outside ``[0, trials]``, ``confidence`` not in (0, 1).
    """
    if isinstance(successes, bool) or isinstance(trials, bool):
        raise TypeError("clopper_pearson: successes and trials must be integers, not bool")
    k, n = int(successes), int(trials)
    if k != successes or n != trials:
        raise ValueError(f"clopper_pearson: successes and trials must be integers, got {successes}, {trials}")
    if n < 1:
        raise ValueError(f"clopper_pearson: trials must be >= 1, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"clopper_pearson: successes must be in [0, {n}], got {k}")
    alpha = 1.0 - _check_confidence(confidence)
    lower = 0.0 if k == 0 else float(_beta.ppf(alpha / 2.0, k, n - k + 1))
    upper = 1.0 if k == n else float(_beta.ppf(1.0 - alpha / 2.0, k + 1, n - k))
    return lower, upper


def _eps_lb(fpr: npt.ArrayLike, fnr: npt.ArrayLike, delta: float) -> np.ndarray:
    """Vectorised ε lower bound (inputs already validated); +inf where a rate is 0 and its partner
    term's numerator is positive."""
    fpr = np.asarray(fpr, dtype=np.float64)
    fnr = np.asarray(fnr, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        num1, num2 = 1.0 - delta - fpr, 1.0 - delta - fnr
        t1 = np.where(num1 > 0, np.log(np.where(num1 > 0, num1, 1.0)) - np.log(fnr), -np.inf)
        t2 = np.where(num2 > 0, np.log(np.where(num2 > 0, num2, 1.0)) - np.log(fpr), -np.inf)
    return np.maximum(np.maximum(t1, t2), 0.0)


def epsilon_lower_bound(fpr: float, fnr: float, delta: float) -> float:
    """``max(ln((1−δ−FPR)/FNR), ln((1−δ−FNR)/FPR), 0)``: the smallest ε compatible with a test
    that reaches these error rates against an (ε, δ)-DP mechanism.

    A term whose numerator ``1 − δ − rate`` is ≤ 0 is dropped (it bounds nothing). A rate of exactly
    0 facing a positive numerator gives ``math.inf``: a perfect test refutes every finite ε. Point
    estimates of 0 are an artefact of finite samples, which is why :func:`audit_mechanism` passes
    Clopper–Pearson *upper* bounds here — always > 0 for finitely many trials, so its bound stays
    finite.

    Args:
        fpr: false-positive rate in [0, 1] (guessing ``x1`` when the input was ``x0``).
        fnr: false-negative rate in [0, 1].
        delta: the δ of the guarantee being tested, in [0, 1) (0 for pure ε-DP).

    Raises:
        ValueError: a rate outside [0, 1] or NaN; ``delta`` outside [0, 1).
    """
    for name, v in (("fpr", fpr), ("fnr", fnr)):
        if not (isinstance(v, (int, float, np.floating, np.integer)) and 0.0 <= float(v) <= 1.0):
            raise ValueError(f"epsilon_lower_bound: {name} must be a number in [0, 1], got {v!r}")
    if not (isinstance(delta, (int, float, np.floating, np.integer)) and 0.0 <= float(delta) < 1.0):
        raise ValueError(f"epsilon_lower_bound: delta must be in [0, 1), got {delta!r}")
    return float(_eps_lb(np.float64(fpr), np.float64(fnr), float(delta)))


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one audit.

    Attributes:
        epsilon_lower_bound: ε_LB from the held-out Clopper–Pearson upper bounds ``fpr_upper`` and
            ``fnr_upper``; holds with probability ≥ ``confidence``.
        claimed_epsilon: the ε the mechanism's accounting claims at ``delta`` (``None``: not given).
        delta: the δ the bound is computed at.
        trials: mechanism runs per input (half chose the threshold, half measured the errors).
        fpr: held-out false-positive rate (guessed ``x1``, input was ``x0``), point estimate.
        fnr: held-out false-negative rate, point estimate.
        fpr_upper: Clopper–Pearson upper bound on the FPR (one-sided level ``(1+confidence)/2``).
        fnr_upper: the same for the FNR.
        threshold: the test's threshold on the statistic's scale.
        confidence: joint confidence of both upper bounds, hence of the ε lower bound.
        direction: ``+1``: the test guesses ``x1`` when the statistic is ``> threshold``; ``-1``: when
            it is ``< threshold``.
    """

    epsilon_lower_bound: float
    claimed_epsilon: float | None
    delta: float
    trials: int
    fpr: float
    fnr: float
    fpr_upper: float
    fnr_upper: float
    threshold: float
    confidence: float
    direction: int = 1

    @property
    def violated(self) -> bool:
        """``True`` when the audit refutes the claim: ε_LB > claimed ε (the mechanism or its
        accounting is broken, with probability ≥ ``confidence``)."""
        return self.claimed_epsilon is not None and self.epsilon_lower_bound > self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        """All fields plus ``violated``, as plain Python values (JSON-serialisable)."""
        d = asdict(self)
        d["violated"] = self.violated
        return d

    def __str__(self) -> str:
        conf = (
            f"{self.confidence:.0%}"
            if round(self.confidence * 100, 6).is_integer()
            else f"{self.confidence:g}"
        )
        head = (
            f"DP audit: ε ≥ {self.epsilon_lower_bound:.4g} at δ={self.delta:g} ({conf} confidence, "
            f"{self.trials} trials per input)"
        )
        if self.claimed_epsilon is None:
            verdict = "no claimed ε to compare with"
        elif self.violated:
            verdict = (
                f"claimed ε = {self.claimed_epsilon:g}: VIOLATED — the mechanism or its accounting is broken"
            )
        else:
            verdict = f"claimed ε = {self.claimed_epsilon:g}: consistent (this is no proof of privacy)"
        op = ">" if self.direction >= 0 else "<"
        test = (
            f"test: guess x1 if statistic {op} {self.threshold:.6g}; held-out FPR {self.fpr:.4g} "
            f"(≤ {self.fpr_upper:.4g}), FNR {self.fnr:.4g} (≤ {self.fnr_upper:.4g})"
        )
        return f"{head}\n  {verdict}\n  {test}"


# --------------------------------------------------------------------------------------------
# the audit
# --------------------------------------------------------------------------------------------


def _check_inputs(
    x0: Tensor, x1: Tensor, trials: int, delta: float, claimed_epsilon: float | None, confidence: float
) -> None:
    if not isinstance(x0, torch.Tensor) or not isinstance(x1, torch.Tensor):
        raise TypeError(f"audit: x0 and x1 must be tensors, got {type(x0).__name__} and {type(x1).__name__}")
    if x0.shape != x1.shape:
        raise ValueError(
            f"audit: x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}"
        )
    if x0.numel() == 0:
        raise ValueError("audit: x0 and x1 are empty")
    if not (torch.isfinite(x0).all() and torch.isfinite(x1).all()):
        raise ValueError("audit: x0 and x1 must be finite")
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 2:
        raise ValueError(
            f"audit: trials must be an integer >= 2 (half choose the threshold, half test it), got {trials!r}"
        )
    if not (isinstance(delta, (int, float, np.floating)) and 0.0 < float(delta) < 1.0):
        raise ValueError(f"audit: delta must be in (0, 1), got {delta!r}")
    if claimed_epsilon is not None and not (float(claimed_epsilon) >= 0.0):
        raise ValueError(f"audit: claimed_epsilon must be >= 0 or None, got {claimed_epsilon!r}")
    _check_confidence(confidence)


def _run_trials(
    mechanism: Callable[[Tensor], Tensor] | None,
    batched: Callable[[Tensor, int], Tensor] | None,
    xs: tuple[Tensor, Tensor],
    trials: int,
    batch_stat: Callable[[Tensor], Tensor],
    single_stat: Callable[[Tensor], float],
    advance: Callable[[int], None],
) -> tuple[np.ndarray, np.ndarray]:
    """Run the mechanism ``trials`` times on each input, interleaving the two inputs chunk by chunk
    (so a drifting mechanism affects both alike), and return the statistics as float64 arrays."""
    d = xs[0].numel()
    chunk = max(1, min(trials, _MAX_BATCH_ELEMENTS // d)) if batched is not None else max(1, min(trials, 64))
    out: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    done = 0
    while done < trials:
        m = min(chunk, trials - done)
        for which, x in enumerate(xs):
            if batched is not None:
                y = batched(x, m)
                if not isinstance(y, torch.Tensor) or y.numel() != m * d or y.dim() == 0 or y.shape[0] != m:
                    got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise ValueError(f"audit: batched(x, {m}) must return a ({m}, {d}) tensor, got {got}")
                s = batch_stat(y.detach().reshape(m, d)).to(device="cpu", dtype=torch.float64).numpy()
            else:
                assert mechanism is not None
                s = np.array([single_stat(mechanism(x)) for _ in range(m)], dtype=np.float64)
            out[which].append(s.reshape(-1))
            advance(m)
        done += m
    s0, s1 = (np.concatenate(o) for o in out)
    if not (np.isfinite(s0).all() and np.isfinite(s1).all()):
        raise ValueError("audit: the statistic is not finite for some mechanism output")
    return s0, s1


def choose_threshold(
    a: np.ndarray,
    b: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    directions: tuple[int, ...] = (1, -1),
) -> tuple[float, int]:
    """Threshold and direction of the test "guess ``b`` (x1, member) if direction·s > t" that
    maximises the ε lower bound on these samples (``a``: scores under x0, ``b``: under x1).

    Every observed value (and −∞) is a candidate for "guess x1 if direction·s > t". Candidates are
    scored with the Clopper–Pearson upper bounds of this half (the same correction the final bound
    gets): raw point estimates would score any threshold with zero errors on one side as ε = ∞ and
    pick a degenerate one. Select on one half of the data and bound on the other: a bound computed
    on the samples that chose the threshold is optimistic. In :func:`audit_mechanism` the held-out
    half never influences the choice, so the final bound stays valid whatever this heuristic does.
    """
    best = (-1.0, 0.0, 1)
    na, nb = len(a), len(b)
    for direction in directions:
        sa, sb = np.sort(direction * a), np.sort(direction * b)
        cand = np.concatenate(([-np.inf], np.unique(np.concatenate((sa, sb)))))
        fp = na - np.searchsorted(sa, cand, side="right")
        fn = np.searchsorted(sb, cand, side="right")
        score = _eps_lb(_cp_upper(fp, na, confidence), _cp_upper(fn, nb, confidence), delta)
        i = int(np.argmax(score))
        if score[i] > best[0]:
            best = (float(score[i]), float(cand[i]), direction)
    return best[1], best[2]


def audit_mechanism(
    mechanism: Callable[[Tensor], Tensor] | None,
    x0: Tensor,
    x1: Tensor,
    *,
    trials: int = 2000,
    delta: float = 1e-5,
    claimed_epsilon: float | None = None,
    confidence: float = 0.95,
    statistic: Callable[[Tensor], float] | None = None,
    seed: int | None = None,
    progress: bool = False,
    batched: Callable[[Tensor, int], Tensor] | None = None,
) -> AuditResult:
    """Audit a randomised mechanism on the neighbouring inputs ``x0`` and ``x1``.

    The mechanism runs ``trials`` times on each input. A threshold test on ``statistic`` is chosen
    on a random half of the runs and evaluated on the other half; its error rates are replaced by
    Clopper–Pearson upper bounds (jointly valid at ``confidence``, see the module docstring) and
    turned into ε_LB by :func:`epsilon_lower_bound`. (The threshold search scores candidates with
    Clopper–Pearson upper bounds of the selection half rather than raw point estimates, which would
    call any zero-error threshold ε = ∞; the held-out half alone decides the reported bound.)

    Args:
        mechanism: one run: ``mechanism(x)`` returns a noisy output (any shape, same number of entries
            as ``x`` when the default statistic is used). Must draw fresh randomness on every call.
            May be ``None`` when ``batched`` is given.
        x0: one of two neighbouring inputs of the same shape (e.g. a flattened update without the
            canary). For the default statistic ``x0`` and ``x1`` must differ.
        x1: the other neighbouring input (e.g. the same update with the canary).
        trials: runs per input (>= 2; half of them choose the threshold).
        delta: δ of the guarantee under test, in (0, 1).
        claimed_epsilon: the ε the mechanism's accounting claims at ``delta``; fills
            :attr:`AuditResult.violated`.
        confidence: joint confidence of the lower bound (each error bound is one-sided at
            ``(1 + confidence) / 2``).
        statistic: maps one output (shaped as the mechanism returns it, or as ``x0`` for batched
            outputs) to a float. Default: projection onto the unit vector ``(x1 − x0)/||x1 − x0||``,
            computed for a whole batch at once. Both test directions are tried.
        seed: if given, torch's global RNG (CPU, and ``x0``'s CUDA device when it is on one) is
            seeded with it for the audit and restored afterwards, and the half/half split is seeded
            too, so mechanisms drawing from the global RNG give reproducible audits. Mechanisms with
            their own generator or a secure noise source are not affected.
        progress: show a rich progress bar.
        batched: optional vectorised mechanism: ``batched(x, n)`` returns ``n`` independent runs as an
            ``(n, x.numel())`` tensor. Used instead of ``mechanism`` (it must sample the same
            distribution); it is called in chunks of at most 2**22 output entries.

    Returns:
        An :class:`AuditResult`.

    Raises:
        ValueError: ``trials < 2``, ``x0 == x1``, ``delta`` outside (0, 1), shapes differ, non-finite
            inputs or statistics, ``confidence`` outside (0, 1), a negative ``claimed_epsilon``.
        TypeError: ``mechanism`` and ``batched`` both missing, non-tensor inputs or outputs.
    """
    _check_inputs(x0, x1, trials, delta, claimed_epsilon, confidence)
    if mechanism is None and batched is None:
        raise TypeError("audit_mechanism: give a mechanism or a batched mechanism")
    trials, delta, confidence = int(trials), float(delta), float(confidence)
    diff = (x1.detach().to(torch.float64) - x0.detach().to(torch.float64)).reshape(-1)
    sensitivity = float(torch.linalg.vector_norm(diff))
    if sensitivity == 0.0:
        raise ValueError("audit: x0 and x1 are identical; the audit needs neighbouring inputs that differ")
    d = x0.numel()

    direction = (diff / sensitivity).to(x0.device)

    def batch_stat(rows: Tensor) -> Tensor:
        if statistic is None:
            return rows.to(device=direction.device, dtype=torch.float64) @ direction
        return torch.tensor([float(statistic(r.reshape(x0.shape))) for r in rows], dtype=torch.float64)

    def single_stat(y: Tensor) -> float:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"audit: the mechanism must return a Tensor, got {type(y).__name__}")
        if statistic is not None:
            return float(statistic(y))
        if y.numel() != d:
            raise ValueError(
                f"audit: the mechanism returned {y.numel()} entries for an input of {d}; "
                "the default statistic needs the same number (or pass statistic=)"
            )
        return float(y.detach().reshape(-1).to(device=direction.device, dtype=torch.float64) @ direction)

    split = torch.Generator()
    if seed is not None:
        split.manual_seed(int(seed))
    else:
        split.seed()
    seeded_block = torch_seeded(int(seed), device=x0.device) if seed is not None else nullcontext()
    with seeded_block, progress_bar(progress, "DP audit", status=None) as bar:
        task = bar.add_task("audit", total=2 * trials)
        s0, s1 = _run_trials(
            mechanism,
            batched,
            (x0.detach(), x1.detach()),
            trials,
            batch_stat,
            single_stat,
            lambda m: bar.advance(task, m),
        )

    half = trials // 2
    p0 = torch.randperm(trials, generator=split).numpy()
    p1 = torch.randperm(trials, generator=split).numpy()
    sel0, ev0 = s0[p0[:half]], s0[p0[half:]]
    sel1, ev1 = s1[p1[:half]], s1[p1[half:]]
    threshold, sign = choose_threshold(sel0, sel1, delta, confidence)

    n_eval = trials - half
    fp = int(np.count_nonzero(sign * ev0 > threshold))
    fn = int(np.count_nonzero(~(sign * ev1 > threshold)))
    fpr_u = clopper_pearson(fp, n_eval, confidence)[1]
    fnr_u = clopper_pearson(fn, n_eval, confidence)[1]
    return AuditResult(
        epsilon_lower_bound=epsilon_lower_bound(fpr_u, fnr_u, delta),
        claimed_epsilon=None if claimed_epsilon is None else float(claimed_epsilon),
        delta=delta,
        trials=trials,
        fpr=fp / n_eval,
        fnr=fn / n_eval,
        fpr_upper=fpr_u,
        fnr_upper=fnr_u,
        threshold=float(sign * threshold),
        confidence=confidence,
        direction=sign,
    )


def audit_defense(
    defense: Defense,
    update0: Mapping[str, Tensor],
    update1: Mapping[str, Tensor],
    ctx: RoundContext | None = None,
    **kw: Any,
) -> AuditResult:
    """Audit one round of a privfl :class:`~privfl.defenses.base.Defense` for one client.

    One trial is ``defense.aggregate([defense.protect(update, ctx.for_client(cid))], ctx)``: what the
    server ends up with when this client's update is ``update0`` (e.g. without a canary) or
    ``update1`` (with it). Outputs are flattened with :func:`privfl.updates.flatten` in the input's
    key order (keys the defense drops, e.g. under partial sharing, count as zeros) and fed to
    :func:`audit_mechanism`.

    Each trial runs as a fresh round: ``ctx.round`` is advanced per trial (so noise sources keyed on
    the round draw fresh noise), and the defense's :meth:`~Defense.state_dict` is restored before
    every trial and at the end, so the audit spends none of the defense's privacy budget and every
    trial sees the same accountant state.

    Args:
        defense: the defense (or :class:`~privfl.defenses.base.Compose` pipeline) to audit.
        update0: one of two neighbouring updates (e.g. without a canary).
        update1: the other, with the same keys and shapes (e.g. with the canary).
        ctx: a round with exactly one sampled client; default: round 0, one client (id 0) of one,
            weight 1. The audited client is ``ctx.client_id`` if set, else ``ctx.sampled[0]``.
        **kw: keyword arguments of :func:`audit_mechanism` (``trials``, ``delta``, ``claimed_epsilon``,
            ``confidence``, ``statistic`` — which then receives the flat output vector —, ``seed``,
            ``progress``).
    """
    if "batched" in kw:
        raise TypeError("audit_defense: a Defense runs one trial at a time; 'batched' is not supported")
    if ctx is None:
        ctx = RoundContext(round=0, num_clients=1, sampled=(0,), weights=(1.0,))
    if len(ctx.sampled) != 1:
        raise ValueError(
            f"audit_defense: ctx must describe a round with exactly one sampled client, "
            f"got sampled={ctx.sampled}"
        )
    cid = ctx.client_id if ctx.client_id is not None else ctx.sampled[0]
    if cid not in ctx.sampled:
        raise ValueError(f"audit_defense: ctx.client_id={cid} is not the sampled client {ctx.sampled}")
    server_ctx = replace(ctx, client_id=None)

    v0, spec = flatten(update0)
    v1, spec1 = flatten(update1)
    if [(e.name, e.shape) for e in spec.entries] != [(e.name, e.shape) for e in spec1.entries]:
        raise ValueError("audit_defense: update0 and update1 must have the same keys and shapes")
    v1 = v1.to(v0.dtype)
    snapshot = copy.deepcopy(defense.state_dict())
    counter = [0]

    def mechanism(vec: Tensor) -> Tensor:
        defense.load_state_dict(copy.deepcopy(snapshot))
        r = ctx.round + counter[0]
        counter[0] += 1
        update = unflatten(vec, spec)
        payload = defense.protect(update, replace(server_ctx, round=r).for_client(cid))
        out = defense.aggregate([payload], replace(server_ctx, round=r))
        extra = [k for k in out if k not in spec.keys]
        if extra:
            raise ValueError(f"audit_defense: the defense returned keys not in the update: {extra[:5]}")
        parts = [
            out[e.name].detach().reshape(-1).to(device=vec.device, dtype=torch.float64)
            if e.name in out
            else torch.zeros(e.numel, dtype=torch.float64, device=vec.device)
            for e in spec.entries
        ]
        return torch.cat(parts)

    try:
        return audit_mechanism(mechanism, v0, v1, **kw)
    finally:
        defense.load_state_dict(copy.deepcopy(snapshot))
