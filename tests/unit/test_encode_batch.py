"""The encoders' batching rule: one item's failure is that item's, unless every item fails; items may be decoded
and finished side by side in a thread pool, with the same results in the same order."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from hcxserve.encoders import ItemRefused, encode_batch, item_pool


@pytest.fixture(scope="module", params=["inline", "pool"])
def pool(request):
    if request.param == "inline":
        yield None
        return
    with ThreadPoolExecutor(3) as executor:
        yield executor


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


def test_items_encode_together(pool):
    encode, calls = encode_all_but("poison")
    assert encode_batch(["x", "y"], decode, encode, refused, pool=pool) == ["enc(x)", "enc(y)"]
    assert calls == [["x", "y"]]


def test_an_undecodable_item_is_refused_alone(pool):
    encode, calls = encode_all_but("poison")
    out = encode_batch(["x", "undecodable", "y"], decode, encode, refused, pool=pool)
    assert out == ["enc(x)", ("refused", "not an image", 400), "enc(y)"]
    assert calls == [["x", "y"]]


def test_an_item_that_fails_the_batch_is_refused_alone_and_the_others_succeed(pool):
    encode, calls = encode_all_but("poison")
    out = encode_batch(["x", "poison", "y"], decode, encode, refused, pool=pool)
    assert out == ["enc(x)", ("refused", "the model could not encode this item", 400), "enc(y)"]
    assert calls == [["x", "poison", "y"], ["x"], ["poison"], ["y"]]


@pytest.mark.parametrize("items", [["poison"], ["poison", "poison"]])
def test_when_every_item_fails_it_is_the_encoders_fault(items, pool):
    encode, _ = encode_all_but("poison")
    with pytest.raises(ValueError, match="cannot take"):
        encode_batch(items, decode, encode, refused, pool=pool)


def test_decode_and_finish_run_in_the_pool_and_keep_the_order():
    threads = set()

    def slow_decode(item):
        threads.add(threading.current_thread().name)
        threading.Event().wait(0.01 * (5 - item))  # later items finish first
        if item == 2:
            raise ItemRefused("item 2 is bad", 413)
        return item

    def encode_each(batch):
        return [f"enc({i})" for i in batch]

    def finish(encoded):
        threads.add(threading.current_thread().name)
        return f"done({encoded})"

    with ThreadPoolExecutor(4, thread_name_prefix="items") as executor:
        out = encode_batch([0, 1, 2, 3, 4], slow_decode, encode_each, refused, finish=finish, pool=executor)
    assert out == ["done(enc(0))", "done(enc(1))", ("refused", "item 2 is bad", 413), "done(enc(3))", "done(enc(4))"]
    assert len(threads) > 1 and all(name.startswith("items") for name in threads)


def test_two_items_go_side_by_side_and_one_stays_on_the_calling_thread():
    def where(item):
        return threading.current_thread().name

    with ThreadPoolExecutor(2, thread_name_prefix="items") as executor:
        two = encode_batch([0, 1], where, list, refused, pool=executor)
        one = encode_batch([0], where, list, refused, pool=executor)
    assert all(name.startswith("items") for name in two)
    assert one == [threading.current_thread().name]  # no thread hop for a single item


def test_an_encoder_that_returns_too_few_results_is_an_error_not_a_missing_answer(pool):
    with pytest.raises(ValueError):
        encode_batch(["x", "y"], decode, lambda batch: ["enc(x)"], refused, pool=pool)


def test_finish_is_applied_to_encoded_items_alone_when_the_batch_failed(pool):
    encode, calls = encode_all_but("poison")
    out = encode_batch(["x", "poison"], decode, encode, refused, finish=str.upper, pool=pool)
    assert out == ["ENC(X)", ("refused", "the model could not encode this item", 400)]
    assert calls == [["x", "poison"], ["x"], ["poison"]]


def test_item_pool_sizes():
    assert item_pool(1, 16) is None  # one thread: items go inline
    with item_pool(3, 16) as executor:
        assert executor._max_workers == 3
    cores = len(os.sched_getaffinity(0))
    default = item_pool(None, 16)
    assert (default is None) if cores == 1 else default._max_workers == min(cores, 16)
    if default is not None:
        default.shutdown()
    capped = item_pool(None, 1)  # never more threads than items in a batch
    assert capped is None
    with item_pool(2, 16) as executor:  # named for operators (py-spy, thread dumps)
        assert executor.submit(lambda: threading.current_thread().name).result().startswith("encoder-items")


def test_the_default_item_threads_follow_the_cores_this_process_may_run_on(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert item_pool(None, 16) is None  # pinned to one core of eight: items inline
    monkeypatch.delattr(os, "sched_getaffinity")  # no affinity on this OS: every core
    with item_pool(None, 16) as executor:
        assert executor._max_workers == 8
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one
    assert item_pool(None, 16) is None


def test_a_refusal_reads_as_its_message_in_logs():
    assert str(ItemRefused("too large", 413)) == "too large"


def test_item_threads_run_torch_alone_and_leave_other_threads_alone():
    import torch

    def in_a_new_thread(fn):
        out = []
        thread = threading.Thread(target=lambda: out.append(fn()))
        thread.start()
        thread.join()
        return out[0]

    def torch_threads_after_an_op():
        torch.ones(1 << 20).add_(1)
        return torch.get_num_threads()

    default = in_a_new_thread(torch_threads_after_an_op)
    executor = item_pool(2, 8)
    try:
        assert executor.submit(torch_threads_after_an_op).result() == 1
    finally:
        executor.shutdown()
    assert in_a_new_thread(torch_threads_after_an_op) == default  # not the whole process's count
