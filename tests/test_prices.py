"""A model's price table: every unit, the lane multiplier, and prices an operator gets wrong."""

from __future__ import annotations

import pytest

from bus.errors import InvalidRequest
from bus.account.prices import Prices, Units
from bus.settings import SettingsError, load_settings

PRICES = Prices(
    input_token=3,
    cached_input_token=1,
    output_token=7,
    image={"256x256": 1_000, "512x512": 4_000},
    audio_second=50,
    character=2,
    input_image=500,
)


def test_each_unit_is_charged_at_its_own_price():
    assert PRICES.cost(Units(input_tokens=10), 1.0) == 30
    assert PRICES.cost(Units(input_tokens=10, cached_input_tokens=4), 1.0) == 6 * 3 + 4 * 1
    assert PRICES.cost(Units(output_tokens=5), 1.0) == 35
    assert PRICES.cost(Units(images={"256x256": 2, "512x512": 1}), 1.0) == 6_000
    assert PRICES.cost(Units(audio_seconds=2.1), 1.0) == 150, "a started second is a second"
    assert PRICES.cost(Units(characters=100), 1.0) == 200
    assert PRICES.cost(Units(input_images=3), 1.0) == 1_500


def test_the_lane_multiplies_the_whole_and_rounds_up_once():
    units = Units(input_tokens=1, output_tokens=1)  # 10 micro-credits
    assert PRICES.cost(units, 0.5) == 5
    assert PRICES.cost(units, 1.5) == 15
    assert PRICES.cost(Units(input_tokens=1), 0.5) == 2, "1.5 rounds up, never down to free"


def test_cached_tokens_cost_as_prompt_tokens_unless_priced():
    assert Prices(input_token=3).cost(Units(input_tokens=10, cached_input_tokens=10), 1.0) == 30


def test_an_image_size_without_a_price_is_refused_not_free():
    with pytest.raises(InvalidRequest) as err:
        PRICES.cost(Units(images={"1024x1024": 1}), 1.0)
    assert err.value.status == 400 and err.value.param == "size"
    assert "256x256, 512x512" in err.value.message


@pytest.mark.parametrize("prices, complaint", [
    ("input_token = -1", "Expected `int` >= 0"),
    ('image = { "big" = 10 }', "prices.image"),
    ("per_token = 1", "per_token"),
])
def test_a_bad_price_table_stops_the_gateway_at_start(tmp_path, prices, complaint):
    config = tmp_path / "tollgate.toml"
    config.write_text(f'[models."m".prices]\n{prices}\n')
    with pytest.raises(SettingsError) as err:
        load_settings(config, env={})
    assert complaint in str(err.value)
