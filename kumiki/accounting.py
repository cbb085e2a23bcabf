"""Privacy accounting shared by sites (DP-SGD, ``client.privacy``) and the server (central DP).

Opacus' accountants, fed an explicit history of (noise multiplier, sample rate, steps), so the
history can live on disk (a site's ledger) or be derived (the server's releases so far).
"""

from __future__ import annotations


def accountant(kind: str, history: list[tuple[float, float, int]]):
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    acc.history = [tuple(h) for h in history]
    return acc


def epsilon(kind: str, history: list[tuple[float, float, int]], delta: float) -> float:
    return float(accountant(kind, history).get_epsilon(delta)) if history else 0.0


def solve_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str) -> float:
    """sigma that spends ``target_epsilon`` in ``steps`` DP-SGD steps at ``sample_rate`` (Opacus' search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=max(steps, 1), accountant=kind))
