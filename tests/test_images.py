"""POST /v1/images/generations and /v1/images/edits on the real stack: diffusers with a tiny random Stable
Diffusion pipeline built from configs (no small real weights exist; it draws noise), 64 px, 2 steps, through
the official openai SDK; `url` results behind signed links that work once."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import string
import time
import urllib.error
import urllib.request

import aiohttp
import msgspec
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from bus import blobs
from bus.account import credits
from bus.openai.images import ImageRequest, charge, to_body
from bus.protocol import BlobRef, ImagesBody, encode
from bus.signing import Identity
from bus.subjects import REQUEST_BLOBS_BUCKET, RESULT_BLOBS_BUCKET
from consumers.backends.diffusers_images import DiffusersImages, open_mask
from consumers.tiny_diffusion import build_tiny_diffusion
from edge.app import edge_identity_path
from edge.image_links import ImageLink
from infra.nats_launcher import free_port
from tests.conftest import CHAT_MODEL, ROOT, eventually, usage_rows
from tests.test_credits import _grant, _prepaid_tenant
from tests.test_metrics import scrape, value as sample

MODEL = "tiny-sd"  # tests/stack_models/images.toml
PIPELINE = ROOT / "build" / "tiny-sd"
PRICE_64, PRICE_32x48 = 1000, 400  # micro-credits per image there
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def sd_metrics(stack) -> str:
    """The metrics URL of the one worker serving ``MODEL`` (its /metrics on a port of its own)."""
    build_tiny_diffusion(PIPELINE)
    port = free_port()
    stack.serve(MODEL, env={"TOLLGATE_WORKER_METRICS_PORT": str(port)})
    return f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
def tiny_sd(sd_metrics) -> str:
    return MODEL


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def _picture(size: tuple[int, int], noise: bool = False) -> bytes:
    """A PNG to upload: a flat colour, or random noise (which PNG cannot compress)."""
    if noise:
        image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        image = Image.new("RGB", size, (200, 40, 40))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _mask(size: tuple[int, int]) -> bytes:
    """OpenAI's kind of mask: opaque, with a transparent square (the part to repaint)."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


async def test_generations_are_pngs_of_the_size_and_count_asked(tiny_sd, client):
    reply = await client.images.generate(model=MODEL, prompt=PROMPT, n=3, size="32x48", response_format="b64_json")
    assert len(reply.data) == 3 and reply.size == "32x48"
    for item in reply.data:
        assert _png(base64.b64decode(item.b64_json)).size == (32, 48)
    default = await client.images.generate(model=MODEL, prompt=PROMPT, response_format="b64_json")
    assert len(default.data) == 1 and _png(base64.b64decode(default.data[0].b64_json)).size == (64, 64), \
        "the first size in the price table is the default"


async def test_edits_with_and_without_a_mask(tiny_sd, client):
    picture = _picture((96, 80))  # resized to the size asked
    image_to_image = await client.images.edit(model=MODEL, image=("in.png", picture, "image/png"), prompt=PROMPT,
                                              n=2, size="64x64", response_format="b64_json")
    assert [_png(base64.b64decode(d.b64_json)).size for d in image_to_image.data] == [(64, 64)] * 2
    inpainted = await client.images.edit(model=MODEL, image=("in.png", picture, "image/png"),
                                         mask=("mask.png", _mask((96, 80)), "image/png"), prompt=PROMPT,
                                         size="32x48", response_format="b64_json")
    assert [_png(base64.b64decode(d.b64_json)).size for d in inpainted.data] == [(32, 48)]


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=st.text(alphabet=string.ascii_letters + string.digits + "-_.=", min_size=1, max_size=600)
       | st.tuples(st.binary(max_size=400), st.binary(max_size=80)).map(
           lambda parts: ".".join(base64.urlsafe_b64encode(p).decode() for p in parts)))
def test_any_other_link_is_refused_cleanly(stack, token):
    """Random tokens, and base64 of random bytes shaped like a claim and a signature: a 403 or 404, never a 5xx."""
    try:
        with urllib.request.urlopen(f"{stack.base_url}/v1/images/files/{token}.png", timeout=10) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    assert status in (403, 404)


async def _get(url: str) -> tuple[int, bytes, dict]:
    async with aiohttp.ClientSession() as http:  # no API key: the link is the credential
        async with http.get(url) as resp:
            return resp.status, await resp.read(), (await resp.json() if resp.status != 200 else {})


