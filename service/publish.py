"""`python -m service.publish MODEL`: load a model's catalog into Redis as the active id map.

Servers reading the same Redis and namespace serve the new mapping from their next request
on; the switch is atomic (see service/id_store.py). Defaults come from the GENRET_* settings.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys

from .settings import NAMESPACE_PATTERN, SettingsError, load_settings


def url_template(text: str) -> str:
    """An argparse type: a URL template that fills in {key} and {name} only."""
    try:
        text.format(key="k", name="n")
    except (KeyError, IndexError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL template ({type(e).__name__}: {e}); "
                                         "it may use {key} and {name}") from None
    return text


def namespace_arg(text: str) -> str:
    """An argparse type: the Redis keys' prefix, as GENRET_ID_STORE_NAMESPACE takes it."""
    if not re.fullmatch(NAMESPACE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a namespace: a word, no spaces (the servers read it "
                                         "from GENRET_ID_STORE_NAMESPACE)")
    return text


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings()
    except SettingsError as e:
        print(f"publish: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m service.publish", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=settings.model, help="a name under model_store/ or a model folder")
    parser.add_argument("--redis-url", default=settings.redis_url or "redis://127.0.0.1:6379/0")
    parser.add_argument("--namespace", type=namespace_arg, default=settings.id_store_namespace)
    parser.add_argument("--url-template", type=url_template, default=settings.public_url + "/images/{key}",
                        help="image URL; {key} is the image key, {name} its file name (both URL-quoted)")
    args = parser.parse_args(argv)

    from genret.model_store import ModelStoreError, StoredModel
    from redis.exceptions import RedisError

    from .id_store import catalog_records, connect, keys_digest, publish

    async def run() -> str:
        stored = StoredModel.open(settings.model_copy(update={"model": args.model}).model_path)
        records = catalog_records(stored, args.url_template)
        redis = connect(args.redis_url)
        try:
            info = {"model": stored.name, "keys_sha256": keys_digest(records)}  # what servers check theirs against
            version = await publish(redis, args.namespace, records, info=info)
        finally:
            await redis.aclose()
        print(f"published {len(records)} images of model {stored.name!r} "
              f"as version {version} in namespace {args.namespace!r}")
        return version

    try:
        asyncio.run(run())
    except (ModelStoreError, RedisError, RuntimeError, KeyError, ValueError) as e:
        print(f"publish: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
