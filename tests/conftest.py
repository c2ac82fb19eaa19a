"""Fixtures shared across the suite: CKKS keys are slow to make, so one set per session."""

from __future__ import annotations

import pytest
import tenseal as ts

from truscl.privacy.ckks import OwnerKeys, load_context


@pytest.fixture(scope="session")
def owner_keys() -> OwnerKeys:
    return OwnerKeys.generate()


@pytest.fixture(scope="session")
def public_context(owner_keys: OwnerKeys) -> ts.Context:
    return load_context(owner_keys.public_context_bytes())
