"""OCR latency through the whole gateway against RapidOCR called directly, on the same images.

Starts a real nats-server, an edge and a `rapidocr` worker (PP-OCRv4 inside rapidocr-onnxruntime),
then sends each image as a data URL in a chat completion, one request at a time, and times the
answer at the client. The same images are read in this process by the worker's own code
(``RapidOcr.read``, the detection setting the model uses) and by RapidOCR with the package's
default settings (every image's short side scaled up to 736 px). Medians and 90th percentiles.

    .venv/bin/python bench/ocr_latency.py [--runs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import aiohttp
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import gateway  # noqa: E402
from consumers.backends.rapid_ocr import RapidOcr  # noqa: E402

MODEL = "rapidocr"
LINE = "INVOICE 2026-0042 TOTAL 17.50"


def _page(lines: list[str], size: int, canvas: tuple[int, int] | None = None) -> bytes:
    """``lines`` in black on white, ``size`` px type, as a PNG."""
    font = ImageFont.load_default(size=size)
    width = max(font.getbbox(line)[2] for line in lines) + 32
    image = Image.new("RGB", canvas or (width, len(lines) * int(size * 1.5) + 32), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((16, 16 + i * int(size * 1.5)), line, fill="black", font=font)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


IMAGES = {
    "one line, 48 px type": _page([LINE], 48),
    "receipt, 4 lines, 24 px type": _page([f"ITEM {i:02d} WIDGET {i * 7} QTY {i} {i * 3.25:.2f}" for i in range(1, 5)], 24),
}


def _stats(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    return f"{statistics.median(ms):.0f} / {ms[int(0.9 * (len(ms) - 1))]:.0f}"


def _timed(read, data: bytes, runs: int) -> list[float]:
    read(data)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        read(data)
        times.append(time.perf_counter() - start)
    return times


async def _through_gateway(url: str, key: str, data: bytes, runs: int) -> list[float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}]}]}
    times = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        for i in range(runs + 1):
            start = time.perf_counter()
            async with http.post(url, json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status}: {await resp.text()}")
                await resp.read()
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    with gateway(f'[models.{MODEL}]\nbackend = "rapidocr"\nvision = true\n', [MODEL]) as gw:
        from rapidocr_onnxruntime import RapidOCR

        ours, package_default = RapidOcr(), RapidOCR()
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}; {args.runs} runs each, one at a time; ms median / p90\n")
        print("| image | gateway (SDK wire, data URL) | RapidOcr.read direct | overhead (median) "
              "| RapidOCR package defaults direct |")
        print("|---|---|---|---|---|")
        for name, data in IMAGES.items():
            # One at a time: the worker and this process would otherwise share the cores.
            through = asyncio.run(_through_gateway(f"{gw.url}/v1/chat/completions", gw.key, data, args.runs))
            direct = _timed(ours.read, data, args.runs)
            default = _timed(lambda d: package_default(d), data, max(3, args.runs // 4))
            overhead = (statistics.median(through) - statistics.median(direct)) * 1000
            size = "x".join(map(str, Image.open(io.BytesIO(data)).size))
            print(f"| {name}, {size} | {_stats(through)} | {_stats(direct)} | {overhead:+.0f} ms | {_stats(default)} |",
                  flush=True)


if __name__ == "__main__":
    main()
