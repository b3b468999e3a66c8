"""What a row-wise stage declares: a processor class the executor runs on an actor pool.

Its constructor is the per-actor setup (it builds the engine once); `process(rows)` maps a batch of
row dicts to output row dicts, each with `reject_reason` set or not. A stage hands it to the executor
as an `executor.Step`, which names its constructor arguments and the engine it builds. `resume_key`
names the input and output columns of one unit of work, so an interrupted run skips the units already
written.
"""

from __future__ import annotations

import pyarrow as pa

from themis_ray.engines import build_engine
from themis_ray.schema import to_table


class RowProcessor:
    stage: str = ""
    # (input column, output column) naming the same unit of work: a resumed run skips input rows whose
    # key is already written (accepted or rejected). None: the processor cannot resume.
    resume_key: tuple[str, str] | None = None
    # Each input row gives exactly one output row (accepted or rejected), with an `id`: the executor then
    # checks the written rows against the input's and keeps each id once (`plan.drop_duplicates`).
    one_row_per_input: bool = False

    def __init__(self, output_schema: pa.Schema):
        self.schema = output_schema

    def process(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(self.process(batch.to_pylist()), self.schema, self.stage)


class GenerationProcessor(RowProcessor):
    """A processor whose work is one `generate` call: requests from rows, then rows from completions.

    Split this way, the same prompt building and parsing run with any engine in `process`, and through
    ray.data.llm's vLLM processor (see `vllm_batch`), where no engine is built here (`with_engine=False`).
    """

    sampling = None  # the SamplingConfig of the generate call

    def __init__(self, output_schema: pa.Schema, engine_cfg, with_engine: bool = True, engine_key: str = "engine"):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg, engine_key) if with_engine else None

    def conversations(self, rows: list[dict]) -> list:
        raise NotImplementedError

    def parse(self, rows: list[dict], completions: list) -> list[dict]:
        raise NotImplementedError

    def process(self, rows: list[dict]) -> list[dict]:
        return self.parse(rows, self.engine.generate(self.conversations(rows), self.sampling))
