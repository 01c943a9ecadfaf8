"""The encoders' batching rule: one item's failure is that item's, unless every item fails."""

import pytest

from hcxserve.encoders import ItemRefused, encode_batch


def decode(item):
    if item == "undecodable":
        raise ItemRefused("not an image", 400)
    return item


def refused(exc: ItemRefused):
    return ("refused", exc.message, exc.status)


def encode_all_but(poison: str):
    calls = []

    def encode(items):
        calls.append(list(items))
        if poison in items:
            raise ValueError("the model cannot take this")
        return [f"enc({item})" for item in items]

    return encode, calls


def test_items_encode_together():
    encode, calls = encode_all_but("poison")
    assert encode_batch(["x", "y"], decode, encode, refused) == ["enc(x)", "enc(y)"]
    assert calls == [["x", "y"]]


def test_an_undecodable_item_is_refused_alone():
    encode, calls = encode_all_but("poison")
    out = encode_batch(["x", "undecodable", "y"], decode, encode, refused)
    assert out == ["enc(x)", ("refused", "not an image", 400), "enc(y)"]
    assert calls == [["x", "y"]]


def test_an_item_that_fails_the_batch_is_refused_alone_and_the_others_succeed():
    encode, calls = encode_all_but("poison")
    out = encode_batch(["x", "poison", "y"], decode, encode, refused)
    assert out == ["enc(x)", ("refused", "the model could not encode this item", 400), "enc(y)"]
    assert calls == [["x", "poison", "y"], ["x"], ["poison"], ["y"]]


@pytest.mark.parametrize("items", [["poison"], ["poison", "poison"]])
def test_when_every_item_fails_it_is_the_encoders_fault(items):
    encode, _ = encode_all_but("poison")
    with pytest.raises(ValueError, match="cannot take"):
        encode_batch(items, decode, encode, refused)
