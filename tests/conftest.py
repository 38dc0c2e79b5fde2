"""Test configuration: tests marked ``expensive`` run only with FINER1_EXPENSIVE=1."""
import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FINER1_EXPENSIVE") == "1":
        return
    skip = pytest.mark.skip(reason="expensive; set FINER1_EXPENSIVE=1 to run")
    for item in items:
        if "expensive" in item.keywords:
            item.add_marker(skip)
