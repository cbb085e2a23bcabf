"""FedAvg site update (McMahan et al., 2017): E epochs of SGD on CE from w_t."""

from client.methods.base import SiteObjective


class FedAvgObjective(SiteObjective):
    """The base objective is FedAvg's; this class only names it."""
