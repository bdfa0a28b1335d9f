"""The MongoDB change-feed scenarios against a real MongoDB replica set (or sharded cluster).

Skipped unless RT_TEST_MONGO_URL is set, e.g.
    RT_TEST_MONGO_URL='mongodb://127.0.0.1:27017/?replicaSet=rs0' ./scripts/test tests/test_mongo_real.py
Each test uses a database of its own (rttest_<random>) and drops it afterwards. Pre-images
need MongoDB 6.0+; the failpoint scenario needs `--setParameter enableTestCommands=1`.
Scenarios that need the test double's control API (truncating the oplog, killing every
connection, stopping the server) run only in test_mongo_source.py.
"""

from __future__ import annotations

import uuid

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

from tests import mongo_scenarios as sc

pytestmark = pytest.mark.mongo_real


@pytest.fixture
async def env(real_mongo_url, collecting_sink, tmp_path):
    database = f"rttest_{uuid.uuid4().hex[:10]}"
    yield sc.Env(url=real_mongo_url, database=database, state_dir=str(tmp_path / "state"), sink=collecting_sink)
    client = AsyncMongoClient(real_mongo_url, serverSelectionTimeoutMS=5000)
    try:
        await client.drop_database(database)
    finally:
        await client.close()


async def _server_version(env) -> tuple[int, ...]:
    client = AsyncMongoClient(env.url, serverSelectionTimeoutMS=5000)
    try:
        return tuple((await client.admin.command("buildInfo"))["versionArray"][:2])
    finally:
        await client.close()


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
    if await _server_version(env) < (6, 0):
        pytest.skip("pre-images need MongoDB 6.0+")
    await sc.pre_images_give_old_document(env)


async def test_a_change_over_16_mib_arrives_whole(env):
    if await _server_version(env) < (7, 0):  # 6.0.9+ has the stage too; versionArray[:2] cannot tell
        pytest.skip("$changeStreamSplitLargeEvent needs MongoDB 7.0 (or 6.0.9)")
    await sc.large_changes_arrive_whole(env)


async def test_a_change_too_large_to_send_is_skipped_with_a_gap(env):
    await sc.a_change_too_large_to_send_is_skipped_with_a_gap(env)


async def test_transaction_changes_share_a_correlation_id(env):
    await sc.transaction_correlation_id(env)


async def test_resume_after_restart_loses_and_duplicates_nothing(env):
    await sc.resume_after_restart(env)


async def test_resume_after_restart_with_an_option_added_to_the_url(env):
    await sc.resume_after_restart_with_an_option_added(env)


async def test_a_new_stream_resumes_from_its_first_empty_batch(env):
    await sc.a_new_stream_resumes_from_its_first_empty_batch(env)


async def test_resume_after_getmore_network_error_and_resumable_error(env):
    try:
        await sc.resume_after_failpoints(env)
    except OperationFailure as exc:
        if "configureFailPoint" in str(exc) or exc.code == 59:
            pytest.skip("the server does not allow failpoints (enableTestCommands=1)")
        raise


async def test_invalidate_reopens_the_stream(env):
    await sc.invalidate_reopens(env)


async def test_collection_drop_does_not_stop_other_collections(env):
    await sc.collection_drop_keeps_streaming(env)


async def test_collection_rename_does_not_stop_the_feed(env):
    await sc.collection_rename_keeps_streaming(env)


async def test_check_channel(env):
    await sc.check_channel(env)


async def test_a_view_or_time_series_collection_is_refused_saying_what_it_is(env):
    await sc.views_and_time_series_are_not_channels(env)  # time series: MongoDB 5.0+


async def test_operations_narrow_the_stream(env):
    await sc.operations_narrow_the_stream(env)
