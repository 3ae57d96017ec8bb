"""The blend's search with its z-score tables on disk: `blend.tune` at ML-32M size.

Why: the greedy search (`blend.tune`) ranks every validation user's whole catalogue for each trial
weight, from each member's (users x items) z-score table. At ML-32M size (seven members, 65,583
items) those tables hold ~14 GB, and `17_blend` peaked at 14.1 GB. Here each member's table is
written once, as raw float32 rows, to a folder (the run's ``.cache/blend/``), and every greedy step
reads it back one batch of users at a time, scoring all of the step's trials on that batch before
the next: each trial's per-user nDCG is computed by `blend.batch_ndcg` from the same rows with the
same float operations as in memory, so the search table and the weights are the same, bit for bit
(tests/unit/test_savings.py). Memory is bounded by one batch of every member's rows
(``batch_bytes``); the reads go through the page cache, which the kernel may drop, not the heap.

Only `blend.tune` imports this module, and only when the tables would pass its in-memory bound, so
a smaller run never loads it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .blend import batch_ndcg, zscore_batches

#: the most bytes of z-score rows (all members) read back at once
BATCH_BYTES = 512 * 1024 ** 2


class SpilledTables:
    """Each member's (U, n_items) float32 z-scores of ``labels.users`` in ``folder/<member>.f32``."""

    def __init__(self, members: dict, labels, folder, batch_users: int = 1024, blocked=None,
                 batch_bytes: int = BATCH_BYTES):
        self.folder = Path(folder) / f"tables-{id(self):x}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.names = list(members)
        self.labels, self.blocked = labels, blocked
        self.n_items = int(labels.n_items)
        self.seen = labels.ctx.seen[labels.users]
        per_user = 4 * self.n_items * len(self.names)
        self.rows = max(1, min(int(batch_users), int(batch_bytes) // per_user))   # users read back at once
        for name, model in members.items():
            with open(self._path(name), "wb") as f:
                for z in zscore_batches(model, labels.users, labels.ctx, batch_users):
                    np.ascontiguousarray(z, dtype=np.float32).tofile(f)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.f32"

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * self.n_items
        z = np.fromfile(self._path(name), dtype=np.float32, count=count, offset=4 * start * self.n_items)
        return z.reshape(stop - start, self.n_items)

    def evaluate(self, trials: list[dict[str, float]]) -> list[float]:
        """Each trial's mean validation nDCG@10: one pass over the users, every trial per batch."""
        n_users = len(self.labels.users)
        per_user: list[list[np.ndarray]] = [[] for _ in trials]
        for a in range(0, n_users, self.rows):
            b = slice(a, min(a + self.rows, n_users))
            z_rows = {n: self._read(n, b.start, b.stop) for n in self.names}
            seen, pos = self.seen[b], self.labels.positives[b]
            blocked = None if self.blocked is None else self.blocked(b)
            for i, w in enumerate(trials):
                per_user[i].append(batch_ndcg(z_rows, w, seen, pos, blocked_rows=blocked))
        return [float(np.concatenate(p).mean()) for p in per_user]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
