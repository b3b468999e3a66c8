"""The trained judge's own mistakes -> a DPO-tuned judge in `<run_dir>/prefer/judge` (DeepSpeed ZeRO-3).

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --entrypoint-num-cpus 0 --entrypoint-num-gpus 0 --runtime-env cluster/runtime-env.yaml \\
        -- python jobs/prefer.py --config configs/quickstart.yaml run_dir=/shared/runs/x [--force] [--export URI] [key=value ...]

Mines and scores on `prefer.pool`'s actors, then runs `train.num_workers` Ray Train workers
(`train.use_gpu: true` puts one GPU under each); rank 0 writes the judge into run_dir, so run_dir
must be on storage every node mounts.
Arguments, the runtime env and what the driver reserves: see jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("prefer", sys.argv[1:]))
