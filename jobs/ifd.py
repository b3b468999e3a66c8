"""Labelled records -> IFD, the teacher's answer loss with and without the prompt.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --entrypoint-num-cpus 0 --entrypoint-num-gpus 0 --runtime-env cluster/runtime-env.yaml \\
        -- python jobs/ifd.py --config configs/quickstart.yaml run_dir=/shared/runs/x [--force] [--export URI] [key=value ...]

Runs on the `ifd.pool` actor pool; needs an engine that scores text (hf).
Arguments, the runtime env and what the driver reserves: see jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("ifd", sys.argv[1:]))
