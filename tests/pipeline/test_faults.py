"""Tests for streamer.pipeline.faults: the crash and hold points of the delivery-guarantee tests."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from streamer.errors import ConfigError
from streamer.pipeline import faults
from streamer.pipeline.faults import CRASH_POINTS


@pytest.fixture(autouse=True)
def _disarmed():
    yield
    faults.disarm()


class TestArm:
    def test_reads_known_points_from_the_environment(self) -> None:
        """STREAMER_CRASH_AT names one of the documented points; unset means nothing is armed."""
        faults.arm({})
        assert faults.armed() == (None, None)
        for point in CRASH_POINTS:
            faults.arm({"STREAMER_CRASH_AT": point})
            assert faults.armed() == (point, None)

    def test_unknown_point_is_a_config_error(self) -> None:
        """A typo in the crash point fails at start-up instead of silently never crashing."""
        with pytest.raises(ConfigError, match="STREAMER_CRASH_AT='after_lunch'"):
            faults.arm({"STREAMER_CRASH_AT": "after_lunch"})

    def test_hold_needs_a_known_point_and_a_release_file(self) -> None:
        """STREAMER_HOLD_AT is POINT:FILE; anything else is refused."""
        for bad in ("during_unlearn", "after_lunch:/tmp/x", ":/tmp/x"):
            with pytest.raises(ConfigError, match="STREAMER_HOLD_AT"):
                faults.arm({"STREAMER_HOLD_AT": bad})


class TestCrashAt:
    def test_other_points_do_nothing(self) -> None:
        """The hook fires only at its own point (this process is still alive)."""
        faults.arm({"STREAMER_CRASH_AT": "after_ledger"})
        faults.crash_at("after_checkpoint")
        faults.disarm()
        faults.crash_at("after_ledger")


class TestHoldAt:
    def test_blocks_until_released_then_holds_again(self, tmp_path: Path) -> None:
        """A hold returns only once its release file appears, consumes it, and the next pass holds again."""
        release = tmp_path / "release"
        faults.arm({"STREAMER_HOLD_AT": f"during_unlearn:{release}"})
        passed: list[int] = []
        worker = threading.Thread(target=lambda: (faults.hold_at("during_unlearn", threading.Event()),
                                                  passed.append(1)))
        worker.start()
        time.sleep(0.3)
        assert passed == [] and worker.is_alive()
        release.touch()
        worker.join(timeout=5)
        assert passed == [1] and not release.exists()
        cancel = threading.Event()
        again = threading.Thread(target=faults.hold_at, args=("during_unlearn", cancel))
        again.start()
        time.sleep(0.3)
        assert again.is_alive()
        cancel.set()  # a cancelled fragment is never held past its cancellation
        again.join(timeout=5)
        assert not again.is_alive()

    def test_unarmed_or_other_point_does_not_block(self) -> None:
        faults.hold_at("during_unlearn", threading.Event())
        faults.arm({"STREAMER_HOLD_AT": "during_unlearn:/nonexistent/release"})
        faults.hold_at("elsewhere", threading.Event())
