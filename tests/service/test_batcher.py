"""service.inference.batcher without HTTP: requests queued in one step coalesce into one batch, each gets its
own row, the queue bound refuses at once, a cancelled request frees its slot and its work is never
run, an input that fails the run fails its own request only, and close() finishes what was
admitted. With several instances, batches run at the same time, and a broken instance (its batch
of zeros fails too) is taken out of rotation while the others serve its batch and the next ones,
until its probe runs again."""

import asyncio
import threading
from contextlib import AsyncExitStack

import numpy as np
import pytest

from service.inference.batcher import Batcher, Instance
from service.core.errors import InferenceFailed, Overloaded, ShuttingDown
from service.telemetry.metrics import Metrics

pytestmark = pytest.mark.timeout(30)


class Model:
    """A `run` that records its batch sizes and returns each row's sum, optionally held back. It
    fails every batch (`fail`), or those with a row full of `poison` (an input it cannot take)."""

    def __init__(self, fail: bool = False, barrier: threading.Barrier | None = None, poison: float | None = None):
        self.batches: list[int] = []
        self.release = threading.Event()
        self.release.set()
        self.fail, self.probe_fails, self.barrier, self.poison = fail, False, barrier, poison

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        if self.barrier is not None:       # slowed on purpose: runs until another batch runs too
            self.barrier.wait()
        self.release.wait(10)
        self.batches.append(len(batch))
        if self.fail or self.poison is not None and (batch == self.poison).all(axis=(1, 2, 3)).any():
            raise RuntimeError("boom")
        return [batch.reshape(len(batch), -1).sum(1)]

    def probe(self) -> None:
        if self.probe_fails:
            raise RuntimeError("still broken")


def batcher(*models: Model, **options) -> Batcher:
    """A batcher with one instance per model."""
    settings = {"max_batch_size": 4, "max_queue_delay_s": 0.0, "max_queue_size": 8, **options}
    instances = [Instance(str(i), "cpu", model, model.probe) for i, model in enumerate(models)]
    return Batcher(instances, name="m:1", input_dtype=np.float32, metrics=Metrics().for_model("m", 1), **settings)


def rows(n: int) -> list[np.ndarray]:
    return [np.full((1, 2, 2), float(i), np.float32) for i in range(n)]


async def submit_all(b: Batcher, xs: list[np.ndarray]):
    async with AsyncExitStack() as stack:
        slots = [await stack.enter_async_context(b.slot()) for _ in xs]
        return await asyncio.gather(*(slot.submit(x) for slot, x in zip(slots, xs)))


def test_rows_queued_together_run_as_one_batch_and_each_gets_its_own_row():
    async def main():
        model = Model()
        b = batcher(model, max_queue_delay_s=0.05)
        b.start()
        results = await submit_all(b, rows(4))
        await b.close(5)
        return model, results

    model, results = asyncio.run(main())
    assert model.batches == [4]
    assert [float(r.outputs[0]) for r in results] == [0.0, 4.0, 8.0, 12.0]     # 4 pixels of value i
    assert all(r.batch_size == 4 for r in results)


def test_batches_never_exceed_the_largest_batch_size():
    async def main():
        model = Model()
        b = batcher(model, max_batch_size=3)
        b.start()
        await submit_all(b, rows(7))
        await b.close(5)
        return model

    assert sorted(asyncio.run(main()).batches, reverse=True)[0] <= 3


def test_the_queue_bound_refuses_at_once_and_frees_with_the_slots():
    async def main():
        b = batcher(Model(), max_queue_size=2)
        first, second = b.slot(), b.slot()
        with pytest.raises(Overloaded, match="2 requests queued"):
            b.slot()
        async with first, second:
            assert b.depth == 2
        assert b.depth == 0
        b.slot()                                   # admitted again
        return True

    assert asyncio.run(main())


