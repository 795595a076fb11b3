"""`MapStep.new_items`: an item's id is its identity, so two items of one list with the same
id are one item if their content is the same, and a loud error if it is not (the second was
dropped without a trace)."""

from __future__ import annotations

import pytest

from jobs.maps import MapStep
from ledger import JSON


def _step() -> MapStep[None]:
    return MapStep(
        name="search",
        run=lambda ctx: [],
        key="crawl:{crawl_id}:search",
        each=lambda ctx: None,
        item_id=lambda item: str(item["id"]) if isinstance(item, dict) else "",
    )


def test_the_same_item_twice_is_one_item() -> None:
    items: list[JSON] = [{"id": "c1", "r": 5}, {"id": "c2", "r": 5}, {"id": "c1", "r": 5}]

    added = _step().new_items("places-crawl", "crawl:1:search", items)

    assert [item.item_id for item in added] == ["c1", "c2"]


def test_one_id_with_two_contents_is_refused_naming_the_id() -> None:
    items: list[JSON] = [{"id": "c1", "amount": 5}, {"id": "c1", "amount": 7}]

    with pytest.raises(ValueError, match=r"'c1'.*other content"):
        _step().new_items("places-crawl", "crawl:1:search", items)