async def test_url_results_download_once_from_any_edge(tiny_sd, client, second_edge, stack):
    reply = await client.images.generate(model=MODEL, prompt=PROMPT, n=2)  # url: OpenAI's default
    first, second = (d.url for d in reply.data)
    assert first.startswith(stack.base_url + "/v1/images/files/") and first != second
    status, data, _ = await _get(first)
    assert status == 200 and _png(data).size == (64, 64)
    status, _, body = await _get(first)
    assert status == 404 and body["error"]["code"] == "link_used"
    # Signed by the first edge, served by the second: every edge of the deployment trusts the others' links.
    status, data, _ = await _get(second.replace(stack.base_url, second_edge))
    assert status == 200 and _png(data).size == (64, 64)
    status, _, _ = await _get(second)
    assert status == 404


async def test_expired_or_altered_links_are_refused_and_leave_the_image(tiny_sd, client, stack):
    url = (await client.images.generate(model=MODEL, prompt=PROMPT)).data[0].url
    prefix, token = url.removesuffix(".png").rsplit("/", 1)
    claim_text, signature = token.split(".")
    claim = base64.urlsafe_b64decode(claim_text + "=" * (-len(claim_text) % 4))
    link = msgspec.msgpack.decode(claim, type=ImageLink)
    assert 0 < link.expires - time.time() <= stack.settings.max_deadline_s, "links never outlive the stored image"

    edge = Identity.load_or_create(edge_identity_path(stack.settings))  # the edge's own key, as a forger lacks
    expired = msgspec.msgpack.encode(msgspec.structs.replace(link, expires=time.time() - 1))
    expired_url = f"{prefix}/{base64.urlsafe_b64encode(expired).decode().rstrip('=')}.{edge.sign(expired)}.png"
    status, _, body = await _get(expired_url)
    assert status == 404 and body["error"]["code"] == "link_expired"

    longer = msgspec.msgpack.encode(msgspec.structs.replace(link, expires=link.expires + 3600))
    altered_url = f"{prefix}/{base64.urlsafe_b64encode(longer).decode().rstrip('=')}.{signature}.png"
    status, _, body = await _get(altered_url)
    assert status == 403 and body["error"]["code"] == "invalid_link"
    forger = Identity.generate()  # a well-signed link from a key no operator registered
    forged = msgspec.msgpack.encode(msgspec.structs.replace(link, issuer=forger.public_key))
    status, _, body = await _get(f"{prefix}/{base64.urlsafe_b64encode(forged).decode().rstrip('=')}."
                                 f"{forger.sign(forged)}.png")
    assert status == 403 and body["error"]["code"] == "invalid_link"

    status, data, _ = await _get(url)
    assert status == 200 and _png(data).size == (64, 64), "refused links took nothing"


async def test_an_edit_upload_over_a_mebibyte_travels_through_the_object_store(tiny_sd, client, stack, nc):
    picture = _picture((600, 600), noise=True)
    assert len(picture) > 1024 * 1024
    reply = await client.images.with_raw_response.edit(model=MODEL, image=("big.png", picture, "image/png"),
                                                       prompt=PROMPT, response_format="b64_json")
    assert _png(base64.b64decode(reply.parse().data[0].b64_json)).size == (64, 64)
    # The request body the worker read is in tg_blobs under the request id, exactly as the edge built it.
    spec = stack.settings.model(MODEL)
    body = encode(to_body(ImageRequest(model=MODEL, prompt=PROMPT), spec, image=picture))
    ref = BlobRef(REQUEST_BLOBS_BUCKET, reply.headers["x-request-id"], len(body), hashlib.sha256(body).hexdigest())
    assert await blobs.get(nc.jetstream(), ref) == body


async def test_usage_row_has_the_images_and_their_cost(tiny_sd, client, clickhouse):
    reply = await client.images.with_raw_response.generate(model=MODEL, prompt=PROMPT, n=2, size="32x48",
                                                           response_format="b64_json")
    request_id = reply.headers["x-request-id"]
    [row] = await usage_rows(clickhouse, [request_id], expect=1)
    [(kind, unit)] = await clickhouse.query("SELECT kind, unit FROM usage_events WHERE request_id = {r:String}",
                                            {"r": request_id})
    assert (kind, unit, row["status"]) == ("images", "images", "ok")
    assert (row["input_units"], row["output_units"], row["cost_micros"]) == (0, 2, 2 * PRICE_32x48)


async def test_a_prepaid_tenant_holds_the_images_asked_and_pays_for_those_made(tiny_sd, stack, nc, meter, clickhouse):
    tenant = "prepaid-images"
    key = await _prepaid_tenant(stack, tenant)
    await _grant(stack, nc, tenant, 100_000)
    reply = await stack.client(api_key=key).images.with_raw_response.generate(
        model=MODEL, prompt=PROMPT, n=3, response_format="b64_json")
    lane = "high"  # the enterprise tier's default lane
    spec = stack.settings.model(MODEL)
    held = spec.prices.cost(charge(ImagesBody(PROMPT, 64, 64, n=3)).max_units, stack.settings.lane_multipliers[lane])
    [(hold, cost)] = await eventually(lambda: clickhouse.query(
        "SELECT hold_micros, cost_micros FROM usage_events WHERE request_id = {r:String}",
        {"r": reply.headers["x-request-id"]}))
    assert hold == cost == held == 3 * PRICE_64 * 1.5

    async def settled():
        return await credits.available(nc.jetstream(), tenant) == 100_000 - cost

    await eventually(settled)


