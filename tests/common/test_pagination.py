"""A page's byte bound (servers/common/pagination.py): where a page stops, and what it says."""

from __future__ import annotations

from google.protobuf import struct_pb2

from servers.common.pagination import PAGE_MAX_BYTES, page


def item(size: int) -> struct_pb2.Value:
    """A message of exactly ``size`` bytes: a string value, less its tag and length varint."""
    for overhead in range(2, 6):
        value = struct_pb2.Value(string_value="x" * (size - overhead))
        if value.ByteSize() == size:
            return value
    raise AssertionError(size)


def test_a_page_within_its_bound_is_served_as_asked() -> None:
    asked = page(10, 20)
    items = [item(PAGE_MAX_BYTES // 4)] * 4
    kept, served = asked.fit(items)
    assert len(kept) == 4 and served == asked
    assert served.fields(40) == {"total": 40, "limit": 10, "offset": 20, "has_more": True}


def test_a_page_past_its_bound_stops_and_says_where_the_next_starts() -> None:
    items = [item(PAGE_MAX_BYTES // 4)] * 4 + [item(10)] * 3
    kept, served = page(10, 20).fit(items)
    assert len(kept) == 4 and served.limit == 4 and served.offset == 20
    # Fewer items than the page asked for, and yet more follow, at offset + limit.
    assert served.fields(27) == {"total": 27, "limit": 4, "offset": 20, "has_more": True}


def test_an_item_larger_than_the_bound_is_a_page_of_its_own() -> None:
    big = item(PAGE_MAX_BYTES + 1)
    kept, served = page(5, 0).fit([big, item(10)])
    assert list(kept) == [big] and served.limit == 1
    kept, served = page(5, 1).fit([item(10), big])
    assert len(kept) == 1 and served.limit == 1 and served.has_more(3)
