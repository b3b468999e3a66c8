"""Judge any dataset on a cluster: a user's Parquet/JSONL/CSV files in, judged Parquet parts out.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --entrypoint-num-cpus 0 --entrypoint-num-gpus 0 --runtime-env cluster/runtime-env.yaml \\
        -- python jobs/judge.py --config configs/quickstart.yaml input=s3://bucket/data/ output=s3://bucket/judged/ \\
           judge.engine.model=s3://bucket/runs/x/train/judge judge.scenario=open_qa [key=value ...]

Runs on the `judge.pool` actor pool (GPUs per actor with `judge.pool.num_gpus`, or a vllm engine's
tensor_parallel_size); cluster/rayjob-judge.yaml gives it a worker group that autoscales from zero.
The driver holds no rows. Arguments, the runtime env and what the driver reserves: see jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("judge", sys.argv[1:]))
