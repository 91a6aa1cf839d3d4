"""Chat with images on the real stack, through the official openai SDK: RapidOCR with its real PP-OCRv4
models reads a rendered invoice line, and a tiny random Llava built from configs (no small real weights
exist) answers about an image; image inputs are checked at the edge, remote ones fetched only from
allowed hosts at public addresses, and each image is billed beside the tokens."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import openai
import pytest
from aiohttp import web
from PIL import Image, ImageDraw, ImageFont

from bus.account import credits
from bus.errors import InvalidRequest
from bus.openai.chat import ImageRef
from bus.settings import ImageInputSettings
from consumers.models import resolve
from consumers.tiny_vision import build_tiny_vision
from edge.image_inputs import ImageInputs
from tests.conftest import CHAT_MODEL, ROOT, eventually, usage_rows
from tests.test_credits import _grant, _prepaid_tenant

OCR, VLM = "rapidocr", "tiny-vlm"  # tests/stack_models/vision.toml
OCR_IMAGE_PRICE, VLM_INPUT, VLM_OUTPUT, VLM_IMAGE_PRICE = 1000, 3, 7, 500
INVOICE = "INVOICE 2026-0042 TOTAL 17.50"


def _rendered(text: str, size: int = 48, canvas: tuple[int, int] | None = None) -> Image.Image:
    """``text`` in black on white, ``size`` px type (Pillow's own font), with a margin (or on a larger ``canvas``)."""
    font = ImageFont.load_default(size=size)
    _, _, right, bottom = font.getbbox(text)
    image = Image.new("RGB", canvas or (right + 32, bottom + 32), "white")
    ImageDraw.Draw(image).text((16, 16), text, fill="black", font=font)
    return image


def _png(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **options)
    return out.getvalue()


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def _ask(*urls: str, text: str = "Read this.") -> list[dict]:
    """One user message as the SDK sends it: a text part, then an image_url part per URL."""
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}]


@pytest.fixture(scope="module")
def ocr(stack) -> str:
    stack.serve(OCR)
    return OCR


@pytest.fixture(scope="module")
def vlm(stack) -> Path:
    chat = resolve(CHAT_MODEL, stack.settings.model(CHAT_MODEL), Path(stack.settings.cache_dir))
    path = build_tiny_vision(ROOT / stack.settings.model(VLM).source, chat)  # SmolLM2's tokenizer, random weights
    stack.serve(VLM)
    return path


async def _input_images(clickhouse, request_id: str) -> int:
    [(count,)] = await clickhouse.query("SELECT input_images FROM usage_events WHERE request_id = {r:String}",
                                        {"r": request_id})
    return count


async def test_ocr_reads_a_rendered_invoice_line_exactly(ocr, client, clickhouse):
    reply = await client.chat.completions.create(model=ocr, messages=_ask(_data_url(_png(_rendered(INVOICE)))))
    assert reply.choices[0].message.content == INVOICE
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (0, 0)  # no tokenizer: priced per image
    [row] = await usage_rows(clickhouse, [reply._request_id], expect=1)
    assert (row["status"], row["input_units"], row["output_units"]) == ("ok", 0, 0)
    assert row["cost_micros"] == OCR_IMAGE_PRICE
    assert await _input_images(clickhouse, reply._request_id) == 1


async def test_ocr_streams_each_image_and_a_large_image_goes_by_blob(ocr, client, clickhouse):
    # Uncompressed and tall: over a MiB, far past the bus's blob threshold.
    big = _png(_rendered("TOTAL 17.50", canvas=(960, 480)), compress_level=0)
    assert len(big) > 1 << 20
    second = Image.open(io.BytesIO(_png(_rendered("PAID IN FULL")))).convert("RGB")
    jpeg = io.BytesIO()
    second.save(jpeg, "JPEG", quality=95)
    stream = await client.chat.completions.create(
        model=ocr, messages=_ask(_data_url(big), _data_url(jpeg.getvalue(), "image/jpeg")), stream=True,
        stream_options={"include_usage": True})
    deltas, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
        request_id = chunk.id.removeprefix("chatcmpl-")
    assert deltas == ["TOTAL 17.50", "\n\nPAID IN FULL"]  # one delta per image, as each is read
    assert usage.prompt_tokens == usage.completion_tokens == 0
    [row] = await usage_rows(clickhouse, [request_id], expect=1)
    assert row["cost_micros"] == 2 * OCR_IMAGE_PRICE
    assert await _input_images(clickhouse, request_id) == 2