def test_a_cancelled_request_leaves_the_queue_and_its_work_is_not_done():
    async def main():
        model = Model()
        model.release.clear()                      # the first batch runs, and is held there
        b = batcher(model, max_batch_size=1)
        b.start()
        running = asyncio.ensure_future(submit_all(b, rows(1)))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(submit_all(b, rows(1)))
        await asyncio.sleep(0.05)
        assert b.depth == 1
        queued.cancel()
        await asyncio.sleep(0.05)
        assert b.depth == 0                        # its slot is free again
        model.release.set()
        await running
        await b.close(5)
        return model

    assert asyncio.run(main()).batches == [1]     # only the first request's batch ever ran


def test_an_input_that_fails_the_run_fails_its_own_request_only(caplog):
    """Four requests in one batch, the third poisoned: the batch runs again in halves, then the
    failing half in halves; the others get their rows, the third a generic error, the log the
    runtime's text once, and the instance stays in rotation."""
    async def main():
        model = Model(poison=2.0)
        b = batcher(model, max_queue_delay_s=0.05)
        b.start()
        answers = await asyncio.gather(*(submit_all(b, [x]) for x in rows(4)), return_exceptions=True)
        assert b.instances[0].healthy and b.instances[0].last_error is None
        again = await submit_all(b, rows(2))            # it serves on
        await b.close(5)
        return model, answers, again

    model, answers, again = asyncio.run(main())
    assert model.batches == [4, 2, 2, 1, 1, 2]
    assert [float(a[0].outputs[0]) for a in (answers[0], answers[1], answers[3])] == [0.0, 4.0, 12.0]
    assert [a[0].batch_size for a in (answers[0], answers[1], answers[3])] == [2, 2, 1]
    assert isinstance(answers[2], InferenceFailed) and answers[2].message == InferenceFailed.ON_INPUT
    assert [float(r.outputs[0]) for r in again] == [0.0, 4.0]
    (line,) = [r.getMessage() for r in caplog.records if "boom" in r.getMessage()]
    assert "one request's input" in line and "its batch had 4" in line


def test_a_broken_lone_instance_fails_its_batch_with_a_generic_message():
    async def main():
        model = Model(fail=True)
        model.probe_fails = True
        b = batcher(model)
        b.start()
        answers = await asyncio.gather(*(submit_all(b, [x]) for x in rows(2)), return_exceptions=True)
        assert not b.instances[0].healthy
        assert b.instances[0].last_error.startswith("RuntimeError: ")
        assert "still broken" not in b.instances[0].last_error
        await b.close(5)
        return model, answers

    model, answers = asyncio.run(main())
    assert model.batches == [2]                         # no part of it runs on a broken instance
    assert all(isinstance(a, InferenceFailed) and a.message == InferenceFailed.ON_INSTANCE for a in answers)


def test_close_finishes_what_was_admitted_then_refuses():
    async def main():
        model = Model()
        model.release.clear()
        b = batcher(model, max_batch_size=2)
        b.start()
        pending = asyncio.ensure_future(submit_all(b, rows(3)))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(b.close(5))
        await asyncio.sleep(0.05)
        with pytest.raises(ShuttingDown):
            b.slot()
        model.release.set()
        results = await pending
        await closing
        return results

    assert len(asyncio.run(main())) == 3


def test_two_instances_run_two_batches_at_the_same_time_and_give_the_same_results():
    """Each run waits at a barrier until another batch is running too: with two instances both
    batches pass it; one instance alone would break it (BrokenBarrierError fails the batch)."""
    async def main(models):
        b = batcher(*models, max_batch_size=2)
        b.start()
        first = asyncio.ensure_future(submit_all(b, rows(2)))
        await asyncio.sleep(0)                     # the first batch is dispatched
        second = asyncio.ensure_future(submit_all(b, rows(4)[2:]))
        results = await asyncio.gather(first, second)
        await b.close(5)
        return [float(r.outputs[0]) for rs in results for r in rs]

    barrier = threading.Barrier(2, timeout=5)
    concurrent = [Model(barrier=barrier), Model(barrier=barrier)]
    together = asyncio.run(main(concurrent))
    assert [m.batches for m in concurrent] == [[2], [2]]          # one batch each, at the same time
    assert together == asyncio.run(main([Model()])) == [0.0, 4.0, 8.0, 12.0]

    alone = threading.Barrier(2, timeout=0.5)
    with pytest.raises(InferenceFailed):                         # no overlap with a single instance
        asyncio.run(main([Model(barrier=alone)]))


