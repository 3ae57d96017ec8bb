"""The second stage: candidates from stage-1 models, re-ranked by a model trained on validation.

Bottom to top, each module importing only from those above it in this list:
- `candidates`: the retriever's top K, joined by other candidate sources;
- `sources`: stage 1's checkpoints as stage 2 loads them, and the candidate lists 20_two_tower writes;
- `ranking`: candidate rows + scores -> each user's top list; the user splits and folds;
- `features`: the re-ranker's features of (user, candidate) rows: counts from train rows, histories
  from the rows known at scoring time;
- `inputs`: what a re-ranker learns from and scores (`StageInputs`, `WindowLists`, `prepare`);
- `rerankers/`: the kinds (id_mlp, mlp_features, LightGBM), each with its own config, one
  interface and file format, and the cross-fitted ensemble;
- `section`: the params ``reranker:`` section, typed;
- `selection`: cross-fitting over validation users and the choice of variant;
- `refit`: stage 1 refit before the last share of train: the label window, the stale lists;
- `system`: the two-stage system on a run folder: candidates, inputs, fitting, recording, scores;
- `leakage`: the leakage audit's re-ranker pieces.
"""
