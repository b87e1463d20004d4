"""Synthetic card-transaction data with a learnable, imbalanced fraud signal.

The default use case of the platform. Rows are generated in fixed-size blocks, each from
its own seed sequence, so a dataset is identical for the same ``(rows, seed, drift)`` no
matter how it is consumed, and memory stays bounded by one block.

``drift`` in [0, 1] moves the feature distributions (bigger amounts, riskier IPs, more
card-not-present traffic) and the label relationship (a pattern that was harmless becomes
fraudulent), which is what a challenger trained on old data gets wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from mlops.settings import CategoricalFeature, DatasetSchema, NumericFeature

BLOCK_ROWS = 250_000

MERCHANT_CATEGORIES = (
    "grocery",
    "restaurant",
    "fuel",
    "electronics",
    "travel",
    "online_retail",
    "gaming",
    "jewelry",
    "cash_advance",
    "utilities",
)
CHANNELS = ("pos", "ecommerce", "atm", "mobile_app")
CARD_TYPES = ("debit", "credit", "prepaid")
ENTRY_MODES = ("chip", "contactless", "swipe", "manual", "card_not_present")
GEO = ("home_region", "domestic", "foreign")

_NUMERIC_RANGES: tuple[tuple[str, float, float], ...] = (
    ("amount", 0.0, 100_000.0),
    ("hour_of_day", 0.0, 23.0),
    ("day_of_week", 0.0, 6.0),
    ("account_age_days", 0.0, 40_000.0),
    ("card_age_days", 0.0, 20_000.0),
    ("customer_age", 18.0, 110.0),
    ("credit_limit", 0.0, 1_000_000.0),
    ("utilization", 0.0, 2.0),
    ("distance_from_home_km", 0.0, 20_100.0),
    ("distance_from_last_txn_km", 0.0, 20_100.0),
    ("seconds_since_last_txn", 0.0, 1e9),
    ("txn_count_1h", 0.0, 10_000.0),
    ("txn_count_24h", 0.0, 50_000.0),
    ("amount_avg_30d", 0.0, 100_000.0),
    ("amount_to_avg_ratio", 0.0, 100_000.0),
    ("merchant_risk_score", 0.0, 1.0),
    ("ip_risk_score", 0.0, 1.0),
    ("device_age_days", 0.0, 20_000.0),
    ("failed_logins_24h", 0.0, 1_000.0),
    ("cards_on_device", 1.0, 1_000.0),
    ("chargebacks_12m", 0.0, 1_000.0),
    ("email_age_days", 0.0, 40_000.0),
)
_CATEGORICAL: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("merchant_category", MERCHANT_CATEGORIES),
    ("channel", CHANNELS),
    ("card_type", CARD_TYPES),
    ("entry_mode", ENTRY_MODES),
    ("geo", GEO),
)


def fraud_schema() -> DatasetSchema:
    """The dataset schema of the generated card transactions."""
    return DatasetSchema(
        name="card-transactions",
        model_name="fraud-detector",
        id_column="transaction_id",
        entity_column="user_id",
        timestamp_column="event_time",
        label_column="is_fraud",
        label_values=(0, 1),
        numeric=tuple(NumericFeature(name=n, min=lo, max=hi) for n, lo, hi in _NUMERIC_RANGES),
        categorical=tuple(CategoricalFeature(name=n, categories=c) for n, c in _CATEGORICAL),
        min_rows=100,
    )


def _categorical(rng: np.random.Generator, values: tuple[str, ...], probs: list[float], n: int) -> np.ndarray:
    p = np.asarray(probs, dtype=float)
    p = p / p.sum()
    return np.asarray(values, dtype=object)[rng.choice(len(values), size=n, p=p)]


def _block(rows: int, seed: int, block: int, drift: float, start: datetime, n_users: int) -> pd.DataFrame:
    rng = np.random.default_rng(np.random.SeedSequence([seed, block]))
    d = float(drift)
    first = block * BLOCK_ROWS
    ids = np.arange(first, first + rows)

    users = (rng.zipf(1.3, rows) + rng.integers(0, n_users, rows)) % n_users
    span = timedelta(days=1).total_seconds()
    offsets = np.sort(rng.uniform(0, span, rows))
    event_time = pd.Timestamp(start) + pd.to_timedelta(offsets, unit="s")
    hour = event_time.hour.to_numpy().astype(float)
    dow = event_time.day_of_week.to_numpy().astype(float)

    merchant = _categorical(rng, MERCHANT_CATEGORIES, [22, 18, 10, 8, 5, 15, 4 + 6 * d, 2, 2, 14], rows)
    channel = _categorical(rng, CHANNELS, [50 - 15 * d, 30 + 15 * d, 8, 12], rows)
    card_type = _categorical(rng, CARD_TYPES, [55, 38, 7 + 5 * d], rows)
    entry = np.where(
        np.isin(channel, ("ecommerce", "mobile_app")),
        "card_not_present",
        _categorical(rng, ENTRY_MODES[:4], [45, 35, 15, 5], rows),
    ).astype(object)
    geo = _categorical(rng, GEO, [80 - 10 * d, 15, 5 + 10 * d], rows)

    scale = 1.0 + 0.6 * d
    amount_avg = rng.lognormal(3.6, 0.7, rows)
    amount = np.clip(amount_avg * rng.lognormal(0.0, 0.8, rows) * scale, 0.5, 99_999.0)
    account_age = rng.gamma(2.0, 900.0, rows)
    card_age = np.minimum(account_age, rng.gamma(1.5, 500.0, rows))
    customer_age = np.clip(rng.normal(44, 15, rows), 18, 100)
    credit_limit = np.round(rng.lognormal(8.5, 0.6, rows), -2)
    utilization = np.clip(rng.beta(2, 5, rows) * 1.3, 0, 1.99)
    dist_home = np.where(
        geo == "foreign",
        rng.gamma(2, 1500, rows),
        np.where(geo == "domestic", rng.gamma(2, 200, rows), rng.gamma(1.2, 8, rows)),
    )
    dist_last = np.clip(dist_home * rng.beta(2, 2, rows) + rng.gamma(1, 5, rows), 0, 20_000)
    since_last = rng.exponential(30_000, rows)
    cnt_1h = rng.poisson(0.4 + 0.8 * d, rows).astype(float)
    cnt_24h = cnt_1h + rng.poisson(3.0, rows)
    ratio = amount / amount_avg
    merchant_risk = np.clip(
        rng.beta(2, 8, rows) + 0.25 * np.isin(merchant, ("gaming", "jewelry", "cash_advance")), 0, 1
    )
    ip_risk = np.clip(
        rng.beta(1.5, 9 - 4 * d, rows) * np.isin(channel, ("ecommerce", "mobile_app"))
        + rng.beta(1, 30, rows),
        0,
        1,
    )
    device_age = rng.gamma(1.3, 300.0, rows)
    failed_logins = rng.poisson(0.15, rows).astype(float)
    cards_on_device = 1.0 + rng.poisson(0.2, rows)
    chargebacks = rng.poisson(0.05, rows).astype(float)
    email_age = account_age + rng.gamma(2.0, 400.0, rows)

    night = ((hour <= 4) | (hour >= 23)).astype(float)
    cnp = (entry == "card_not_present").astype(float)
    foreign = (geo == "foreign").astype(float)
    new_device = (device_age < 7).astype(float)
    logit = (
        -6.6
        + 2.0 * (ratio > 4)
        + 1.5 * (ratio > 12)
        + 3.5 * merchant_risk
        + 4.5 * (ip_risk > 0.3) * cnp  # interaction: risky IP only matters online
        + 2.0 * (utilization > 0.9) * (card_age < 60)  # maxing out a brand-new card
        + 2.5 * foreign * (ratio > 3)  # big unusual spend abroad
        + 2.0 * night * new_device
        + 0.8 * np.minimum(cnt_1h, 6)
        + 0.9 * np.minimum(failed_logins, 4)
        + 1.2 * (cards_on_device > 2)
        + 1.0 * (card_type == "prepaid")
        + 0.9 * np.minimum(chargebacks, 3)
        - 0.5 * np.log1p(account_age / 365.0)
        - 0.3 * np.log1p(email_age / 365.0)
        + d * (2.5 * (merchant == "gaming") + 1.5 * (channel == "mobile_app") - 2.5 * merchant_risk)
    )
    label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    frame = {
        "transaction_id": np.char.add(f"tx-{seed}-", ids.astype(str)).astype(object),
        "user_id": np.char.add("u", users.astype(str)).astype(object),
        "event_time": event_time,
        "amount": np.round(amount, 2),
        "hour_of_day": hour,
        "day_of_week": dow,
        "account_age_days": np.round(account_age, 1),
        "card_age_days": np.round(card_age, 1),
        "customer_age": np.round(customer_age),
        "credit_limit": credit_limit,
        "utilization": np.round(utilization, 4),
        "distance_from_home_km": np.round(np.minimum(dist_home, 20_000), 2),
        "distance_from_last_txn_km": np.round(dist_last, 2),
        "seconds_since_last_txn": np.round(since_last, 1),
        "txn_count_1h": cnt_1h,
        "txn_count_24h": cnt_24h.astype(float),
        "amount_avg_30d": np.round(amount_avg, 2),
        "amount_to_avg_ratio": np.round(ratio, 4),
        "merchant_risk_score": np.round(merchant_risk, 4),
        "ip_risk_score": np.round(ip_risk, 4),
        "device_age_days": np.round(device_age, 1),
        "failed_logins_24h": failed_logins,
        "cards_on_device": cards_on_device.astype(float),
        "chargebacks_12m": chargebacks,
        "email_age_days": np.round(email_age, 1),
        "merchant_category": merchant,
        "channel": channel,
        "card_type": card_type,
        "entry_mode": entry,
        "geo": geo,
        "is_fraud": label,
    }
    return pd.DataFrame(frame)


def generate_blocks(
    rows: int,
    seed: int = 0,
    drift: float = 0.0,
    start: datetime | None = None,
) -> Iterator[pd.DataFrame]:
    """Yield the dataset in blocks of at most ``BLOCK_ROWS`` rows, deterministically."""
    if rows < 1:
        raise ValueError("rows must be at least 1")
    if not 0.0 <= drift <= 1.0:
        raise ValueError("drift must be between 0 and 1")
    start = start or datetime(2026, 1, 1)
    n_users = max(1_000, rows // 20)
    for block, first in enumerate(range(0, rows, BLOCK_ROWS)):
        yield _block(min(BLOCK_ROWS, rows - first), seed, block, drift, start, n_users)


def generate(rows: int, seed: int = 0, drift: float = 0.0, start: datetime | None = None) -> pd.DataFrame:
    """The whole dataset in memory (use ``generate_blocks`` for large row counts)."""
    return pd.concat(list(generate_blocks(rows, seed, drift, start)), ignore_index=True)
