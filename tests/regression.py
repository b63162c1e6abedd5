"""Seeded reduced simulations whose results must not change when code only moves.

``python tests/regression.py record`` writes ``tests/fixtures/regression/expected.json``
(the runs' ``metrics.json`` without wall-clock fields, and the sha256 of every
file of the exported adapter); ``tests/test_regression.py`` reruns the same
simulations and compares. Re-record only when a change is *meant* to alter
results, and say so in the commit.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).parent / "fixtures" / "regression" / "expected.json"

#: name -> run-config overrides on top of the tiny run (3 clients, 2 rounds).
CASES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedavg-local-dp": {"dp-mode": "local", "dp-noise-multiplier": 0.5},
    "fedavg-int8": {"compression": "int8"},
    "feature-centering": {"feature-centering": True, "pooling": "mean"},
    "ffa-lora": {"strategy": "ffa-lora"},
    "hetero-rank": {"strategy": "hetero-rank", "sim-client-ranks": "2,4,8"},
}
#: Cases whose noise is OS-seeded (a site's DP noise is never reproducible, see
#: fedlora.privacy.dpsgd): only what does not depend on the noise is compared
#: (ε, δ, bytes, counts), not losses, accuracies or the adapter's tensors.
NOISY = {"fedavg-local-dp"}
NOISY_FIELDS = (
    "global_accuracy",
    "global_loss",
    "adapter_model.safetensors",
    "standalone/model.safetensors",  # the merged weights carry the same noise
)
#: Fields of metrics.json that measure time or machine, not results.
VOLATILE = ("seconds", "time", "duration", "wall")
#: Exported files written from a library's template, not from results: PEFT's
#: model card (``README.md``) changes its text and version line with each release.
TEMPLATES = ("README.md",)
#: What in ``adapter_config.json`` decides the adapter's results. PEFT adds a key
#: with a null default for each new method in most releases (0.22 added nine),
#: so the whole file's hash would fail on a PEFT upgrade that changes nothing.
ADAPTER_CONFIG_KEYS = (
    "alpha_pattern", "base_model_name_or_path", "bias", "fan_in_fan_out", "init_lora_weights",
    "lora_alpha", "lora_dropout", "modules_to_save", "peft_type", "r", "rank_pattern",
    "target_modules", "task_type", "use_dora", "use_rslora",
)  # fmt: skip
#: Keys that name the library release that wrote a file.
VERSION_KEYS = ("peft_version", "transformers_version")


def _stable(obj: Any, drop: tuple[str, ...] = ()) -> Any:
    if isinstance(obj, dict):
        return {
            k: _stable(v, drop)
            for k, v in obj.items()
            if not any(t in k.lower() for t in VOLATILE) and not any(d in k for d in drop)
        }
    if isinstance(obj, list):
        return [_stable(v, drop) for v in obj]
    return obj


def _canonical(path: Path, workdir: Path) -> bytes:
    """A file's bytes with the (temporary) work folder named ``<work>``; JSON
    files with sorted keys and PEFT's module *sets* sorted (PEFT writes them
    in the process's string-hash order, which changes from run to run), without
    the library versions that wrote them, and ``adapter_config.json`` reduced to
    :data:`ADAPTER_CONFIG_KEYS`."""
    data = path.read_bytes().replace(str(workdir).encode(), b"<work>")
    if path.suffix != ".json":
        return data
    obj = json.loads(data)
    if path.name == "adapter_config.json":
        obj = {k: obj.get(k) for k in ADAPTER_CONFIG_KEYS}
    for key in ("target_modules", "modules_to_save"):
        if isinstance(obj, dict) and isinstance(obj.get(key), list):
            obj[key] = sorted(obj[key])
    for key in ("local_files_only", "is_local", *VERSION_KEYS):  # not results
        if isinstance(obj, dict):
            obj.pop(key, None)
    return json.dumps(obj, sort_keys=True).encode()


def _fingerprint(path: Path, workdir: Path) -> Any:
    """A tensor file's per-tensor sum, sum of magnitudes and sum of squares; any
    other file's sha256.

    Tensors are compared with a tolerance (:func:`same`): the last bits of a
    float sum move with the BLAS build, so a hash of the bytes would fail on a
    machine whose libraries differ while the results do not.
    """
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        def sums(v: Any) -> dict[str, float]:
            v = v.astype("float64")
            return {"sum": float(v.sum()), "abs": float(abs(v).sum()), "sq": float((v**2).sum())}

        return {k: sums(v) for k, v in sorted(load_file(str(path)).items())}
    return hashlib.sha256(_canonical(path, workdir)).hexdigest()


def same(got: Any, expected: Any, rel: float = 1e-5, path: str = "") -> list[str]:
    """Where ``got`` differs from ``expected`` (floats within ``rel``, all else exactly)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        if set(expected) == {"sum", "abs", "sq"} == set(got):
            # a signed sum cancels: its error is relative to the sum of magnitudes
            scale = rel * max(expected["abs"], 1e-9)
            ok = abs(got["sum"] - expected["sum"]) <= scale and all(
                math.isclose(got[k], expected[k], rel_tol=rel, abs_tol=1e-9) for k in ("abs", "sq")
            )
            return [] if ok else [f"{path}: {got!r} != {expected!r}"]
        if sorted(got) != sorted(expected):
            return [f"{path}: keys {sorted(set(got) ^ set(expected))[:5]} differ"]
        return [d for k in expected for d in same(got[k], expected[k], rel, f"{path}/{k}")]
    if isinstance(expected, list) and isinstance(got, list):
        if len(got) != len(expected):
            return [f"{path}: length {len(got)} != {len(expected)}"]
        pairs = enumerate(zip(got, expected, strict=True))
        return [d for i, (g, e) in pairs for d in same(g, e, rel, f"{path}[{i}]")]
    if isinstance(expected, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        ok = math.isclose(got, expected, rel_tol=rel, abs_tol=1e-9)
        return [] if ok else [f"{path}: {got!r} != {expected!r}"]
    return [] if got == expected else [f"{path}: {got!r} != {expected!r}"]


def run_case(name: str, workdir: Path) -> dict[str, Any]:
    """Run one case; its stable metrics and its exported adapter's file hashes."""
    from fedlora.simulations.engine import Resources, simulate
    from fedlora.simulations.tiny import make_text_csv, make_tiny_model, tiny_run_config

    model = workdir / "tiny-bert"
    if not model.exists():
        make_tiny_model(model)
    data = workdir / "texts.csv"
    if not data.exists():
        make_text_csv(data, n=90)
    run_dir = workdir / name
    cfg = tiny_run_config(
        model,
        data,
        run_dir,
        # export-round=last: which round a noisy (DP) run exports must not depend on its noise
        **{"learning-rate": 0.05, "local-epochs": 2, "export-round": "last", **CASES[name]},
    )
    status = simulate(cfg, 3, Resources(num_cpus=1))
    if status.get("status") != "completed":
        raise RuntimeError(f"regression case {name} did not complete: {status}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    adapter = {
        str(p.relative_to(run_dir)): _fingerprint(p, workdir)
        for p in sorted((run_dir / "adapter").rglob("*"))
        if p.is_file() and p.name not in TEMPLATES
    }
    drop = NOISY_FIELDS if name in NOISY else ()
    return {"metrics": _stable(metrics, drop), "adapter": _stable(adapter, drop)}


def run_all() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return {name: run_case(name, Path(tmp)) for name in CASES}


if __name__ == "__main__":
    results = run_all()
    if sys.argv[1:] == ["record"]:
        FIXTURE.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(f"recorded {FIXTURE}")
    else:
        print(json.dumps(results, indent=2, sort_keys=True))
