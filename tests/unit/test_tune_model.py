"""colo-tune's model and recommender on synthetic measurements (pure: no KVM)."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest

from scenarios.tune_model import (MIN_SPREAD, PRIOR_PER_PAGE_US, CostSource, Model, fit_model, model_report,
                                  parse_predict, recommend, toml_snippet)


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


def test_fit_recovers_the_per_page_cost_and_says_it_was_fitted() -> None:
    truth = Model(fixed_us=150.0, per_page_us=0.6, dirty_rate=40000.0, compression=12.0)
    fitted = fit_model(synthetic(truth, [64, 64 * MIN_SPREAD]))
    assert fitted.per_page_source == CostSource.FIT and fitted.note == ""
    assert fitted.per_page_us == pytest.approx(0.6, rel=1e-6)


def service_like(pages: list[float], pause_us: float = 800.0) -> list[dict]:
    """Settings as the service sweep measures them: every epoch about the same size, whatever the knob."""
    truth = Model(fixed_us=pause_us, per_page_us=0.0, dirty_rate=5000.0, compression=100.0)
    return synthetic(truth, pages)


@pytest.mark.parametrize("pages", [[26.0] * 9, [26.0] * 6 + [16.0], [26.0]],
                         ids=["no spread", "a spread below the factor", "one setting"])
def test_without_spread_in_pages_the_model_takes_the_prior_and_says_why(pages) -> None:
    fitted = fit_model(service_like(pages))
    assert fitted.per_page_source == CostSource.PRIOR
    assert fitted.per_page_us == PRIOR_PER_PAGE_US
    assert f"{min(pages):.0f} to {max(pages):.0f} dirty pages" in fitted.note
    assert f"{PRIOR_PER_PAGE_US:g} us per page" in fitted.note
    # the fixed cost keeps the mean measured pause at the mean measured size
    mean_pages = float(np.mean(pages))
    assert fitted.pause_us(mean_pages) == pytest.approx(800.0)
    # what could be fitted still is
    assert fitted.dirty_rate == pytest.approx(5000.0, rel=1e-6)
    assert fitted.compression == pytest.approx(100.0, rel=1e-6)


def test_a_stated_prior_is_used_and_predictions_grow_with_it() -> None:
    fitted = fit_model(service_like([26.0] * 4), prior_per_page_us=2.0)
    assert fitted.per_page_us == 2.0 and "2 us per page" in fitted.note
    small, large = fitted.predict(128), fitted.predict(512)
    assert large["pause_us"] - small["pause_us"] == pytest.approx(2.0 * (512 - 128))
    assert small["per_page_source"] == large["per_page_source"] == CostSource.PRIOR


def test_a_slope_not_above_zero_is_not_believed() -> None:
    points = service_like([64.0, 1024.0])
    points[1]["pause_us"] = points[0]["pause_us"] - 100          # the larger epochs paused less: noise
    fitted = fit_model(points)
    assert fitted.per_page_source == CostSource.PRIOR and "not above zero" in fitted.note
    assert fitted.per_page_us == PRIOR_PER_PAGE_US


def test_fit_with_nothing_measured_names_the_cause() -> None:
    with pytest.raises(ValueError, match="nothing to fit"):
        fit_model([])


def sweep_settings(pages: list[float]) -> list[dict]:
    return [{"dirty_pages": p["dirty_pages"], "pause_us_p50": p["pause_us"],
             "checkpoints_per_s": p["checkpoints_per_s"], "raw_mb_per_s": p["raw_mb_per_s"],
             "encoded_mb_per_s": p["encoded_mb_per_s"]} for p in service_like(pages)]


def test_the_report_always_answers_predict_on_a_sweep_without_spread() -> None:
    report = model_report(sweep_settings([26.0] * 9), parse_predict("128,512"))
    assert report["model"]["per_page_source"] == "prior" and "dirty pages per epoch" in report["model"]["note"]
    assert [p["dirty_pages"] for p in report["predictions"]] == [128.0, 512.0]
    assert report["predictions"][1]["pause_us"] > report["predictions"][0]["pause_us"] > 0
    assert json.loads(json.dumps(report))["predictions"][0]["per_page_source"] == "prior"


def test_the_report_names_the_cause_when_nothing_can_be_predicted() -> None:
    idle = [{**s, "checkpoints_per_s": 0.0} for s in sweep_settings([26.0] * 3)]
    report = model_report(idle, parse_predict("128"))
    assert report["predictions"] == [] and "nothing to fit" in report["model"]["error"]
    assert "predictions" not in model_report(sweep_settings([26.0] * 3), None)


def test_predict_spec_parses_and_refuses_nonsense() -> None:
    assert parse_predict("128,512@40000") == ([128.0, 512.0], 40000.0)
    assert parse_predict("64") == ([64.0], None)
    for bad in ("", "abc", "128@", "-5", "128@0"):
        with pytest.raises(ValueError, match="PAGES|above zero"):
            parse_predict(bad)


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
