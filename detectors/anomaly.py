"""Anomaly score: how unlike its own history a reading is, in [0, 1], causal, for many series at once.

Thresholds catch what we can name; this catches what we cannot: a charging port drawing unlike itself,
a smoke chamber's baseline moving, a noise point behaving out of character. Each reading is scored
from that reading and earlier ones only, with a fixed handful of numbers per series, and every step
is vectorised over series *and* over time: a block of T readings of m series is one pass of linear
filters (``scipy.signal.lfilter``, exact recursions carried across blocks in the state) and
elementwise numpy, so scoring reading by reading, round by round or a whole file at once gives the
same scores (to rounding).

The parts, and why each is there:

* **Prediction error against a medium-horizon EWMA** (weight ``medium``), scaled by the EW spread of
  those errors: a *spike*, and the first readings of a *level shift* (they stay surprising until the
  mean has moved). The scale never falls below a tenth of the spread of the series' own level, so a
  series that sits exactly still for hours (a port idling at 0 W) does not find every step infinite. Every EW statistic is bias-corrected (divided by the weight seen so far, as Adam
  does), so it is an exact running mean early on and an EWMA later, all as one linear filter.
* **Short against long error variance** (``short`` vs ``long``): a *variance change* — a sensor gone
  flat or stuck, noise bursting — which no single reading gives away.
* **Short mean against the long level** (``short`` vs ``long``), in units of what a short mean of the
  series' own spread would wander: a *level shift* or a drift that has lasted a few readings, with
  more certainty than any one reading of it carries.
* **Slow drift** (plain view, ``drift`` vs ``long``): the long level against a still slower baseline
  (``drift``: ~670 readings), in units of how far apart the two means would be on white noise of the
  series' spread after as many readings (:func:`gap_share`, exact at every count, so a young series
  is not judged against a young baseline). A level that creeps moves too slowly for the short mean to
  stand out from the long level, and no reading of it is unusual. Three scales, each judged against
  the next slower one: a reading against the medium mean (spike), the short mean against the long
  level (shift), the long level against the slow baseline (drift). Its evidence counts half
  (``drift_weight``): the gap moves over ~100 readings, so its calibration rests on far fewer
  independent values than a spike's, and at full weight the quiet street's supply voltages raised one
  false alert at the shipped threshold in 3,000 simulated port-days (none at half; NAB −0.2).
  Measured at half weight, twelve seeds: a rise of 2–4 σ over 100–300 readings of noise is its
  series' highest score in 4–6, against 1–5 without the drift (5–6 against 2–5 before the ordinary
  worst, below); on NAB +0.7.
* **Seasonal view** (``period`` readings, 0 = off): the spike, volatility and shift on the difference
  from one period ago, combined with the plain view by geometric mean, so a pattern that repeats every day
  (a load peak, a nightly lull) stops being surprising while a spike on a seasonal series is still
  seen by both. The seasonal view also counts alone, at ``seasonal_alone`` (0.6) of its surprise: a
  day that lacks its usual peak holds only ordinary values (the plain view sees nothing, and a
  geometric mean with nothing is nothing), yet it is unlike the day before.
* **Contextual novelty** (``levels``, ``context``, ``context_weight``): each reading becomes one of
  ``levels`` symbols by where it falls in the series' range so far, and its *context* is its symbol
  with the ``context - 1`` before it (4^4 = 256 contexts, a 32-byte bitset per series). A context
  the series has never produced is a pattern it has not shown before, even when every value in it is
  ordinary: a daily peak that comes twice, a rhythm that breaks, a wave cut short, which no
  prediction error sees. How surprising a new context is depends on how often this series produces
  new ones: −ln of the Krichevsky–Trofimov estimate (new contexts so far + ½) / (contexts so far + 1),
  beyond ln 2. A cumulative estimate, not an EW rate: on noise, new contexts thin out like 1/n and
  so does the estimate, so a rare run of noise scores as rare as it is (an EW rate collapses
  exponentially between new contexts, and the next one then looks like a miracle; on 20,000 Gaussian
  readings that took the highest score from 0.56 to 0.85). Idea from the contextual detectors on NAB
  (CAD OSE), written here as one ``np.unique`` per block, so it stays vectorised along time.
* **A learned threshold on the score's own distribution**: each feature (log1p-compressed) is
  standardised by its own long EW mean and spread (``calibration``, ~2,000 readings) and turned into a
  surprise, −ln of the Gaussian tail probability. A series that is spiky by nature learns that its
  spikes are ordinary; a quiet one stays sensitive. This makes scores comparable across series, so
  one threshold fits a whole kind. The features' surprises add up (beyond ln 2 each: evidence
  stronger than a coin flip), so a reading that is a spike *and* a shift counts more than either.
* **Novelty against a decaying peak** of past surprise (fading ``decay`` nats a reading): what
  counts is by how much a reading's surprise exceeds the (fading) worst of the recent past, plus a
  fraction (``echo``) of the surprise itself; one anomaly gives one high score, not a burst, and the
  first reading of an event scores highest (earliest detection is what matters to an operator). The echo
  lets a second event that is not the worst of the recent past still be seen, but only at a reading
  that is a *local* record: its surprise beats the previous reading's, ``local`` (0.9) times the one
  before that, ``local``² times the one before that, and so on. The readings after a spike are still
  surprising while the statistics settle, each a little less than the one before, and the echo of
  each made one event a run of alerts (six rows in a row on one NAB series; the record is worth +1.2
  on NAB). ``local=None`` lets every reading's echo count, so the score stays up while an anomaly
  lasts (what a rule ``anomaly_score >= x for T`` needs: the transform's ``sustain``).
* **The ordinary worst, remembered longer** (``forget``, ``ordinary``, ``memory``): a second peak
  holds every surprise up to ``ordinary`` nats (20: novelty that large alone scores 2/3, just under
  the shipped rules' thresholds of 0.7 and 0.75) and fades ``forget / age`` nats a reading, ``age``
  being the readings since the warm-up: ``forget`` nats over each e-fold of age, never faster than
  ``decay`` (the first ``forget / decay`` = 300 readings) nor slower than ``forget`` over ``memory``
  readings (20,000: 70 days of 5-minute readings). Novelty is judged against the higher of the two
  peaks. On noise, a reading beats a peak that fades d a reading by θ nats about e^−θ·d of the time:
  the fixed fade alone keeps the false-alarm rate fixed however long a series has been watched, while
  the worst of n ordinary readings only grows like ln n. Fading by e-folds of age lets the rate fall
  as the series shows what its ordinary worst is (five series of Gaussian noise, 3,428 readings each
  after NAB's probation: 50 scores above the NAB threshold, now 19). A surprise beyond ``ordinary``
  is an event, not the ordinary worst: it fades at ``decay`` as before, so a new event days after a
  big one still scores in full (a slow peak of every surprise held a nightly job's first night
  against an event ten days later, 0.28 instead of 0.44). NAB dev +1.6, from fewer false rows in 7
  files and worse in none. The cost: a new pattern in an otherwise still series stands out a little
  less (a rhythm that doubles, ``tests/test_anomaly.py``: 0.44 against the series' next highest
  0.40, from 0.52). The slowest fade was first over the calibration's horizon (2,000 readings): past
  that age the worst fell a steady 1.5 nats every 1,000 readings, and a series watched for weeks went
  back to a fixed false-alarm rate (twelve series of 20,000 readings of noise on a daily cycle: 83
  scores above NAB's threshold after the first 3,000, 36 of them in the second half; with ``memory``
  48 and 13). The longer memory hides at most ``ordinary`` nats, and that still fades ``forget`` over
  each e-fold of age.
* **Recurrence a period ago** (seasonal series only): the surprise is also judged against the largest
  surprise within ``band`` of a period (6%: about ±1.5 h of a day) one period before. An event that
  happened about this time yesterday too (a nightly batch job, a morning peak whose edge jitters by
  minutes) is not news, however surprising each time; the seasonal view alone misses it when the
  edge moves by a few readings. One more row of ``period + band`` numbers per series.
* **Warm-up**: 0 for the first ``warmup`` readings of a series, while its statistics are still learning.

The surprise s ≥ 0 maps to the score s / (s + 10): 0.5 at 10 nats (p ≈ 5e-5).

Inspired by the EWMA/CUSUM control-chart family (Roberts 1959, Page 1954) and by the tail
probability of a detector's own error distribution used by Numenta's anomaly likelihood (Ahmad et
al. 2017, "Unsupervised real-time anomaly detection for streaming data"); scored on the Numenta
Anomaly Benchmark by ``bench/nab.py`` (docs/PERFORMANCE.md).

>>> import numpy as np
>>> rng = np.random.default_rng(1)
>>> readings = 150 + rng.normal(0, 3, (1, 600))   # a charging port at 150 W
>>> readings[0, 500] = 420                         # … and one reading it has never drawn
>>> scores = Anomaly(1).score(np.array([0]), readings)[0]
>>> int(np.argmax(scores)), bool(scores[500] > 0.5 > scores[200:500].max())
(500, True)
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import lfilter
from scipy.special import log_ndtr

SCALE_FLOOR = 1e-9  # a perfectly flat history must not make every change infinitely surprising
RELATIVE_FLOOR = 1e-6  # … nor a series around 10^8 (bytes) judged on rounding noise
LEVEL_SHARE = 0.1  # … nor a port idling at exactly 0 W judge its plug-ins: a tenth of its level's own spread
SPREAD_FLOOR = 0.04  # of a feature's log: one that barely varied must not make a wobble a certainty
MIN_HISTORY = 3  # readings before the first one is judged (their errors make the first spread)
HALF_SCORE_NATS = 10.0  # surprise at which the score is 0.5
LN_2 = float(np.log(2.0))
RECORD_MARGIN = 1e-9  # a local record beats the old one by more than rounding (a log and an exp in blocks)


def gap_share(a: float, b: float, seen_a: np.ndarray, seen_b: np.ndarray) -> np.ndarray:
    """Variance of the gap between two bias-corrected EW means (weights ``a`` and ``b``) of the same
    n readings of white noise, per unit of its variance: Σ (wₐ − w_b)² over the readings' weights.
    ``seen_a`` and ``seen_b`` are the weights seen after n readings, 1 − (1 − a)ⁿ and 1 − (1 − b)ⁿ
    (:meth:`Ewm.seen`), from which every power of the sums follows.

    Exact at every n, so the gap is in the same units while the slow mean is still young (both are
    then nearly the running mean and their gap tiny) as later; with a steady-state share the young
    gap looked unusually small, then its growth unusually large, just after the warm-up.
    """
    ka, kb = 1.0 - a, 1.0 - b
    pa, pb = 1.0 - seen_a, 1.0 - seen_b  # (1 − a)ⁿ, (1 − b)ⁿ
    aa = a * a * (1.0 - pa * pa) / ((1.0 - ka * ka) * seen_a * seen_a)
    bb = b * b * (1.0 - pb * pb) / ((1.0 - kb * kb) * seen_b * seen_b)
    ab = a * b * (1.0 - pa * pb) / ((1.0 - ka * kb) * seen_a * seen_b)
    return np.maximum(aa + bb - 2.0 * ab, 1e-12)


def decaying_max(start: np.ndarray, values: np.ndarray,
                 decay: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P ← max(P − dₜ, v) along each row of a block, as a running maximum of v + (d₁ + … + dₜ).

    ``decay`` is d, the same for every reading, or one per reading (an array shaped as ``values``).
    Returns (P decayed to each reading, before it counts: P₍ₜ₋₁₎ − dₜ; P after the last reading);
    ``start`` is P before the block.
    """
    if np.ndim(decay) == 0:
        lift = decay * np.arange(1, values.shape[1] + 1)[None, :]
    else:
        lift = np.cumsum(decay, axis=1)
    held = np.maximum.accumulate(np.concatenate([start[:, None], values + lift], axis=1), axis=1)
    return held[:, :-1] - lift, held[:, -1] - lift[:, -1]


