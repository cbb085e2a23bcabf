"""FedAvg (McMahan et al., AISTATS 2017, arXiv 1602.05629).

    w_{t+1} = sum_{k in S_t} (n_k / sum_{j in S_t} n_j) * w_k

The whole model is shared; the base strategy's n-weighted mean is exactly this.
"""

from strategies.base import KumikiStrategy


class FedAvg(KumikiStrategy):
    """Example-weighted mean of every shared tensor."""
