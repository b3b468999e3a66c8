"""Config loading: defaults, YAML, overrides, validation errors and the digest."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from themis_ray import config
from themis_ray.stages.registry import selected

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_load():
    cfg = config.load()
    assert cfg.run_dir == "runs/quickstart"
    assert cfg.corpus.sources == ["python-docs"]
    assert cfg.corpus.max_docs == 8
    assert cfg.label.sampling.logprobs == 10
    assert cfg.synthesize.sampling.temperature == 0.7
    assert cfg.curate.max_ifd_zscore == 3.0
    assert cfg.scenarios_dir is None
    assert cfg.stages == []  # every stage, in the registry's order
    assert selected(cfg)[0] == "synthesize" and selected(cfg)[-1] == "evaluate"


def test_overrides_set_values_with_their_types():
    cfg = config.load(overrides=["corpus.max_docs=3", "label.engine.kind=openai", "curate.max_ifd_zscore=null",
                                 "synthesize.sampling.temperature=0.25"])
    assert cfg.corpus.max_docs == 3 and isinstance(cfg.corpus.max_docs, int)
    assert cfg.label.engine.kind == "openai"
    assert cfg.curate.max_ifd_zscore is None
    assert cfg.synthesize.sampling.temperature == 0.25
    assert config.load().corpus.max_docs == 8  # defaults are not mutated by an override


def test_unknown_override_key_raises_naming_it():
    with pytest.raises(Exception, match="max_dox"):
        config.load(overrides=["corpus.max_dox=3"])


def test_unknown_key_in_yaml_raises_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("label:\n  prefil_score: true\n")
    with pytest.raises(Exception, match="prefil_score"):
        config.load(path)


def test_wrong_type_raises():
    with pytest.raises(Exception, match="max_docs"):
        config.load(overrides=["corpus.max_docs=many"])


def test_wrong_type_in_yaml_raises(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: three\n")
    with pytest.raises(Exception, match="epochs"):
        config.load(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        config.load(tmp_path / "nope.yaml")


def test_quickstart_loads_and_anchor_blocks_are_dropped():
    cfg = config.load(ROOT / "configs" / "quickstart.yaml")
    plain = OmegaConf.to_container(cfg)
    assert "_engine" not in plain and "_pool" not in plain
    # values from the anchors reached every section that referenced them
    assert cfg.synthesize.engine.num_threads == 2
    assert cfg.label.engine.num_threads == 2
    assert cfg.respond.responders[0].engine.num_threads == 2
    assert [r.name for r in cfg.respond.responders] == ["careful", "careless"]
    assert cfg.respond.responders[1].sampling.temperature == 1.3
    assert cfg.label.sampling.max_tokens == 96 and cfg.label.sampling.logprobs == 10
    assert cfg.corpus.max_docs == 6 and cfg.corpus.chunk_chars == 1200
    assert cfg.ray.num_cpus == 2
    # a section the YAML does not mention keeps its defaults
    assert cfg.curate.max_ifd_zscore == 3.0


def test_underscore_block_with_unknown_fields_is_dropped(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("_shared: &s\n  anything: 1\n  kind: openai\ncorpus:\n  max_docs: 2\n")
    cfg = config.load(path)
    assert cfg.corpus.max_docs == 2
    assert "_shared" not in OmegaConf.to_container(cfg)


def test_override_wins_over_yaml():
    cfg = config.load(ROOT / "configs" / "quickstart.yaml", ["corpus.max_docs=1"])
    assert cfg.corpus.max_docs == 1


def test_digest_is_stable_and_changes_with_a_value():
    a, b = config.load(), config.load()
    assert config.digest(a.label) == config.digest(b.label)
    assert len(config.digest(a.label)) == 16
    changed = config.load(overrides=["label.sampling.max_tokens=161"])
    assert config.digest(changed.label) != config.digest(a.label)
    # other sections are untouched by that override
    assert config.digest(changed.curate) == config.digest(a.curate)
    # a plain dict digests the same as the equivalent config, whatever the key order
    plain = OmegaConf.to_container(a.curate)
    reordered = dict(reversed(list(plain.items())))
    assert config.digest(reordered) == config.digest(a.curate)


def test_judge_names_are_shorthand_for_specs(tmp_path):
    from themis_ray.config import load

    path = tmp_path / "c.yaml"
    path.write_text("evaluate:\n  judges: [trained, {name: teacher, model: /models/t}]\n")
    cfg = load(path)
    assert [(j.name, j.model) for j in cfg.evaluate.judges] == [("trained", None), ("teacher", "/models/t")]
    cfg = load(path, ["evaluate.judges=[base]"])
    assert [j.name for j in cfg.evaluate.judges] == ["base"]


@pytest.mark.parametrize("override, key", [
    ("label.score_by=choise", "label.score_by"),
    ("label.engine.kind=hff", "label.engine.kind"),
    ("classify.method=trainedd", "classify.method"),
    ("curate.ifd_measure=perplexitty", "curate.ifd_measure"),
    ("judge.mode=triple", "judge.mode"),
])
def test_a_mistyped_enum_value_fails_at_load_naming_the_key(override, key):
    # At load, before any stage runs: not hours later when the stage that reads it starts.
    with pytest.raises(Exception) as err:
        config.load(ROOT / "configs" / "quickstart.yaml", [override])
    message = str(err.value)
    assert key in message and override.split("=")[1] in message


def test_the_judge_job_classifier_has_no_route_by_to_ignore():
    # themis-ray judge keeps a row's own scenario and classifies only rows without one.
    assert config.load(overrides=["classify.route_by=classifier"]).classify.route_by == "classifier"
    with pytest.raises(Exception, match=r"route_by"):
        config.load(overrides=["judge.classify.route_by=classifier"])


def test_an_override_may_index_a_list():
    cfg = config.load("configs/quickstart.yaml", ["respond.responders.1.engine.model=/models/other",
                                                  "evaluate.judges=[trained,/models/x]"])
    assert cfg.respond.responders[1].engine.model == "/models/other"
    assert cfg.respond.responders[0].engine.model == "smollm2-135m-instruct"  # its neighbour untouched
    assert cfg.respond.responders[1].sampling.max_tokens == 32  # the rest of the item kept
    assert [j.name for j in cfg.evaluate.judges] == ["trained", "/models/x"]
    with pytest.raises(ValueError, match=r"respond\.responders has 2 items"):
        config.load("configs/quickstart.yaml", ["respond.responders.2.engine.model=x"])
    with pytest.raises(ValueError, match="not key=value"):
        config.load(overrides=["corpus.max_docs"])
