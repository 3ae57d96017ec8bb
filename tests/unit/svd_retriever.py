"""A quick retriever for tests that need one (re-ranker inputs, distributed steps): a truncated
SVD of the train matrix, with the retriever interface (user/item embeddings, score_all, score_pairs).
Imported by the unit tests and by dist_step_worker.py (tests/unit is on their sys.path)."""
from __future__ import annotations

import numpy as np
import torch


class SVDRetriever:
    """A quick MF-like retriever: truncated SVD of the train interaction matrix."""

    def __init__(self, data, d: int = 8, positives_only: bool = False):
        m = data.train.matrix(data.n_users, data.n_items, positives_only=positives_only).toarray()
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        self.U = torch.tensor(u[:, :d] * np.sqrt(s[:d]), dtype=torch.float32)
        self.V = torch.tensor(vt[:d].T * np.sqrt(s[:d]), dtype=torch.float32)

    def user_embeddings(self, users, ctx):
        return self.U[users]

    def item_embeddings(self):
        return self.V

    def score_all(self, users, ctx):
        return self.U[users] @ self.V.T

    def score_pairs(self, users, items, ctx):
        return (self.U[users] * self.V[items]).sum(1)
