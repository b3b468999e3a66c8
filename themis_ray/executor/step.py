"""What a stage hands the executor: one typed, frozen `Step` per actor-pool map.

A step names the processor class and its constructor arguments, the pool it runs on, the engine it
builds (declared by the stage, so the executor can check it on the driver and give each actor its
GPUs without looking inside the arguments), the partition its rows belong to, and the statistics its
parts carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import pyarrow as pa

# stats(table, rejected) -> summable figures of those rows ({name: number or nested dict of numbers})
Stats = Callable[[pa.Table, bool], dict]


@dataclass(frozen=True)
class StepEngine:
    """The engine a step's processor builds: its config, the config key that names it in errors, and
    whether the step scores given text by log-probability (checked on the driver against the
    engine's capabilities)."""

    config: Any
    key: str
    scores: bool = False


@dataclass(frozen=True)
class Step:
    name: str  # in progress bars and errors
    processor: type  # a RowProcessor subclass
    args: Mapping[str, Any]  # the processor's constructor arguments (besides output_schema), nothing else
    pool: Any  # a PoolConfig
    engine: Optional[StepEngine] = None  # None: the processor builds no engine
    # {column: value} the step's rows share: its parts record it in their footers (`StageStore.files`
    # selects by it), and a resumed step skips only the rows written in its own partition.
    partition: Optional[Mapping[str, str]] = None
    stats: Optional[Stats] = None

    def build(self, output_schema: pa.Schema, **setup):
        """The processor itself (once per actor); `setup` carries the executor's own switches."""
        return self.processor(output_schema=output_schema, **self.args, **setup)

    @property
    def engine_config(self):
        return self.engine.config if self.engine is not None else None

