"""Reference documents -> instructions (reference-based questioning, role-playing quizzing).

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --entrypoint-num-cpus 0 --entrypoint-num-gpus 0 --runtime-env cluster/runtime-env.yaml \\
        -- python jobs/synthesize.py --config configs/quickstart.yaml run_dir=/shared/runs/x [--force] [--export URI] [key=value ...]

Runs on the `synthesize.pool` actor pool (give it `num_gpus: 1` with an hf engine on GPU workers).
Arguments, the runtime env and what the driver reserves: see jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("synthesize", sys.argv[1:]))
