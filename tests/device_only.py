"""Run truscl as on a device that installed only the ``device`` extra.

The server roles' packages are installed in the test environment, so a device process that
imported one by mistake would still work here and fail on a Pi. :data:`DEVICE_ONLY` is a
``python -c`` program that makes them unimportable, then runs the ``truscl`` command line.
"""

from __future__ import annotations

import sys

# In the server extra (or brought by it) and not in the device extra, or installed and unused.
SERVER_ONLY = (
    *("web3", "eth_tester", "eth", "py_evm", "requests", "dp_accounting", "scipy"),
    *("eth_account", "eth_keyfile", "py_ecc"),  # a device signs messages only, never a transaction
)

DEVICE_ONLY = f"""
import sys

class ServerOnly:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {SERVER_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the device extra)")
        return None

sys.meta_path.insert(0, ServerOnly())
from truscl.cli import main
sys.exit(main(sys.argv[1:]))
"""

TRUSCL_ON_A_DEVICE = [sys.executable, "-c", DEVICE_ONLY]
