"""What a user's conftest.py might hold: default models for every test in this directory."""

import pytest
from inventory import Bin, Item


@pytest.fixture
def txindex_models():
    return [Item, Bin]