LONG_PROMPT = "fox " * 1001


@pytest.mark.parametrize("params, param", [
    ({"size": "128x128"}, "size"),  # not in the price table
    ({"size": "big"}, "size"),
    ({"n": 0}, "n"),
    ({"n": 11}, "n"),
    ({"prompt": LONG_PROMPT}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"response_format": "gif"}, "response_format"),
    ({"quality": "ultra"}, "quality"),
    ({"output_format": "jpeg"}, "output_format"),
    ({"stream": True}, "stream"),
    ({"style": "vivid"}, "style"),
    ({"model": CHAT_MODEL}, "model"),
])
async def test_bad_generations_are_400s_naming_the_field(tiny_sd, stack, meter, nc, params, param):
    fields = {"model": MODEL, "prompt": PROMPT, **params}
    status, body, headers = await _refused(stack, nc, "generations", json=fields)
    assert status == 400 and body["error"]["param"] == param, body


def _form(fields: dict, files: dict[str, bytes]) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)  # multipart even with no file in it
    for name, value in fields.items():
        form.add_field(name, str(value))
    for name, data in files.items():
        form.add_field(name, data, filename=f"{name}.png", content_type="image/png")
    return form


@pytest.mark.parametrize("fields, files, param", [
    ({}, {"image": b"not an image at all"}, "image"),
    ({}, {"image": b""}, "image"),
    ({}, {"image": _picture((64, 64), noise=True)[:5000]}, "image"),  # a PNG cut short
    ({}, {"image": b"GIF89a" + bytes(64)}, "image"),
    ({}, {}, "image"),
    ({}, {"image": _picture((64, 64)), "mask": _mask((32, 32))}, "mask"),
    ({}, {"image": _picture((64, 64)), "mask": b"not a mask"}, "mask"),
    ({"size": "48x48"}, {"image": _picture((64, 64))}, "size"),
    ({"n": "eleven"}, {"image": _picture((64, 64))}, "n"),
    ({"model": CHAT_MODEL}, {"image": _picture((64, 64))}, "model"),
])
async def test_bad_edits_are_400s_naming_the_field(tiny_sd, stack, meter, nc, fields, files, param):
    status, body, headers = await _refused(stack, nc, "edits",
                                           data=_form({"model": MODEL, "prompt": PROMPT, **fields}, files))
    assert status == 400 and body["error"]["param"] == param, body


async def _refused(stack, nc, endpoint: str, **request) -> tuple[int, dict, dict]:
    """POST a request the edge must refuse; check it published nothing, so nothing is billed or stored."""
    js = nc.jetstream()
    streams = [blobs.blob_stream(REQUEST_BLOBS_BUCKET), blobs.blob_stream(RESULT_BLOBS_BUCKET)]
    before = [(await js.stream_info(s)).state.messages for s in streams]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.base_url}/v1/images/{endpoint}", **request,
                             headers={"Authorization": f"Bearer {stack.api_key}"}) as resp:
            status, body, headers = resp.status, await resp.json(), resp.headers
    assert "x-request-id" not in headers, "refused before admission: no request was published"
    assert [(await js.stream_info(s)).state.messages for s in streams] == before
    return status, body, headers


