"""The re-ranker kinds behind one interface (`Reranker`: ``score(inputs)``, ``save``, `load`).

- `config`: each kind's configuration (`IdMLPConfig`, `FeatureMLPConfig`, `LGBMConfig`) and
  `from_params`, which builds a variant's config from the params ``reranker:`` section;
- `base`: the interface and the one file format (a saved file records its kind);
- `mlp`: ``id_mlp`` (the design we start from) and ``mlp_features``, one torch training loop;
- `lgbm`: ``lgbm``, LightGBM LambdaRank;
- `ensemble`: a cross-fitted variant's fold models, scored as one.
"""
from .base import Reranker, load
from .config import (CONFIGS, MLP_KINDS, VARIANTS, FeatureMLPConfig, IdMLPConfig, LGBMConfig, MLPConfig,
                     RerankerConfig, config_class, from_params, kind_of)
from .ensemble import RerankerEnsemble
from .lgbm import LGBMReranker
from .mlp import FeatureMLPReranker, IdMLPReranker

#: the kinds a config may name, and the class that fits each
RERANKERS: dict[str, type[Reranker]] = {c.kind: c for c in (IdMLPReranker, FeatureMLPReranker, LGBMReranker)}

__all__ = ["CONFIGS", "MLP_KINDS", "RERANKERS", "VARIANTS", "FeatureMLPConfig", "FeatureMLPReranker", "IdMLPConfig",
           "IdMLPReranker", "LGBMConfig", "LGBMReranker", "MLPConfig", "Reranker", "RerankerConfig",
           "RerankerEnsemble", "config_class", "from_params", "kind_of", "load"]
