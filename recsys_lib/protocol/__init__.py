"""The evaluation protocol (docs/PROTOCOL.md), the layer every model stands on.

- `split`: temporal splits of the ratings (per user or global), n-core filters, cached on disk;
- `splitdata`: a split in contiguous ids (`SplitData`), with item features and each period behind
  the leakage guard, and the `ScoringContext` a model may know at scoring time;
- `guard`: while a model is fit, reading a period it may not learn from raises `LeakageError`;
- `metrics`: nDCG, Recall, HitRate, MRR, coverage over a hit matrix; bootstrap CIs and paired tests;
- `evaluate`: full-catalogue ranking in user batches (`rank_topk`) and its per-user metrics.
"""
