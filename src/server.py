"""The customers service: a REST API over customer hashes in a Redis Cluster."""

import contextlib
import dataclasses
import hashlib
import logging
import sys
from urllib.parse import quote

import orjson
from dotenv import find_dotenv, load_dotenv
from flask import Flask, Response, current_app, request, url_for
from flask.sessions import NullSession, SecureCookieSessionInterface
from flask_restful import Api, Resource
from werkzeug.routing import PathConverter

import access
import api_contract
import docs_page
import errors
import health
import idempotency
import listing
import metrics
import preconditions
import projection
import representation
import request_log
import transfer
import validation
from database import connect, waiting_threads
from embedded import SERVICE_USER, EmbeddedError, EmbeddedRedis, find_redis_server
from settings import Config, ConfigError, load_config
from storage import (
    CustomerStore,
    NotACustomer,
    NothingLeft,
    PreconditionFailed,
    TooManyFields,
)

log = logging.getLogger("customers")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Where WSGI keeps the Idempotency-Key header: request.headers costs several times more.
IDEMPOTENCY_KEY = "HTTP_" + idempotency.HEADER.upper().replace("-", "_")


def no_content(status: int = 204, headers: dict | None = None) -> Response:
    """Answer with no body and no content type: 204, or 201 for a PUT that created."""
    response = Response(status=status, headers=headers)
    del response.headers["Content-Type"]
    return response


class NoSessions(SecureCookieSessionInterface):
    """No sessions (the service keeps none): one shared null session, none made per request."""

    null_session = NullSession()

    def open_session(self, app, request):
        """Return the null session: there is no session cookie to read."""
        return self.null_session


class SyncFlask(Flask):
    """Flask, told that every view and hook here is synchronous, and that it keeps no sessions."""

    session_interface = NoSessions()

    def ensure_sync(self, func):
        """Return func: Flask's check for coroutines costs tens of microseconds a request."""
        return func


class AnyId(PathConverter):
    """A path's rest as a customer id, line breaks and a leading / included: check_id answers
    400 for line breaks (werkzeug's path converter does not match them, and a 404 would not
    say why), and an id written by another program may start with a /."""

    regex = "(?s:.+?)"
    part_isolating = False  # werkzeug would take a regex without a / to match one segment


class JsonApi(Api):
    """Flask-RESTful's Api, leaving every error to the app's JSON error handlers."""

    def error_router(self, original_handler, e):
        """Hand every error to Flask's handlers (see errors.py).

        Flask-RESTful's own router first matches the request's URL again to see whether the
        error came from one of its routes; with a Host that werkzeug cannot bind (a label over
        63 characters), that match raises anew, outside every handler: a bare 500.
        """
        return original_handler(e)


def page_arguments() -> tuple[int, str | None] | None:
    """Return the page size and cursor asked for, or None when the whole list is wanted."""
    if "limit" not in request.args and "cursor" not in request.args:
        return None
    limit = request.args.get("limit", str(DEFAULT_PAGE_SIZE))
    if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= MAX_PAGE_SIZE):
        errors.fail(400, f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}")
    cursor = request.args.get("cursor")
    if cursor == "":
        errors.fail(400, "cursor must be the one from a Link header of this service")
    return int(limit), cursor


def fields_asked() -> tuple:
    """Return what HMGET asks for ?fields= (comma-separated, or repeated), or () when the
    whole customer is wanted."""
    if not request.environ.get("QUERY_STRING") or "fields" not in request.args:
        return ()
    try:
        names = projection.parse(",".join(request.args.getlist("fields")),
                                 current_app.config["MAX_FIELDS"])
    except projection.BadFields as error:
        errors.fail(400, str(error))
    return projection.arguments(names)


def json_response(item, status: int = 200, headers: dict | None = None) -> Response:
    """Answer with item as JSON, encoded by orjson."""
    body = representation.dumps(item) + b"\n"
    return Response(body, status, headers, mimetype="application/json")


def members(items: list) -> bytes:
    """Encode items as the members of a JSON array, without its brackets."""
    try:
        # orjson encodes a list of items in far less time than each item alone.
        return orjson.dumps(items)[1:-1]
    except orjson.JSONEncodeError:
        return b",".join(representation.dumps(item) for item in items)


