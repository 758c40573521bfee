"""commsync.config: settings models, YAML loading and secret resolution."""

from .loading import ConfigError, load_settings, settings_from_dict
from .models import MailboxConfig, Settings

__all__ = ["ConfigError", "MailboxConfig", "Settings", "load_settings", "settings_from_dict"]
