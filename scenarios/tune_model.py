"""The trade-off model behind colo-tune, and its recommender (pure functions: no KVM, no agents).

Assumptions, stated once:
- The pause of a checkpoint is a fixed cost (kick, vCPU state, resume) plus a cost per dirty page
  (harvest, reset, gather): pause = fixed_us + per_page_us * dirty_pages. With the dirty ring this
  does not depend on the guest's memory size (the bitmap's cost would), so predictions for larger
  guests keep these two parameters.
- The per-page cost is fitted only when the measured epochs differ in size by at least MIN_SPREAD.
  Otherwise (the service: its replies close every epoch at about the same few pages, whatever the
  threshold) the model assumes a stated prior, PRIOR_PER_PAGE_US unless the caller gives another,
  and says so (`per_page_source` "prior" and a `note`). The prior: gathering a 4 KiB page with
  np.take costs about 0.55 us here (4096 pages in 2.2 ms, ../shared/KVM-NOTES.md) and harvesting
  and resetting its ring entry a little more; the hotcold sweep fitted 0.57 us.
- The guest dirties new pages at a steady rate R (pages/s) while it runs. An epoch closed at
  threshold d then lasts d / R seconds of guest time, so checkpoints/s = R / (d + R * pause).
- The share of time the guest is paused (the overhead the agent causes, apart from the machine's own
  first-write faults) is rate * pause; the raw bandwidth is R * 4096 bytes/s, the encoded one that
  divided by the compression ratio measured.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import numpy as np

PAGE = 4096
MIN_SPREAD = 2.0            # largest / smallest measured dirty pages per epoch needed to fit a slope
PRIOR_PER_PAGE_US = 0.6     # the per-page cost assumed when it cannot be fitted (see above)


class CostSource(enum.StrEnum):
    """Where the model's per-page cost comes from."""

    FIT = "fit"             # fitted by least squares from the sweep
    PRIOR = "prior"         # not measurable from the sweep: the stated prior


@dataclass(frozen=True)
class Model:
    fixed_us: float          # per checkpoint
    per_page_us: float       # per dirty page
    dirty_rate: float        # pages per second the guest dirties
    compression: float       # raw / encoded bytes
    per_page_source: CostSource = CostSource.FIT
    note: str = ""           # why the per-page cost is not fitted (empty when it is)

    def pause_us(self, dirty_pages: float) -> float:
        return self.fixed_us + self.per_page_us * dirty_pages

    def predict(self, dirty_pages: float, dirty_rate: float | None = None) -> dict:
        """Pause, rate, overhead and bandwidth at a threshold (and optionally another dirty rate)."""
        rate_pages = self.dirty_rate if dirty_rate is None else dirty_rate
        pause_s = self.pause_us(dirty_pages) / 1e6
        epoch_s = dirty_pages / rate_pages if rate_pages > 0 else float("inf")
        checkpoints = 1.0 / (epoch_s + pause_s) if epoch_s != float("inf") else 0.0
        raw = rate_pages * PAGE * (epoch_s / (epoch_s + pause_s)) if rate_pages > 0 else 0.0
        return {"dirty_pages": dirty_pages, "pause_us": self.pause_us(dirty_pages),
                "checkpoints_per_s": checkpoints, "overhead": checkpoints * pause_s,
                "raw_mb_per_s": raw / 1e6, "encoded_mb_per_s": raw / self.compression / 1e6,
                "per_page_source": self.per_page_source}


def fit_model(points: list[dict], prior_per_page_us: float = PRIOR_PER_PAGE_US) -> Model:
    """Least-squares fit from measured settings, each with dirty_pages, pause_us, checkpoints_per_s,
    raw_mb_per_s and encoded_mb_per_s.

    The per-page cost can only be fitted from settings whose epochs differ in size. The service's
    epochs all hold about the same few pages (its replies close them, whatever the threshold), so
    when the largest measured epoch is less than MIN_SPREAD times the smallest, or the fit gives a
    cost that is not above zero (noise larger than the effect), the model takes `prior_per_page_us`
    instead, fixes the fixed cost from the mean pause, and says so in `note`. Raises ValueError only
    when nothing was measured at all.
    """
    if not points:
        raise ValueError("no measured setting had checkpoints with dirty pages: there is nothing to "
                         "fit the model to")
    pages = np.array([p["dirty_pages"] for p in points], dtype=float)
    pauses = np.array([p["pause_us"] for p in points], dtype=float)
    # guest time per epoch = 1/rate - pause; dirty rate = pages / guest time (median over settings)
    rates = np.array([p["checkpoints_per_s"] for p in points], dtype=float)
    guest_s = 1.0 / rates - pauses / 1e6
    dirty_rate = float(np.median(pages / np.maximum(guest_s, 1e-9)))
    raw = np.array([p["raw_mb_per_s"] for p in points], dtype=float)
    encoded = np.array([p["encoded_mb_per_s"] for p in points], dtype=float)
    compression = float(raw.sum() / encoded.sum()) if encoded.sum() > 0 else 1.0
    smallest, largest = float(pages.min()), float(pages.max())
    if len(points) < 2 or largest < MIN_SPREAD * smallest:
        why = (f"every measured setting held {smallest:.0f} to {largest:.0f} dirty pages per epoch "
               f"(less than a factor {MIN_SPREAD:g} apart)")
    else:
        design = np.column_stack([np.ones_like(pages), pages])
        (fixed, per_page), *_ = np.linalg.lstsq(design, pauses, rcond=None)
        if per_page > 0:
            return Model(float(fixed), float(per_page), dirty_rate, compression)
        why = f"the fit gave {per_page:.3g} us per page, not above zero (noise larger than the effect)"
    fixed = max(0.0, float(pauses.mean() - prior_per_page_us * pages.mean()))
    return Model(fixed, prior_per_page_us, dirty_rate, compression, CostSource.PRIOR,
                 f"the per-page cost was not fitted: {why}; predictions assume {prior_per_page_us:g} us "
                 f"per page and a fixed cost of {fixed:.0f} us (the mean pause measured, less that)")


