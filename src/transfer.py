"""Bulk export and import of customers as NDJSON: one JSON object a line, streamed both ways."""

import logging
import uuid

from flask import Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge, RequestTimeout

import errors
from bulk_merge import Pending, merge_many
from database import UNAVAILABLE
from representation import dumps
from storage import NotACustomer, TooManyFields, valid_id
from validation import ID_RULE, Invalid, check_fields, check_not_encoded, parse_object

log = logging.getLogger(__name__)
NDJSON = "application/x-ndjson"
STREAM_CHUNK_BYTES = 64 * 1024
READ_BYTES = 256 * 1024
# An import is applied a chunk of lines at a time: one pipeline per primary per chunk.
CHUNK_LINES = 1000
CHUNK_BYTES = 2 * 1024 * 1024
MAX_LISTED_FAILURES = 1000
# What ends an export the database cut short: a last line that no JSON parser takes.
CUT_SHORT = b'{"message":"the export was cut short: the database became unavailable"'


def wanted() -> bool:
    """Tell whether the request's Accept prefers NDJSON to JSON."""
    return request.accept_mimetypes.best_match(["application/json", NDJSON]) == NDJSON


def lines_of(customers: list) -> bytes:
    """Encode customers as NDJSON lines."""
    return b"".join(dumps(customer) + b"\n" for customer in customers)


def streamed(batches, encode, end: bytes, cut_short: bytes):
    """Return the body's chunks: encode(batch, first?) of each batch, written about
    STREAM_CHUNK_BYTES at a time, then end, or cut_short when the database fails midway; None
    when there is no batch. The first batch is read now: an outage at the start is a 503."""
    batches = (batch for batch in batches if batch)
    # Sent chunk by chunk, each made in one of the worker's slots (see deadlines.py).
    request.environ["customers.streamed"] = True
    first = next(batches, None)

    def chunks():
        # The first batch goes out at once: the status line is sent, and the client starts.
        yield encode(first, True)
        buffer, size, count = [], 0, len(first)
        try:
            for batch in batches:
                text = encode(batch, False)
                buffer.append(text)
                size += len(text)
                count += len(batch)
                if size >= STREAM_CHUNK_BYTES:
                    yield b"".join(buffer)
                    buffer, size = [], 0
        except UNAVAILABLE as error:
            # Too late for a 503: end with what no parser takes for a whole list.
            log.warning("list cut short after %d customers: %s: %s", count,
                        type(error).__name__, error)
            buffer.append(cut_short)
            yield b"".join(buffer)
            return
        buffer.append(end)
        yield b"".join(buffer)

    return chunks() if first is not None else None


def stream(batches) -> Response:
    """Answer with the customers of each batch as NDJSON lines, written as the batches arrive."""
    chunks = streamed(batches, lambda batch, _: lines_of(batch), b"", CUT_SHORT)
    return Response(chunks or [], mimetype=NDJSON)


def numbered_lines(read, most: int):
    """Yield (number, line) for each line read(size) gives; a line over most bytes as None,
    never held whole in memory."""
    number, rest, too_long = 0, b"", False
    while block := read(READ_BYTES):
        lines = block.split(b"\n")
        lines[0] = rest + lines[0]
        rest = lines.pop()
        for line in lines:
            number += 1
            yield number, None if too_long or len(line) > most else line
            too_long = False
        if len(rest) > most:
            too_long, rest = True, b""
    if rest.strip() or too_long:
        yield number + 1, None if too_long else rest


def line_fields(line: bytes, most: int) -> tuple[str | None, dict]:
    """Return the id (None: a new customer) and the fields of an import line, or raise Invalid."""
    body = parse_object(line, "the line")
    customer_id = None
    if "id" in body:
        customer_id = body.pop("id")
        if not (isinstance(customer_id, str) and valid_id(customer_id)):
            raise Invalid(f"the id must be a string: {ID_RULE}")
    if not body:
        raise Invalid("the line must hold at least one field besides id")
    if customer_id is None and None in body.values():
        raise Invalid("a new customer has no field to remove: send no null values "
                      "(or give the line an id)")
    return customer_id, check_fields(body, most)


