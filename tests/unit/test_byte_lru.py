"""The byte-bounded LRU store under the encoder and URL caches."""

from __future__ import annotations

from hcxserve.gateway.byte_lru import ByteBoundedLRU


def filled(max_bytes: int, *entries: tuple[str, int]) -> ByteBoundedLRU[str]:
    store: ByteBoundedLRU[str] = ByteBoundedLRU(max_bytes)
    for key, size in entries:
        store.put(key, key.upper(), size)
    return store


def test_bytes_are_the_sum_of_the_sizes_and_the_bound_may_be_met_exactly():
    store = filled(10, ("a", 4), ("b", 6))
    assert (len(store), store.bytes) == (2, 10)
    assert (store.peek("a"), store.peek("b")) == ("A", "B")


def test_the_least_recently_used_goes_first_and_get_counts_as_a_use():
    store = filled(10, ("a", 3), ("b", 3), ("c", 3))
    assert store.get("a") == "A"  # now b is the oldest
    assert store.put("d", "D", 3) == 1
    assert ("a" in store, "b" in store, "c" in store, "d" in store) == (True, False, True, True)
    assert store.bytes == 9


def test_peek_does_not_count_as_a_use():
    store = filled(6, ("a", 3), ("b", 3))
    assert store.peek("a") == "A"
    store.put("c", "C", 3)
    assert "a" not in store and store.get("b") == "B"


def test_one_put_evicts_as_many_as_it_takes_but_never_itself():
    store = filled(10, ("a", 3), ("b", 3), ("c", 3))
    assert store.put("big", "BIG", 10) == 3
    assert (len(store), store.bytes, store.get("big")) == (1, 10, "BIG")


def test_a_value_larger_than_the_bound_is_not_kept_and_evicts_nothing():
    store = filled(10, ("a", 3))
    assert store.put("huge", "HUGE", 11) == 0
    assert ("huge" in store, store.get("huge"), len(store), store.bytes) == (False, None, 1, 3)


def test_putting_a_key_again_replaces_its_value_and_size():
    store = filled(10, ("a", 3), ("b", 3))
    assert store.put("a", "A2", 7) == 0  # a's old 3 bytes are gone first: 3 + 7 fits
    assert (store.get("a"), store.bytes, len(store)) == ("A2", 10, 2)
    assert store.put("b", "B2", 11) == 0  # too large: b is now empty, not left holding the old value
    assert ("b" in store, store.bytes) == (False, 7)


def test_pop_returns_the_value_and_frees_its_bytes():
    store = filled(10, ("a", 3), ("b", 4))
    assert store.pop("a") == "A"
    assert (store.pop("a"), store.bytes, len(store)) == (None, 4, 1)