def stream_json_array(batches) -> Response:
    """Answer with a JSON array of the items of each batch, written as the batches arrive."""
    def encode(batch, first):
        return (b"[" if first else b",") + members(batch)

    # Cut short, the array stays unclosed: no JSON parser takes it for a whole list.
    chunks = transfer.streamed(batches, encode, b"]\n", b"")
    return Response(chunks or [b"[]\n"], mimetype="application/json")


def stale(customer_id: str):
    """Stop with 412: the customer is not in the version If-Match or If-None-Match asked for."""
    errors.fail(412, f"customer {customer_id} is not in the version the request's condition names")


def not_a_customer(customer_id: str):
    """Stop with 409: another program keeps something other than a customer under its key."""
    errors.fail(409, f"the key of customer {customer_id} holds something that is not a "
                     "customer (not a hash); it is left as it is")


def too_many_fields(error: TooManyFields):
    """Stop with 400: the write would leave the customer with more fields than MAX_FIELDS."""
    most = current_app.config["MAX_FIELDS"]
    errors.fail(400, f"a customer holds at most MAX_FIELDS={most} fields; "
                     f"this write would leave {error.args[0]}")


def customer_url(customer_id: str) -> str:
    """Return the path of a customer, its id percent-encoded."""
    return f"{request.script_root}/customers/{quote(customer_id, safe='')}"


def options(resource: Resource, headers: dict | None = None) -> Response:
    """Answer OPTIONS with 204 and the methods the resource allows."""
    response = no_content()
    response.headers["Allow"] = ", ".join(sorted(resource.methods | {"HEAD"}))
    response.headers.update(headers or {})
    return response


def idempotent_post(creates: idempotency.IdempotentCreates, key: str) -> Response:
    """Create a customer once per key: a repeat of the body answers the first 201 again."""
    if not idempotency.valid_key(key):
        errors.fail(400, f"{idempotency.HEADER} must be 1 to 255 visible ASCII characters "
                         "(no spaces)")
    fields = validation.read_fields()
    try:
        created = creates.create(key, fields)
    except idempotency.KeyReused:
        errors.fail(422, f"this {idempotency.HEADER} was first sent with another body; "
                         "use a new key for another customer")
    except idempotency.InProgress:
        errors.fail(409, f"a request with this {idempotency.HEADER} is still being processed "
                         "(waiting for the replicas); retry it later",
                    {"Retry-After": str(errors.RETRY_AFTER_SECONDS)})
    except idempotency.NotARecord:
        errors.fail(409, f"the key of this {idempotency.HEADER}'s record holds another "
                         "program's data, not a record; it is left as it is")
    headers = {"Location": f"{request.script_root}/customers/{created.customer_id}"}
    if created.replayed:
        headers["Idempotent-Replayed"] = "true"
    else:
        log.info("created customer %s", created.customer_id)
    return Response(created.customer + "\n", 201, headers, mimetype="application/json")


