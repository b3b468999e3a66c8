"""A `GenerationProcessor` on vLLM through ray.data.llm: Ray's own batch path for vLLM on GPU clusters.

The dataset goes through `build_processor(vLLMEngineProcessorConfig(...))`: our `conversations` builds
each row's chat messages (preprocess), ray.data.llm applies the model's chat template, tokenizes and
runs vLLM engine actors (GPUs per actor = tensor_parallel_size, an autoscaling pool of
pool.min_size..pool.max_size), and our `parse` turns the answers into the stage's rows (a map_batches
after it, since one input row may give several output rows or a reject). A row vLLM fails on
(`should_continue_on_error`) comes back as a completion with its error: a reject with the reason,
never a lost batch.

Every other engine, and a processor that is not one `generate` call, runs in `map_processor`'s actor pool.
"""

from __future__ import annotations

import functools
import pickle

import pyarrow as pa

from themis_ray.engines import Completion, gpus_per_engine, plain_conversation
from themis_ray.engines.vllm_engine import plain, sampling_params
from themis_ray.executor.plan import LIGHT_CPUS  # the templating, tokenizing and pre/postprocess steps
from themis_ray.schema import to_table

ROW = "_themis_row"  # the input row, pickled: ray.data.llm adds and overwrites columns of its own
ERROR = "__inference_error__"  # ray.data.llm's per-row error column (should_continue_on_error)


def processor_config(engine_cfg, pool):
    """The ray.data.llm config for an EngineConfig (kind vllm) and a stage's PoolConfig."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from themis_ray.assets import resolve_model

    path = resolve_model(engine_cfg.model)
    engine_kwargs = {
        "dtype": engine_cfg.dtype,
        "max_model_len": int(engine_cfg.max_model_len),
        "tensor_parallel_size": int(engine_cfg.tensor_parallel_size),
        **({"gpu_memory_utilization": float(engine_cfg.gpu_memory_utilization)} if engine_cfg.device != "cpu" else {}),
        **plain(engine_cfg.engine_kwargs),
    }
    extra = {}
    if not gpus_per_engine(engine_cfg):
        # A CPU build of vLLM: the engine actor holds CPUs, never a GPU it would wait for forever.
        extra["placement_group_config"] = {"bundles": [{"CPU": max(pool.num_cpus, LIGHT_CPUS)}]}
    light = {"num_cpus": LIGHT_CPUS}
    return vLLMEngineProcessorConfig(
        model_source=path,
        engine_kwargs=engine_kwargs,
        batch_size=pool.batch_size,
        concurrency=(max(1, pool.min_size), max(1, pool.min_size, pool.max_size)),
        should_continue_on_error=True,
        chat_template_stage=light,
        tokenize_stage=light,
        detokenize_stage=False,  # vLLM already returns the text
        **extra,
    )


@functools.lru_cache(maxsize=2)
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def preprocess(row: dict, helper, model_path: str) -> dict:
    """One input row -> its chat messages and sampling parameters, with the row itself kept aside.
    ray.data.llm templates and tokenizes the messages itself, so their text is made plain here, as
    the engines do (`plain_conversation`)."""
    (conversation,) = helper.conversations([row])
    return {ROW: pickle.dumps(row), "messages": plain_conversation(_tokenizer(model_path), conversation),
            "sampling_params": sampling_params(helper.sampling)}


# What parse_batch reads of ray.data.llm's output row.
OUTPUT = ("generated_text", "num_input_tokens", "num_generated_tokens", ERROR)


def postprocess(row: dict) -> dict:
    """ray.data.llm's output row -> the input row and the few output fields `parse_batch` reads.

    Rows vLLM failed on skip the postprocess and arrive whole, with the same names: keep the names.
    """
    return {ROW: row[ROW], **{key: row.get(key) for key in OUTPUT}}


def parse_batch(batch: pa.Table, helper) -> pa.Table:
    """Completions -> the stage's rows, through the processor's own `parse`."""
    columns = {key: batch[key].to_pylist() if key in batch.column_names else [None] * batch.num_rows
               for key in OUTPUT}
    rows = [pickle.loads(blob) for blob in batch[ROW].to_pylist()]
    completions = [
        Completion(text=text or "", prompt_tokens=int(prompt or 0), completion_tokens=int(generated or 0),
                   error=error or None)
        for text, prompt, generated, error in zip(*(columns[key] for key in OUTPUT))
    ]
    return to_table(helper.parse(rows, completions), helper.schema, helper.stage)


def map_generation(ds, step, schema: pa.Schema):
    """`ds` through ray.data.llm's vLLM processor and the step's parsing; a lazy Dataset."""
    from ray.data.llm import build_processor

    from themis_ray.assets import resolve_model

    pool = step.pool
    helper = step.build(schema, with_engine=False)  # prompts and parsing, no model
    llm = build_processor(
        processor_config(step.engine.config, pool),
        preprocess=functools.partial(preprocess, helper=helper, model_path=resolve_model(step.engine.config.model)),
        postprocess=postprocess,
        preprocess_map_kwargs={"num_cpus": LIGHT_CPUS},
        postprocess_map_kwargs={"num_cpus": LIGHT_CPUS},
    )
    return llm(ds).map_batches(parse_batch, fn_kwargs={"helper": helper}, batch_size=pool.batch_size,
                               batch_format="pyarrow", num_cpus=LIGHT_CPUS)
