"""Scenario YAML loading and validation: the built-ins, bad files, a user's own folder."""

from __future__ import annotations

import pytest
import yaml

from themis_ray.scenarios import BUILTIN_DIR, get_scenario, load_scenarios, load_tiers, parse_scenario

BUILTINS = {
    "close_qa", "open_qa", "creative_writing", "informative_writing", "rewriting", "translation",
    "role_playing", "math_qa", "programming", "reading_comprehension",
}

GOOD = {
    "name": "haiku",
    "title": "Haiku writing",
    "definition": "Write a haiku.  ",
    "open_ended": True,
    "reference_helps": False,
    "criteria": [
        {"name": "Form", "description": "Three lines, 5-7-5 syllables."},
        {"name": "Imagery", "description": "Concrete, seasonal images, fresh rather than stale."},
    ],
}


def _write(folder, name, data):
    path = folder / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_ten_builtins_load_with_at_least_60_criteria():
    scenarios = load_scenarios()
    assert set(scenarios) == BUILTINS
    assert all(key == s.name for key, s in scenarios.items())
    assert sum(len(s.criteria) for s in scenarios.values()) >= 60
    for s in scenarios.values():
        names = [c.name for c in s.criteria]
        assert len(names) == len(set(names)), s.name
        assert s.title and s.definition
        assert isinstance(s.open_ended, bool) and isinstance(s.reference_helps, bool)


def test_builtin_criteria_descriptions_are_whole_sentences():
    # An unquoted comma in a YAML flow mapping `{name: x, description: a, b}` cuts the description at
    # the comma; compare every description with the text in the file.
    for path in sorted(BUILTIN_DIR.glob("[!_]*.yaml")):
        raw = path.read_text()
        for c in load_scenarios()[yaml.safe_load(raw)["name"]].criteria:
            assert c.description.endswith("."), (path.name, c)
            assert c.description in raw


def test_close_qa_criterion_with_commas_is_whole():
    precision = {c.name: c.description for c in get_scenario("close_qa").criteria}["Precision"]
    assert precision == "Quantities, names and terms are exact rather than vague."


def test_builtin_tiers_cover_1_to_5():
    tiers = load_tiers()
    assert set(tiers) == {"with_reference", "without_reference"}
    for table in tiers.values():
        assert sorted(table) == [1, 2, 3, 4, 5]


def test_parse_good_scenario_strips_definition_and_keeps_order():
    s = parse_scenario(GOOD, "x.yaml")
    assert s.definition == "Write a haiku."
    assert [c.name for c in s.criteria] == ["Form", "Imagery"]
    assert s.criteria[1].description == "Concrete, seasonal images, fresh rather than stale."


@pytest.mark.parametrize("field", ["name", "title", "definition", "open_ended", "reference_helps", "criteria"])
def test_missing_field_raises_with_file_and_field(tmp_path, field):
    data = {k: v for k, v in GOOD.items() if k != field}
    path = _write(tmp_path, "haiku", data)
    with pytest.raises(ValueError) as err:
        load_scenarios(str(tmp_path))
    assert str(path) in str(err.value) and repr(field) in str(err.value)


def test_empty_criteria_raises(tmp_path):
    path = _write(tmp_path, "haiku", {**GOOD, "criteria": []})
    with pytest.raises(ValueError, match="criteria") as err:
        load_scenarios(str(tmp_path))
    assert str(path) in str(err.value)


def test_criterion_without_description_raises(tmp_path):
    path = _write(tmp_path, "haiku", {**GOOD, "criteria": [{"name": "Form"}]})
    with pytest.raises(ValueError, match=r"criteria\[0\]") as err:
        load_scenarios(str(tmp_path))
    assert str(path) in str(err.value)


def test_criterion_with_unquoted_comma_raises(tmp_path):
    text = yaml.safe_dump({k: v for k, v in GOOD.items() if k != "criteria"})
    text += "criteria:\n  - {name: Form, description: Three lines, five syllables first.}\n"
    path = _write(tmp_path, "haiku", text)
    with pytest.raises(ValueError, match=r"criteria\[0\]") as err:
        load_scenarios(str(tmp_path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "field,value,kind",
    [("open_ended", "yes please", "bool"), ("title", 3, "str"), ("criteria", "Form", "list"),
     ("reference_helps", 1, "bool")],
)
def test_wrong_type_raises_with_file_and_field(tmp_path, field, value, kind):
    path = _write(tmp_path, "haiku", {**GOOD, field: value})
    with pytest.raises(ValueError) as err:
        load_scenarios(str(tmp_path))
    msg = str(err.value)
    assert str(path) in msg and repr(field) in msg and kind in msg


def test_not_a_mapping_raises(tmp_path):
    path = _write(tmp_path, "haiku", "- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping") as err:
        load_scenarios(str(tmp_path))
    assert str(path) in str(err.value)


def test_invalid_yaml_syntax_names_the_file(tmp_path):
    path = _write(tmp_path, "haiku", "name: haiku\ncriteria: [unclosed\n")
    with pytest.raises(ValueError) as err:
        load_scenarios(str(tmp_path))
    assert str(path) in str(err.value)


def test_duplicate_name_raises(tmp_path):
    _write(tmp_path, "a", GOOD)
    second = _write(tmp_path, "b", GOOD)
    with pytest.raises(ValueError, match="haiku") as err:
        load_scenarios(str(tmp_path))
    assert str(second) in str(err.value) and "twice" in str(err.value)


def test_empty_folder_raises(tmp_path):
    with pytest.raises(ValueError, match="no scenario"):
        load_scenarios(str(tmp_path))


def test_user_folder_with_its_own_scenario(tmp_path):
    _write(tmp_path, "haiku", GOOD)
    _write(tmp_path, "_notes", "this: is skipped because of the underscore\n")
    scenarios = load_scenarios(str(tmp_path))
    assert list(scenarios) == ["haiku"]
    s = get_scenario("haiku", str(tmp_path))
    assert s.open_ended is True and s.reference_helps is False
    assert [c.name for c in s.criteria] == ["Form", "Imagery"]
    # the user folder does not change the built-ins
    assert "haiku" not in load_scenarios()
    # no _tiers.yaml in the user folder: the built-in tiers
    assert load_tiers(str(tmp_path)) == load_tiers()


def test_unknown_scenario_raises_listing_known(tmp_path):
    _write(tmp_path, "haiku", GOOD)
    with pytest.raises(KeyError, match="sonnet.*haiku"):
        get_scenario("sonnet", str(tmp_path))
