"""A fast tar reader for webdataset shards: parses the 512-byte headers directly instead of Python's ``tarfile``.

``tarfile`` spends about 40 us per member here (TarInfo objects, checks, seeks), more than decoding a small JPEG;
reading the headers directly costs about 3 us. Handles what shard writers produce: ustar names with their prefix
field, GNU long names (``L``), PAX extended headers (``x``: ``path``, ``size``), regular files; other entries
(directories, links, global headers) are skipped. The output feeds webdataset's own ``group_by_keys``.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

BLOCK = 512


class TruncatedShard(ValueError):
    pass


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes beyond 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _pax(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream, in order."""
    long_name, pax = None, {}
    while True:
        header = stream.read(BLOCK)
        if not header or header.count(0) == BLOCK:
            return
        if len(header) < BLOCK:
            raise TruncatedShard("truncated tar header")
        size = _octal(header[124:136])
        kind = header[156:157]
        if "size" in pax:
            size = int(pax["size"])
        data = stream.read(size)
        if len(data) < size:
            raise TruncatedShard(f"truncated tar member ({len(data)} of {size} bytes)")
        stream.read(-size % BLOCK)
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":
            pax = _pax(data)
            continue
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix and header[257:262] == b"ustar":
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        name = pax.get("path", long_name or name)
        long_name, pax = None, {}
        if kind in (b"0", b"\0", b"7"):
            yield name, data


def tar_samples(sources: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Pipeline stage: shard urls (``{"url": ...}``) -> webdataset samples, a drop-in for ``tarfile_to_samples``.

    A shard that fails to open or parse goes to ``handler`` (skip and count, or re-raise); the samples read before
    the error are kept.
    """

    def files():
        for source in sources:
            url = source["url"]
            try:
                with gopen(url, "rb") as stream:
                    for name, data in tar_members(stream):
                        yield {"fname": name, "data": data, "__url__": url}
            except Exception as exn:  # the handler decides: skip and count, or raise
                exn.args = (*exn.args, url)  # say which shard, as webdataset does
                if not handler(exn):
                    raise
            yield {}  # end of shard: samples never straddle shards

    return group_by_keys(files(), handler=handler)
