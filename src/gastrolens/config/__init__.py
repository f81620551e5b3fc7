"""Settings: the schema (`schema`) and loading from TOML plus the environment (`loader`)."""

from gastrolens.config.loader import load_settings
from gastrolens.config.schema import Settings

__all__ = ["Settings", "load_settings"]