async def test_the_tiny_vision_model_answers_about_an_image_with_exact_usage(vlm, client, clickhouse):
    from transformers import AutoProcessor

    question = "What colour is this square?"
    webp = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(webp, "WEBP")
    square = webp.getvalue()
    reply = await client.chat.completions.create(model=VLM, messages=_ask(_data_url(square, "image/webp"), text=question),
                                                 max_tokens=6)
    assert reply.choices[0].message.content.strip()  # random weights: some words
    assert reply.choices[0].finish_reason == "length"
    processor = AutoProcessor.from_pretrained(vlm)
    text_only = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": question}]}],
                                              add_generation_prompt=True, tokenize=False)
    prompt_tokens = len(processor.tokenizer(text_only)["input_ids"])  # the image's own tokens are not counted
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 6)
    [row] = await usage_rows(clickhouse, [reply._request_id], expect=1)
    assert (row["input_units"], row["output_units"]) == (prompt_tokens, 6)
    assert row["cost_micros"] == prompt_tokens * VLM_INPUT + 6 * VLM_OUTPUT + VLM_IMAGE_PRICE
    assert await _input_images(clickhouse, reply._request_id) == 1

    # Greedy decoding: the stream says the same, and text alone is answered too, without an image's price.
    stream = await client.chat.completions.create(model=VLM, messages=_ask(_data_url(square, "image/webp"), text=question),
                                                  max_tokens=6, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == \
        reply.choices[0].message.content
    plain = await client.chat.completions.create(model=VLM, messages=[{"role": "user", "content": question}],
                                                 max_tokens=2)
    assert plain.usage.prompt_tokens == prompt_tokens
    [row] = await usage_rows(clickhouse, [plain._request_id], expect=1)
    assert row["cost_micros"] == prompt_tokens * VLM_INPUT + 2 * VLM_OUTPUT


async def _refused(client, model: str, messages: list[dict], param: str) -> str:
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=model, messages=messages)
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body
    return err.value.body["message"]


async def test_remote_images_come_only_from_allowed_hosts_at_public_addresses(ocr, client):
    part = "messages[0].content[1].image_url.url"
    message = await _refused(client, ocr, _ask("https://images.example.com/invoice.png"), part)
    assert "images.example.com" in message and "fetch_hosts" in message
    # Each of these hosts is allowed by name (vision.toml), and none is ever fetched from: by literal
    # address, a name that resolves to loopback, an IPv4-mapped IPv6 address.
    for host in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "localhost", "[::ffff:127.0.0.1]"):
        message = await _refused(client, ocr, _ask(f"http://{host}/latest/meta-data/x.png"), part)
        assert "never fetched" in message, (host, message)
    # 127.0.0.1 written as one decimal number: not a URL the edge follows at all.
    assert "not valid" in await _refused(client, ocr, _ask("http://2130706433/x.png"), part)


