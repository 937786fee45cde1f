"""A synthetic sensor fleet with labelled injected anomalies (pure generation, no I/O).

Each device has a level, a daily cycle, a slow trend, noise, occasional regime changes (the "new
normal" — not labelled), irregular sampling and dropouts (a channel missing now and then). With
``profiles="varied"`` devices differ much more, as real fleets do: the daily cycle is a sine, office
hours (a smoothed square wave), a morning and an evening peak, a sawtooth or absent; weekends may
run at a fraction of the weekday amplitude; the noise may be autocorrelated (AR(1)) or heavy-tailed
(Student t, 3 degrees of freedom); some levels wander (random walk); sampling intervals range from
1 minute to 1 hour. Anomalies
are injected at random with a label per reading: ``spike``, ``level_shift``, ``drift``, ``stuck``,
``noise_burst`` and — with two or more channels — ``broken_correlation`` (channels normally move
together; one stops following).

>>> from sensorwatch.simulate import Fleet
>>> fleet = Fleet(devices=3, channels=2, seed=1)
>>> ids, ts, values, labels = fleet.step()
>>> len(ids), values.shape, labels[0] in ("", *Fleet.KINDS)
(3, (3, 2), True)
"""

from __future__ import annotations

import numpy as np

DAY_S = 86_400.0
#: Daily shapes of ``profiles="varied"``.
SHAPES = ("sine", "office_hours", "two_peaks", "sawtooth", "flat")
VARIED_INTERVALS_S = (60.0, 300.0, 300.0, 600.0, 1800.0, 3600.0)


