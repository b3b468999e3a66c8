"""Every stage in the config's `stages`, skipping those whose manifest still matches.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --entrypoint-num-cpus 0 --entrypoint-num-gpus 0 --runtime-env cluster/runtime-env.yaml \\
        -- python jobs/pipeline.py --config configs/quickstart.yaml run_dir=/shared/runs/x [--force] [--export URI] [key=value ...]

Each stage's actors and trainers are scheduled on the cluster: row-wise stages on their
`<stage>.pool` (CPUs, GPUs, custom resources), train on `train.num_workers` Ray Train workers.
Arguments, the runtime env and what the driver reserves: see jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("pipeline", sys.argv[1:]))
