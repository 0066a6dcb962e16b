"""A config mapping being read: typed getters that name the key in every error, and `done()`
which rejects unknown keys (so a typo never silently falls back to a default)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _same_kind(value: Any, default: Any) -> bool:
    """YAML's value fits the engine field's type (an int is fine where a float is expected)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


# --- typed access with the key path in every message -----------------------------------------

_MISSING = object()


class _Section:
    """One mapping of the config, read key by key; `done()` rejects the keys nobody read."""

    def __init__(self, raw: Any, path: str, base_dir: Path):
        if not isinstance(raw, dict):
            raise ConfigError(f"{path or 'config'}: must be a mapping, got {type(raw).__name__}")
        self._raw, self._path, self._base_dir = raw, path, base_dir
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path and name else (self._path or name)

    def fail(self, name: str, message: str) -> None:
        raise ConfigError(f"{self.key(name)}: {message}")

    def keys(self) -> list[str]:
        return [str(k) for k in self._raw if str(k) not in self._read]

    def get(self, name: str, default: Any = None) -> Any:
        return self._raw.get(name, default)

    def take(self, name: str, default: Any = _MISSING) -> Any:
        self._read.add(name)
        if name in self._raw:
            return self._raw[name]
        if default is _MISSING:
            self.fail(name, "is required")
        return default

    def skip(self, name: str) -> None:
        self._read.add(name)
        return None

    def done(self) -> None:
        unknown = sorted(str(k) for k in self._raw if str(k) not in self._read)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(self.key(k) for k in unknown)}")

    def section(self, name: str, required: bool = False) -> _Section:
        value = self.take(name) if required else self.take(name, None)
        return _Section({} if value is None else value, self.key(name), self._base_dir)

    def string(self, name: str, default: str | None) -> str:
        value = self.take(name, _MISSING if default is None else default)
        if not isinstance(value, str) or not value:
            self.fail(name, f"must be a non-empty string, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.take(name, default)
        if not isinstance(value, bool):
            self.fail(name, f"must be true or false, got {value!r}")
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: str | None) -> str:
        value = self.take(name, _MISSING if default is None else default)
        if value not in allowed:
            self.fail(name, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def integer(self, name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.take(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(name, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(name, f"must be <= {maximum}, got {value}")
        return value

    def number(self, name: str, default: float, minimum: float | None = None) -> float:
        value = self.take(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(name, f"must be a number, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(name, f"must be >= {minimum}, got {value}")
        return float(value)

    def int_list(self, name: str, default: list[int]) -> list[int]:
        value = self.take(name, default)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            self.fail(name, f"must be a list of integers, got {value!r}")
        return list(value)

    def float_list(self, name: str, default: list[float]) -> list[float]:
        value = self.take(name, default)
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            self.fail(name, f"must be a non-empty list of numbers, got {value!r}")
        return [float(v) for v in value]

    def string_list(self, name: str, default: list[str]) -> list[str]:
        value = self.take(name, default)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(name, f"must be a list of non-empty strings, got {value!r}")
        return list(value)

    def optional_path(self, name: str) -> Path | None:
        value = self.take(name, None)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(name, f"must be a path string, got {value!r}")
        return self.resolve(value)

    def resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self._base_dir / path).resolve()
