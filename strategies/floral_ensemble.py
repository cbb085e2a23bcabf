"""FLoRAL's ensemble baseline (spec ``floral.md`` section 10, code ``ensembleavg.py``).

C full copies of the model, mixed by each site's private router; copy c is averaged with
p(k|c), exactly as FLoRAL's adaptor c (``strategies.floral``), over ``copies.<c>.*``.
"""

from strategies.floral import FLoRAL


class FloralEnsemble(FLoRAL):
    """FLoRAL's rule with the cluster tensors being whole model copies (``cluster_prefix = copies``)."""
