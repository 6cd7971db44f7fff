"""How stored hashes turn into customers, whatever other clients wrote into them."""

import sys
import threading

from hypothesis import given
from hypothesis import strategies as st

import storage
from storage import TYPE_PREFIX, _typed, decode, decode_all

NAMES = ["id", "name", "n", TYPE_PREFIX + "n", TYPE_PREFIX + "id", TYPE_PREFIX + "name",
         TYPE_PREFIX + TYPE_PREFIX + "n", TYPE_PREFIX + "gone", "_other"]
TEXTS = ["Joe", "1", "-7", "2.5", "nan", "true", "false", "int", "float", "bool", ""]


def as_the_rule_says(customer_id: str, stored: dict) -> dict:
    """Every field but "id" and the markers, each typed by its marker "_type:<field>" if any."""
    customer = {"id": customer_id}
    for name, value in stored.items():
        if name != "id" and not name.startswith(TYPE_PREFIX):
            kind = stored.get(TYPE_PREFIX + name)
            customer[name] = value if kind is None else _typed(value, kind)
    return customer


@given(st.dictionaries(st.sampled_from(NAMES), st.sampled_from(TEXTS)))
def test_every_stored_hash_decodes_as_the_rule_says(stored):
    flat = [part for pair in stored.items() for part in pair]
    expected = as_the_rule_says("c1", stored)
    # The first of a shape works out its plan, the next ones use it.
    for raw in (flat, stored, flat, stored):
        customer = decode("c1", raw)
        # repr: in the same order, and "nan" read as a float equals itself.
        assert repr(customer) == repr(expected)
    # Many at once, as a listing decodes them; an empty hash is a key gone, skipped.
    listed = decode_all(["c1", "gone", "c1"], [flat, [], flat])
    assert repr(listed) == repr([expected, expected] if flat else [])


def test_customers_of_one_shape_decode_alike_but_keep_their_own_values():
    shape = ["name", "Joe", "balance", "10", TYPE_PREFIX + "balance", "int"]
    first = decode("1", shape)
    second = decode("2", ["name", "Kim", "balance", "x", TYPE_PREFIX + "balance", "int"])
    assert first == {"id": "1", "name": "Joe", "balance": 10}
    assert second == {"id": "2", "name": "Kim", "balance": "x"}
    assert decode("3", ["name", "Al"]) == {"id": "3", "name": "Al"}
    assert decode("4", ["id", "x"]) == {"id": "4"}


def test_a_shape_too_large_to_keep_decodes_the_same_and_is_not_kept():
    names = [f"f{number}" for number in range(storage.MAX_CACHED_NAMES + 1)]
    raw = [part for name in names for part in (name, "1")] + [TYPE_PREFIX + "f0", "int"]
    expected = {"id": "c1", "f0": 1, **{name: "1" for name in names[1:]}}
    assert decode("c1", raw) == expected
    assert decode("c1", raw) == expected
    assert tuple(raw[::2]) not in storage._PLANS


def test_shapes_without_end_keep_the_plans_within_their_bound():
    for number in range(3000):
        name = f"field-{number}-" + "x" * 100
        assert decode("c1", [name, "v", TYPE_PREFIX + name, "int"]) == {"id": "c1", name: "v"}
        assert storage._cached_characters <= storage.MAX_CACHED_CHARACTERS
    assert sum(sum(map(len, names)) for names in storage._PLANS) == storage._cached_characters


def test_threads_meeting_new_shapes_at_once_keep_the_count_of_the_plans_true():
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can

    def decode_shapes(thread):
        for number in range(8000):
            name = f"{(number + thread) % 700}-" + "x" * 150
            decode("c1", [name, "1", TYPE_PREFIX + name, "int"])

    try:
        threads = [threading.Thread(target=decode_shapes, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert sum(sum(map(len, names)) for names in storage._PLANS) == storage._cached_characters
    assert storage._cached_characters <= storage.MAX_CACHED_CHARACTERS


def test_a_field_name_of_bytes_that_are_not_utf8_is_typed_by_its_marker():
    name = b"n\xe9".decode("utf-8", "surrogateescape")  # as the client reads another program's
    raw = [name, "7", TYPE_PREFIX + name, "int", "city", "Lyon"]
    assert decode("c1", raw) == {"id": "c1", name: 7, "city": "Lyon"}
    assert decode("c1", raw) == {"id": "c1", name: 7, "city": "Lyon"}  # from the cached plan
