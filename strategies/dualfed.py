"""DualFed server (Zhu et al., ACM MM 2024, arXiv 2407.17754; spec ``dualfed.md`` section 5).

    theta_bar = (1/M) sum_i theta_i,    omega_bar = (1/M) sum_i omega_i

over the M sites that replied (code ``Server.average_weights``): the shared encoder
theta and shared head omega only. The projector, the personal head and every
BatchNorm buffer are personal by the split and never travel. ``weighting =
num_examples`` switches to the n-weighted mean. The average replaces the global
tensors (no server optimizer); sites not sampled keep their personal parts.
"""

from strategies.base import KumikiStrategy, Update


class DualFed(KumikiStrategy):
    def weights(self, updates: list[Update]) -> list[float]:
        if self.method.weighting == "uniform":
            return [1.0] * len(updates)
        return super().weights(updates)
