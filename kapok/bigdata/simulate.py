"""The causal model behind the simulated big-data system, one chunk of enterprises at a time.

Each enterprise has a permanent quality, a repayment willingness and a latent health that evolves
monthly (AR(1) with rare distress jumps) under industry and city-wide shocks, including one sharp
downturn. Every observable is a noisy, lagged consequence of health, size and willingness; the
outcome of an application is drawn from a true probability that depends on health over the outcome
window and on the loan's burden. That probability is the oracle, written apart from the features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from features.raw_tables import PUBLICATION_DAY
from kapok import uscc
from kapok.bigdata.world import (
    DISTRICTS,
    INDUSTRIES,
    PRODUCTS,
    SIZE_CLASSES,
    SIZE_EMPLOYEES,
    SIZE_REVENUE,
    SIZE_SHARES,
)

BURN_IN = 24  # months of latent history simulated before the first exported month
FIRST_APPLICATION_MONTH = 6
UTC = "UTC"


@dataclass(frozen=True)
class SimulationConfig:
    enterprises: int
    months: int
    seed: int
    start: str = "2023-01"  # first exported month, YYYY-MM

    @property
    def first_month(self) -> np.datetime64:
        return np.datetime64(self.start, "M")

    @property
    def downturn_month(self) -> int:
        """Index of the month the city-wide downturn starts: inside recent outcome windows."""
        return max(1, round(self.months * 0.55))


@dataclass(frozen=True)
class Macro:
    """Shocks shared by all enterprises; depend on the seed and the calendar, not on N."""

    city: np.ndarray  # (BURN_IN + months,)
    industry: np.ndarray  # (n_industries, BURN_IN + months)


OUTCOME_WINDOW = {"microloan": 12, "insurance": 12}  # guarantee: the guarantee's term
APPLY_RATE = {"microloan": 0.016, "guarantee": 0.007, "insurance": 0.007}
TERMS = {"microloan": (3, 6, 12, 12, 12, 24), "guarantee": (6, 12, 12, 24), "insurance": (12,)}
AMOUNT = {  # requested amount as a share of annual revenue: (median, log-sd, min, max)
    "microloan": (0.10, 0.55, 2.0e4, 5.0e6),
    "guarantee": (0.22, 0.55, 1.0e5, 2.0e7),
    "insurance": (0.14, 0.55, 5.0e4, 5.0e6),
}
INTERCEPT = {"microloan": -3.75, "guarantee": -4.2, "insurance": -4.1}
RISK_SCALE = 0.7
ID_PREFIX = {"microloan": "ML", "guarantee": "GU", "insurance": "IN"}


def simulate_macro(config: SimulationConfig) -> Macro:
    rng = np.random.default_rng([config.seed, 7_000_001])
    length = BURN_IN + config.months
    city = np.zeros(length)
    for t in range(1, length):
        city[t] = 0.7 * city[t - 1] + 0.06 * rng.standard_normal()
    shape = np.array([0.35, 0.75, 1.0, 0.95, 0.8, 0.6, 0.4, 0.25, 0.12])
    start = BURN_IN + config.downturn_month
    end = min(length, start + len(shape))
    city[start:end] -= 1.6 * shape[: end - start]
    industry = np.zeros((len(INDUSTRIES), length))
    for t in range(1, length):
        industry[:, t] = 0.8 * industry[:, t - 1] + 0.10 * rng.standard_normal(len(INDUSTRIES))
    return Macro(city=city, industry=industry)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _days(months: np.ndarray) -> np.ndarray:
    return months.astype("datetime64[D]")


def _ts(days: np.ndarray) -> pl.Series:
    return pl.Series(days.astype("datetime64[us]")).dt.replace_time_zone(UTC)


class _Chunk:
    """All arrays of one chunk of enterprises; methods build one raw table each."""

    def __init__(self, config: SimulationConfig, macro: Macro, chunk: int, first: int, n: int):
        self.config, self.n, self.T = config, n, config.months
        self.global_index = np.arange(first, first + n)
        self.rng = np.random.default_rng([config.seed, chunk])
        rng, T = self.rng, self.T
        self.month = config.first_month + np.arange(T)  # datetime64[M]
        self.month_days = _days(self.month)

        # registration
        self.industry = rng.choice(len(INDUSTRIES), n, p=[i.weight for i in INDUSTRIES])
        self.district = rng.choice(len(DISTRICTS), n, p=[d.weight for d in DISTRICTS])
        self.size = rng.choice(3, n, p=SIZE_SHARES)
        young = rng.random(n) < 0.15
        founded_in_window = rng.integers(0, max(1, T - 6), n)
        age_at_start = np.minimum(6 + rng.exponential(84, n), 360).astype(int)
        self.found_t = np.where(young, founded_in_window, -age_at_start)  # month index
        self.found_date = _days(config.first_month + self.found_t) + rng.integers(0, 28, n)
        ind_risk = np.array([i.base_risk for i in INDUSTRIES])[self.industry]
        dist_risk = np.array([d.base_risk for d in DISTRICTS])[self.district]
        youth = np.clip(1 - (np.maximum(0, -self.found_t) / 36), 0, 1)  # 1 = founded recently
        self.quality = 0.75 * rng.standard_normal(n) + ind_risk + dist_risk - 0.35 * youth
        self.willingness = 0.45 * self.quality + 0.9 * rng.standard_normal(n)
        self.revenue_scale = (
            np.array(SIZE_REVENUE)[self.size]
            * np.exp(0.6 * rng.standard_normal(n) + 0.15 * self.quality)
            / 12
        )
        self.employees = np.array(SIZE_EMPLOYEES)[self.size] * np.exp(0.4 * rng.standard_normal(n))
        capital = self.revenue_scale * 12 * np.exp(rng.normal(-0.7, 0.8, n))
        self.capital = np.maximum(1e4, np.round(capital / 1e4) * 1e4)
        ids = uscc.generate(
            np.arange(first, first + n),
            np.array([d.code for d in DISTRICTS])[self.district],
            np.full(n, "1"),
            config.seed,
        )
        self.ids = pl.Series("enterprise_id", ids, dtype=pl.String)

        # latent health over burn-in + exported months
        length = BURN_IN + T
        x = np.zeros((n, length))
        x[:, 0] = 0.6 * rng.standard_normal(n)
        shocks = rng.standard_normal((n, length))
        jumps = rng.random((n, length)) < 0.004
        for t in range(1, length):
            x[:, t] = 0.85 * x[:, t - 1] + 0.32 * shocks[:, t] - 1.3 * jumps[:, t]
        beta = np.array([i.macro_beta for i in INDUSTRIES])[self.industry]
        h = (
            self.quality[:, None]
            + x
            + beta[:, None] * macro.city[None, :]
            + macro.industry[self.industry]
        )
        self.h_full = h
        self.h = h[:, BURN_IN:]  # (n, T) exported months
        t_idx = np.arange(T)[None, :]
        self.alive = t_idx >= self.found_t[:, None]
        season = np.sin(2 * np.pi * (self.month.astype(int) % 12 - 2) / 12)
        self.season = season[None, :]
        self.revenue = self.revenue_scale[:, None] * np.exp(
            # distressed firms have more erratic sales
            0.30 * self.h
            + 0.06 * self.season
            + (0.25 + 0.12 * np.maximum(0, -self.h)) * rng.standard_normal((n, T))
        )

    # -- helpers -------------------------------------------------------------------------------
    def _long(
        self,
        mask: np.ndarray,
        columns: dict[str, np.ndarray],
        publish_day: int | None,
        late_months: np.ndarray | None = None,
    ) -> pl.DataFrame:
        """Flatten (n, T) arrays where mask holds into a long table with month and available_at."""
        rows, months = np.nonzero(mask)
        frame = {
            "enterprise_id": self.ids.gather(rows),
            "month": pl.Series(self.month_days[months]),
        }
        for name, values in columns.items():
            frame[name] = values[rows, months]
        if publish_day is not None:
            lag = 1 if late_months is None else 1 + late_months[rows, months]
            available = _days(self.month[months] + lag) + (publish_day - 1)
            frame["available_at"] = _ts(available)
        return pl.DataFrame(frame)

    # -- tables --------------------------------------------------------------------------------
    def registration(self) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "enterprise_id": self.ids,
                "industry": np.array([i.code for i in INDUSTRIES])[self.industry],
                "district": np.array([d.name for d in DISTRICTS])[self.district],
                "founded_on": pl.Series(self.found_date),
                "registered_capital": self.capital,
                "size_class": np.array(SIZE_CLASSES)[self.size],
                # registration data is public at founding; available from the founding date
                "available_at": _ts(self.found_date),
            }
        )

    def registration_events(self) -> pl.DataFrame:
        """Legal-representative changes and abnormal-operations listings / removals."""
        rng, n, T = self.rng, self.n, self.T
        p_change = 0.004 + 0.012 * (self.h < -1.0)
        change = (rng.random((n, T)) < p_change) & self.alive
        listed = np.zeros(n, dtype=bool)
        listing = np.zeros((n, T), dtype=bool)
        removal = np.zeros((n, T), dtype=bool)
        p_list = _sigmoid(-6.3 - 0.9 * self.h - 0.6 * self.willingness[:, None])
        draws = rng.random((n, T))
        for t in range(T):
            new = ~listed & (draws[:, t] < p_list[:, t]) & self.alive[:, t]
            out = listed & (draws[:, t] > 0.92)
            listing[:, t], removal[:, t] = new, out
            listed = (listed | new) & ~out
        parts = []
        for kind, mask in (
            ("legal_rep_change", change),
            ("abnormal_ops_listed", listing),
            ("abnormal_ops_removed", removal),
        ):
            rows, months = np.nonzero(mask)
            day = _days(self.month[months]) + rng.integers(0, 28, len(rows))
            parts.append(
                pl.DataFrame(
                    {
                        "enterprise_id": self.ids.gather(rows),
                        "event_type": np.full(len(rows), kind),
                        "event_date": pl.Series(day),
                        "available_at": _ts(day + rng.integers(1, 15, len(rows))),
                    }
                )
            )
        return pl.concat(parts).sort("enterprise_id", "event_date", "event_type")

    def tax(self) -> pl.DataFrame:
        rng, n, T = self.rng, self.n, self.T
        w = self.willingness[:, None]
        underreport = np.clip(
            0.93 + 0.05 * self.willingness + 0.04 * rng.standard_normal(n), 0.55, 1.0
        )[:, None]
        declared = self.revenue * underreport
        vat_rate = rng.uniform(0.012, 0.035, n)[:, None]
        margin = 0.05 + 0.04 * self.h + 0.02 * rng.standard_normal((n, T))
        vat = declared * vat_rate
        income_tax = np.maximum(margin, 0) * declared * 0.05
        p_overdue = _sigmoid(-5.0 - 1.5 * self.h - 0.7 * w)
        overdue = np.where(
            rng.random((n, T)) < p_overdue, (vat + income_tax) * rng.uniform(0.5, 3, (n, T)), 0
        )
        vat_paid = np.maximum(0, vat - overdue * 0.7)
        income_paid = np.maximum(0, income_tax - overdue * 0.3)
        p_late = _sigmoid(-3.6 - 0.7 * w - 0.4 * self.h)
        late = (rng.random((n, T)) < p_late) * rng.integers(1, 3, (n, T))
        filed = self.alive & (rng.random((n, T)) > _sigmoid(-5.5 - 0.6 * w - 0.5 * self.h))
        return self._long(
            filed,
            {
                "declared_sales": np.round(declared, 2),
                "vat_paid": np.round(vat_paid, 2),
                "income_tax_paid": np.round(income_paid, 2),
                "overdue_tax": np.round(overdue, 2),
                "filed_late": late > 0,
            },
            PUBLICATION_DAY["tax"],
            late,
        )

    def tax_credit_rating(self) -> pl.DataFrame:
        """Yearly rating for year y, published on 30 April of y+1, for every year ending in data."""
        rng, n = self.rng, self.n
        first_year = int(str(self.config.first_month)[:4])
        rows = []
        for offset in range(-1, self.T // 12 + 1):
            year = first_year + offset
            lo = BURN_IN + offset * 12
            hi = lo + 12
            if lo < 0 or hi > self.h_full.shape[1]:
                continue
            score = (
                self.h_full[:, lo:hi].mean(axis=1)
                + 0.6 * self.willingness
                + 0.9 * rng.standard_normal(n)
            )
            rating = np.select(
                [score > 0.9, score > -0.5, score > -1.4], ["A", "B", "C"], default="D"
            )
            year_end_t = (offset + 1) * 12 - 1  # month index of December of `year`
            rating = np.where(self.found_t > year_end_t - 12, "M", rating)
            exists = self.found_t <= year_end_t
            idx = np.nonzero(exists)[0]
            published = np.datetime64(f"{year + 1}-04-30")
            rows.append(
                pl.DataFrame(
                    {
                        "enterprise_id": self.ids.gather(idx),
                        "rating_year": np.full(len(idx), year, dtype=np.int16),
                        "rating": rating[idx],
                        "available_at": _ts(np.full(len(idx), published)),
                    }
                )
            )
        frame = pl.concat(rows)
        last_available = _days(self.month[-1] + 1)
        return frame.filter(pl.col("available_at") <= _ts(np.array([last_available]))[0])

    def electricity(self) -> pl.DataFrame:
        rng, n, T = self.rng, self.n, self.T
        meter = rng.random(n) < np.array([i.meter_share for i in INDUSTRIES])[self.industry]
        intensity = np.array([i.energy_intensity for i in INDUSTRIES])[self.industry]
        summer = np.array([i.summer_power for i in INDUSTRIES])[self.industry]
        base = self.revenue_scale * intensity * np.exp(0.3 * rng.standard_normal(n))
        summer_curve = np.cos(2 * np.pi * (self.month.astype(int) % 12 - 6) / 12)[None, :]
        kwh = base[:, None] * np.exp(
            0.25 * self.h + summer[:, None] * summer_curve + 0.12 * rng.standard_normal((n, T))
        )
        mask = self.alive & meter[:, None] & (rng.random((n, T)) > 0.01)
        return self._long(mask, {"kwh": np.round(kwh, 1)}, PUBLICATION_DAY["electricity"])

    def social_insurance(self) -> pl.DataFrame:
        rng, n, T = self.rng, self.n, self.T
        lagged = self.h_full[:, BURN_IN - 3 : BURN_IN - 3 + T]
        heads = self.employees[:, None] * np.exp(0.15 * lagged + 0.05 * rng.standard_normal((n, T)))
        covered = rng.random(n) < 0.9
        mask = self.alive & covered[:, None]
        return self._long(
            mask,
            {"insured_headcount": np.maximum(0, np.round(heads)).astype(np.int32)},
            PUBLICATION_DAY["social_insurance"],
        )

    def payments(self) -> pl.DataFrame:
        rng, n, T = self.rng, self.n, self.T
        inflow = self.revenue * np.exp(0.05 + 0.12 * rng.standard_normal((n, T)))
        outflow = inflow * np.clip(
            0.95 - 0.04 * self.h + 0.12 * rng.standard_normal((n, T)), 0.5, 1.6
        )
        base_cp = np.array([4.0, 15.0, 50.0])[self.size] * np.exp(0.3 * rng.standard_normal(n))
        counterparties = rng.poisson(base_cp[:, None] * np.exp(0.15 * self.h))
        base_share = rng.normal(-0.5, 0.6, n)[:, None]
        top_share = _sigmoid(base_share - 0.35 * self.h + 0.3 * rng.standard_normal((n, T)))
        on_network = rng.random(n) < 0.88
        mask = self.alive & on_network[:, None]
        return self._long(
            mask,
            {
                "inflow": np.round(inflow, 2),
                "outflow": np.round(outflow, 2),
                "counterparties": counterparties.astype(np.int32),
                "top_counterparty_share": np.round(top_share, 4),
            },
            PUBLICATION_DAY["payments"],
        )

    def receivables_payables(self) -> pl.DataFrame:
        rng, n, T = self.rng, self.n, self.T
        dso = np.array([i.dso_days for i in INDUSTRIES])[self.industry] * np.exp(
            0.3 * rng.standard_normal(n)
        )
        dso_t = dso[:, None] * np.exp(-0.15 * self.h + 0.1 * rng.standard_normal((n, T)))
        receivables = self.revenue * dso_t / 30
        overdue_share = _sigmoid(-2.2 - 0.55 * self.h + 0.9 * rng.standard_normal((n, T)))
        dpo = (
            45
            * np.exp(0.3 * rng.standard_normal(n))[:, None]
            * np.exp(-0.22 * self.h + 0.1 * rng.standard_normal((n, T)))
        )
        payables = self.revenue * 0.7 * dpo / 30
        reports = rng.random(n) < 0.75
        mask = self.alive & reports[:, None]
        return self._long(
            mask,
            {
                "receivables": np.round(receivables, 2),
                "overdue_receivables": np.round(receivables * overdue_share, 2),
                "payables": np.round(payables, 2),
                "days_payable": np.round(dpo, 1),
            },
            PUBLICATION_DAY["receivables_payables"],
        )

    def judicial_events(self) -> pl.DataFrame:
        """Lawsuits as defendant, court enforcement, dishonest-debtor listing, penalties."""
        rng, n, T = self.rng, self.n, self.T
        h, w = self.h, self.willingness[:, None]
        lawsuit = rng.random((n, T)) < _sigmoid(-5.4 - 0.8 * h - 0.45 * w)
        enforcement = (rng.random((n, T)) < _sigmoid(-6.4 - 1.0 * h - 0.8 * w)) & self.alive
        recent_enf = np.zeros(n)
        dishonest = np.zeros((n, T), dtype=bool)
        draws = rng.random((n, T))
        for t in range(T):
            recent_enf = 0.92 * recent_enf + enforcement[:, t]
            p = _sigmoid(-8.0 - 1.0 * h[:, t] - 1.1 * w[:, 0] + 2.5 * (recent_enf > 0.3))
            dishonest[:, t] = draws[:, t] < p
        penalty = rng.random((n, T)) < _sigmoid(-5.2 - 0.3 * h - 0.6 * w)
        lags = {
            "lawsuit": (15, 60),
            "enforcement": (7, 30),
            "dishonest_debtor": (3, 20),
            "admin_penalty": (10, 40),
        }
        parts = []
        for kind, mask in (
            ("lawsuit", lawsuit),
            ("enforcement", enforcement),
            ("dishonest_debtor", dishonest),
            ("admin_penalty", penalty),
        ):
            mask = mask & self.alive
            rows, months = np.nonzero(mask)
            day = _days(self.month[months]) + rng.integers(0, 28, len(rows))
            lo, hi = lags[kind]
            amount = (
                self.revenue_scale[rows]
                * rng.lognormal(0, 0.8, len(rows))
                * (0.05 if kind == "admin_penalty" else 0.8)
            )
            parts.append(
                pl.DataFrame(
                    {
                        "enterprise_id": self.ids.gather(rows),
                        "event_type": np.full(len(rows), kind),
                        "event_date": pl.Series(day),
                        "amount": np.round(amount, 2),
                        "available_at": _ts(day + rng.integers(lo, hi, len(rows))),
                    }
                )
            )
        return pl.concat(parts).sort("enterprise_id", "event_date", "event_type")

    def credit_history(self) -> pl.DataFrame:
        """Monthly reports of banks, microloan companies and guarantee firms, one row per type."""
        rng, n, T = self.rng, self.n, self.T
        h, w = self.h, self.willingness[:, None]
        size_term = np.array([0.0, 0.8, 1.5])[self.size]
        has = {
            "bank": rng.random(n) < _sigmoid(-0.4 + size_term + 0.5 * self.quality),
            "microloan": rng.random(n) < _sigmoid(-1.6 - 0.5 * self.quality),
            "guarantee": rng.random(n) < _sigmoid(-2.2 + 0.3 * size_term),
        }
        start = self.found_t + rng.integers(3, 24, n)
        parts = []
        for reporter, has_it in has.items():
            share = {"bank": 0.35, "microloan": 0.10, "guarantee": 0.25}[reporter]
            level = self.revenue_scale * 12 * share * np.exp(0.4 * rng.standard_normal(n))
            balance = level[:, None] * np.exp(-0.1 * h + 0.08 * rng.standard_normal((n, T)))
            loans = np.maximum(1, rng.poisson(0.6, n) + 1)[:, None] * np.ones((1, T), dtype=int)
            dpd30 = rng.random((n, T)) < _sigmoid(-4.3 - 1.2 * h - 0.6 * w)
            dpd90 = dpd30 & (rng.random((n, T)) < _sigmoid(-1.6 - 0.8 * h - 0.5 * w))
            comp = (rng.random((n, T)) < _sigmoid(-7.2 - 1.4 * h)) & (reporter == "guarantee")
            mask = self.alive & has_it[:, None] & (np.arange(T)[None, :] >= start[:, None])
            frame = self._long(
                mask,
                {
                    "loans": loans.astype(np.int16),
                    "balance": np.round(balance, 2),
                    "dpd30": dpd30,
                    "dpd90": dpd90,
                    "guarantee_compensations": comp.astype(np.int16),
                },
                PUBLICATION_DAY["credit_history"],
            )
            parts.append(frame.with_columns(reporter_type=pl.lit(reporter)))
        return (
            pl.concat(parts)
            .select(
                "enterprise_id",
                "month",
                "reporter_type",
                "loans",
                "balance",
                "dpd30",
                "dpd90",
                "guarantee_compensations",
                "available_at",
            )
            .sort("enterprise_id", "month", "reporter_type")
        )

    def applications(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Applications for the three products, their outcomes (null until matured), the oracle."""
        rng, n, T = self.rng, self.n, self.T
        h_future = self.h_full[:, BURN_IN:]
        apps, oracle = [], []
        for product in PRODUCTS:
            rate = APPLY_RATE[product] * np.exp(-0.25 * self.h)  # weaker firms ask more often
            eligible = np.arange(T)[None, :] >= np.maximum(
                FIRST_APPLICATION_MONTH, self.found_t[:, None] + 3
            )
            rows, months = np.nonzero((rng.random((n, T)) < rate) & eligible)
            k = len(rows)
            terms = np.array(TERMS[product])[rng.integers(0, len(TERMS[product]), k)]
            window = terms if product == "guarantee" else np.full(k, OUTCOME_WINDOW[product])
            median, sd, lo, hi = AMOUNT[product]
            annual = self.revenue_scale[rows] * 12
            amount = np.clip(annual * median * rng.lognormal(0, sd, k), lo, hi)
            amount = np.round(amount / 1e4) * 1e4
            # health over the outcome window: the part no model can see at application time
            offsets = np.arange(1, 37)[None, :]
            idx = months[:, None] + offsets
            inside = offsets <= window[:, None]
            padded = np.concatenate([h_future, np.repeat(h_future[:, -1:], 37, axis=1)], axis=1)
            path = padded[rows[:, None], idx]
            mean_h = (path * inside).sum(axis=1) / inside.sum(axis=1)
            min_h = np.where(inside, path, np.inf).min(axis=1)
            # the firm's real revenue over the months it existed in the last year
            back = months[:, None] - np.arange(12)[None, :]
            trailing = self.revenue[rows[:, None], np.clip(back, 0, None)]
            existed = (back >= 0) & (back >= self.found_t[rows, None])
            annual = (trailing * existed).sum(axis=1) / np.maximum(existed.sum(axis=1), 1) * 12
            burden = amount / np.maximum(annual, 1.0)
            # convex in health, with burden and willingness mattering more for weak firms: a
            # scorecard that adds up one feature at a time cannot represent this exactly
            weak = np.maximum(0, -mean_h - 0.4)
            logit = INTERCEPT[product] + RISK_SCALE * (
                -0.45 * mean_h
                + 0.9 * weak
                + 0.55 * np.maximum(0, -min_h - 1.2)
                + (0.15 + 0.5 * _sigmoid(-2 * mean_h)) * np.log(burden / AMOUNT[product][0])
                - 0.3 * self.willingness[rows] * (1 + weak)
                + 0.3 * (window / 12 - 1)
            )
            pd_true = _sigmoid(logit)
            outcome = rng.random(k) < pd_true
            matured = months + window <= T - 1
            applied = _days(self.month[months]) + rng.integers(0, 28, k)
            app_id = [
                f"{ID_PREFIX[product]}{first:0>9}{t:03d}"
                for first, t in zip(self.global_index[rows].tolist(), months.tolist(), strict=True)
            ]
            apps.append(
                pl.DataFrame(
                    {
                        "application_id": app_id,
                        "enterprise_id": self.ids.gather(rows),
                        "product": np.full(k, product),
                        "applied_at": _ts(applied),
                        "requested_amount": amount,
                        "term_months": terms.astype(np.int16),
                        "outcome_window_months": window.astype(np.int16),
                        "outcome_known_at": _ts(_days(self.month[months] + window + 1)),
                        "outcome": pl.Series(np.where(matured, outcome, False)).cast(pl.Int8),
                        "matured": matured,
                    }
                ).with_columns(
                    outcome=pl.when(pl.col("matured")).then(pl.col("outcome")).otherwise(None)
                )
            )
            oracle.append(
                pl.DataFrame(
                    {"application_id": app_id, "product": np.full(k, product), "pd_true": pd_true}
                )
            )
        return (
            pl.concat(apps).sort("applied_at", "application_id"),
            pl.concat(oracle).sort("application_id"),
        )


def simulate_chunk(
    config: SimulationConfig, macro: Macro, chunk: int, first: int, n: int
) -> dict[str, pl.DataFrame]:
    """All raw tables for enterprises first .. first + n - 1. The order of calls fixes the RNG."""
    return simulate_chunk_with_state(config, macro, chunk, first, n)[0]


def simulate_chunk_with_state(
    config: SimulationConfig, macro: Macro, chunk: int, first: int, n: int
) -> tuple[dict[str, pl.DataFrame], _Chunk]:
    """simulate_chunk, plus the chunk's latent state (health, quality, willingness) for benches
    that ask what a model seeing the truth at application time could do."""
    sim = _Chunk(config, macro, chunk, first, n)
    tables = {
        "registration": sim.registration(),
        "registration_events": sim.registration_events(),
        "tax": sim.tax(),
        "tax_credit_rating": sim.tax_credit_rating(),
        "electricity": sim.electricity(),
        "social_insurance": sim.social_insurance(),
        "payments": sim.payments(),
        "receivables_payables": sim.receivables_payables(),
        "judicial_events": sim.judicial_events(),
        "credit_history": sim.credit_history(),
    }
    tables["applications"], tables["oracle"] = sim.applications()
    return tables, sim
