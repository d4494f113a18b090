"""What a file someone else wrote may hold: the one place that reads it safely and writes its text back out safely.

A RUN_DIR, a recipe or a plan.yaml may come from someone else (sent, downloaded, edited by hand), so nothing read
from one is trusted:

* ``load_yaml`` is the one YAML loader of recipes, plan.yaml and ``--set`` values: limits on size, nesting,
  aliases and integer length (an alias bomb or a 5000-digit number is one line, not a hang or a traceback),
  duplicate keys refused, and only plain types (mappings, lists, strings, numbers, booleans, null) loaded: a date
  or a set never reaches a job config or a JSON dump;
* ``inside`` / ``check_links`` / ``open_append`` keep the runtime's reads and writes inside their root: a symbolic
  link that leads out of it is refused in one line, never followed;
* ``rich_text``, ``markdown_text`` and ``html_text`` are the one escaping rule for text that came from outside
  (paths, model names, class folders) on its way to the terminal (rich markup), report.md or an HTML page.

Sits just above ``errors`` (it raises MonomodError) and below ``plan``, which loads its file through it.
"""
from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any

import yaml

from monomod.errors import MonomodError, shorten

MAX_YAML_BYTES = 1 << 20  # a recipe or plan is a few kB; a megabyte leaves room for long cut lists
MAX_DEPTH = 50  # nesting of mappings and lists (a plan nests 4 deep)
MAX_ALIASES = 100  # `*ref` uses; an alias bomb needs thousands
MAX_INT_DIGITS = 30  # the largest seed (2**63) has 19 digits
MAX_NODES = 100_000  # values once aliases are expanded (9 aliases of 9 aliases ... is a billion)


# ------------------------------------------------------------------------------------------------------------ YAML


class _Loader(yaml.SafeLoader):
    """A SafeLoader that counts aliases, refuses duplicate keys and non-plain types, and reads ``5e-4`` (YAML 1.1
    reads it as a string) as the number it means."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _Refused(f"it uses more than {MAX_ALIASES} aliases (*name)")
        if self.depth >= MAX_DEPTH:
            raise _Refused(f"its values are nested deeper than {MAX_DEPTH} levels")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node: Any) -> Any:
        """Count the values as they would be once aliases are expanded, before building any of them: an alias bomb
        is a few hundred bytes that expand to billions of values."""
        sizes: dict[int, int] = {}
        open_: set[int] = set()

        def size(n: Any) -> int:
            if id(n) in open_:
                raise _Refused("an alias (*name) refers to a value that holds it", n)
            if id(n) not in sizes:
                open_.add(id(n))
                children = n.value if isinstance(n, yaml.SequenceNode) else (
                    [x for pair in n.value for x in pair] if isinstance(n, yaml.MappingNode) else [])
                sizes[id(n)] = 1 + sum(size(c) for c in children)
                open_.discard(id(n))
            return sizes[id(n)]

        if size(node) > MAX_NODES:
            raise _Refused(f"it expands to more than {MAX_NODES} values through its aliases (an alias bomb)")
        return super().construct_document(node)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):  # keys as written: a merge (<<: *base) may still override
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise _Refused(f"a key is a {type(key).__name__}, not a string", key_node)
                if key in seen:
                    raise _Refused(f"the key {shorten(repr(key), 60)} is given twice", key_node)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> int:
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise _Refused(f"an integer has {digits} digits (at most {MAX_INT_DIGITS})", node)
        return super().construct_yaml_int(node)

    def _not_plain(self, node: Any) -> Any:
        shown = f"{shorten(str(node.value), 40)!r} is" if isinstance(node, yaml.ScalarNode) else "a value is"
        raise _Refused(f"{shown} a {node.tag.rsplit(':', 1)[-1]}, not a string, number, "
                       "boolean, null, list or mapping (quote it to keep it as text)", node)


class _Refused(Exception):
    """A limit or rule of ``load_yaml`` broken, with the node where it was (for the line number)."""

    def __init__(self, problem: str, node: Any = None) -> None:
        super().__init__(problem)
        self.line = node.start_mark.line + 1 if node is not None and getattr(node, "start_mark", None) else None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
for _tag in ("timestamp", "binary", "set", "omap", "pairs"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _Loader._not_plain)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
               r"|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_yaml(data: str | bytes, source: str, fix: str = "fix the file") -> Any:
    """The plain value of a YAML text from ``source`` (a file name, ``--set``), or one MonomodError naming the
    problem: not UTF-8, too large, too deep, an alias bomb, a huge integer, a duplicate key, a date or other
    non-plain value, or a syntax error (with its line)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MonomodError(f"{source} is not UTF-8 text (byte {e.start})", fix) from None
    if len(data) > MAX_YAML_BYTES:
        raise MonomodError(f"{source} is {len(data)} characters, more than {MAX_YAML_BYTES} allowed", fix)
    loader = None
    try:
        loader = _Loader(data)  # its reader refuses control characters (a NUL byte) here
        return loader.get_single_data()
    except _Refused as e:
        where = f" (line {e.line})" if e.line else ""
        raise MonomodError(f"{source}: {e}{where}", fix) from None
    except yaml.YAMLError as e:
        raise MonomodError(f"{source} is not valid YAML ({shorten(' '.join(str(e).split()), 160)})", fix) from None
    except RecursionError:
        raise MonomodError(f"{source}: its values are nested too deeply", fix) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: Path, source: str | None = None, fix: str = "fix the file") -> Any:
    """``load_yaml`` of a file, read as bytes (so invalid UTF-8 is one line) and refused when over the size limit
    before it is read whole."""
    source = source or shorten(str(path))
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise MonomodError(f"{source} is {path.stat().st_size} bytes, more than {MAX_YAML_BYTES} allowed", fix)
        data = path.read_bytes()
    except OSError as e:
        raise MonomodError(f"cannot read {source} ({e.strerror})", fix) from None
    return load_yaml(data, source, fix)


