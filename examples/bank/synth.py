"""Synthetic bank card payments shaped by examples/bank/card_payment.avsc, with 0/1 fraud labels.

The label is drawn first (about 3% fraud), then every field from a legitimate or a fraudulent
profile, so the signal is known and the rate is stable. Fraud leans towards ECOM and MOTO, card
not present, larger amounts, risky merchant categories (5967 direct marketing, 7995 gambling,
4829 money transfer, also electronics and jewellery), night hours (0-5 UTC), weekends, merchants
abroad and far from the card holder's address. Nothing is a rule: every fraud trait also occurs
in legitimate traffic. About 10% of card_present and of customer_distance_km are null.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import numpy as np

FRAUD_RATE = 0.03
NULL_RATE = 0.10
START = datetime(2025, 3, 3, tzinfo=timezone.utc)  # a Monday, so day_of_week is the day index mod 7
DAYS = 28

CHANNELS = ["POS", "ECOM", "ATM", "MOTO"]
CHANNEL_P = {0: [0.70, 0.22, 0.06, 0.02], 1: [0.30, 0.50, 0.08, 0.12]}
# Chance the card is read at a POS or ATM terminal (ECOM and MOTO never read it).
CARD_READ_P = {0: 0.97, 1: 0.55}

ISSUERS = ["NL", "DE", "BE", "FR", "GB", "US"]
ISSUER_P = [0.55, 0.15, 0.10, 0.08, 0.07, 0.05]
MERCHANT_COUNTRIES = ["NL", "DE", "BE", "FR", "GB", "US", "ES", "IT", "CY", "MT"]
CURRENCY = {"GB": "GBP", "US": "USD"}  # the others use EUR
CROSS_BORDER_P = {0: 0.10, 1: 0.45}

# mcc: (median amount, legitimate weight, fraud weight); ATM payments are always 6011.
MCCS = {
    "5411": (35.0, 0.22, 0.08),   # grocery stores, supermarkets
    "5814": (12.0, 0.10, 0.01),   # fast food
    "5812": (45.0, 0.12, 0.05),   # restaurants
    "5541": (55.0, 0.09, 0.05),   # service stations
    "4111": (15.0, 0.07, 0.02),   # commuter transport
    "5311": (70.0, 0.07, 0.04),   # department stores
    "5912": (20.0, 0.06, 0.01),   # drug stores, pharmacies
    "5999": (40.0, 0.08, 0.10),   # miscellaneous retail
    "5732": (250.0, 0.05, 0.14),  # electronics
    "4722": (400.0, 0.03, 0.06),  # travel agencies
    "5944": (300.0, 0.01, 0.08),  # jewellery
    "5967": (30.0, 0.02, 0.12),   # direct marketing, inbound teleservices
    "7995": (50.0, 0.02, 0.12),   # gambling
    "4829": (150.0, 0.02, 0.12),  # money transfer
}
ATM_AMOUNTS = [20, 50, 100, 200, 300, 500]
ATM_P = {0: [0.25, 0.30, 0.25, 0.12, 0.05, 0.03], 1: [0.02, 0.08, 0.15, 0.25, 0.25, 0.25]}

# Share of each UTC hour; legitimate traffic sleeps at night, fraud much less so.
_HOUR_SHAPE = {0: [2, 1, 1, 1, 1, 2, 4, 6, 8, 9, 9, 10, 11, 10, 9, 9, 10, 11, 11, 10, 9, 7, 5, 3],
               1: [8, 9, 9, 8, 7, 6, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5, 6]}
HOUR_P = {label: np.array(shape, float) / sum(shape) for label, shape in _HOUR_SHAPE.items()}
WEEKEND_WEIGHT = {0: 1.0, 1: 1.5}

# log-normal (median km, sigma) of the distance card holder <-> merchant, by (label, cross-border).
DISTANCE = {(0, False): (6.0, 1.0), (0, True): (600.0, 0.8), (1, False): (40.0, 1.4), (1, True): (1500.0, 0.9)}
# Fraudulent amounts are this log-normal multiple of the category's usual amount.
FRAUD_AMOUNT_FACTOR = (3.0, 0.9)
AMOUNT_SIGMA = 0.8


def _pick(rng: np.random.Generator, y: np.ndarray, options: list, p: dict[int, list[float]]) -> np.ndarray:
    """Draw one of options per row, from the legitimate or the fraud distribution by label."""
    out = np.empty(len(y), dtype=object)
    for label in (0, 1):
        rows = np.flatnonzero(y == label)
        out[rows] = np.asarray(options, dtype=object)[rng.choice(len(options), size=len(rows), p=p[label])]
    return out


def _cents(amount: float) -> Decimal:
    """An amount as an exact 2-place Decimal, as the Avro decimal(12, 2) field wants it."""
    return Decimal(int(round(amount * 100))).scaleb(-2)


def generate(n: int, seed: int = 0) -> list[tuple[dict, int]]:
    """Return n (CardPayment record dict ready for fastavro, fraud label 0/1), ordered by event_time."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < FRAUD_RATE).astype(np.int64)

    # Cards: a pool of card tokens, each with its issuer country.
    n_cards = max(n // 20, 10)
    card_ids = [f"tok_{rng.integers(0, 16**12):012x}" for _ in range(n_cards)]
    card_issuer = rng.choice(ISSUERS, size=n_cards, p=ISSUER_P)
    card = rng.integers(0, n_cards, n)

    channel = _pick(rng, y, CHANNELS, CHANNEL_P)
    mcc_codes = list(MCCS)
    mcc_p = {label: np.array([w[1 + label] for w in MCCS.values()]) for label in (0, 1)}
    mcc = _pick(rng, y, mcc_codes, {k: v / v.sum() for k, v in mcc_p.items()})
    mcc[channel == "ATM"] = "6011"

    read = rng.random(n) < np.where(y == 1, CARD_READ_P[1], CARD_READ_P[0])
    card_present = np.where(np.isin(channel, ["POS", "ATM"]), read, False).astype(object)
    card_present[rng.random(n) < NULL_RATE] = None

    issuer = card_issuer[card]
    cross = rng.random(n) < np.where(y == 1, CROSS_BORDER_P[1], CROSS_BORDER_P[0])
    abroad = rng.choice(MERCHANT_COUNTRIES, size=n)
    # Redraw "abroad" countries that happen to be the issuer's own, so cross-border means cross-border.
    same = cross & (abroad == issuer)
    while same.any():
        abroad[same] = rng.choice(MERCHANT_COUNTRIES, size=int(same.sum()))
        same = cross & (abroad == issuer)
    merchant_country = np.where(cross, abroad, issuer)
    merchant_no = rng.integers(0, 200, n)

    median = np.array([MCCS[m][0] if m in MCCS else 0.0 for m in mcc])
    amount = median * rng.lognormal(0.0, AMOUNT_SIGMA, n)
    amount *= np.where(y == 1, rng.lognormal(np.log(FRAUD_AMOUNT_FACTOR[0]), FRAUD_AMOUNT_FACTOR[1], n), 1.0)
    atm = channel == "ATM"
    amount[atm] = _pick(rng, y[atm], ATM_AMOUNTS, ATM_P).astype(float)
    amount = np.clip(amount, 0.5, 25_000.0)

    day_weights = {label: np.array([WEEKEND_WEIGHT[label] if d % 7 >= 5 else 1.0 for d in range(DAYS)])
                   for label in (0, 1)}
    day = _pick(rng, y, list(range(DAYS)), {k: v / v.sum() for k, v in day_weights.items()}).astype(np.int64)
    hour = _pick(rng, y, list(range(24)), HOUR_P).astype(np.int64)
    micros_in_hour = rng.integers(0, 3_600_000_000, n)
    micros = (day * 24 + hour) * 3_600_000_000 + micros_in_hour

    med_km = np.array([DISTANCE[(int(lab), bool(c))][0] for lab, c in zip(y, cross)])
    sig_km = np.array([DISTANCE[(int(lab), bool(c))][1] for lab, c in zip(y, cross)])
    distance = np.round(med_km * np.exp(sig_km * rng.standard_normal(n)), 1)
    distance_null = rng.random(n) < NULL_RATE
    payment_uuid = rng.bytes(16 * n)

    rows = []
    for i in range(n):
        country = str(merchant_country[i])
        record = {
            "payment_id": str(uuid.UUID(bytes=payment_uuid[16 * i:16 * i + 16], version=4)),
            "card": {"card_id": card_ids[card[i]], "issuer_country": str(issuer[i])},
            "merchant": {"merchant_id": f"{country}-{mcc[i]}-{merchant_no[i]:04d}", "mcc": str(mcc[i]),
                         "country": country},
            "amount": _cents(float(amount[i])),
            "currency": CURRENCY.get(country, "EUR"),
            "card_present": None if card_present[i] is None else bool(card_present[i]),
            "channel": str(channel[i]),
            "event_time": START + timedelta(microseconds=int(micros[i])),
            "customer_distance_km": None if distance_null[i] else float(distance[i]),
        }
        rows.append((record, int(y[i])))
    rows.sort(key=lambda row: row[0]["event_time"])
    return rows
