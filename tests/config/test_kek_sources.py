"""Tests for the `privacy` section's KEK sources: a file, a variable or a KMS key, exactly one."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from streamer.config import KmsKeyConfig, parse_config
from streamer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _privacy(privacy: dict[str, Any]) -> Any:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["privacy"] = {k: v for k, v in raw["privacy"].items() if k not in ("kek_file", "kek_env")} | privacy
    return parse_config(raw, base_dir=Path("/base")).privacy


class TestKekKms:
    def test_a_kms_key_with_and_without_region_and_endpoint(self) -> None:
        """key_id is required; region and endpoint_url default to boto3's choice (null)."""
        assert _privacy({"kek_kms": {"key_id": "alias/streamer"}}).kek_kms == KmsKeyConfig("alias/streamer")
        full = {"key_id": "arn:aws:kms:eu-west-1:1:key/k", "region": "eu-west-1", "endpoint_url": "https://kms.x",
                "outage_s": 60}
        assert _privacy({"kek_kms": full}).kek_kms == KmsKeyConfig(**full)
        assert _privacy({"kek_kms": None, "kek_env": "K"}).kek_kms is None

    @pytest.mark.parametrize("privacy, message", [
        ({"kek_kms": {"region": "eu-west-1"}}, "privacy.kek_kms.key_id: is required"),
        ({"kek_kms": {"key_id": ""}}, "privacy.kek_kms.key_id: must be a non-empty string"),
        ({"kek_kms": {"key_id": "k", "region": 3}}, "privacy.kek_kms.region: must be a non-empty string or null"),
        ({"kek_kms": {"key_id": "k", "aws_secret_access_key": "x"}}, "unknown key(s) privacy.kek_kms.aws_secret"),
        ({"kek_kms": "alias/streamer"}, "privacy.kek_kms: must be a mapping"),
        ({"kek_kms": {"key_id": "k", "outage_s": -1}}, "privacy.kek_kms.outage_s: must be >= 0"),
        ({"kek_kms": {"key_id": "k"}, "kek_file": "/keys/kek.key"}, "not kek_file and kek_kms"),
        ({"kek_env": "K", "kek_kms": {"key_id": "k"}}, "not kek_env and kek_kms"),
    ])
    def test_errors_name_the_key(self, privacy: dict[str, Any], message: str) -> None:
        """No credentials in the config (an unknown key), exactly one source, each error names its key."""
        with pytest.raises(ConfigError) as err:
            _privacy(privacy)
        assert message in str(err.value)
