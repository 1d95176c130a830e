"""The learning benchmark's printed table (benchmarks.learning.format_table) from a report dict."""

from __future__ import annotations

from benchmarks.learning import FOLLOW_MARGIN_DB, format_table


def _report(resumed: bool, ldmk_spread: float | None) -> dict:
    passes = {"25": {"mouth_psnr": 22.66, "psnr": 28.68}, "5": {"mouth_psnr": 22.24, "psnr": 28.1}}
    return {
        "seed": 2,
        "device": "cpu",
        "cpu": "AMD EPYC",
        "cpu_minutes": 34.0,
        "wall_minutes": 38.5,
        "resumed": resumed,
        "atom": {"mouth_corr_trained": 0.79, "mouth_corr_untrained": 0.131},
        "mtov": {
            "mouth_psnr_heldout": 22.66,
            "mouth_psnr_reference_copy": 16.26,
            "psnr_heldout": 28.68,
            "psnr_reference_copy": 26.61,
            "passes": passes,
            "mouth_psnr_wrong_landmarks": 20.74,
            "mouth_dark_corr": 0.68,
            "mouth_dark_corr_wrong_landmarks": 0.29,
            "latents": {
                "rgb": {"saturated": 0.0, "spread": 0.0061, "spread_median": 0.006, "opening_r2": 0.98},
                "ldmk": {"saturated": 1.0, "spread": ldmk_spread, "spread_median": None, "opening_r2": 0.5},
            },
        },
        "end_to_end": {"mouth_dark_corr": 0.65, "mouth_dark_corr_true_frames": 0.97},
        "targets_met": {"atom": True, "mtov": True, "mtov_follows_landmarks": False},
    }


def test_table_rows_and_the_resumed_line():
    lines = format_table(_report(resumed=False, ldmk_spread=0.0002)).splitlines()
    assert lines[0] == "learning benchmark, seed 2, cpu (AMD EPYC): 34.0 CPU min, 38.5 min wall"
    assert "| AToM | mouth opening corr (held-out) | 0.790 | 0.131 (untrained) |" in lines[4]
    row = next(x for x in lines if "5 passes | 22.24" in x)
    assert f"20.74 (another sentence's landmarks) | own >= wrong + {FOLLOW_MARGIN_DB} dB |" in row
    assert "| 25 | 22.66 | 28.68 |" in lines and "| 5 | 22.24 | 28.10 |" in lines
    assert "| ldmk | 1.00 | 0.0002 | 0.500 |" in lines
    assert lines[-1] == "targets: AToM met, MToV met; MToV does NOT follow its landmarks"
    # a resumed run says its CPU minutes are this invocation's; a latent of one window has no spread
    resumed = format_table(_report(resumed=True, ldmk_spread=None)).splitlines()
    assert resumed[0].endswith("(this invocation, resumed: earlier training not counted)")
    assert "| ldmk | 1.00 | - | 0.500 |" in resumed