async def test_a_model_of_another_kind_refuses_images_through_the_sdk(tiny_sd, client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.images.generate(model=CHAT_MODEL, prompt=PROMPT)
    assert err.value.body["param"] == "model"


async def test_a_cancelled_drawing_stops_and_frees_the_pipeline():
    """The backend itself: a cancelled request gives nothing back, and the next one draws."""
    backend = await asyncio.to_thread(DiffusersImages, str(build_tiny_diffusion(PIPELINE)), sizes=["64x64"])
    cancel = asyncio.Event()
    cancel.set()
    assert await backend.draw(ImagesBody(PROMPT, 64, 64, steps=50), cancel) is None
    [drawn] = await backend.draw(ImagesBody(PROMPT, 64, 64, steps=2), asyncio.Event())
    assert _png(drawn).size == (64, 64)


def test_masks_repaint_where_openai_s_are_transparent_or_diffusers_are_white():
    openai_style = open_mask(_mask((64, 64)), (32, 32))  # transparent square in the middle, resized
    assert openai_style.mode == "L"
    assert openai_style.getpixel((16, 16)) == 255 and openai_style.getpixel((2, 2)) == 0
    plain = Image.new("L", (64, 64), 0)
    plain.paste(255, (0, 0, 32, 64))  # no alpha: white is what is repainted, as diffusers takes it
    out = io.BytesIO()
    plain.save(out, format="PNG")
    diffusers_style = open_mask(out.getvalue(), (64, 64))
    assert diffusers_style.getpixel((10, 10)) == 255 and diffusers_style.getpixel((50, 10)) == 0



def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(_png(data), dtype=np.int16)


def _same_pictures(got: list[bytes], alone: list[bytes]) -> bool:
    """The same images: pixel for pixel, give or take one level where a batched kernel rounded the last
    bit of a float the other way (PNGs mostly come out byte-equal)."""
    return len(got) == len(alone) and all(np.abs(_pixels(g) - _pixels(a)).max() <= 1 for g, a in zip(got, alone))


async def _seeded(client, prompt: str, seed: int, n: int, size: str) -> tuple[str, list[bytes]]:
    reply = await client.images.with_raw_response.generate(model=MODEL, prompt=prompt, n=n, size=size,
                                                           response_format="b64_json", extra_body={"seed": seed})
    return reply.headers["x-request-id"], [base64.b64decode(d.b64_json) for d in reply.parse().data]


async def test_concurrent_requests_share_pipeline_calls_and_get_what_they_get_alone(tiny_sd, sd_metrics, client,
                                                                                     clickhouse):
    asks = [("a red fox", 11, 1, "64x64"), ("a blue whale", 12, 2, "64x64"), ("a red fox", 13, 3, "64x64"),
            ("a green hill", 14, 1, "32x48")]  # the last one's size runs in a call of its own
    alone = [(await _seeded(client, *ask))[1] for ask in asks]
    assert not _same_pictures(alone[0], alone[2][:1]), "another seed draws other images"
    before = await scrape(sd_metrics)
    together = await asyncio.gather(*(_seeded(client, *ask) for ask in asks))
    after = await scrape(sd_metrics)
    for (prompt, seed, n, size), pictures, (_, got) in zip(asks, alone, together):
        assert _same_pictures(got, pictures), f"seed {seed}'s images changed when drawn with others"
        assert {_png(g).size for g in got} == {tuple(int(side) for side in size.split("x"))}
    calls, requests = (sample(after, f"tollgate_worker_batch_requests_{s}", kind="images")
                       - sample(before, f"tollgate_worker_batch_requests_{s}", kind="images") for s in ("count", "sum"))
    assert requests == len(asks) and calls < len(asks), f"{requests} requests ran in {calls} pipeline calls"
    rows = await usage_rows(clickhouse, [request_id for request_id, _ in together], expect=len(asks))
    billed = {row["request_id"]: (row["output_units"], row["cost_micros"]) for row in rows}
    assert [billed[request_id] for request_id, _ in together] == [
        (n, n * (PRICE_64 if size == "64x64" else PRICE_32x48)) for _, _, n, size in asks]


async def test_a_request_cancelled_mid_call_drops_its_images_and_the_others_keep_theirs():
    """The backend itself: two edits in one pipeline call; the first is cancelled while it runs."""
    backend = await asyncio.to_thread(DiffusersImages, str(build_tiny_diffusion(PIPELINE)), sizes=["64x64"],
                                      max_batch=8, batch_wait_ms=200)
    kept = ImagesBody(PROMPT, 64, 64, n=2, steps=60, image=_picture((64, 64)), seed=7)
    alone = await backend.draw(kept, asyncio.Event())
    cancel = asyncio.Event()
    leaving = asyncio.ensure_future(backend.draw(msgspec.structs.replace(kept, seed=8), cancel))
    staying = asyncio.ensure_future(backend.draw(kept, asyncio.Event()))

    async def running():
        return backend._batcher.calls == 2

    await eventually(running)  # the second call, with both in it, has started
    cancel.set()
    assert await leaving is None
    assert _same_pictures(await staying, alone)
    assert backend._batcher.calls == 2, "both ran in one call"


async def test_a_call_whose_every_request_left_stops_at_the_next_step():
    """The backend itself: 1000 steps at 256 px would take minutes here; cancelled once its call runs, the
    next drawing is done within seconds."""
    backend = await asyncio.to_thread(DiffusersImages, str(build_tiny_diffusion(PIPELINE)),
                                      sizes=["256x256", "64x64"], max_batch=8, batch_wait_ms=0)
    cancel = asyncio.Event()
    leaving = asyncio.ensure_future(backend.draw(ImagesBody(PROMPT, 256, 256, steps=1000), cancel))

    async def running():
        return backend._batcher.calls == 1

    await eventually(running)
    cancel.set()
    assert await leaving is None
    [drawn] = await asyncio.wait_for(backend.draw(ImagesBody(PROMPT, 64, 64, steps=2), asyncio.Event()), 20)
    assert _png(drawn).size == (64, 64)
