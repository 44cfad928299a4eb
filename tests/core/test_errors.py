"""A row's `error` value is read one way everywhere: `<reason>: <detail>`."""

from __future__ import annotations

import pytest

from groupemotion_core.errors import GroupEmotionError, error_reason, split_error


def test_an_error_value_splits_at_its_first_colon_as_a_groupemotion_error_wrote_it():
    error = GroupEmotionError("access_denied", "s3://b/k: 403 Forbidden")
    assert split_error(str(error)) == ("access_denied", "s3://b/k: 403 Forbidden")
    assert error_reason("crashed:exit -6") == "crashed"


@pytest.mark.parametrize("value", ["", ": no reason given", "   "])
def test_a_value_without_a_reason_counts_as_unknown(value):
    assert error_reason(value) == "unknown"