class Import:
    """The running tally of an import: what was read, created, updated and refused."""

    def __init__(self, store):
        self.store = store
        self.lines = self.created = self.updated = self.failed = 0
        self.failures = []
        self.chunk, self.numbers, self.chunk_bytes = [], [], 0
        self.applied_through = 0
        self.in_flight = None

    def fail(self, number: int, message: str) -> None:
        """Count a line that was not applied, and list it among the first failures."""
        self.failed += 1
        if len(self.failures) < MAX_LISTED_FAILURES:
            self.failures.append({"line": number, "message": message})

    def add(self, number: int, line: bytes | None, most_bytes: int, most_fields: int) -> None:
        """Check one line and queue it; apply the queue once it makes a chunk."""
        if line is None:
            self.lines += 1
            self.fail(number, f"the line is longer than MAX_BODY_BYTES={most_bytes} bytes")
            return
        if not line.strip():
            return  # blank lines (a last newline, say) are no customers
        self.lines += 1
        try:
            customer_id, fields = line_fields(line, most_fields)
        except Invalid as error:
            self.fail(number, str(error))
            return
        # A new customer's id is drawn once, before any attempt: a retried chunk rewrites it.
        self.chunk.append((customer_id or str(uuid.uuid4()), fields))
        self.numbers.append(number)
        self.chunk_bytes += len(line)
        if len(self.chunk) >= CHUNK_LINES or self.chunk_bytes >= CHUNK_BYTES:
            self.apply()

    def apply(self) -> None:
        """Send the queued lines, one pipeline per primary, once the chunk sent before them
        is tallied: the database applies one chunk while the next is read and checked."""
        self.finish()
        if self.chunk:
            try:
                pending = Pending(self.store, self.chunk)
            except UNAVAILABLE:
                pending = None  # finish() applies them again, with retries
            self.in_flight = (pending, self.chunk, self.numbers)
        self.chunk, self.numbers, self.chunk_bytes = [], [], 0

    def finish(self) -> None:
        """Tally the chunk in flight, applying it again with retries if its pipelines failed."""
        if self.in_flight is None:
            return
        pending, chunk, numbers = self.in_flight
        self.in_flight = None
        results = None
        if pending is not None:
            try:
                results = pending.receive()
            except UNAVAILABLE:
                pass  # applied again below, with retries
        if results is None:
            self.in_flight = (None, chunk, numbers)  # still in flight until that succeeds
            results = merge_many(self.store, chunk)
            self.in_flight = None
        for (customer_id, _), number, result in zip(chunk, numbers, results, strict=True):
            if result is True:
                self.created += 1
            elif result is False:
                self.updated += 1
            elif isinstance(result, NotACustomer):
                self.fail(number, f"the key of customer {customer_id} holds something that is "
                                  "not a customer (not a hash); it is left as it is")
            elif isinstance(result, TooManyFields):
                self.fail(number, f"a customer holds at most MAX_FIELDS={self.store.max_fields} "
                                  f"fields; this line would leave {result.args[0]}")
        self.applied_through = numbers[-1]

    def close(self) -> None:
        """Give back the connections of a chunk still in flight when the import stopped."""
        if self.in_flight and self.in_flight[0]:
            self.in_flight[0].close()

    def summary(self) -> dict:
        """Return what the import did, as the response tells it."""
        return {"lines": self.lines, "created": self.created, "updated": self.updated,
                "failed": self.failed, "failures": self.failures,
                "unlisted_failures": self.failed - len(self.failures)}

    def so_far(self, pending: bool = False) -> str:
        """Say which lines were applied before the import stopped; pending: the chunk after
        them was being applied."""
        done = (f"lines 1 to {self.applied_through} were applied" if self.applied_through
                else "no line was applied")
        after = ("the next chunk of lines may be in part, the lines after it were not"
                 if pending else "the lines after them were not")
        return (f"{done} ({self.created} created, {self.updated} updated, {self.failed} "
                f"failed); {after}")


def body_reader():
    """Return read(size) over the request body, limited to MAX_IMPORT_BYTES, not MAX_BODY_BYTES."""
    check_not_encoded()
    limit = current_app.config["MAX_IMPORT_BYTES"]
    request.max_content_length = limit
    try:
        body = request.stream
    except RequestEntityTooLarge:
        errors.fail(413, f"an import is at most MAX_IMPORT_BYTES={limit} bytes; "
                         "nothing was applied")

    def read(size: int) -> bytes:
        try:
            return body.read(size)
        except RequestEntityTooLarge:
            # A chunked body reaching the limit exactly ends there; one byte more is over it.
            if request.environ["wsgi.input"].read(1):
                raise
            return b""

    return read


def import_customers(store) -> Response:
    """Apply an NDJSON body, line by line, and answer 200 with the summary."""
    most_bytes = current_app.config["MAX_CONTENT_LENGTH"]
    most_fields = current_app.config["MAX_FIELDS"]
    read = body_reader()
    tally = Import(store)
    try:
        for number, line in numbered_lines(read, most_bytes):
            tally.add(number, line, most_bytes, most_fields)
        tally.apply()
        tally.finish()
    except RequestEntityTooLarge:
        tally.finish()
        limit = current_app.config["MAX_IMPORT_BYTES"]
        errors.fail(413, f"an import is at most MAX_IMPORT_BYTES={limit} bytes: "
                         f"{tally.so_far()}")
    except RequestTimeout:
        tally.finish()
        errors.fail(408, f"the import came too slowly (MIN_BODY_RATE): {tally.so_far()}")
    except UNAVAILABLE as error:
        log.warning("import stopped: %s: %s", type(error).__name__, error)
        errors.fail(503, f"{errors.database_state(error)}; {tally.so_far(pending=True)}; "
                         "try again shortly",
                    {"Retry-After": str(errors.RETRY_AFTER_SECONDS)})
    finally:
        tally.close()
    log.info("imported %d lines: %d created, %d updated, %d failed", tally.lines,
             tally.created, tally.updated, tally.failed)
    return Response(dumps(tally.summary()) + b"\n", 200, mimetype="application/json")
