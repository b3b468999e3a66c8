"""Every knob of the pipeline, as OmegaConf structured configs.

`load(path, overrides)` merges a YAML file and `key=value` overrides onto these dataclasses, so a typo
in a key or a wrong type fails at load time with the key's name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf


@dataclass
class EngineConfig:
    kind: str = "hf"  # hf | openai | vllm
    model: str = "smollm2-135m-instruct"  # a local folder, or the embedded default's name
    dtype: str = "float32"  # hf: float32 on CPU, bfloat16 on GPU
    num_threads: int = 1  # hf: torch intra-op threads per actor; match the actor's num_cpus
    max_model_len: int = 2048  # prompt + completion tokens the engine accepts
    base_url: Optional[str] = None  # openai: endpoint; defaults to $OPENAI_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"  # openai: the variable holding the key (never the key)
    max_concurrency: int = 16  # openai: requests in flight per actor
    timeout_s: float = 120.0  # openai: per request
    max_retries: int = 6  # openai: on 429, 5xx, timeouts, malformed bodies


@dataclass
class SamplingConfig:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0
    logprobs: int = 0  # top-k log-probabilities per generated token (0: none)


@dataclass
class PoolConfig:
    """How a row-wise stage runs on Ray Data: an autoscaling actor pool."""

    min_size: int = 1
    max_size: int = 1
    num_cpus: float = 1.0  # per actor; keep the sum below the cluster's CPUs or reads starve
    num_gpus: float = 0.0
    batch_size: int = 8


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
    seed: int = 0


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
    seed: int = 0


@dataclass
class ClassifyConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    route_by: str = "synthesis"  # synthesis: keep the scenario asked for; classifier: use the prediction


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
    score_by: str = "text"
    # With score_by=choice: divide out the teacher's score prior, measured on a content-free record
    # ("N/A" instruction and response) of the same scenario and mode, so a small teacher's bias
    # toward one score does not flatten every label to it (contextual calibration).
    calibrate: bool = False
    # With score_by=text: prefill the answer with "[[" so the first generated token is the score; the
    # engine must continue an assistant message (hf and vLLM servers do; many remote APIs do not).
    prefill_score: bool = False
    max_attempts: int = 2  # a parse failure is re-asked (sampled) until this many attempts
    retry_temperature: float = 0.7


@dataclass
class IFDConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)


@dataclass
class CurateConfig:
    drop_ifd_above_one: bool = True  # Cherry LLM: IFD > 1 means the prompt does not help the answer
    keep_top_percent: float = 100.0  # Cherry LLM: keep the hardest k% by IFD
    max_ifd_zscore: Optional[float] = 3.0  # Themis: drop outliers within their scenario
    rebalance: bool = True  # cap each score's share within a scenario at the rarest kept score
    rebalance_max_ratio: float = 2.0  # a score may have at most this many times the rarest score
    validation_fraction: float = 0.25
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
    deepspeed_config: str = "configs/deepspeed/zero3.json"
    seed: int = 0
    # Where DeepSpeed caches its compiled ops; persistent so the one-time compile happens once.
    torch_extensions_dir: str = "~/.cache/themis-ray/torch_extensions"


@dataclass
class EvaluateConfig:
    # Judges to compare: "trained" (this run's judge), "base" (train.model), or a model folder.
    judges: list[str] = field(default_factory=lambda: ["trained", "base"])
    engine: EngineConfig = field(default_factory=EngineConfig)  # model is set per judge
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_tokens=96, temperature=0.0, logprobs=10)
    )
    pool: PoolConfig = field(default_factory=PoolConfig)
    prefill_score: bool = True


@dataclass
class ServeConfig:
    model: Optional[str] = None  # None: the run's trained judge
    host: str = "127.0.0.1"
    port: int = 8000
    engine: EngineConfig = field(default_factory=EngineConfig)
    api_keys_env: str = "THEMIS_API_KEYS"  # comma-separated keys; unset means no auth
    max_request_bytes: int = 65536
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    num_replicas: int = 1
    replica_num_cpus: float = 1.0
    prefill_score: bool = True
    max_tokens: int = 128


@dataclass
class PipelineConfig:
    run_dir: str = "runs/quickstart"
    stages: list[str] = field(
        default_factory=lambda: [
            "synthesize",
            "classify",
            "respond",
            "label",
            "ifd",
            "curate",
            "train",
            "evaluate",
        ]
    )
    ray: RayConfig = field(default_factory=RayConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    respond: RespondConfig = field(default_factory=RespondConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    ifd: IFDConfig = field(default_factory=IFDConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
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
        cfg = OmegaConf.merge(cfg, data)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def digest(section: Any) -> str:
    """A stable digest of a config section, for manifests and skip decisions."""
    plain = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else section
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
