"""Field projection (?fields=name,email): read only some fields of customers, with HMGET."""

from redis import exceptions as rx

from database import classified, on_primary
from storage import KEY_PREFIX, TYPE_PREFIX, NotACustomer, customer_key, decode, is_wrongtype
from validation import Invalid, check_fields


class BadFields(ValueError):
    """A fields parameter that names no list of fields a customer could hold."""


def parse(text: str, most: int) -> tuple[str, ...]:
    """Return the field names of a fields parameter, each once, or raise BadFields."""
    names = text.split(",")
    if len(names) > most:
        raise BadFields(f"fields names at most MAX_FIELDS={most} fields, got {len(names)}")
    try:
        # The names a body may set are the names a projection may ask for.
        check_fields(dict.fromkeys(names, ""), most)
    except Invalid as error:
        raise BadFields(f"fields is a comma-separated list of field names: {error}") from None
    return tuple(dict.fromkeys(names))


def arguments(names: tuple[str, ...]) -> tuple[str, ...]:
    """Return what HMGET asks for: each field and its type marker."""
    # A stored "id" is never a customer's field (the key names the id): asked for, it is
    # dropped like any other stored "id", and it keeps HMGET's list from being empty.
    return ("id", *(part for name in names if name != "id"
                    for part in (name, TYPE_PREFIX + name)))


def customer(customer_id: str, asked: tuple, values: list) -> dict:
    """Turn an HMGET reply into the customer's asked-for fields, typed as stored."""
    raw = [part for name, value in zip(asked, values, strict=True) if value is not None
           for part in (name, value)]
    return decode(customer_id, raw)


def picked(customer: dict, asked: tuple) -> dict:
    """Return the asked-for fields of a customer read whole."""
    return {"id": customer["id"], **{name: customer[name] for name in asked[1::2]
                                     if name in customer}}


def read(store, customer_id: str, asked: tuple) -> dict | None:
    """Return the asked-for fields of one customer, or None when there is no customer."""
    return store.retrying(_read, store.redis, customer_id, asked)


def _read(redis, customer_id: str, asked: tuple) -> dict | None:
    key = customer_key(customer_id)
    try:
        values = on_primary(redis, key, "HMGET", key, *asked)
    except rx.ResponseError as error:
        if is_wrongtype(error):
            raise NotACustomer(customer_id) from None
        raise
    # No value: a customer without these fields, or no customer at all.
    if all(value is None for value in values) and not on_primary(redis, key, "EXISTS", key):
        return None
    return customer(customer_id, asked, values)


def customers_of(redis, keys: list, replies: list, asked: tuple) -> list:
    """Turn the HMGET replies of a batch into customers, skipping keys gone or retyped."""
    start = len(KEY_PREFIX)
    customers, unsure = [], []
    for key, values in zip(keys, replies, strict=True):
        if isinstance(values, Exception):
            if isinstance(values, rx.AskError):
                # MOVED or ASK: a resharding moved the key; the cluster client follows it.
                values = redis.execute_command("HMGET", key, *asked)
            elif is_wrongtype(values):
                continue
            else:
                raise classified(values)
        if any(value is not None for value in values):
            customers.append(customer(key[start:], asked, values))
        else:
            unsure.append(key)
    if unsure:
        # A customer holding none of the fields, or a key deleted since SCAN found it.
        pipe = redis.pipeline(transaction=False)
        for key in unsure:
            pipe.exists(key)
        customers += [{"id": key[start:]} for key, found in zip(unsure, pipe.execute(),
                                                                strict=True) if found]
    return customers
