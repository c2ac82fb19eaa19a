"""One root for every error truscl raises.

Each leaf also inherits the built-in it resembles (the gpiozero and web3.py pattern), so a
caller can catch ``ValueError`` without knowing truscl, or ``TrusclError`` to catch only ours.
"""


class TrusclError(Exception):
    """Root of all truscl errors."""


class ProtocolError(TrusclError, ValueError):
    """A message on the wire is malformed, oversized or inconsistent."""


class SignatureError(ProtocolError):
    """A signature does not verify or names a different signer."""


class HeError(TrusclError, ValueError):
    """A CKKS context or ciphertext is unusable with the task's parameters."""


class PrivacyBudgetExceeded(TrusclError, RuntimeError):
    """Training would spend more epsilon than the task allows."""


class ChainError(TrusclError, RuntimeError):
    """The contract refused a call, or the chain holds something unexpected."""


class ConfigError(TrusclError, ValueError):
    """A configuration value is missing or invalid."""


class SensorError(TrusclError, OSError):
    """A sensor did not answer or returned an impossible value."""
