"""What a call cost: the price table (shim/costs.py) and the SQL that applies it (migration 0006)."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import asyncpg
import pydantic
import pytest
from vapi.types import CallCostsItem

from shim.costs import DEFAULT_MODEL_PRICES, PriceTableError, load_prices, sync_prices

T0 = dt.datetime(2026, 11, 30, 12, 0, 0, tzinfo=dt.UTC)
COSTS_ADAPTER = pydantic.TypeAdapter(list[CallCostsItem])


def usage(text_in, audio_in, text_out, audio_out, cached_text=0, cached_audio=0):
    """A response.done usage object, as the Realtime API sends it."""
    return {
        "total_tokens": text_in + audio_in + text_out + audio_out,
        "input_tokens": text_in + audio_in,
        "output_tokens": text_out + audio_out,
        "input_token_details": {
            "text_tokens": text_in, "audio_tokens": audio_in, "image_tokens": 0,
            "cached_tokens": cached_text + cached_audio,
            "cached_tokens_details": {"text_tokens": cached_text, "audio_tokens": cached_audio, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }


async def add_usage(conn, call_sid, response_id, u):
    await conn.execute("INSERT INTO model_usage (call_sid, response_id, at, usage) VALUES ($1, $2, $3, $4::jsonb)",
                       call_sid, response_id, T0, json.dumps(u))


async def call_row(conn, call_sid):
    row = await conn.fetchrow("SELECT cost_usd, costs FROM calls WHERE call_sid = $1", call_sid)
    return row["cost_usd"], json.loads(row["costs"]) if row["costs"] is not None else None


@pytest.fixture
async def conn(db_dsn):
    c = await asyncpg.connect(db_dsn)
    yield c
    await c.close()


async def test_cost_matches_hand_computed_figures_whatever_the_row_order(conn):
    # Response 1 arrives before the call row exists; response 2 after; the end last.
    await add_usage(conn, "CA1", "resp_1", usage(200, 800, 50, 250))
    await conn.execute("INSERT INTO calls (call_sid, model, started_at) VALUES ('CA1', 'gpt-realtime-2.1', $1)", T0)
    await add_usage(conn, "CA1", "resp_2", usage(300, 1700, 100, 400, cached_text=256, cached_audio=768))
    # Not ended yet: tokens only, no transport entry.
    # uncached text in 200+44=244 x $4; cached text 256 x $0.40; uncached audio 800+932=1732 x $32;
    # cached audio 768 x $0.40; text out 150 x $24; audio out 650 x $64   (per 1M tokens)
    model_cost = Decimal("976") + Decimal("102.4") + Decimal("55424") + Decimal("307.2") + Decimal("3600") + Decimal("41600")
    assert model_cost / 1_000_000 == Decimal("0.1020096")
    cost, costs = await call_row(conn, "CA1")
    assert cost == Decimal("0.1020096")
    # 61 s is billed as 2 Twilio minutes at $0.0085.
    await conn.execute("UPDATE calls SET ended_at = $1 WHERE call_sid = 'CA1'", T0 + dt.timedelta(seconds=61))
    cost, costs = await call_row(conn, "CA1")
    assert cost == Decimal("0.1190096")
    COSTS_ADAPTER.validate_python(costs)  # Vapi's costs[] shape
    assert costs == [
        {"type": "transport", "provider": "twilio", "minutes": 2, "cost": 0.017},
        {"type": "model", "model": {"provider": "openai", "model": "gpt-realtime-2.1"},
         "promptTokens": 3000, "completionTokens": 800, "cachedPromptTokens": 1024, "cost": 0.1020096},
    ]
    rollup = await conn.fetchrow("SELECT duration_s, cost_usd, cost_per_minute_usd FROM call_rollup WHERE call_sid = 'CA1'")
    assert rollup["duration_s"] == Decimal("61.000")
    assert rollup["cost_per_minute_usd"] == (Decimal("0.1190096") / (Decimal(61) / 60)).quantize(Decimal("0.000001"))


async def test_snapshot_names_use_the_longest_matching_price_and_unknown_models_cost_null(conn):
    await conn.execute("INSERT INTO calls (call_sid, model, started_at, ended_at) VALUES "
                       "('CAmini', 'gpt-realtime-2.1-mini-2026-10-01', $1, $2), ('CAx', 'someone-elses-model', $1, $2)",
                       T0, T0 + dt.timedelta(seconds=30))
    await add_usage(conn, "CAmini", "resp_1", usage(0, 1_000_000, 0, 0))
    await add_usage(conn, "CAx", "resp_1", usage(0, 1_000_000, 0, 0))
    cost, _ = await call_row(conn, "CAmini")
    assert cost == Decimal("10") + Decimal("0.0085")  # mini's $10 / 1M audio in, not gpt-realtime-2.1's $32
    cost, costs = await call_row(conn, "CAx")
    assert cost is None  # unknown, not guessed
    assert [c["type"] for c in costs] == ["transport", "model"]


async def test_only_exact_names_and_dated_snapshots_are_priced(conn):
    models = {"CAga": "gpt-realtime-2025-08-28", "CA2": "gpt-realtime-2", "CA25": "gpt-realtime-2.5",
              "CA21x": "gpt-realtime-2.1-experimental"}
    for sid, model in models.items():
        await conn.execute("INSERT INTO calls (call_sid, model, started_at) VALUES ($1, $2, $3)", sid, model, T0)
        await add_usage(conn, sid, "resp_1", usage(0, 0, 1_000_000, 0))
    assert (await call_row(conn, "CAga"))[0] == Decimal("16")  # gpt-realtime's snapshot, not gpt-realtime-2's $24
    assert (await call_row(conn, "CA2"))[0] == Decimal("24")  # the reasoning model's text output price
    assert (await call_row(conn, "CA25"))[0] is None  # not guessed from the gpt-realtime prefix
    assert (await call_row(conn, "CA21x"))[0] is None


async def test_vapi_calls_keep_vapi_figures(conn):
    costs = [{"type": "vapi", "subType": "normal", "minutes": 1.5, "cost": 0.075}]
    await conn.execute("INSERT INTO calls (call_sid, stack, model, cost_usd, costs, started_at, ended_at) VALUES "
                       "('vapi-1', 'vapi', 'gpt-realtime', 0.21, $1::jsonb, $2, $3)",
                       json.dumps(costs), T0, T0 + dt.timedelta(seconds=90))
    await add_usage(conn, "vapi-1", "resp_1", usage(10, 10, 10, 10))
    cost, stored = await call_row(conn, "vapi-1")
    assert cost == Decimal("0.21") and stored == costs


async def test_override_file_changes_future_costs(conn, tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text("source: contract 2026-11\nmodels:\n  gpt-realtime-2.1: {input_audio: 16}\nminutes:\n  twilio: 0.01\n")
    prices = load_prices(path)
    assert prices.models["gpt-realtime-2.1"].input_audio == 16
    assert prices.models["gpt-realtime-2.1"].output_audio == DEFAULT_MODEL_PRICES["gpt-realtime-2.1"].output_audio
    assert prices.models["gpt-realtime-2.1"].source == "contract 2026-11"
    await sync_prices(conn, prices)
    await conn.execute("INSERT INTO calls (call_sid, model, started_at, ended_at) VALUES ('CA2', 'gpt-realtime-2.1', $1, $2)",
                       T0, T0 + dt.timedelta(seconds=60))
    await add_usage(conn, "CA2", "resp_1", usage(0, 1_000_000, 0, 0))
    cost, _ = await call_row(conn, "CA2")
    assert cost == Decimal("16.01")


def test_override_file_errors_name_every_problem(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"gpt-realtime": {"input_audio": -1, "speech": 3}, "new-model": {"input_text": 1}},
                                "minutes": {"twilio": "cheap"}, "currency": "EUR"}))
    with pytest.raises(PriceTableError) as err:
        load_prices(path)
    message = str(err.value)
    for part in ("currency", "models.gpt-realtime.input_audio: got -1", "models.gpt-realtime.speech: unknown price",
                 "models.new-model: a model without a default needs every price; missing cached_input_text",
                 "minutes.twilio: got 'cheap'"):
        assert part in message, part
    path.write_text("{not json")
    with pytest.raises(PriceTableError, match="not JSON"):
        load_prices(path)


def test_every_default_has_a_public_source():
    prices = load_prices(None)
    for entry in [*prices.models.values(), *prices.minutes.values()]:
        assert "https://" in entry.source, entry
