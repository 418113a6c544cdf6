"""Noise, stated: a loss over seeds is a mean ± spread, a speed over rounds is a median with its
min-max, and a difference inside the noise is said to be one ("within noise"), never a win.

spread: the sample standard deviation over seeds (n - 1; none with one seed).
A difference of two means is within noise when it is at most two standard errors of the
difference, 2·√(s_a²/n_a + s_b²/n_b) (about a 95 % band for normal noise); with one seed on either
side the noise is unknown and nothing is called a win. Two speeds differ beyond noise when their
min-max ranges over the rounds do not overlap.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Spread:
    mean: float
    sd: Optional[float]  # None with one value
    n: int

    def text(self, digits: int = 4) -> str:
        if self.sd is None:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} ({self.n} seeds)"


def spread(values: Sequence[float]) -> Optional[Spread]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    sd = statistics.stdev(values) if len(values) > 1 else None
    return Spread(statistics.fmean(values), sd, len(values))


def noise_band(a: Spread, b: Spread) -> Optional[float]:
    """Two standard errors of a.mean - b.mean (None: a side has one seed)."""
    if a.sd is None or b.sd is None:
        return None
    return 2 * math.sqrt(a.sd ** 2 / a.n + b.sd ** 2 / b.n)


def compare_means(a: Spread, b: Spread, digits: int = 3) -> tuple[float, Optional[bool], str]:
    """(a - b, beyond noise? (None: unknown), words), e.g. "-0.012 (within noise ±0.030)"."""
    d = a.mean - b.mean
    band = noise_band(a, b)
    if band is None:
        return d, None, f"{d:+.{digits}f} (1 seed: noise unknown)"
    beyond = abs(d) > band
    return d, beyond, f"{d:+.{digits}f} ({'beyond' if beyond else 'within'} noise ±{band:.{digits}f})"


@dataclass(frozen=True)
class Range:
    median: float
    lo: float
    hi: float
    n: int

    def text(self) -> str:
        """'1,234 (1,200–1,300)'; slow speeds keep two significant digits ('0.42 (0.40–0.45)')."""
        digits = 0 if self.median >= 100 else (1 if self.median >= 10 else 2)
        return f"{self.median:,.{digits}f} ({self.lo:,.{digits}f}–{self.hi:,.{digits}f})"


def speed_range(values: Sequence[float]) -> Optional[Range]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return Range(statistics.median(values), min(values), max(values), len(values))


def faster(a: Range, b: Range) -> Optional[bool]:
    """True: a is faster than b beyond noise; False: b is; None: their ranges overlap (within noise)."""
    if a.lo > b.hi:
        return True
    if b.lo > a.hi:
        return False
    return None
