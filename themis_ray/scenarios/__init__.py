"""The ten judging scenarios, loaded from YAML files in this folder (or a user's folder) and validated."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

BUILTIN_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    definition: str
    open_ended: bool
    reference_helps: bool
    criteria: tuple[Criterion, ...]  # in descending importance


def _require(data: dict, key: str, kind: type, where: str):
    if key not in data:
        raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(data[key], kind):
        raise ValueError(f"{where}: field {key!r} must be {kind.__name__}, got {type(data[key]).__name__}")
    return data[key]


def parse_scenario(data: dict, where: str) -> Scenario:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of scenario fields")
    criteria_raw = _require(data, "criteria", list, where)
    if not criteria_raw:
        raise ValueError(f"{where}: 'criteria' is empty; a scenario needs at least one criterion")
    criteria = []
    for i, c in enumerate(criteria_raw):
        if not isinstance(c, dict) or not c.get("name") or not c.get("description"):
            raise ValueError(f"{where}: criteria[{i}] needs a non-empty 'name' and 'description'")
        extra = set(c) - {"name", "description"}
        if extra:  # e.g. an unquoted comma in a YAML flow mapping `{name: x, description: a, b}`
            raise ValueError(
                f"{where}: criteria[{i}] has unknown fields {sorted(map(str, extra))}; "
                "quote a description that contains a comma"
            )
        criteria.append(Criterion(str(c["name"]), str(c["description"])))
    return Scenario(
        name=_require(data, "name", str, where),
        title=_require(data, "title", str, where),
        definition=_require(data, "definition", str, where).strip(),
        open_ended=_require(data, "open_ended", bool, where),
        reference_helps=_require(data, "reference_helps", bool, where),
        criteria=tuple(criteria),
    )


@lru_cache(maxsize=8)
def load_scenarios(directory: str | None = None) -> dict[str, Scenario]:
    """Every `*.yaml` in the folder except `_*.yaml`, keyed by scenario name."""
    folder = Path(directory) if directory else BUILTIN_DIR
    scenarios: dict[str, Scenario] = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML: {err}") from err
        scenario = parse_scenario(data, str(path))
        if scenario.name in scenarios:
            raise ValueError(f"{path}: scenario {scenario.name!r} is defined twice")
        scenarios[scenario.name] = scenario
    if not scenarios:
        raise ValueError(f"{folder}: no scenario YAML files found")
    return scenarios


@lru_cache(maxsize=8)
def load_tiers(directory: str | None = None) -> dict[str, dict[int, str]]:
    """Grading tiers {with_reference|without_reference: {score: text}}; falls back to the built-in."""
    path = Path(directory or BUILTIN_DIR) / "_tiers.yaml"
    if not path.is_file():
        path = BUILTIN_DIR / "_tiers.yaml"
    data = yaml.safe_load(path.read_text())
    return {k: {int(s): str(t) for s, t in v.items()} for k, v in data.items()}


def get_scenario(name: str, directory: str | None = None) -> Scenario:
    scenarios = load_scenarios(directory)
    if name not in scenarios:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(scenarios)}")
    return scenarios[name]
