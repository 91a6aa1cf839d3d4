"""The edge application's typed state: one ``AppKey`` per shared object, set once at start-up.

Routes read them with ``request.config_dict[KEY]``, which also finds them from the
``/admin`` sub-application.
"""

from __future__ import annotations

from aiohttp import web

from bus.account.budgets import BudgetStore
from bus.account.tenant_store import TenancyStore
from bus.publisher import Publisher
from bus.settings import Settings
from edge.admission import Gate
from edge.auth import Authenticator
from edge.image_inputs import ImageInputs
from edge.quota import QuotaGate
from edge.response_cache import ResponseCache

SETTINGS = web.AppKey("settings", Settings)
PUBLISHER = web.AppKey("publisher", Publisher)
AUTH = web.AppKey("auth", Authenticator)
GATE = web.AppKey("gate", Gate)
QUOTA = web.AppKey("quota", QuotaGate)
TENANCY = web.AppKey("tenancy", TenancyStore)
BUDGETS = web.AppKey("budgets", BudgetStore)
IMAGE_INPUTS = web.AppKey("image_inputs", ImageInputs)
RESPONSE_CACHE = web.AppKey("response_cache", ResponseCache)
