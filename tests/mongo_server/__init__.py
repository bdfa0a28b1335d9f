"""A minimal MongoDB wire-protocol server for the tests: a TEST DOUBLE, not a database.

No MongoDB server can be installed on the machines these tests run on, so this package speaks
just enough of the wire protocol for the real PyMongo driver to connect over TCP and run its
own handshake, cursor, getMore and resume logic against it: a single replica-set primary with
an in-memory oplog and change streams (resume tokens, updateLookup, pre-images, invalidate,
ChangeStreamHistoryLost), insert/update/delete with retryable-write dedup and simple
transactions, equality-style find, and the `failCommand` failpoint for fault injection.
See README.md in this folder for what it does and does not implement. The real-MongoDB suite
(tests/test_mongo_real.py, RT_TEST_MONGO_URL) runs the same scenarios against a real server.
"""

from .server import MongoTestServer, ThreadedMongoTestServer

__all__ = ["MongoTestServer", "ThreadedMongoTestServer"]
