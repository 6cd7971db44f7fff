"""The slots that bound the requests running Python at once in a worker."""

import threading

from deadlines import Slots
from mixed_load import wait_until


def test_a_freed_slot_goes_to_the_longest_waiter():
    slots, order = Slots(1), []

    def take(number):
        with slots:
            order.append(number)

    slots.__enter__()
    threads = []
    for number in range(4):
        threads.append(threading.Thread(target=take, args=(number,)))
        threads[-1].start()
        wait_until(lambda count=number + 1: len(slots._waiters) == count, 5)
    slots.__exit__(None, None, None)
    for thread in threads:
        thread.join(5)
    assert order == [0, 1, 2, 3]


def test_slots_let_count_holders_in_at_once_and_no_more():
    slots, inside, most = Slots(3), [], []
    lock, release = threading.Lock(), threading.Event()

    def hold():
        with slots:
            with lock:
                inside.append(1)
                most.append(len(inside))
            release.wait(5)
            with lock:
                inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(5)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(inside) == 3 and len(slots._waiters) == 2, 5)
    release.set()
    for thread in threads:
        thread.join(5)
    assert max(most) == 3
    assert len(most) == 5
