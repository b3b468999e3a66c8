"""Responses -> teacher evaluations with `[[n]]` scores (unparsable answers re-asked, then rejects).

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --entrypoint-num-cpus 0 --entrypoint-num-gpus 0 --runtime-env cluster/runtime-env.yaml \\
        -- python jobs/label.py --config configs/quickstart.yaml run_dir=/shared/runs/x [--force] [--export URI] [key=value ...]

Runs on the `label.pool` actor pool. With a teacher behind an OpenAI-compatible endpoint the actors
are I/O-bound: `label.pool.num_cpus: 0`, a custom resource such as `{labeler: 1}` that only the
labeling workers offer, and `min_size`/`max_size` let the autoscaler add and remove those workers
as the pool grows and drains (cluster/rayjob-label.yaml).
Arguments, the runtime env and what the driver reserves: see jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("label", sys.argv[1:]))
