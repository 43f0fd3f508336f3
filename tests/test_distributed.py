"""The Dask path (minrr.backends.distributed) against the single-process results."""

import numpy as np
import pytest

pytest.importorskip("dask.distributed")

from minrr import hamming  # noqa: E402
from minrr.backends import distributed  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with distributed.connect(workers=2) as c:
        yield c


def test_merge_top_k_equals_search_on_the_whole_database():
    rng = np.random.default_rng(0)
    database = rng.integers(0, 2, size=(300, 16))  # 16 bits: many ties
    queries = rng.integers(0, 2, size=(20, 16))
    cuts = [0, 70, 71, 180, 300]
    parts = [hamming.search(queries=queries, database=database[a:b], k=min(25, b - a)) for a, b in zip(cuts, cuts[1:])]
    merged = hamming.merge_top_k([d for d, _ in parts], [i + a for (_, i), a in zip(parts, cuts)], 25)
    for got, want in zip(merged, hamming.search(queries=queries, database=database, k=25)):
        np.testing.assert_array_equal(got, want)


def test_search_over_shards_equals_one_machine(client, tmp_path):
    rng = np.random.default_rng(1)
    database = np.where(rng.random((500, 32)) < 0.5, -1, 1).astype(np.int8)
    queries = database[rng.choice(500, 30)] * np.where(rng.random((30, 32)) < 0.1, -1, 1).astype(np.int8)
    folder = tmp_path / "db"
    folder.mkdir()
    for s, (a, b) in enumerate([(0, 120), (120, 121), (121, 400), (400, 500)]):
        np.save(folder / f"shard-{s:05d}.npy", database[a:b])
    shards = distributed.shard_paths(folder)
    got = distributed.search_shards(client, shards, queries, 40)
    for g, w in zip(got, hamming.search(queries=queries, database=database, k=40)):
        np.testing.assert_array_equal(g, w)


def test_in_order_yields_chunks_in_order_with_a_small_window(client):
    import time

    def slow_square(x):
        time.sleep(0.05 * (x % 3))
        return x * x

    assert list(distributed.in_order(client, slow_square, range(12), window=3)) == [x * x for x in range(12)]


def test_unreachable_scheduler_is_one_clear_error():
    with pytest.raises(ValueError, match=r"scheduler: cannot reach tcp://127\.0\.0\.1:9 "):
        with distributed.connect("tcp://127.0.0.1:9", timeout=1):
            pass


def _sleepy_square(x):
    import time

    time.sleep(0.2)
    return x * x


def test_a_killed_worker_loses_no_chunk(client):
    import os
    import signal

    pids = client.run(os.getpid)
    results = []
    for value in distributed.in_order(client, _sleepy_square, range(16), window=4):
        if not results:  # tasks are in flight on both workers: kill one of them
            os.kill(next(iter(pids.values())), signal.SIGKILL)
        results.append(value)
    assert results == [x * x for x in range(16)]
    client.wait_for_workers(2, timeout=30)
    assert set(client.run(os.getpid).values()) != set(pids.values())  # the nanny started a new one


def test_minrr_search_over_a_folder_of_shards(tmp_path, capsys):
    from minrr.cli.main import main

    rng = np.random.default_rng(2)
    database = np.where(rng.random((300, 24)) < 0.5, -1, 1).astype(np.int8)
    queries = database[:12] * np.where(rng.random((12, 24)) < 0.15, -1, 1).astype(np.int8)
    labels, database_labels = rng.integers(0, 3, 12), rng.integers(0, 3, 300)
    folder = tmp_path / "db"
    folder.mkdir()
    for s, (a, b) in enumerate([(0, 100), (100, 250), (250, 300)]):
        np.save(folder / f"shard-{s:05d}.npy", database[a:b])
    for name, arr in (("db.npy", database), ("q.npy", queries), ("y.npy", labels), ("dy.npy", database_labels)):
        np.save(tmp_path / name, arr)
    common = ["--queries", str(tmp_path / "q.npy"), "--top-k", "30", "--labels", str(tmp_path / "y.npy"),
              "--database-labels", str(tmp_path / "dy.npy")]
    assert main(["search", "--database", str(tmp_path / "db.npy"), *common, "--out", str(tmp_path / "one.npz")]) == 0
    reference = capsys.readouterr().out.splitlines()
    for extra, out in (([], "local.npz"), (["--workers", "2"], "dask.npz")):
        assert main(["search", "--database", str(folder), *common, "--out", str(tmp_path / out), *extra]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert [line for line in printed if "mAP" in line] == [line for line in reference if "mAP" in line]
        with np.load(tmp_path / out) as got, np.load(tmp_path / "one.npz") as want:
            for key in ("distances", "indices"):
                np.testing.assert_array_equal(got[key], want[key])
    np.save(folder / "shard-00003.npy", np.ones((0, 24), np.int8))
    assert main(["search", "--database", str(folder), *common]) == 1
    assert "--database: shard shard-00003.npy holds shape (0, 24)" in capsys.readouterr().err


def test_merge_top_k_orders_by_distance_then_index_even_without_a_packed_key():
    d = [np.array([[3, 5]]), np.array([[3, 4]])]
    for offset in (0, 1 << 50):  # the second cannot pack (distance, index) into one int64
        i = [np.array([[7, 2]]) + offset, np.array([[1, 9]]) + offset]
        got_d, got_i = hamming.merge_top_k(d, i, 3)
        np.testing.assert_array_equal(got_d, [[3, 3, 4]])
        np.testing.assert_array_equal(got_i - offset, [[1, 7, 9]])
