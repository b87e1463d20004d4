"""The columns of the generated card transactions: names, ranges and categories.

Plain data, importing nothing, so that both the settings (whose default dataset schema this
is) and the generator (``mlops.datagen``) can use it without importing each other.
"""

from __future__ import annotations

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

NUMERIC_RANGES: tuple[tuple[str, float, float], ...] = (
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
CATEGORICAL: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("merchant_category", MERCHANT_CATEGORIES),
    ("channel", CHANNELS),
    ("card_type", CARD_TYPES),
    ("entry_mode", ENTRY_MODES),
    ("geo", GEO),
)


FRAUD_SCHEMA: dict[str, object] = {
    "name": "card-transactions",
    "model_name": "fraud-detector",
    "id_column": "transaction_id",
    "entity_column": "user_id",
    "timestamp_column": "event_time",
    "label_column": "is_fraud",
    "label_values": (0, 1),
    "numeric": tuple({"name": n, "min": lo, "max": hi} for n, lo, hi in NUMERIC_RANGES),
    "categorical": tuple({"name": n, "categories": c} for n, c in CATEGORICAL),
    "min_rows": 100,
}
"""The default dataset schema, as the data a ``DatasetSchema`` is validated from."""