class Ewm:
    """A bias-corrected exponentially weighted mean along time, for a block of several series."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.keep = 1.0 - alpha
        self.b = np.array([alpha])
        self.a = np.array([1.0, -self.keep])

    def seen(self, n: np.ndarray) -> np.ndarray:
        """Weight the filter has given real readings after ``n`` of them (1 − (1 − alpha)^n)."""
        return np.maximum(1.0 - self.keep ** n, 1e-300)

    def seen_around(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`seen` after and before each of a block's readings (``n`` after each, rising by 1)."""
        both = self.seen(np.concatenate([n[:, :1] - 1, n], axis=1))
        return both[:, 1:], both[:, :-1]

    def run(self, u: np.ndarray, last: np.ndarray, seen_after: np.ndarray,
            seen_before: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean after each reading, mean before it, raw filter state to keep).

        ``last`` is the raw (uncorrected) filter output before the block; ``seen_after`` and
        ``seen_before`` are :meth:`seen` after and before each reading.
        """
        if u.shape[1] == 1:  # one reading per series (the rule engine's rounds): the recursion itself
            raw = self.alpha * u + (self.keep * last)[:, None]
        else:
            raw, _ = lfilter(self.b, self.a, u, axis=1, zi=(self.keep * last)[:, None])
        before = np.concatenate([last[:, None], raw[:, :-1]], axis=1)
        return raw / seen_after, before / seen_before, raw[:, -1]


VIEW_STATE = ("level", "level_var", "mean", "spread", "short_var", "long_var", "short_mean",
              "g_spike", "g_spike_var", "g_vol", "g_vol_var", "g_shift", "g_shift_var")
DRIFT_STATE = ("drift_level", "drift_var", "g_drift", "g_drift_var")  # the plain view's only


class Anomaly:
    """Anomaly scores for ``n_series`` series; state in arrays, one row per series."""

    # state a snapshot from an older version may lack, whose blank start is safe: an empty ordinary
    # worst scores as the version before it did, until it fills again (a restart of the whole score
    # would cost a smoke detector's chamber rule five days of warm-up)
    OPTIONAL_STATE = frozenset({"worst"})

    def __init__(self, n_series: int, warmup: int = 100, period: int = 0, medium: float = 0.05,
                 short: float = 0.1, long: float = 0.01, calibration: float = 0.0005, decay: float = 0.01,
                 forget: float | None = 3.0, ordinary: float = 20.0, memory: float = 20000.0,
                 echo: float = 0.1, local: float | None = 0.9, band: float = 0.06, levels: int = 4, context: int = 4,
                 context_weight: float = 2.5, seasonal_alone: float = 0.6, drift: float = 0.0015,
                 drift_weight: float = 0.5):
        self.warmup, self.period, self.decay, self.echo = warmup, period, decay, echo
        # the ordinary worst's fade by age, the age past which it fades no slower, and its cap
        # (forget None: no second peak)
        self.forget, self.memory, self.ordinary = forget, memory, ordinary
        if memory < 1.0:
            raise ValueError("memory must be at least 1 reading")
        if local is not None and not 0.0 < local < 1.0:
            raise ValueError("local must be in (0, 1), or None: the echo of every reading counts")
        if drift and not 0.0 < drift < long:
            raise ValueError("drift must be slower than long (0 < drift < long), or 0: no drift feature")
        self.local = local
        self.levels, self.context, self.context_weight = levels, context, context_weight
        self.seasonal_alone = seasonal_alone
        self.contexts = levels ** context
        if self.contexts % 8 or context < 2:
            raise ValueError("levels ** context must be a multiple of 8 (a bitset of whole bytes), context ≥ 2")
        self.band = max(1, int(round(period * band))) if period else 0  # readings each side of "a period ago"
        self.medium, self.short, self.long, self.calibration = (Ewm(medium), Ewm(short), Ewm(long),
                                                                Ewm(calibration))
        self.short_share = short / (2.0 - short)  # variance of a short EW mean of white noise, per unit
        self.drift, self.drift_weight = (Ewm(drift) if drift else None), drift_weight
        self.filters = tuple(f for f in (self.medium, self.short, self.long, self.calibration, self.drift) if f)
        self.views = ("plain", "seasonal") if period else ("plain",)
        self.arrays: dict[str, np.ndarray] = {"count": np.zeros(n_series, dtype=np.int64),
                                              "origin": np.zeros(n_series), "peak": np.zeros(n_series),
                                              "local": np.zeros(n_series),  # the local record of surprise
                                              # contextual novelty: the range so far, the last context − 1
                                              # symbols (as one code), readings and new contexts counted,
                                              # and which contexts were seen (a bitset)
                                              "ctx.lo": np.zeros(n_series), "ctx.hi": np.zeros(n_series),
                                              "ctx.recent": np.zeros(n_series, dtype=np.int64),
                                              "ctx.count": np.zeros(n_series, dtype=np.int64),
                                              "ctx.novel": np.zeros(n_series, dtype=np.int64),
                                              "ctx.seen": np.zeros((n_series, self.contexts // 8), dtype=np.uint8)}
        for view in self.views:
            for name in VIEW_STATE:
                self.arrays[f"{view}.{name}"] = np.zeros(n_series)
        if forget is not None:
            self.arrays["worst"] = np.zeros(n_series)  # the ordinary worst
        if self.drift:
            for name in DRIFT_STATE:
                self.arrays[f"plain.{name}"] = np.zeros(n_series)
        if period:
            self.arrays["lag"] = np.zeros((n_series, period))  # the last period's readings, oldest first
            # the surprises of the last period and a band beyond it, oldest first
            self.arrays["echoes"] = np.zeros((n_series, period + self.band))

    def grow(self, n_series: int) -> None:
        for name, a in self.arrays.items():
            extra = n_series - a.shape[0]
            if extra > 0:
                self.arrays[name] = np.concatenate([a, np.zeros((extra, *a.shape[1:]), dtype=a.dtype)])

    def state(self) -> dict[str, np.ndarray]:
        return self.arrays

    def step(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Score one reading per row (rows unique, values not NaN), then learn it."""
        return self.score(rows, values[:, None])[:, 0]

    def score(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Score a block: ``values[i, t]`` is the t-th next reading of series ``rows[i]`` (rows unique)."""
        state = self.arrays
        width = values.shape[1]
        seen = state["count"][rows]
        new = seen == 0
        state["origin"][rows[new]] = values[new, 0]  # centred on its first reading: no cancellation at 1e8
        x = values - state["origin"][rows][:, None]
        n = seen[:, None] + 1 + np.arange(width)[None, :]  # readings seen after each one
        seen_by = {f: f.seen_around(n) for f in self.filters}
        surprise = self._view(rows, x, n, seen_by, "plain")
        if self.period:
            joined = np.concatenate([state["lag"][rows], x], axis=1)
            state["lag"][rows] = joined[:, -self.period:]
            seasonal = self._view(rows, x - joined[:, :width], n, seen_by, "seasonal")
            # until a period and a warm-up have passed, the seasonal view compares with nothing
            both = np.maximum(np.sqrt(surprise * seasonal), self.seasonal_alone * seasonal)
            surprise = np.where(n > self.period + self.warmup, both, surprise)
        if self.context_weight:
            surprise = surprise + self.context_weight * self._novel_context(rows, x)
        surprise = np.where(n > self.warmup, surprise, 0.0)
        recurring = self._recurring(rows, surprise) if self.period else 0.0
        peak_before, state["peak"][rows] = decaying_max(state["peak"][rows], surprise, self.decay)
        if self.forget is not None:
            fade = np.minimum(self.decay, self.forget / np.clip(n - self.warmup, 1, self.memory))
            worst_before, state["worst"][rows] = decaying_max(state["worst"][rows],
                                                              np.minimum(surprise, self.ordinary), fade)
            peak_before = np.maximum(peak_before, worst_before)
        peak_before = np.maximum(peak_before, 0.0)
        state["count"][rows] = seen + width
        echo = self.echo * np.maximum(surprise - recurring, 0.0)
        if self.local is not None:
            echo = echo * self._local_record(rows, surprise)
        novelty = np.maximum(surprise - np.maximum(peak_before, recurring), 0.0) + echo
        return novelty / (novelty + HALF_SCORE_NATS)

    def _novel_context(self, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Surprise (nats) of each reading whose context (its symbol and those before it) is new."""
        state, levels, context = self.arrays, self.levels, self.context
        m, width = x.shape
        count = state["ctx.count"][rows]
        fresh = count == 0  # its range starts at its first reading
        state["ctx.lo"][rows[fresh]] = x[fresh, 0]
        state["ctx.hi"][rows[fresh]] = x[fresh, 0]
        lo, hi = state["ctx.lo"][rows][:, None], state["ctx.hi"][rows][:, None]  # the range before each reading
        if width > 1:
            lo = np.minimum.accumulate(np.concatenate([lo, x[:, :-1]], axis=1), axis=1)
            hi = np.maximum.accumulate(np.concatenate([hi, x[:, :-1]], axis=1), axis=1)
        state["ctx.lo"][rows] = np.minimum(lo[:, -1], x[:, -1])
        state["ctx.hi"][rows] = np.maximum(hi[:, -1], x[:, -1])
        span = hi - lo
        share = np.divide(x - lo, span, out=np.zeros_like(x), where=span > 0)
        # (a range that overflowed to inf gives no place in it: such a reading is symbol 0)
        symbol = np.nan_to_num(np.clip(np.floor(levels * share), 0, levels - 1)).astype(np.int64)
        # a context's code: its symbols, oldest first, as the digits of a number in base ``levels``
        recent = state["ctx.recent"][rows][:, None]  # the code of the context − 1 symbols before
        if width == 1:
            code = recent * levels + symbol
        else:
            place = levels ** np.arange(context - 2, -1, -1)
            joined = np.concatenate([recent // place % levels, symbol], axis=1)
            code = sum(joined[:, k:k + width] * levels ** (context - 1 - k) for k in range(context))
        state["ctx.recent"][rows] = code[:, -1] % levels ** (context - 1)
        c = count[:, None] + 1 + np.arange(width)[None, :]  # readings the feature has seen after each
        state["ctx.count"][rows] = count + width
        whole = c > context  # a full context of readings after the first (which has no range yet)
        seen = state["ctx.seen"]
        row_of = np.broadcast_to(rows[:, None], code.shape)
        novel = whole & ((seen[row_of, code >> 3] >> (code & 7).astype(np.uint8)) & 1 == 0)
        if width > 1:  # only the first of a context's repeats within the block is new
            flat = (np.arange(m)[:, None] * self.contexts + code)[novel]
            _, first = np.unique(flat, return_index=True)
            where = np.flatnonzero(novel.ravel())
            novel = np.zeros(novel.size, dtype=bool)
            novel[where[first]] = True
            novel = novel.reshape(code.shape)
        np.bitwise_or.at(seen, (row_of[novel], code[novel] >> 3), (1 << (code[novel] & 7)).astype(np.uint8))
        novel_before = state["ctx.novel"][rows][:, None]
        if width > 1:
            novel_before = novel_before + np.cumsum(novel, axis=1) - novel
        state["ctx.novel"][rows] += novel.sum(axis=1)
        judged_before = np.maximum(c - 1 - context, 0)
        rate = (novel_before + 0.5) / (judged_before + 1.0)  # Krichevsky–Trofimov: chance of a new one
        return np.where(novel, np.maximum(-np.log(rate) - LN_2, 0.0), 0.0)

    def _local_record(self, rows: np.ndarray, surprise: np.ndarray) -> np.ndarray:
        """Whether each surprise beats the local record L (L ← max(local·L, s) after each reading)."""
        width, record = surprise.shape[1], self.arrays["local"][rows]
        if width == 1:  # one reading per series (the rule engine's rounds): the recursion itself
            self.arrays["local"][rows] = np.maximum(self.local * record, surprise[:, 0])
            return surprise > record[:, None] * (1.0 + RECORD_MARGIN)
        # in logs the record is the decaying maximum ln L ← max(ln L − decay, ln s), decay = −ln local
        decay = -float(np.log(self.local))
        with np.errstate(divide="ignore"):  # a surprise (or record) of 0 is −inf in logs: never the record
            before, after = decaying_max(np.log(record), np.log(surprise), decay)
        self.arrays["local"][rows] = np.exp(after)
        return surprise > np.exp(before + decay) * (1.0 + RECORD_MARGIN)  # L₍ₜ₋₁₎ itself, undecayed

    def _recurring(self, rows: np.ndarray, surprise: np.ndarray) -> np.ndarray:
        """For each reading, the largest surprise within ``band`` readings of one period before it."""
        width, band = surprise.shape[1], self.band
        joined = np.concatenate([self.arrays["echoes"][rows], surprise], axis=1)
        self.arrays["echoes"][rows] = joined[:, -(self.period + band):]
        # reading t of the block sits at period + band + t of ``joined``; t − period ± band at t … t + 2·band
        return sliding_window_view(joined, 2 * band + 1, axis=1)[:, :width].max(axis=2)

    def _view(self, rows: np.ndarray, x: np.ndarray, n: np.ndarray,
              seen: dict[Ewm, tuple[np.ndarray, np.ndarray]], view: str) -> np.ndarray:
        """Surprise (nats) of each reading of one view: its spike, volatility, shift (and drift) evidence added up."""
        state = self.arrays

        def ewm(f: Ewm, name: str, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            after, before, last = f.run(u, state[f"{view}.{name}"][rows], *seen[f])
            state[f"{view}.{name}"][rows] = last
            return after, before

        level, level_before = ewm(self.long, "level", x)
        _, level_var_before = ewm(self.long, "level_var", (x - level_before) ** 2)
        _, mean_before = ewm(self.medium, "mean", x)
        error = np.where(n > 1, x - mean_before, 0.0)
        square = error * error
        _, spread_before = ewm(self.medium, "spread", square)
        short_var, _ = ewm(self.short, "short_var", square)
        _, long_var_before = ewm(self.long, "long_var", square)
        floor = (SCALE_FLOOR + RELATIVE_FLOOR * np.abs(mean_before)) ** 2 + LEVEL_SHARE ** 2 * level_var_before
        judged = n > MIN_HISTORY  # with fewer errors behind it a spread is no yardstick yet
        spike = np.where(judged, np.abs(error) / np.sqrt(np.maximum(spread_before, floor)), 0.0)
        volatility = np.where(judged, np.abs(np.log((short_var + floor) / (long_var_before + floor))), 0.0)
        short_mean, _ = ewm(self.short, "short_mean", x)
        shift = np.where(judged, np.abs(short_mean - level_before)
                         / np.sqrt(np.maximum(level_var_before, floor) * self.short_share), 0.0)
        features = [("g_spike", spike, 1.0), ("g_vol", volatility, 1.0), ("g_shift", shift, 1.0)]
        if self.drift and view == "plain":
            baseline, baseline_before = ewm(self.drift, "drift_level", x)
            _, drift_var_before = ewm(self.drift, "drift_var", (x - baseline_before) ** 2)
            drift_floor = (SCALE_FLOOR + RELATIVE_FLOOR * np.abs(baseline_before)) ** 2
            share = gap_share(self.long.alpha, self.drift.alpha, seen[self.long][0], seen[self.drift][0])
            wander = np.maximum(drift_var_before, drift_floor) * share
            features.append(("g_drift", np.where(judged, np.abs(level - baseline) / np.sqrt(wander), 0.0),
                             self.drift_weight))
        surprise = np.zeros_like(x)
        for name, feature, weight in features:
            g = np.log1p(feature)
            _, g_mean = ewm(self.calibration, name, g)
            _, g_var = ewm(self.calibration, name + "_var", (g - g_mean) ** 2)
            tail = (g - g_mean) / np.sqrt(np.maximum(g_var, SPREAD_FLOOR))
            # independent evidence adds up; only what is beyond a coin flip (p < 1/2) counts
            surprise += weight * np.maximum(-log_ndtr(-tail) - LN_2, 0.0)
        return surprise
