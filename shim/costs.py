"""The price table: what a shim call costs, per model token and per Twilio minute.

Costs are computed in SQL (migration 0006: `shim_call_cost`, kept current on `calls.cost_usd` /
`calls.costs` by triggers) from the tables `model_prices` and `minute_prices`. This module owns
the figures: documented defaults with their public sources, merged with an override file
(`SHIM_PRICES_FILE`, JSON or YAML), validated (every problem in one message) and written to
those tables when the schema is migrated (`sync_prices`, called by `shim.store.migrate`).

Override file (every key optional; a model entry may give only some prices, the rest come from
the default entry of the same name, a new model must give all eight):

    models:
      gpt-realtime-2.1: {input_audio: 28, output_audio: 56}
      my-finetune:      {input_text: 4, cached_input_text: 0.4, input_audio: 32, cached_input_audio: 0.4,
                         input_image: 5, cached_input_image: 0.5, output_text: 16, output_audio: 64}
    minutes:
      twilio: 0.0085
    source: "our contract of 2026-11"      # recorded beside each overridden row

`python -m shim.costs` prints the effective table as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MINUTE_PRICES", "DEFAULT_MODEL_PRICES", "MinutePrice", "ModelPrice", "PriceTableError",
           "Prices", "load_prices", "sync_prices"]

PRICES_FILE_ENV = "SHIM_PRICES_FILE"

TOKEN_FIELDS = ("input_text", "cached_input_text", "input_audio", "cached_input_audio", "input_image",
                "cached_input_image", "output_text", "output_audio")


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens. Cached input is billed at the cached price instead of the input price."""
    model: str
    input_text: float
    cached_input_text: float
    input_audio: float
    cached_input_audio: float
    input_image: float
    cached_input_image: float
    output_text: float
    output_audio: float
    source: str


@dataclass(frozen=True)
class MinutePrice:
    """USD per started minute (Twilio rounds each call up to whole minutes)."""
    item: str
    usd_per_minute: float
    source: str


_OPENAI = "https://platform.openai.com/docs/pricing"
_MODELS = "https://developers.openai.com/api/docs/models/"
DEFAULT_MODEL_PRICES: dict[str, ModelPrice] = {
    p.model: p
    for p in (
        # The reasoning models (2, 2.1) bill text output at $24, the others at $16.
        ModelPrice("gpt-realtime-2.1", 4.0, 0.40, 32.0, 0.40, 5.0, 0.50, 24.0, 64.0, _MODELS + "gpt-realtime-2.1"),
        ModelPrice("gpt-realtime-2.1-mini", 0.60, 0.06, 10.0, 0.30, 0.80, 0.08, 2.40, 20.0, _MODELS + "gpt-realtime-2.1-mini"),
        ModelPrice("gpt-realtime-2", 4.0, 0.40, 32.0, 0.40, 5.0, 0.50, 24.0, 64.0, _MODELS + "gpt-realtime-2"),
        ModelPrice("gpt-realtime-1.5", 4.0, 0.40, 32.0, 0.40, 5.0, 0.50, 16.0, 64.0, _MODELS + "gpt-realtime-1.5"),
        ModelPrice("gpt-realtime", 4.0, 0.40, 32.0, 0.40, 5.0, 0.50, 16.0, 64.0, _MODELS + "gpt-realtime ; " + _OPENAI),
        ModelPrice("gpt-realtime-mini", 0.60, 0.06, 10.0, 0.30, 0.80, 0.08, 2.40, 20.0,
                   _MODELS + "gpt-realtime-mini ; " + _OPENAI),
        ModelPrice("gpt-4o-realtime-preview", 5.0, 2.50, 40.0, 2.50, 0.0, 0.0, 20.0, 80.0,
                   _MODELS + "gpt-4o-realtime-preview ; " + _OPENAI),
        ModelPrice("gpt-4o-mini-realtime-preview", 0.60, 0.30, 10.0, 0.30, 0.0, 0.0, 2.40, 20.0,
                   _MODELS + "gpt-4o-mini-realtime-preview ; " + _OPENAI),
    )
}

DEFAULT_MINUTE_PRICES: dict[str, MinutePrice] = {
    "twilio": MinutePrice(
        "twilio", 0.0085,
        "https://www.twilio.com/en-us/voice/pricing/us (inbound local call, per minute, rounded up; "
        "Media Streams and recording surcharges not included)"),
}


@dataclass(frozen=True)
class Prices:
    models: dict[str, ModelPrice]
    minutes: dict[str, MinutePrice]

    def to_json(self) -> dict[str, Any]:
        return {"models": {k: asdict(v) for k, v in self.models.items()},
                "minutes": {k: asdict(v) for k, v in self.minutes.items()}}


class PriceTableError(ValueError):
    """The override file is unreadable or invalid; the message lists every problem."""


