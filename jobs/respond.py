"""Instructions -> one response per responder (model, sampling, system prompt).

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --entrypoint-num-cpus 0 --entrypoint-num-gpus 0 --runtime-env cluster/runtime-env.yaml \\
        -- python jobs/respond.py --config configs/quickstart.yaml run_dir=/shared/runs/x [--force] [--export URI] [key=value ...]

Runs one actor pool per responder, sized by `respond.pool`.
Arguments, the runtime env and what the driver reserves: see jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("respond", sys.argv[1:]))
