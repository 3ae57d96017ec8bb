"""The second stage: candidates from stage-1 models, re-ranked by a model trained on validation.

- `candidates`: the retriever's top K, joined by other candidate sources;
- `features`: the re-ranker's features of (user, candidate) rows, from rows known at scoring time;
- `ranking`: candidate rows + scores -> each user's top list; the user splits and folds;
- `rerankers`: the re-ranker kinds (id_mlp, mlp_features, LightGBM), cross-fitting and selection;
- `system`: the two-stage system on a run folder: candidates, inputs, fitting, recording, the
  stage-1 refits behind the label window and the stale lists, and the leakage audit's pieces.
"""
