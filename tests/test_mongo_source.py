"""MongoSource against the MongoDB test double over TCP, through the real PyMongo driver:
every operation, BSON mapping, multi-workspace fan-in, resume after a gateway restart and after
dropped connections, history lost, invalidate, collection checks.

The same scenarios run against a real replica set in test_mongo_real.py (shared in
tests/mongo_scenarios.py)."""

from __future__ import annotations

import pytest

from rtserver.sources.mongo import database_for
from tests import mongo_scenarios as sc


@pytest.fixture
def env(mongo_server, collecting_sink, tmp_path):
    return sc.Env(url=mongo_server.url, database="shop", state_dir=str(tmp_path / "state"), sink=collecting_sink,
                  server=mongo_server)


async def test_operations_have_the_seed_shape(env):
    await sc.operations_have_the_seed_shape(env)


async def test_update_of_a_document_deleted_since_has_null_document(env):
    await sc.update_then_delete_gives_null_document(env)


async def test_bson_types_map_to_json(env):
    await sc.bson_types_map_to_json(env)


async def test_each_collection_is_its_own_channel(env):
    await sc.collections_are_channels(env)


async def test_one_event_per_workspace_with_one_body(env):
    await sc.one_event_per_workspace(env)


async def test_pre_images_give_old_document(env):
    await sc.pre_images_give_old_document(env)


async def test_transaction_changes_share_a_correlation_id(env):
    await sc.transaction_correlation_id(env)


async def test_resume_after_restart_loses_and_duplicates_nothing(env):
    await sc.resume_after_restart(env)


async def test_a_new_stream_resumes_from_its_first_empty_batch(env):
    await sc.a_new_stream_resumes_from_its_first_empty_batch(env)


async def test_resume_after_server_drops_connections(env):
    await sc.resume_after_dropped_connections(env, lambda: env.server.drop_connections())


async def test_resume_after_getmore_network_error_and_resumable_error(env):
    await sc.resume_after_failpoints(env)


async def test_history_lost_reports_a_gap_and_restarts(env):
    await sc.history_lost(env, lambda: env.server.truncate_oplog())


async def test_invalidate_reopens_the_stream(env):
    await sc.invalidate_reopens(env)


async def test_collection_drop_does_not_stop_other_collections(env):
    await sc.collection_drop_keeps_streaming(env)


async def test_check_channel(env):
    await sc.check_channel(env)


async def test_operations_narrow_the_stream(env):
    await sc.operations_narrow_the_stream(env)
    assert "aggregate" in env.server.commands_seen()


async def test_unreachable_server_is_not_ready_then_recovers(env):
    await sc.not_ready_while_unreachable(env)


def test_database_from_url_or_workspace():
    assert database_for("mongodb://h:27017/shop?replicaSet=rs0", "w1") == "shop"
    assert database_for("mongodb://u:p@h1,h2/app%20db", "w1") == "app db"
    assert database_for("mongodb://h:27017/?directConnection=true", "w1") == "w1"
    assert database_for("mongodb+srv://cluster.example.net", "w2") == "w2"
