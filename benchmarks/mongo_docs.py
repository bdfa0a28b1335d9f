"""Change events of about 500 bytes of BSON, the shape the MongoDB normalizer benchmark and
its tests use: an order with nested items, money as Decimal128, dates, ObjectIds."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import bson
from bson import Decimal128, Int64, ObjectId, Timestamp
from bson.binary import Binary, UuidRepresentation


def order_change(i: int = 0, operation: str = "insert") -> dict[str, Any]:
    oid = ObjectId(f"65a5{i:020x}")
    when = dt.datetime(2024, 1, 15, 10, 0, 0, 123000) + dt.timedelta(seconds=i)
    document = {
        "_id": oid,
        "orderId": f"ORD-{i:06d}",
        "status": "paid",
        "total": Decimal128("198.95"),
        "items": [
            {"sku": "SKU-1", "name": "Wireless mouse", "qty": 2, "price": 49.5},
            {"sku": "SKU-2", "name": "USB-C hub", "qty": 1, "price": 99.95},
        ],
        "customer": {"id": ObjectId(f"65b5{i:020x}"), "name": "Ada Lovelace", "tier": "gold",
                     "visits": Int64(1234567890123)},
        "createdAt": when,
        "updatedAt": when,
        "tags": ["priority", "gift"],
        "shipping": {"method": "express", "address": {"city": "Berlin", "zip": "10115", "country": "DE"}},
        "paymentRef": Binary.from_uuid(uuid.UUID(int=i + 1), UuidRepresentation.STANDARD),
    }
    change: dict[str, Any] = {
        "_id": {"_data": f"8265A5{i:010X}000000012B022C0100296E5A1004A1B2C3D4E5F6A7B8C9D0E1F2A3B4C5D646645F69640064{i:020X}0004"},
        "operationType": operation,
        "clusterTime": Timestamp(1705312800 + i, 1),
        "wallTime": when,
        "ns": {"db": "shop", "coll": "orders"},
        "documentKey": {"_id": oid},
    }
    if operation == "delete":
        return change
    change["fullDocument"] = document
    if operation == "update":
        change["updateDescription"] = {"updatedFields": {"status": "paid", "updatedAt": when}, "removedFields": [],
                                       "truncatedArrays": []}
    return change


def bson_size(change: dict[str, Any]) -> int:
    return len(bson.encode(change.get("fullDocument") or {}))
