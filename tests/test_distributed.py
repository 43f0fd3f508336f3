"""The Dask path (minrr.backends.distributed) against the single-process results."""

import numpy as np
import pytest

pytest.importorskip("dask.distributed")

from minrr.hashing import hamming  # noqa: E402
from minrr.backends import distributed  # noqa: E402
from minrr.io import shard_paths  # noqa: E402


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
    shards = shard_paths(folder, name="database")
    want = hamming.search(queries=queries, database=database, k=40)
    for split, chunk_size in (("shards", None), ("queries", None), ("queries", 7), ("queries", 1000)):
        got = distributed.search_shards(client, shards, queries, 40, split=split, chunk_size=chunk_size)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="split: expected one of queries, shards, got 'rows'"):
        distributed.search_shards(client, shards, queries, 40, split="rows")
    with pytest.raises(ValueError, match="chunk_size: expected a whole number >= 1, got 0"):
        distributed.search_shards(client, shards, queries, 40, chunk_size=0)


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
    for extra, out in (([], "local.npz"), (["--workers", "2"], "dask.npz"),
                       (["--workers", "2", "--split", "shards"], "by-shard.npz"),
                       (["--workers", "2", "--chunk-size", "5"], "chunked.npz")):
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


def _save_shards(folder, array, cuts):
    folder.mkdir()
    for s, (a, b) in enumerate(zip(cuts, cuts[1:])):
        np.save(folder / f"part-{s:05d}.npy", array[a:b])


@pytest.mark.parametrize("multi", [False, True])
def test_query_statistics_in_chunks_equal_one_machine(client, tmp_path, multi):
    from minrr.metrics.retrieval import query_statistics

    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=(400, 6)).astype(np.float32)  # a coarse grid: many exact ties
    y = rng.integers(0, 5, 400) if not multi else (rng.random((400, 7)) < 0.2).astype(np.int64)
    g, gy = x[:150] + 0.5, y[:150]
    _save_shards(tmp_path / "x", x, [0, 1, 170, 400])
    for ranking in ({"exclude": "index"}, {"exclude": "nearest"}, {"gallery": g, "gallery_labels": gy}):
        want = query_statistics(x, y, **ranking)
        for c, inputs, chunk in ((client, (x, y), 37), (client, (tmp_path / "x", y), 400), (None, (x, y), 101)):
            got = distributed.query_statistics_chunks(c, *inputs, chunk_size=chunk, **ranking)
            for column, expected in zip(got, want):
                np.testing.assert_array_equal(column, expected)


def test_query_statistics_lose_no_chunk_to_a_killed_worker(client, tmp_path):
    import os
    import signal

    from minrr.metrics.retrieval import BLOCK_BYTES, query_statistics

    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((2000, 16)), rng.integers(0, 10, 2000)
    _save_shards(tmp_path / "x", x, [0, 700, 2000])
    np.save(tmp_path / "y.npy", y)
    inputs = {"embeddings": str(tmp_path / "x"), "labels": str(tmp_path / "y.npy")}
    chunks = [(a, a + 100) for a in range(0, 2000, 100)]
    pids = client.run(os.getpid)
    parts = []
    for part in distributed.in_order(client, distributed._statistics_chunk, chunks, inputs, None, BLOCK_BYTES,
                                     window=4):
        if not parts:  # chunks are in flight on both workers: kill one of them
            os.kill(next(iter(pids.values())), signal.SIGKILL)
        parts.append(part)
    for column, expected in zip(zip(*parts), query_statistics(x, y)):
        np.testing.assert_array_equal(np.concatenate(column), expected)
    client.wait_for_workers(2, timeout=30)
    assert set(client.run(os.getpid).values()) != set(pids.values())


def test_minrr_evaluate_over_shards_on_a_cluster_writes_the_one_machine_metrics(tmp_path, capsys):
    import json

    from minrr.cli.main import main

    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    y = rng.integers(0, 6, 300)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    _save_shards(tmp_path / "xs", x, [0, 120, 121, 300])
    _save_shards(tmp_path / "ys", y, [0, 50, 300])
    assert main(["evaluate", "--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--json", str(tmp_path / "one.json")]) == 0
    want = json.loads((tmp_path / "one.json").read_text())
    for extra, out in (([], "local.json"), (["--workers", "2", "--chunk-size", "64"], "dask.json")):
        assert main(["evaluate", "--embeddings", str(tmp_path / "xs"), "--labels", str(tmp_path / "ys"),
                     "--json", str(tmp_path / out), *extra]) == 0
        got = json.loads((tmp_path / out).read_text())
        assert got["metrics"] == want["metrics"] and got["queries"] == 300 and got["protocol"] == want["protocol"]
    capsys.readouterr()
    np.save(tmp_path / "xs" / "part-00003.npy", np.zeros((4, 9), np.float32))
    assert main(["evaluate", "--embeddings", str(tmp_path / "xs"), "--labels", str(tmp_path / "ys"),
                 "--workers", "2", "--json", str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("minrr evaluate: error: --embeddings: shard part-00003.npy holds float32 rows of shape (9,); "
                   "the first shard holds float32 rows of shape (8,)") and not (tmp_path / "bad.json").exists()
    assert main(["evaluate", "--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--workers", "2", "--scheduler", "tcp://127.0.0.1:9"]) == 1
    assert "--workers: give either --scheduler" in capsys.readouterr().err