# ----------------------------------------------------------------------------------------------------------- paths


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (symbolic links followed) is ``root`` or lies under it."""
    base, target = Path(root).resolve(), Path(path).resolve()
    return target == base or base in target.parents


def check_links(root: Path, what: str = "RUN_DIR") -> None:
    """Refuse, in one line, any symbolic link under ``root`` whose target leaves it (or that cannot be resolved,
    as a loop): the runtime would read or write through it outside ``root``."""
    root = Path(root)
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):  # links to folders are listed, never followed
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            if path.is_symlink() and not _resolves_inside(root, path):
                raise MonomodError(f"{shorten(str(path))} is a symbolic link that leads out of {what}",
                                   f"remove that link (monomod reads and writes only inside {what})")


def _resolves_inside(root: Path, path: Path) -> bool:
    try:
        return inside(root, path.resolve(strict=True))
    except (OSError, RuntimeError):  # a dangling link or a loop
        return False


def open_append(path: Path, binary: bool = False) -> Any:
    """``open(path, "a")`` that refuses to follow a symbolic link at ``path`` itself (a planted link to a file
    elsewhere): for the logs the runtime appends to."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if Path(path).is_symlink():
            raise MonomodError(f"{shorten(str(path))} is a symbolic link; monomod does not write through one",
                               "remove that link") from None
        raise
    return os.fdopen(fd, "ab" if binary else "a", **({} if binary else {"encoding": "utf-8"}))


# ------------------------------------------------------------------------------------------------------------ text


def rich_text(value: Any) -> str:
    """``value`` as literal text in a rich markup string: ``[/x]`` in a path prints as is, never as a tag."""
    from rich.markup import escape

    return escape(str(value))


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~>-])")


def markdown_text(value: Any) -> str:
    """``value`` as literal text in Markdown: HTML escaped (a Markdown renderer passes raw HTML through), Markdown
    punctuation backslash-escaped, and newlines as spaces, so it stays inside its table cell or line."""
    text = " ".join(str(value).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(text, quote=True))


def markdown_code(value: Any) -> str:
    """``value`` as a Markdown code span (shown literally, HTML included), or as escaped text when it holds a
    backtick (which would end the span early)."""
    text = " ".join(str(value).split())
    return f"`{text}`" if "`" not in text else markdown_text(text)


def html_text(value: Any) -> str:
    """``value`` as literal text in HTML (element content or a quoted attribute)."""
    return html.escape(str(value), quote=True)
