"""The pipeline's stages, one module each: its processors and its `run(ctx) -> StageResult`.

The executor (`themis_ray.executor`) runs them as Ray Data plans; `themis_ray.pipeline` orders them.
"""