def points_from_settings(settings: list[dict]) -> list[dict]:
    """The sweep's settings as the model's points (those that checkpointed pages at all)."""
    return [{"dirty_pages": s["dirty_pages"], "pause_us": s["pause_us_p50"],
             "checkpoints_per_s": s["checkpoints_per_s"], "raw_mb_per_s": s["raw_mb_per_s"],
             "encoded_mb_per_s": s["encoded_mb_per_s"]} for s in settings
            if s["checkpoints_per_s"] > 0 and s["dirty_pages"] > 0]


def parse_predict(spec: str) -> tuple[list[float], float | None]:
    """`PAGES[,PAGES...][@RATE]` as (dirty-page counts, dirty rate or None); ValueError naming the flaw."""
    pages_part, at, rate_part = spec.partition("@")
    try:
        pages = [float(p) for p in pages_part.split(",")]
        rate = float(rate_part) if at else None
    except ValueError:
        raise ValueError(f"{spec!r}: expected PAGES[,PAGES...][@RATE], numbers") from None
    if any(p <= 0 for p in pages) or (rate is not None and rate <= 0):
        raise ValueError(f"{spec!r}: dirty pages and the dirty rate must be above zero")
    return pages, rate


def model_report(settings: list[dict], predict: tuple[list[float], float | None] | None,
                 prior_per_page_us: float = PRIOR_PER_PAGE_US) -> dict:
    """The report's `model` and, when asked for, `predictions` (a list, empty only with a model error).

    `model` is the fitted Model's fields, or {"error": cause} when nothing could be fitted.
    """
    report: dict = {}
    try:
        model = fit_model(points_from_settings(settings), prior_per_page_us)
    except ValueError as exc:
        report["model"] = {"error": str(exc)}
        if predict is not None:
            report["predictions"] = []
        return report
    report["model"] = dataclasses.asdict(model)
    if predict is not None:
        pages, rate = predict
        report["predictions"] = [model.predict(p, rate) for p in pages]
    return report


def recommend(settings: list[dict], slo_latency_ms: float, max_overhead_pct: float) -> tuple[dict | None, str]:
    """The setting that meets the output-latency objective with the least overhead, and why.

    Each setting has at least `name`, `output_latency_us_p99` and `overhead` (a fraction of time).
    """
    if not settings:
        return None, "nothing was measured"
    meets = [s for s in settings if s["output_latency_us_p99"] <= slo_latency_ms * 1000]
    within = [s for s in meets if s["overhead"] * 100 <= max_overhead_pct]
    if within:
        best = min(within, key=lambda s: (s["overhead"], s["output_latency_us_p99"]))
        return best, (f"{best['name']} keeps the output latency p99 at "
                      f"{best['output_latency_us_p99'] / 1000:.1f} ms (objective {slo_latency_ms} ms) with "
                      f"the least overhead of the {len(within)} settings that meet both objectives "
                      f"({best['overhead'] * 100:.1f}% of the time paused, limit {max_overhead_pct}%).")
    if meets:
        best = min(meets, key=lambda s: s["overhead"])
        return best, (f"no setting meets both objectives: {best['name']} meets the latency objective "
                      f"({best['output_latency_us_p99'] / 1000:.1f} ms p99) with the least overhead, "
                      f"{best['overhead'] * 100:.1f}%, above the {max_overhead_pct}% allowed.")
    best = min(settings, key=lambda s: s["output_latency_us_p99"])
    return best, (f"no setting meets the {slo_latency_ms} ms latency objective; {best['name']} comes "
                  f"closest ({best['output_latency_us_p99'] / 1000:.1f} ms p99).")


def toml_snippet(setting: dict) -> str:
    """What to paste into the primary's TOML for a recommended setting."""
    lines = ["[guest]", f"ring_entries = {setting['ring_entries']}", "", "[triggers]",
             f"dirty_pages = {setting.get('dirty_pages_trigger', 0)}",
             f"max_interval_ms = {setting.get('max_interval_ms', 0.0)}",
             f"output_delay_ms = {setting.get('output_delay_ms', 1.0)}"]
    return "\n".join(lines) + "\n"
