"""One registry for every recorded model (issue 42, item 3): the blend, the two-stage systems and
the ablations are entries like the baselines; the blend's members are declared there, and every
list of model names (the worker's, the report's single-stage models, the notebook that records a
name) reads it."""
import pytest

from recsys_lib import worker
from recsys_lib.errors import ConfigError
from recsys_lib.models import registry
from recsys_lib.models.registry import REGISTRY, ModelSpec
from recsys_lib.report import analysis
from recsys_lib.run import layout
from recsys_lib.stage2 import ablation


def test_every_recorded_kind_of_model_is_registered_with_its_role():
    assert registry.names("single_stage") == ["popularity", "mf", "neumf", "ease", "ials", "transition", "sasrec"]
    assert registry.names("retriever") == ["two_tower"]
    assert registry.names("blend") == ["blend"]
    assert registry.names("two_stage") == ["two_stage"]
    assert set(registry.names("ablation")) == set(ablation.WITHOUT)       # the names 35_ablations records
    assert registry.names() == list(REGISTRY)
    with pytest.raises(ConfigError, match="unknown role"):
        registry.names("baseline")
    with pytest.raises(ConfigError, match="role"):
        ModelSpec("x", "X", "XConfig", "18_x", role="baseline")


def test_a_name_belongs_to_its_entry_or_the_entry_whose_variant_it_is():
    assert registry.role_of("ease") == "single_stage"
    assert registry.role_of("two_stage_lgbm") == "two_stage"              # a re-ranker variant of 30_reranker
    assert registry.role_of("two_stage_no_reranker") == "ablation"        # its own entry, not a variant
    assert registry.role_of("blend") == "blend"
    assert registry.role_of("toy") is None and registry.record_spec("toy") is None
    assert layout.notebook_of("two_stage_lgbm") == "30_reranker"
    assert layout.notebook_of("two_stage_no_two_tower") == "35_ablations"
    assert layout.notebook_of("blend") == layout.BLEND_NOTEBOOK == REGISTRY["blend"].notebook


def test_the_blend_members_are_declared_not_read_off_the_notebook_order():
    declared = [n for n, s in REGISTRY.items() if s.in_blend]
    assert registry.blend_members() == declared
    assert "two_tower" not in declared and "blend" not in declared


def test_a_declared_member_fit_after_the_blend_is_an_error_not_a_silent_omission(monkeypatch):
    late = {**REGISTRY, "late": ModelSpec("popularity", "Popularity", "PopularityConfig", "21_late", in_blend=True)}
    monkeypatch.setattr(registry, "REGISTRY", late)
    with pytest.raises(ConfigError, match=r"late \(21_late\).*below 17"):
        registry.blend_members()


def test_a_member_numbered_anywhere_before_the_blend_joins_it_when_declared(monkeypatch):
    toy = {**REGISTRY, "toy": ModelSpec("popularity", "Popularity", "PopularityConfig", "09_toy", in_blend=True),
           "shy": ModelSpec("popularity", "Popularity", "PopularityConfig", "09_shy")}
    monkeypatch.setattr(registry, "REGISTRY", toy)
    members = registry.blend_members()
    assert "toy" in members and "shy" not in members          # the number alone decides nothing


def test_the_lists_of_model_names_read_the_registry():
    assert worker.TUNED == tuple(n for n, s in REGISTRY.items() if s.worker) == ("mf", "neumf", "two_tower")
    assert analysis.is_two_stage("two_stage") and analysis.is_two_stage("two_stage_mlp")
    assert analysis.is_two_stage("two_stage_no_two_tower")
    assert analysis.is_blend("blend") and not analysis.is_blend("ease")
    records = [{"model": n, "valid": {"ndcg@10": v}} for n, v in
               (("ease", 0.10), ("blend", 0.20), ("two_stage", 0.30), ("two_stage_no_reranker", 0.25), ("toy", 0.05))]
    assert analysis.strongest_single_stage(records)["model"] == "ease"


def test_entries_above_the_models_layer_name_no_class():
    with pytest.raises(ConfigError, match="no model class"):
        REGISTRY["two_stage"].cls
    assert REGISTRY["blend"].cls.__name__ == "Blend"
