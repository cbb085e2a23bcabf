"""FedRep (Collins et al., ICML 2021, arXiv 2102.07078).

    phi_{t+1} = sum_{k in S_t} (n_k / sum_j n_j) * phi_k

over the representation phi (everything but ``head.*``); the paper averages
uniformly over sampled clients, the baselines spec chooses the n-weighted mean.
Heads are personal and never travel.
"""

from strategies.fedavg import FedAvg


class FedRep(FedAvg):
    """n-weighted mean of the representation; head-then-body training lives on the sites."""