def _read(path: Path) -> Any:
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PriceTableError(f"{PRICES_FILE_ENV}={path}: cannot read it ({exc.strerror})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise PriceTableError(f"{PRICES_FILE_ENV}={path}: not YAML ({exc})") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PriceTableError(f"{PRICES_FILE_ENV}={path}: not JSON ({exc}); name it .yaml for YAML") from None


def _price(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e6


def load_prices(path: str | os.PathLike[str] | None = None) -> Prices:
    """Defaults merged with the override file (`path`, else $SHIM_PRICES_FILE, else none)."""
    path = path if path is not None else (os.environ.get(PRICES_FILE_ENV) or None)
    models = dict(DEFAULT_MODEL_PRICES)
    minutes = dict(DEFAULT_MINUTE_PRICES)
    if path is None:
        return Prices(models, minutes)
    path = Path(path)
    data = _read(path)
    problems: list[str] = []
    if not isinstance(data, dict):
        raise PriceTableError(f"{PRICES_FILE_ENV}={path}: expected a mapping with models/minutes/source, got {type(data).__name__}")
    unknown = set(data) - {"models", "minutes", "source"}
    if unknown:
        problems.append(f"unknown keys {sorted(unknown)}; expected models, minutes, source")
    source = data.get("source", f"override file {path}")
    if not isinstance(source, str):
        problems.append(f"source: got {source!r}, expected a string")
        source = str(path)
    for name, entry in (data.get("models") or {}).items() if isinstance(data.get("models") or {}, dict) else ():
        if not isinstance(entry, dict):
            problems.append(f"models.{name}: got {entry!r}, expected a mapping of token kind -> USD per 1M tokens")
            continue
        for key, value in entry.items():
            if key not in TOKEN_FIELDS:
                problems.append(f"models.{name}.{key}: unknown price; expected one of {', '.join(TOKEN_FIELDS)}")
            elif not _price(value):
                problems.append(f"models.{name}.{key}: got {value!r}, expected USD per 1M tokens (a number >= 0)")
        base = models.get(name)
        if base is None:
            missing = [f for f in TOKEN_FIELDS if f not in entry]
            if missing:
                problems.append(f"models.{name}: a model without a default needs every price; missing {', '.join(missing)}")
                continue
            base = ModelPrice(name, *(0.0,) * len(TOKEN_FIELDS), source="")
        valid = {k: float(v) for k, v in entry.items() if k in TOKEN_FIELDS and _price(v)}
        models[name] = replace(base, **valid, source=source)
    if not isinstance(data.get("models") or {}, dict):
        problems.append(f"models: got {data.get('models')!r}, expected a mapping of model name -> prices")
    raw_minutes = data.get("minutes") or {}
    if not isinstance(raw_minutes, dict):
        problems.append(f"minutes: got {raw_minutes!r}, expected a mapping like {{twilio: 0.0085}}")
        raw_minutes = {}
    for item, value in raw_minutes.items():
        if item not in DEFAULT_MINUTE_PRICES:
            problems.append(f"minutes.{item}: unknown; expected one of {', '.join(DEFAULT_MINUTE_PRICES)}")
        elif not _price(value):
            problems.append(f"minutes.{item}: got {value!r}, expected USD per minute (a number >= 0)")
        else:
            minutes[item] = MinutePrice(item, float(value), source)
    if problems:
        raise PriceTableError(f"{PRICES_FILE_ENV}={path}: " + "; ".join(problems))
    return Prices(models, minutes)


async def sync_prices(conn: Any, prices: Prices | None = None) -> None:
    """Make `model_prices` / `minute_prices` the effective table (asyncpg connection). Only
    future cost computations use it: costs already stored keep the prices of their time."""
    prices = prices or load_prices()
    async with conn.transaction():
        await conn.execute("DELETE FROM model_prices WHERE NOT (model = ANY($1::text[]))", list(prices.models))
        await conn.executemany(
            f"""INSERT INTO model_prices (model, {', '.join(TOKEN_FIELDS)}, source, updated_at)
                VALUES ($1, {', '.join(f'${i}' for i in range(2, 2 + len(TOKEN_FIELDS)))}, ${2 + len(TOKEN_FIELDS)}, now())
                ON CONFLICT (model) DO UPDATE SET {', '.join(f'{f} = EXCLUDED.{f}' for f in TOKEN_FIELDS)},
                    source = EXCLUDED.source, updated_at = now()""",
            [(p.model, *(_decimal(getattr(p, f)) for f in TOKEN_FIELDS), p.source) for p in prices.models.values()],
        )
        await conn.execute("DELETE FROM minute_prices WHERE NOT (item = ANY($1::text[]))", list(prices.minutes))
        await conn.executemany(
            """INSERT INTO minute_prices (item, usd_per_minute, source, updated_at) VALUES ($1, $2, $3, now())
               ON CONFLICT (item) DO UPDATE SET usd_per_minute = EXCLUDED.usd_per_minute, source = EXCLUDED.source,
                   updated_at = now()""",
            [(m.item, _decimal(m.usd_per_minute), m.source) for m in prices.minutes.values()],
        )


def _decimal(value: float):
    from decimal import Decimal

    return Decimal(repr(value))  # exact decimal of the figure as written, not of its binary float


def main() -> int:
    try:
        prices = load_prices()
    except PriceTableError as exc:
        print(f"shim: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(prices.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