def test_a_broken_instance_leaves_rotation_its_batch_goes_to_the_others_until_its_probe_runs():
    async def main():
        broken, healthy = Model(fail=True), Model()
        broken.probe_fails = True
        b = batcher(broken, healthy, max_batch_size=2)
        b.start()
        served = [await submit_all(b, rows(2))]         # instance 0 is idle longest: it fails the first
        assert [i.healthy for i in b.instances] == [False, True] and b.healthy
        served += [await submit_all(b, rows(2)) for _ in range(3)]   # the others serve meanwhile
        assert broken.batches == [2] and healthy.batches == [2, 2, 2, 2]
        assert b.instances[0].last_error == ("RuntimeError: a batch of zeros failed; "
                                             "the server log has the runtime's message")
        broken.fail, broken.probe_fails = False, False           # repaired: the next probe (1 s) passes
        for _ in range(100):
            if b.instances[0].healthy:
                break
            await asyncio.sleep(0.05)
        assert b.instances[0].healthy
        await asyncio.gather(submit_all(b, rows(2)), submit_all(b, rows(2)))
        await b.close(5)
        return served, broken

    served, broken = asyncio.run(main())
    assert all(float(r.outputs[0]) == 4.0 * i for rs in served for i, r in enumerate(rs))
    assert len(broken.batches) == 2                              # back in rotation: it ran a batch again


def test_a_solo_instance_takes_the_lone_batches_and_none_while_another_runs():
    """Two instances sharing the cores and a solo one (every core): requests one at a time all run
    on the solo instance; a batch that comes while one runs goes to a sharing instance, even with
    the solo one idle; with the solo instance out of rotation, lone batches go to the others."""
    async def until(condition):
        for _ in range(200):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    async def main():
        models = [Model(), Model(), Model(fail=True)]
        instances = [Instance("0", "cpu", models[0], models[0].probe, 1),
                     Instance("1", "cpu", models[1], models[1].probe, 1),
                     Instance("2", "cpu", models[2], models[2].probe, 2, solo=True)]
        b = Batcher(instances, name="m:1", input_dtype=np.float32, metrics=Metrics().for_model("m", 1),
                    max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=8)
        b.start()
        models[2].fail = False
        for _ in range(3):
            await submit_all(b, rows(1))
        assert [m.batches for m in models] == [[], [], [1, 1, 1]]

        models[2].release.clear()
        models[0].release.clear()
        first = asyncio.ensure_future(submit_all(b, rows(1)))
        await until(lambda: instances[2].busy)
        second = asyncio.ensure_future(submit_all(b, rows(1)))      # the solo one runs: instance 0
        await until(lambda: instances[0].busy)
        models[2].release.set()
        await first
        await submit_all(b, rows(1))                   # instance 0 runs: instance 1, not the idle solo
        assert [m.batches for m in models] == [[], [1], [1, 1, 1, 1]]
        models[0].release.set()
        await second
        await submit_all(b, rows(1))                   # nothing runs: the solo one again
        assert [m.batches for m in models] == [[1], [1], [1, 1, 1, 1, 1]]

        models[2].fail = models[2].probe_fails = True
        await submit_all(b, rows(1))                   # fails on the solo one, then a sharing one serves it
        assert not instances[2].healthy and len(models[0].batches) + len(models[1].batches) == 3
        await submit_all(b, rows(1))                   # out of rotation: a sharing instance serves
        assert len(models[0].batches) + len(models[1].batches) == 4
        await b.close(5)

    asyncio.run(main())
