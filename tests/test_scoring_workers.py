"""Batch scoring on the workers: categorical features fed as integer category codes, and
the local cluster's background work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adapters import parquet_input
from mlops.datagen import generate
from mlops.errors import DataError
from mlops.onnx_model import CodedScorer, OnnxScorer, category_code_model
from mlops.partitions import plan_partitions
from mlops.settings import load_settings

SCHEMA = load_settings(environ={}).dataset


def _odd_rows(n: int) -> pa.Table:
    """Generated rows with a null, values outside the model's categories, and a value that
    differs from a category only in case."""
    frame = generate(n, seed=5)
    frame.loc[3, "channel"] = None
    frame.loc[4, "merchant_category"] = "pawn_shop"
    frame.loc[7, "geo"] = "Domestic"
    frame.loc[9, "card_type"] = ""
    return pa.Table.from_pandas(frame, preserve_index=False)


def test_codes_score_exactly_as_strings(small_model: bytes, tmp_path: Path) -> None:
    """Plain and dictionary-encoded string columns, several chunks, nulls and unknown values:
    the codes graph gives the string graph's scores bit for bit, and it is the graph used."""
    table = _odd_rows(4_000)
    strings = OnnxScorer(small_model, SCHEMA)
    expected = strings.predict_proba(table.to_pandas())
    coded = CodedScorer(small_model, SCHEMA)
    assert coded.coded_session is not None
    assert set(coded.categories) == {SCHEMA.input_names[c] for c in SCHEMA.categorical_names}

    plain = coded.table_feeds(table)
    assert all(plain[SCHEMA.input_names[c]].dtype == np.int64 for c in SCHEMA.categorical_names)
    np.testing.assert_array_equal(coded.run_table(plain), expected)

    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=700)  # chunks with dictionaries of their own
    got = []
    for part in plan_partitions(parquet_input.layouts(path), 1_500, min_rows=1):
        read = parquet_input.read_partition(part, table.column_names, SCHEMA.categorical_names)
        assert pa.types.is_dictionary(read.schema.field("channel").type)
        assert read.column("channel").num_chunks > 1 or read.num_rows <= 700
        got.append(coded.run_table(coded.table_feeds(read)))
    np.testing.assert_array_equal(np.concatenate(got), expected)


def test_a_non_string_categorical_column_is_scored_through_strings(small_model: bytes) -> None:
    """A categorical column that is not text (here integers) cannot be coded: it goes
    through the string feeds, with the string graph, as before."""
    frame = generate(500, seed=8)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    as_ints = table.set_column(
        table.schema.get_field_index("geo"), "geo", pa.array(np.zeros(len(frame), dtype=np.int64))
    )
    coded = CodedScorer(small_model, SCHEMA)
    feeds = coded.table_feeds(as_ints)
    assert feeds[SCHEMA.input_names["geo"]].dtype == object
    strings = OnnxScorer(small_model, SCHEMA)
    np.testing.assert_array_equal(
        coded.run_table(feeds), strings.run(strings.feeds(as_ints.to_pandas().astype({"geo": str})))
    )


def test_missing_feature_column_is_one_line(small_model: bytes) -> None:
    table = _odd_rows(50).drop_columns(["amount"])
    with pytest.raises(DataError, match="missing feature column 'amount'"):
        CodedScorer(small_model, SCHEMA).table_feeds(table)


def test_graphs_that_read_strings_otherwise_are_left_as_they_are(small_model: bytes) -> None:
    """A string input read by anything but a lone OneHotEncoder keeps the string graph."""
    proto = onnx.load_from_string(small_model)
    name = SCHEMA.input_names["channel"]
    proto.graph.node.append(onnx.helper.make_node("Identity", [name], ["channel_copy"]))
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info("channel_copy", onnx.TensorProto.STRING, None)
    )
    assert category_code_model(proto.SerializeToString()) is None
    rewritten, categories = category_code_model(small_model)
    assert categories[name] == ("atm", "ecommerce", "mobile_app", "pos")
    assert all(
        i.type.tensor_type.elem_type == onnx.TensorProto.INT64
        for i in onnx.load_from_string(rewritten).graph.input
        if i.name in categories
    )


def _intervals(dask_worker) -> dict[str, float]:
    """Milliseconds between runs of a server's background callbacks."""
    callbacks = dask_worker.periodic_callbacks
    return {
        name: callbacks[name].callback_time
        for name in ("tick", "monitor", "memory_monitor")
        if name in callbacks
    }


def test_a_local_cluster_runs_its_background_checks_slowly() -> None:
    """The scheduler and every worker of a local cluster check their event loop every second
    and sample the host every 5 s; workers check memory every 500 ms; no profiler runs."""
    from adapters import dask_cluster

    client = dask_cluster.client_for(load_settings(environ={}).dask)
    per_worker = client.run(_intervals)
    assert per_worker
    for intervals in per_worker.values():
        assert intervals == {"tick": 1000.0, "monitor": 5000.0, "memory_monitor": 500.0}
    assert not any(client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks).values())
    scheduler = client.run_on_scheduler(_intervals)
    assert scheduler["tick"] == 1000.0 and scheduler["monitor"] == 5000.0


def test_a_local_cluster_leaves_the_default_dashboard_port_to_others() -> None:
    """With port 8787 taken (a user's own Dask dashboard), a local cluster starts without a
    warning and serves its scheduler's HTTP routes on another loopback port."""
    import socket
    import warnings

    import psutil

    from adapters import dask_cluster
    from mlops.settings import DaskConfig

    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind(("127.0.0.1", 8787))
            taken.listen()
        except OSError:
            pass  # already taken by someone else: the same situation
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            client = dask_cluster._connect(DaskConfig(n_workers=1, processes=False))
    try:
        port = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.http_server.port)
        listening = {c.laddr for c in psutil.Process().net_connections("tcp") if c.status == "LISTEN"}
        assert port != 8787 and ("127.0.0.1", port) in listening
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def _faults_reallocating(nbytes: int, pieces: int = 16) -> int:
    """Page faults of allocating and filling ``pieces`` arrays of ``nbytes`` in all, after
    arrays of the same sizes were allocated, filled and freed once (the previous partition)."""
    import resource
    import time

    def one_partition() -> None:
        arrays = [np.empty(nbytes // pieces // 8) for _ in range(pieces)]
        for a in arrays:
            a.fill(1.0)

    one_partition()
    time.sleep(0.05)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    one_partition()
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def test_a_local_cluster_worker_reuses_the_memory_of_the_previous_partition() -> None:
    """A worker of a local cluster gets the pages of a partition's freed arrays back for the
    next partition: filling sixteen 2 MB arrays again faults in almost none of their 8,192
    pages (under Dask's default environment every page faults again), and pyarrow's
    allocator is told to keep freed pages too."""
    from adapters import dask_cluster

    client = dask_cluster.client_for(load_settings(environ={}).dask)
    faults = client.run(_faults_reallocating, 32 << 20)
    assert faults
    assert all(f < 500 for f in faults.values()), faults
    assert set(client.run(os.environ.get, "MIMALLOC_PURGE_DELAY").values()) == {"-1"}