class Customers(Resource):
    """The collection of customers: list them all, or create one."""

    # One instance serves every request (it keeps no per-request state): none made per request.
    init_every_request = False

    def __init__(self, store: CustomerStore, cursor_key: bytes,
                 creates: idempotency.IdempotentCreates):
        self.store = store
        self.cursor_key = cursor_key
        self.creates = creates

    def get(self):
        """List every customer, streamed, or one page of them when limit or cursor is given;
        as JSON, or as NDJSON when Accept asks for it."""
        validation.check_query("limit", "cursor", "fields")
        asked, ndjson = fields_asked(), transfer.wanted()
        paging = page_arguments()
        if paging is None:
            batches = listing.walk(self.store, asked)
            return transfer.stream(batches) if ndjson else stream_json_array(batches)
        limit, cursor = paging
        try:
            customers, following = listing.page(self.store, limit, cursor, self.cursor_key,
                                                asked)
        except listing.BadCursor as error:
            errors.fail(400, f"{error}: use the one from a Link header of this service")
        except listing.StaleCursor as error:
            errors.fail(410, f"{error}: start again without a cursor")
        headers = {}
        if following:
            kept = {"fields": ",".join(request.args.getlist("fields"))} if asked else {}
            url = url_for("customers", limit=limit, cursor=following, **kept)
            headers["Link"] = f'<{url}>; rel="next"'
        if ndjson:
            return Response(transfer.lines_of(customers), 200, headers, mimetype=transfer.NDJSON)
        return json_response(customers, 200, headers)

    def post(self):
        """Create a customer under a new id (once per Idempotency-Key if one is sent), or import
        NDJSON lines (see transfer.py)."""
        validation.check_query()
        key = request.environ.get(IDEMPOTENCY_KEY)
        if request.mimetype == transfer.NDJSON:
            if key is not None:
                # Taken and ignored, the key would promise a safe retry: a retried import
                # creates its lines without ids again.
                errors.fail(400, f"an import takes no {idempotency.HEADER}: give each line an "
                                 "id, and sending the import again is safe (docs/bulk.md)")
            return transfer.import_customers(self.store)
        if key is not None:
            return idempotent_post(self.creates, key)
        customer = self.store.create(validation.read_fields())
        log.info("created customer %s", customer["id"])
        # Ids are URL-safe as they are (a uuid4 here): no quoting, no url_for.
        location = f"{request.script_root}/customers/{customer['id']}"
        return json_response(customer, 201, {"Location": location})

    def options(self):
        """Answer which methods the collection allows."""
        return options(self)


class Customers_ID(Resource):  # noqa: N801 - the name of the original design
    """One customer: read, create or update, patch, delete; writes may be conditional."""

    init_every_request = False  # as Customers

    def __init__(self, store: CustomerStore):
        self.store = store

    def get(self, customer_id):
        """Return one customer with its ETag, or 304 when If-None-Match names it; with
        ?fields=, only those fields and no ETag."""
        validation.check_id(customer_id)
        validation.check_query("fields")
        asked = fields_asked()
        # Conditions name versions of the whole customer: with them, it is read whole.
        projected = asked and not preconditions.conditional()
        try:
            if projected:
                customer = projection.read(self.store, customer_id, asked)
            else:
                customer = self.store.get(customer_id)
        except NotACustomer:
            not_a_customer(customer_id)
        if customer is None:
            errors.fail(404, f"customer {customer_id} does not exist")
        if projected:
            return json_response(customer)
        if asked:
            unchanged = preconditions.read_condition(customer_id, representation.version(customer))
            return unchanged or json_response(projection.picked(customer, asked))
        return preconditions.tagged(customer)

    def put(self, customer_id):
        """Merge the given fields into a customer, creating it if absent; null removes a field."""
        validation.check_id(customer_id)
        validation.check_query()
        fields = validation.read_fields(customer_id)
        condition = preconditions.write_condition()
        try:
            if condition:
                created = self.store.merge_if(customer_id, fields, condition)
            else:
                created = self.store.merge(customer_id, fields)
        except NotACustomer:
            not_a_customer(customer_id)
        except PreconditionFailed:
            stale(customer_id)
        except TooManyFields as error:
            too_many_fields(error)
        if created:
            log.info("created customer %s", customer_id)
            return no_content(201, {"Location": customer_url(customer_id)})
        return no_content()

    def patch(self, customer_id):
        """Apply a JSON merge patch to an existing customer and return it with its ETag."""
        validation.check_id(customer_id)
        validation.check_query()
        fields = validation.read_merge_patch(customer_id)
        try:
            customer = self.store.patch(customer_id, fields, preconditions.write_condition())
        except NotACustomer:
            not_a_customer(customer_id)
        except PreconditionFailed:
            stale(customer_id)
        except NothingLeft:
            errors.fail(422, "the patch would remove every field; DELETE the customer instead")
        except TooManyFields as error:
            too_many_fields(error)
        if customer is None:
            errors.fail(404, f"customer {customer_id} does not exist")
        return preconditions.tagged(customer, read=False)

    def delete(self, customer_id):
        """Delete a customer; deleting one that does not exist succeeds too (unless If-Match)."""
        validation.check_id(customer_id)
        validation.check_query()
        condition = preconditions.write_condition()
        try:
            if condition is None:
                self.store.delete(customer_id)
            else:
                self.store.delete_if(customer_id, condition)
        except NotACustomer:
            not_a_customer(customer_id)
        except PreconditionFailed:
            stale(customer_id)
        return no_content()

    def options(self, customer_id):
        """Answer which methods a customer allows, and the patch format PATCH takes."""
        validation.check_id(customer_id)
        return options(self, {"Accept-Patch": validation.MERGE_PATCH})


