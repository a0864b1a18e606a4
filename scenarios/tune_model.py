"""The trade-off model behind colo-tune, and its recommender (pure functions: no KVM, no agents).

Assumptions, stated once:
- The pause of a checkpoint is a fixed cost (kick, vCPU state, resume) plus a cost per dirty page
  (harvest, reset, gather): pause = fixed_us + per_page_us * dirty_pages. With the dirty ring this
  does not depend on the guest's memory size (the bitmap's cost would), so predictions for larger
  guests keep these two parameters.
- The guest dirties new pages at a steady rate R (pages/s) while it runs. An epoch closed at
  threshold d then lasts d / R seconds of guest time, so checkpoints/s = R / (d + R * pause).
- The share of time the guest is paused (the overhead the agent causes, apart from the machine's own
  first-write faults) is rate * pause; the raw bandwidth is R * 4096 bytes/s, the encoded one that
  divided by the compression ratio measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAGE = 4096


@dataclass(frozen=True)
class Model:
    fixed_us: float          # per checkpoint
    per_page_us: float       # per dirty page
    dirty_rate: float        # pages per second the guest dirties
    compression: float       # raw / encoded bytes

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
                "raw_mb_per_s": raw / 1e6, "encoded_mb_per_s": raw / self.compression / 1e6}


def fit_model(points: list[dict]) -> Model:
    """Least-squares fit from measured settings, each with dirty_pages, pause_us, checkpoints_per_s,
    raw_mb_per_s and encoded_mb_per_s."""
    if len(points) < 2:
        raise ValueError("fitting the model needs at least two measured settings")
    pages = np.array([p["dirty_pages"] for p in points], dtype=float)
    pauses = np.array([p["pause_us"] for p in points], dtype=float)
    if np.ptp(pages) == 0:
        raise ValueError("fitting the model needs settings with different dirty-page counts")
    design = np.column_stack([np.ones_like(pages), pages])
    (fixed, per_page), *_ = np.linalg.lstsq(design, pauses, rcond=None)
    # guest time per epoch = 1/rate - pause; dirty rate = pages / guest time (median over settings)
    rates = np.array([p["checkpoints_per_s"] for p in points], dtype=float)
    guest_s = 1.0 / rates - pauses / 1e6
    dirty_rate = float(np.median(pages / np.maximum(guest_s, 1e-9)))
    raw = np.array([p["raw_mb_per_s"] for p in points], dtype=float)
    encoded = np.array([p["encoded_mb_per_s"] for p in points], dtype=float)
    compression = float(raw.sum() / encoded.sum()) if encoded.sum() > 0 else 1.0
    return Model(float(fixed), float(per_page), dirty_rate, compression)


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
