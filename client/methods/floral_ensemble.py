"""FLoRAL's ensemble baseline on a site: out = sum_c pi_c f_c(x) over C full models.

The same loop and router as FLoRAL (``client.methods.floral``): the copies train at
``train.lr``, the router at ``router_lr``; there are no adaptors to precondition.
"""

from client.methods.floral import FloralObjective


class FloralEnsembleObjective(FloralObjective):
    """FLoRAL's objective; the model variant (``EnsembleModel``) makes the difference."""
