"""colo-tune's model and recommender on synthetic measurements (pure: no KVM)."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from scenarios.tune_model import Model, fit_model, recommend, toml_snippet


def synthetic(model: Model, thresholds, noise: float = 0.0, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    points = []
    for pages in thresholds:
        predicted = model.predict(pages)
        jitter = 1 + noise * rng.standard_normal()
        points.append({"dirty_pages": pages, "pause_us": predicted["pause_us"] * jitter,
                       "checkpoints_per_s": predicted["checkpoints_per_s"],
                       "raw_mb_per_s": predicted["raw_mb_per_s"],
                       "encoded_mb_per_s": predicted["encoded_mb_per_s"]})
    return points


def test_fit_recovers_known_parameters() -> None:
    truth = Model(fixed_us=150.0, per_page_us=0.6, dirty_rate=40000.0, compression=12.0)
    fitted = fit_model(synthetic(truth, [64, 256, 1024, 4032]))
    assert fitted.fixed_us == pytest.approx(150.0, rel=1e-6)
    assert fitted.per_page_us == pytest.approx(0.6, rel=1e-6)
    assert fitted.dirty_rate == pytest.approx(40000.0, rel=1e-6)
    assert fitted.compression == pytest.approx(12.0, rel=1e-6)


def test_fit_is_robust_to_noise() -> None:
    truth = Model(fixed_us=200.0, per_page_us=0.5, dirty_rate=30000.0, compression=5.0)
    fitted = fit_model(synthetic(truth, [64, 128, 256, 512, 1024, 2048, 4032] * 3, noise=0.02, seed=3))
    assert fitted.fixed_us == pytest.approx(200.0, rel=0.1)
    assert fitted.per_page_us == pytest.approx(0.5, rel=0.1)


def test_predictions_are_monotone_where_they_should_be() -> None:
    model = Model(fixed_us=150.0, per_page_us=0.6, dirty_rate=40000.0, compression=12.0)
    rows = [model.predict(d) for d in (64, 256, 1024, 4032, 16000)]
    assert all(a["pause_us"] < b["pause_us"] for a, b in zip(rows, rows[1:]))
    assert all(a["checkpoints_per_s"] > b["checkpoints_per_s"] for a, b in zip(rows, rows[1:]))
    assert all(a["overhead"] > b["overhead"] for a, b in zip(rows, rows[1:]))
    # a faster-dirtying guest checkpoints more often at the same threshold
    assert model.predict(256, dirty_rate=80000)["checkpoints_per_s"] > rows[1]["checkpoints_per_s"]


def test_fit_needs_distinct_settings() -> None:
    with pytest.raises(ValueError, match="at least two"):
        fit_model([{"dirty_pages": 1, "pause_us": 1, "checkpoints_per_s": 1, "raw_mb_per_s": 1,
                    "encoded_mb_per_s": 1}])


SETTINGS = [
    {"name": "ring 256", "output_latency_us_p99": 2000, "overhead": 0.30},
    {"name": "ring 1024", "output_latency_us_p99": 6000, "overhead": 0.12},
    {"name": "ring 4096", "output_latency_us_p99": 20000, "overhead": 0.05},
]


def test_recommender_picks_the_cheapest_setting_meeting_the_objective() -> None:
    best, why = recommend(SETTINGS, slo_latency_ms=10, max_overhead_pct=20)
    assert best["name"] == "ring 1024" and "meet both" in why
    best, _ = recommend(SETTINGS, slo_latency_ms=50, max_overhead_pct=20)
    assert best["name"] == "ring 4096"


def test_recommender_explains_when_nothing_fits() -> None:
    best, why = recommend(SETTINGS, slo_latency_ms=10, max_overhead_pct=5)
    assert best["name"] == "ring 1024" and "no setting meets both" in why
    best, why = recommend(SETTINGS, slo_latency_ms=1, max_overhead_pct=50)
    assert best["name"] == "ring 256" and "comes closest" in why
    assert recommend([], 1, 1) == (None, "nothing was measured")


def test_snippet_is_valid_toml_for_the_primary(tmp_path) -> None:
    from checkpointer.config import load_config
    snippet = toml_snippet({"ring_entries": 1024, "dirty_pages_trigger": 512, "max_interval_ms": 20.0})
    assert tomllib.loads(snippet)["triggers"]["dirty_pages"] == 512
    path = tmp_path / "tuned.toml"
    path.write_text(snippet)
    config = load_config("primary", str(path), {"primary.replica": "tcp://127.0.0.1:7800"})
    assert config.guest.ring_entries == 1024 and config.triggers.dirty_pages == 512
