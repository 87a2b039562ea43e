"""The test suite; the code it shares with bench/ is the package tests.support."""

import pytest

# The support modules assert too (a ranged GET checks its 206): pytest explains
# those failures as it does the tests' own. Outside pytest this does nothing.
pytest.register_assert_rewrite("tests.support")