def cursor_key(config: Config) -> bytes:
    """Return the key that signs paging cursors: the same for every instance on one database,
    different on another, and unknown to clients while the database has a password."""
    material = repr((config.db_host, config.db_port, config.db_username, config.db_password))
    return hashlib.blake2b(material.encode(), digest_size=32, person=b"cursor").digest()


def create_app(config: Config, redis_client) -> Flask:
    """Build the app around a Redis or Redis Cluster client."""
    # No static files here, so no /static route.
    app = SyncFlask(__name__, static_folder=None)
    # werkzeug would redirect /customers//x (customer "/x", percent-encoded or not) to
    # /customers/x, another customer, with a 308 that clients follow with the same method.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["MAX_FIELDS"] = config.max_fields
    app.config["MAX_IMPORT_BYTES"] = config.max_import_bytes
    errors.register(app)
    request_log.install(app)
    guard = access.install(app, config.api_tokens, {"/metrics": config.metrics_tokens},
                           config.host)
    if config.metrics:
        metrics.install(app)
    store = CustomerStore(redis_client, config.db_retry_seconds, config.db_wait_replicas,
                          wait_timeout=config.db_timeout / 2, max_fields=config.max_fields,
                          waiting_threads=waiting_threads(config.threads))
    health.register(app, redis_client, guard.trusted)
    api = JsonApi(app)
    creates = idempotency.IdempotentCreates(store, config.idempotency_ttl_seconds)
    api.add_resource(Customers, "/customers",
                     resource_class_kwargs={"store": store, "cursor_key": cursor_key(config),
                                            "creates": creates})
    # path: an id may hold a /, as the keys of other programs may. The rule's text stays
    # werkzeug's (metrics label requests by it); its converter is AnyId.
    app.url_map.converters["path"] = AnyId
    api.add_resource(Customers_ID, "/customers/<path:customer_id>", endpoint="customer",
                     resource_class_kwargs={"store": store})
    api_contract.install(app, bool(config.api_tokens))
    docs_page.install(app)
    return app


def database_client(config: Config, max_connections: int):
    """Connect to the database; with DBAUTH=iam, sign and renew IAM tokens in this process."""
    if config.db_auth != "iam":
        return connect(config, max_connections)
    # botocore costs each process about 7 MB: loaded only where IAM tokens are signed.
    import iam_auth

    provider = iam_auth.provider_for(config)
    client = connect(config, max_connections, credential_provider=provider)
    iam_auth.KeepAuthenticated(client, provider).start()
    return client


@contextlib.contextmanager
def database(config: Config):
    """Yield the config to connect with, running the embedded database when no DBHOST is set."""
    if not config.embedded:
        yield config
        return
    embedded = EmbeddedRedis(config.data_dir, find_redis_server(config.redis_server),
                             config.embedded_port)
    socket_path = embedded.start()
    metrics.set_embedded_up(True)
    try:
        yield dataclasses.replace(config, db_socket=socket_path, db_tls=False,
                                  db_username=SERVICE_USER, db_password=embedded.service_password,
                                  db_wait_replicas=0)
    finally:
        embedded.stop()
        metrics.set_embedded_up(False)


def main() -> int:
    """Load .env and the environment, then serve until stopped."""
    load_dotenv(find_dotenv(usecwd=True))
    try:
        config = load_config()
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    request_log.configure(config.log_level, config.log_format)
    access.warn_if_open(config)
    import serving

    try:
        # Before the embedded database starts: a port taken is a start that does nothing.
        serving.check_port(config.host, config.port)
        with metrics.shared_directory(config.metrics), database(config) as db_config:
            pool = serving.pool_size(config)
            serving.serve(lambda: create_app(db_config, database_client(db_config, pool)), config)
    except EmbeddedError as error:
        print(f"cannot start the embedded database: {error}", file=sys.stderr)
        return 1
    except serving.ServeError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
