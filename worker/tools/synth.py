"""Synthetic card transactions shaped like the public card_transdata fraud data set."""

import numpy as np

# Constants fitted by eye and by moments to a 24,999-row sample of card_transdata: the three
# distances/ratios are close to lognormal (log skew ~0, kurtosis ~3) and the flags independent.
LOG_HOME = (2.318, 1.408)
LOG_LAST = (0.016, 1.795)
LOG_RATIO = (0.004, 1.089)
P_CHIP, P_PIN, P_ONLINE = 0.351, 0.102, 0.647
# In the sample repeat_retailer is 0 below ~1.9 km from home and 1 above it.
REPEAT_CUTOFF_KM = 1.9
# Per-card median purchase in EUR; amount = median * ratio.
LOG_MEDIAN_EUR = (np.log(40.0), 0.6)


def _step(x, cutoff, steepness=6.0):
    """Soft 0-to-1 step of x around cutoff on a log scale."""
    return 1.0 / (1.0 + np.exp(-steepness * (np.log(x) - np.log(cutoff))))


def generate(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Return n synthetic transactions as named column arrays and a 0/1 fraud label array."""
    rng = np.random.default_rng(seed)
    home = rng.lognormal(*LOG_HOME, n)
    last = rng.lognormal(*LOG_LAST, n)
    ratio = rng.lognormal(*LOG_RATIO, n)
    repeat = np.log(home) + rng.normal(0.0, 0.05, n) > np.log(REPEAT_CUTOFF_KM)
    chip = rng.random(n) < P_CHIP
    pin = rng.random(n) < P_PIN
    online = rng.random(n) < P_ONLINE
    amount = np.maximum(np.round(rng.lognormal(*LOG_MEDIAN_EUR, n) * ratio, 2), 0.01)

    # Mirrors the real data's rules (fraud = unusually large purchase, far from home or from
    # the last transaction, online, no PIN, less so with chip) but with soft edges and
    # Bernoulli sampling, so labels are noisy rather than a deterministic function.
    logit = (
        -7.6
        + 7.0 * _step(ratio, 4.0)
        + 6.0 * _step(home, 100.0) * np.where(chip, 0.3, 1.0)
        + 5.0 * _step(last, 50.0) * np.where(chip, 0.5, 1.0)
        + 3.5 * online
        - 4.5 * pin
        - 0.7 * chip
    )
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    columns = {
        "distance_from_home": home,
        "distance_from_last_transaction": last,
        "ratio_to_median_purchase_price": ratio,
        "repeat_retailer": repeat,
        "used_chip": chip,
        "used_pin_number": pin,
        "online_order": online,
        "amount": amount,
    }
    return columns, label
