"""A pipeline run: its folder, its notebooks and what they leave there.

- `layout`: the notebooks in order, and which one fits each model;
- `experiment`: `Run`, what every notebook opens (params, seed, device, the split, evaluators,
  fitting a model through the registry and recording its metrics and per-user scores);
- `state`: completion records, so a rerun resumes where it stopped, and the run folder's lock;
- `launch`: the torchrun launcher the fits call when the params ask for several processes.
"""