async def test_bad_image_inputs_are_400s_naming_the_part_and_never_billed(ocr, client, clickhouse):
    part = "messages[0].content[1].image_url.url"
    good = _png(_rendered("OK", size=32))
    await _refused(client, ocr, _ask(_data_url(b"just some text, not a picture")), part)
    await _refused(client, ocr, _ask("data:image/png;base64,***not base64***"), part)
    await _refused(client, ocr, _ask(_data_url(good, "text/plain")), part)
    await _refused(client, ocr, _ask(_data_url(good[: len(good) // 2])), part)  # cut short: does not decode
    bmp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bmp, "BMP")
    await _refused(client, ocr, _ask(_data_url(bmp.getvalue(), "image/bmp")), part)  # an image, not one we read
    await _refused(client, ocr, _ask("ftp://images.example.com/x.png"), part)
    huge = _png(Image.new("1", (4097, 4096), 1))  # small to send, 16.8 million pixels to decode
    assert "pixels" in await _refused(client, ocr, _ask(_data_url(huge)), part)
    assert "at most 8" in await _refused(client, ocr, _ask(*[_data_url(good)] * 9), "messages")
    await _refused(client, CHAT_MODEL, _ask(_data_url(good)), "messages[0].content[1]")  # a text-only model
    await _refused(client, ocr, [{"role": "user", "content": "Read what?"}], "messages")  # nothing to read
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model=ocr, prompt="INVOICE")
    assert err.value.body["param"] == "model"

    # None reached a worker but the chat with no image: it alone (its worker refused it) has a usage row,
    # costing nothing; the others, refused before admission, came before it.
    async def refused_rows():
        return await clickhouse.query("SELECT status, cost_micros FROM usage_events WHERE model = {m:String} "
                                      "AND status != 'ok'", {"m": ocr})

    assert await eventually(refused_rows) == [("error", 0)]


async def test_a_prepaid_hold_covers_every_image(ocr, stack, nc, meter):
    key = await _prepaid_tenant(stack, "vision-prepaid")
    # The enterprise tier's lane (high) costs 1.5 times: credits for one image, not two.
    await _grant(stack, nc, "vision-prepaid", 2000)
    client = stack.client(key)
    image = _data_url(_png(_rendered(INVOICE)))
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model=ocr, messages=_ask(image, image))
    assert err.value.body["code"] == "insufficient_quota"
    reply = await client.chat.completions.create(model=ocr, messages=_ask(image))
    assert reply.choices[0].message.content == INVOICE

    async def settled():
        return await credits.available(nc.jetstream(), "vision-prepaid") == 500

    await eventually(settled, timeout=20)


# -- the fetch itself, against a server on this machine (the stack's edge never fetches from one) --------


@pytest.fixture
async def image_server():
    png = _png(_rendered("FETCHED", size=32))

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "slow.png":
            await asyncio.sleep(5)
        if name == "moved.png":
            raise web.HTTPFound("/ok.png")
        if name == "big.png":
            return web.Response(body=png * 40, content_type="image/png")
        if name == "text.png":
            return web.Response(text="not an image", content_type="image/png")
        return web.Response(body=png, content_type="image/png")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    yield f"http://localhost:{port}", png
    await runner.cleanup()


async def test_fetches_follow_no_redirect_and_stop_at_the_size_and_time_limits(image_server):
    base, png = image_server
    settings = ImageInputSettings(fetch_hosts=["localhost"], fetch_max_bytes=len(png) * 10, fetch_timeout_s=0.5)
    inputs = ImageInputs(settings, address_allowed=lambda host, address: True)  # this machine, for this test only
    try:
        assert await inputs.load([ImageRef(f"{base}/ok.png", "p")]) == [png]
        for name, says in (("moved.png", "HTTP 302"), ("big.png", "larger than"), ("slow.png", "longer than"),
                           ("text.png", "not a PNG")):
            with pytest.raises(InvalidRequest, match=says) as err:
                await inputs.load([ImageRef(f"{base}/{name}", "p")])
            assert err.value.param == "p"
    finally:
        await inputs.close()
    strict = ImageInputs(settings)  # the edge's own rule: the same server is never reached
    try:
        with pytest.raises(InvalidRequest, match="never fetched"):
            await strict.load([ImageRef(f"{base}/ok.png", "p")])
    finally:
        await strict.close()