def daily_shape(kind: np.ndarray, hour: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Value in [−1, 1] of each device's daily shape (index into :data:`SHAPES`) at ``hour`` ∈ [0, 24).

    >>> import numpy as np
    >>> v = daily_shape(np.array([1, 1]), np.array([12.0, 3.0]), np.zeros(2))
    >>> bool(v[0] > 0.9), bool(v[1] < -0.9)
    (True, True)
    """
    h = (hour + 24 * phase / (2 * np.pi)) % 24
    sig = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
    out = np.sin(2 * np.pi * h / 24)
    out = np.where(kind == 1, 2 * (sig((h - 8) / 0.4) - sig((h - 18) / 0.4)) - 1, out)
    two = np.exp(-(((h - 8.5) / 1.5) ** 2)) + 0.8 * np.exp(-(((h - 18.5) / 2.0) ** 2))
    out = np.where(kind == 2, 2 * two - 1, out)
    out = np.where(kind == 3, 2 * (h / 24) - 1, out)
    return np.where(kind == 4, 0.0, out)


class Fleet:
    """``step()`` advances every device by one reading (vectorised over devices)."""

    KINDS = ("spike", "level_shift", "drift", "stuck", "noise_burst", "broken_correlation")

    def __init__(
        self,
        devices: int = 100,
        channels: int = 1,
        *,
        seed: int = 0,
        interval_s: float = 300.0,
        anomaly_rate: float = 0.002,
        dropout_rate: float = 0.01,
        start_ts: float = 1_767_225_600.0,
        prefix: str = "sim",
        profiles: str = "sine",
        inject_after: int = 400,
    ) -> None:
        if profiles not in ("sine", "varied"):
            raise ValueError("profiles must be 'sine' or 'varied'")
        self.n, self.c = devices, channels
        self.rng = np.random.default_rng(seed)
        self.interval = interval_s
        self.anomaly_rate = anomaly_rate
        self.inject_after = inject_after  # readings per device before any anomaly is injected
        self.dropout_rate = dropout_rate
        self.ids = [f"{prefix}-{i:05d}" for i in range(devices)]
        r = self.rng
        self.level = r.uniform(10, 100, (devices, 1)) * r.uniform(0.8, 1.2, (devices, channels))
        self.amp = self.level * r.uniform(0.05, 0.3, (devices, 1))
        self.phase = r.uniform(0, 2 * np.pi, (devices, 1))
        self.noise = self.level * r.uniform(0.005, 0.03, (devices, channels))
        self.trend = self.level * r.normal(0, 2e-6, (devices, channels))
        self.mix = r.uniform(0.5, 1.0, (devices, channels))  # how strongly a channel follows the shared cycle
        self.ts = np.full(devices, start_ts) + r.uniform(0, interval_s, devices)
        self.k = 0
        self.offset = np.zeros((devices, channels))
        # Active anomaly per device: kind index (-1 none), readings left, parameters.
        self.kind = np.full(devices, -1)
        self.left = np.zeros(devices, dtype=np.int64)
        self.mag = np.zeros(devices)
        self.stuck_value = np.zeros((devices, channels))
        self.channel = np.zeros(devices, dtype=np.int64)
        self.age = np.zeros(devices, dtype=np.int64)
        self.varied = profiles == "varied"
        if self.varied:
            # Drawn after everything above, so profiles="sine" fleets are unchanged by this option.
            self.shape = r.integers(len(SHAPES), size=devices)
            self.weekend = np.where(r.random(devices) < 0.5, r.uniform(0.2, 1.0, devices), 1.0)[:, None]
            self.heavy = (r.random(devices) < 0.3)[:, None]
            self.phi = np.where(r.random(devices) < 0.5, r.uniform(0.3, 0.95, devices), 0.0)[:, None]
            self.walk = np.where(r.random(devices) < 0.3, r.uniform(0.05, 0.5, devices), 0.0)[:, None]
            self.intervals = r.choice(VARIED_INTERVALS_S, size=devices)
            self.ts = np.full(devices, start_ts) + r.uniform(0, 1, devices) * self.intervals
            self.ar = np.zeros((devices, channels))
            self.wander = np.zeros((devices, channels))

    def step(self) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
        """One reading per device: (device ids, unix ts, values (N, C) with NaN = missing, labels)."""
        r, n, c = self.rng, self.n, self.c
        self.k += 1
        jitter = r.uniform(0.8, 1.2, n)
        if self.varied:
            self.ts = self.ts + self.intervals * jitter
            hour = 24 * (self.ts[:, None] % DAY_S) / DAY_S
            shared = daily_shape(self.shape[:, None], hour, self.phase)
            weekday = np.floor(self.ts / DAY_S + 3) % 7  # 0 = Monday (1970-01-01 was a Thursday)
            shared = shared * np.where((weekday >= 5)[:, None], self.weekend, 1.0)
            eps = np.where(self.heavy, r.standard_t(3, (n, c)) / np.sqrt(3.0), r.standard_normal((n, c)))
            self.ar = self.phi * self.ar + np.sqrt(1 - self.phi**2) * eps
            self.wander += self.walk * self.noise * r.standard_normal((n, c))
            own = self.ar * self.noise + self.wander
        else:
            self.ts = self.ts + self.interval * jitter
            day = 2 * np.pi * (self.ts[:, None] % DAY_S) / DAY_S
            shared = np.sin(day + self.phase)
            own = r.standard_normal((n, c)) * self.noise
        # Regime changes: rare, permanent level moves — the new normal, not an anomaly.
        regime = r.random(n) < 2e-4
        self.offset[regime] += self.level[regime] * r.uniform(-0.1, 0.1, (int(regime.sum()), 1))
        base = self.level + self.offset + self.trend * self.k
        x = base + self.amp * shared * self.mix + own
        labels = self._inject(x, base, shared)
        missing = r.random((n, c)) < self.dropout_rate
        if c == 1:
            missing[:] = False  # a univariate reading with nothing in it would just be rejected
        x[missing] = np.nan
        return list(self.ids), self.ts.copy(), x, labels

    def _inject(self, x: np.ndarray, base: np.ndarray, shared: np.ndarray) -> list[str]:
        r, n = self.rng, self.n
        start = (self.kind < 0) & (r.random(n) < self.anomaly_rate) & (self.k > self.inject_after)
        kinds = self.KINDS if self.c > 1 else self.KINDS[:-1]
        for i in np.flatnonzero(start):
            self.kind[i] = r.integers(len(kinds))
            self.left[i] = {0: 1, 1: 60, 2: 120, 3: 40, 4: 20, 5: 60}[int(self.kind[i])]
            self.mag[i] = r.choice([-1, 1]) * r.uniform(6, 12)
            self.channel[i] = r.integers(self.c)
            self.stuck_value[i] = x[i]
            self.age[i] = 0
        labels = [""] * n
        for i in np.flatnonzero(self.kind >= 0):
            k, ch = int(self.kind[i]), int(self.channel[i])
            sigma = self.noise[i, ch] + 1e-9
            self.age[i] += 1
            if k == 0:
                x[i, ch] += self.mag[i] * max(sigma, 0.1 * abs(self.amp[i, 0]))
            elif k == 1:
                x[i, ch] += 0.5 * self.mag[i] * max(sigma, 0.2 * abs(self.amp[i, 0]))
            elif k == 2:
                x[i, ch] += self.mag[i] * sigma * self.age[i] / 10
            elif k == 3:
                x[i] = self.stuck_value[i]
            elif k == 4:
                x[i, ch] += self.rng.standard_normal() * 8 * sigma
            else:
                x[i, ch] = base[i, ch] - self.amp[i, ch] * shared[i, 0] * self.mix[i, ch]
            labels[i] = kinds[k]
            self.left[i] -= 1
            if self.left[i] <= 0:
                self.kind[i] = -1
        return labels
