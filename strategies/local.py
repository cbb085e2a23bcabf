"""Local-only: no aggregation and no tensor ever travels.

The split declares every tensor personal, so messages carry empty ArrayRecords;
the server only schedules the rounds and collects metrics.
"""

import numpy as np

from strategies.base import KumikiStrategy, Update


class LocalOnly(KumikiStrategy):
    def aggregate_shared(self, updates: list[Update]) -> dict[str, np.ndarray]:
        return {}
