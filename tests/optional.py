"""Tests that need a package of requirements-optional.txt: skipped, with the reason, where it is missing (the
README's install is requirements.txt alone), and marked `extras`, so that .ci/run, after its run of the README's
install, installs the extras and runs exactly these (`python -m pytest -m extras`).

    @needs("tensorboard")
    def test_...
"""

from __future__ import annotations

import importlib.util

import pytest


def needs(*packages: str):
    """Decorator: mark a test `extras` and skip it, naming what to install, when one of `packages` is missing."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    skip = pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (an optional package): pip install "
                                                    f"-r requirements-optional.txt")

    def mark(test):
        return pytest.mark.extras(skip(test))
    return mark
