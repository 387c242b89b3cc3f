"""PEFT's module-name patterns, from untrusted ``adapter_config.json`` files, matched as PEFT matches
them but never with catastrophic backtracking.

PEFT runs these keys as Python regular expressions (``peft.utils.other``, ``tuners_utils``):

- ``rank_pattern`` / ``alpha_pattern`` keys: ``re.match(rf"(.*\\.)?({key})$", module)``;
- ``target_modules`` / ``exclude_modules`` given as one string: ``re.fullmatch(pattern, module)``;
- ``modules_to_save`` entries: ``re.match(rf"(^|.*\\.){m}($|\\..*)", module)``.

A key such as ``(a|a)+b`` makes Python's backtracking engine take exponential time on a long name
(over a minute at 40 characters). So, before anything is matched, :func:`pattern_risk` reads the
whole expression PEFT would compile and refuses, with one line naming the key:

- a repeated group (``*``, ``+``, ``{m,n}`` with n > 1) that holds a repetition, an optional part or
  an alternation (``(a+)+``, ``(a|ab)*``, ``(a?)+``): the shapes with exponentially many ways to
  match;
- backreferences and conditional groups (matching with them is NP-hard);
- more than :data:`MAX_UNBOUNDED` unbounded repetitions in the expression (PEFT's own wrapper
  counts), which bounds the polynomial degree;
- keys longer than :data:`MAX_PATTERN_CHARS`.

What is left runs in at most about ``L^3`` steps on a name of L characters; names matched against a
key with a repetition of its own are limited to :data:`MAX_NAME_CHARS` (0.05 s at worst). Keys
without metacharacters (``q_proj``, nearly every real config) are compared as strings, at any name
length, with the same result as the regular expression.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

#: Longest key accepted; real keys are module paths well under 200 characters.
MAX_PATTERN_CHARS = 512
#: Unbounded repetitions (``*``, ``+``, ``{m,}``, ``{m,n}`` with n > 16) allowed in the whole
#: expression PEFT compiles, its wrapper included: ``(.*\.)?(key)$`` leaves two for the key.
MAX_UNBOUNDED = 3
#: Longest name matched against a key that has a repetition of its own (module names are < 200).
MAX_NAME_CHARS = 256

_META = frozenset(".^$*+?{}[]\\|()")
_BRACES = re.compile(r"\{(\d*)(,?)(\d*)\}")


class PatternError(ValueError):
    """A key refused by :func:`pattern_risk`, or a name too long to match against it; the caller
    turns it into a :class:`spectra.errors.CheckpointFormatError` naming the config file.

    Attributes:
        key: the key as written in the config.
        reason: a phrase completing "key 'k' …".
    """

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"key {key[:80]!r} {reason}")


def is_literal(key: str) -> bool:
    """True when ``key`` has no regular-expression metacharacter, so it matches only itself."""
    return not (_META & set(key))


def _group_prefix_end(pattern: str, i: int) -> int:
    """Index just after the ``(`` or ``(?…:`` / ``(?P<name>`` / ``(?=`` … opening a group at ``i``."""
    j = i + 1
    if pattern.startswith("?", j):
        j += 1
        if pattern.startswith("P<", j):
            return pattern.index(">", j) + 1
        if pattern.startswith(("<=", "<!"), j):
            return j + 2
        if pattern[j : j + 1] in (":", "=", "!", ">"):
            return j + 1
        while j < len(pattern) and pattern[j] not in ":)":  # inline flags (?i) / (?i-s:...)
            j += 1
        return j + 1 if pattern[j : j + 1] == ":" else j
    return j


def _class_end(pattern: str, i: int) -> int:
    """Index just after the character class opening at ``i`` (a leading ``]`` or ``^]`` is literal)."""
    j = i + 1 + (pattern[i + 1 : i + 2] == "^")
    j += pattern[j : j + 1] == "]"
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def _quantifier(pattern: str, i: int) -> tuple[int | None, int] | None:
    """``(max repeats or None for unbounded, length)`` of a quantifier at ``i``, or None (a literal ``{``)."""
    c = pattern[i]
    if c == "*" or c == "+":
        return None, 1
    if c == "?":
        return 1, 1
    m = _BRACES.match(pattern, i)
    if m is None or not (m.group(1) or m.group(3) or m.group(2)):
        return None if m is None else (1, 0)
    lo, comma, hi = m.groups()
    if not comma:
        return int(lo or 0), m.end() - i
    return (int(hi) if hi else None), m.end() - i


#: Most choice points (``|``, an optional ``?``, the extra repetitions of ``{m,n}``) a name filter may
#: hold: each can double the ways a failing match is retried, and written-out copies that no repetition
#: guard sees ('(?:.|.)' 26 times: 51 s on one name) add up exponentially. 16 bounds that to ~65 000.
MAX_CHOICES = 16


def choice_points(pattern: str) -> int:
    r"""How many choices ``pattern`` leaves the matcher: ``|``, ``?`` quantifiers that make something
    optional (not ``(?…)`` nor a lazy ``*?``), and the ``n − m`` extra repetitions of each ``{m,n}``;
    escapes and character classes hold none. Read with :func:`pattern_risk`'s tokens.

    >>> choice_points(r"layers\.(1|2)\..*mlp"), choice_points(r"(?i)q_proj?"), choice_points(r"\d{1,3}[|?]")
    (1, 1, 2)
    """
    count, i, n = 0, 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
        elif c == "[":
            i = _class_end(pattern, i)
        elif c == "(":
            i = _group_prefix_end(pattern, i)  # its "(?…" prefix holds no quantifier
        elif c in "*+?{" and (q := _quantifier(pattern, i)) is not None and q[1] > 0:
            m = _BRACES.match(pattern, i) if c == "{" else None
            count += 1 if c == "?" else (max(0, int(m.group(3)) - int(m.group(1) or 0)) if m and m.group(2) and m.group(3) else 0)
            i += q[1]
            if i < n and pattern[i] in "?+":  # lazy or possessive form of the same quantifier
                i += 1
        else:
            count += c == "|"
            i += 1
    return count


@functools.lru_cache(maxsize=8192)  # pure; asked again for every module a key is matched against (560 × 1,120: 70 s)
def pattern_risk(expression: str) -> tuple[str | None, int]:
    """Why ``expression`` (the whole regular expression PEFT compiles) could backtrack
    catastrophically, or None; and how many unbounded repetitions it has.

    Returns:
        ``(reason or None, unbounded repetitions)``. The reason is a phrase for
        "``<field> key 'k' <reason>``".

    Example:
        >>> pattern_risk(r"(.*\\.)?((a|a)+b)$")[0]
        "has nested repetition: '(a|a)+' repeats a group holding a repetition or an alternation, which can backtrack for hours on a long name"
        >>> pattern_risk(r"(.*\\.)?(layers\\.\\d+\\.self_attn\\.q_proj)$")
        (None, 2)
    """
    try:
        re.compile(expression)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"is not a valid regular expression ({exc})", 0
    # one frame per open group: [position of "(", holds a quantifier, holds an alternation]
    stack: list[list] = [[0, False, False]]
    last_group: list | None = None  # the group just closed, if the next token may quantify it
    unbounded, i, n = 0, 0, len(expression)
    while i < n:
        c = expression[i]
        group, last_group = last_group, None
        if c == "\\":
            if expression[i + 1 : i + 2] in tuple("123456789"):
                return "uses a backreference, which regular expressions cannot match in bounded time", unbounded
            i += 2
        elif c == "[":
            i = _class_end(expression, i)
        elif c == "(":
            if expression.startswith(("(?P=", "(?("), i):
                return "uses a backreference or a conditional group, which cannot be matched in bounded time", unbounded
            if expression.startswith("(?#", i):
                i = expression.index(")", i) + 1
                continue
            stack.append([i, False, False])
            i = _group_prefix_end(expression, i)
        elif c == ")":
            closed = stack.pop() if len(stack) > 1 else [i, False, False]
            stack[-1][1] |= closed[1]
            stack[-1][2] |= closed[2]
            last_group = closed
            i += 1
        elif c == "|":
            stack[-1][2] = True
            i += 1
        elif c in "*+?{" and (q := _quantifier(expression, i)) is not None and q[1] > 0:
            most, length = q
            if most is None or most > 16:
                unbounded += 1
            if (most is None or most > 1) and group is not None and (group[1] or group[2]):
                text = expression[group[0] : i + length]
                return (f"has nested repetition: {text[:60]!r} repeats a group holding a repetition or an alternation, "
                        "which can backtrack for hours on a long name"), unbounded
            stack[-1][1] = True
            i += length
            if i < n and expression[i] in "?+":  # lazy or possessive form of the same quantifier
                i += 1
        else:
            i += 1
    if unbounded > MAX_UNBOUNDED:
        return (f"has {unbounded} unbounded repetitions where at most {MAX_UNBOUNDED} are matched "
                "(each one multiplies the matching time by the name's length)"), unbounded
    return None, unbounded


def _check(key: str, expression: str, wrapper_unbounded: int) -> int:
    if len(key) > MAX_PATTERN_CHARS:
        raise PatternError(key, f"is {len(key)} characters long; at most {MAX_PATTERN_CHARS} are matched")
    reason, unbounded = pattern_risk(expression)
    if reason:
        raise PatternError(key, reason)
    return unbounded - wrapper_unbounded


def _check_name(key: str, name: str, own_unbounded: int) -> None:
    if own_unbounded and len(name) > MAX_NAME_CHARS:
        raise PatternError(key, f"is a regular expression with repetitions, and module name {name[:40]!r}... has "
                                f"{len(name)} characters; such names are matched up to {MAX_NAME_CHARS}")


def suffix_expression(key: str) -> str:
    """The expression PEFT compiles for a ``rank_pattern`` / ``alpha_pattern`` key."""
    return rf"(.*\.)?({key})$"


def check_suffix_key(key: str) -> None:
    """Refuse a ``rank_pattern`` / ``alpha_pattern`` key :func:`suffix_match` would not match safely.

    Raises:
        PatternError: see the module docstring.
    """
    if not is_literal(key):
        _check(key, suffix_expression(key), 1)


def suffix_match(key: str, name: str) -> bool:
    """PEFT's ``re.match(rf"(.*\\.)?({key})$", name)``: ``key`` matches the whole of ``name`` or a
    part of it that starts after a dot.

    >>> suffix_match("q_proj", "model.layers.0.self_attn.q_proj"), suffix_match("q_proj", "model.qq_proj")
    (True, False)

    Raises:
        PatternError: ``key`` is refused (:func:`check_suffix_key`), or ``name`` is too long for it.
    """
    if is_literal(key) and "\n" not in name:  # "$" also matches before a final newline: left to re
        return name == key or name.endswith("." + key)
    own = _check(key, suffix_expression(key), 1)
    _check_name(key, name, own)
    return _compiled(suffix_expression(key)).match(name) is not None


def check_full_key(pattern: str) -> None:
    """Refuse a ``target_modules`` / ``exclude_modules`` string :func:`full_match` would not match safely."""
    if not is_literal(pattern):
        _check(pattern, pattern, 0)


def full_match(pattern: str, name: str) -> bool:
    """PEFT's ``re.fullmatch(pattern, name)`` for ``target_modules`` / ``exclude_modules`` strings.

    Raises:
        PatternError: ``pattern`` is refused, or ``name`` is too long for it.
    """
    if is_literal(pattern):
        return name == pattern
    own = _check(pattern, pattern, 0)
    _check_name(pattern, name, own)
    return _compiled(pattern).fullmatch(name) is not None


@functools.lru_cache(maxsize=8192)
def _compiled(expression: str) -> re.Pattern[str]:
    """``re.compile(expression)``, kept: re's own cache holds 512, fewer than the keys of one large config."""
    return re.compile(expression)


def component_expression(entry: str) -> str:
    """The expression PEFT compiles for a ``modules_to_save`` entry (inserted unescaped)."""
    return rf"(^|.*\.){entry}($|\..*)"


def check_component_key(entry: str) -> None:
    """Refuse a ``modules_to_save`` entry :func:`component_match` would not match safely."""
    if not is_literal(entry):
        _check(entry, component_expression(entry), 2)


def component_match(entry: str, name: str) -> bool:
    """PEFT's ``re.match(rf"(^|.*\\.){entry}($|\\..*)", name)``: ``entry`` is a run of whole dotted
    components of ``name``.

    Raises:
        PatternError: ``entry`` is refused, or ``name`` is too long for it.
    """
    if is_literal(entry) and "\n" not in name:
        return name == entry or name.startswith(entry + ".") or name.endswith("." + entry) or f".{entry}." in name
    own = _check(entry, component_expression(entry), 2)
    _check_name(entry, name, own)
    return re.match(component_expression(entry), name) is not None


def layer_expression(layers_pattern: str) -> str:
    """The expression PEFT compiles to find the layer index after a ``layers_pattern`` entry."""
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def check_layers_key(layers_pattern: str) -> None:
    """Refuse a ``layers_pattern`` entry :func:`layer_index` would not match safely."""
    if not is_literal(layers_pattern):
        _check(layers_pattern, layer_expression(layers_pattern), 2)


def layer_index(name: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    """The layer index PEFT reads from a module name for ``layers_to_transform``: the first number
    after any component (``layers_pattern`` empty) or after one of ``layers_pattern``, as
    ``peft.tuners.tuners_utils.check_target_module_exists`` finds it; None when there is none.

    >>> layer_index("model.layers.3.experts.1.w1", None), layer_index("model.h.2.attn", ("h",))
    (3, 2)

    Raises:
        PatternError: a ``layers_pattern`` entry is refused, or ``name`` is too long for it.
    """
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)  # fixed and linear: the first numbered component
        return int(m.group("idx")) if m else None
    for pattern in layers_pattern:
        own = _check(pattern, layer_expression(pattern), 2) if not is_literal(pattern) else 0
        _check_name(pattern, name, own)
        m = re.match(layer_expression(pattern), name)
        if m:
            return int(m.group("idx"))
    return None


#: Seconds :func:`spectra.io.adapter.open_adapter` spends looking for pattern keys that clash on a module (a best
#: effort: every key is matched against every module; a recommend config of an 80-layer model has ~560 keys, ~1 s
#: with the compiled keys cached).
CLASH_CHECK_S = 10.0


def clashing_keys(patterns: Mapping[str, Any], module: str) -> str | None:
    """The keys of ``patterns`` matching ``module`` with their values, as text, when they give it different
    values (which one applies then depends on the keys' order); None otherwise. A key that cannot be matched
    safely is left to :func:`spectra.io.adapter.pattern_key`."""
    if len(patterns) < 2:
        return None
    try:
        hits = {k: v for k, v in patterns.items() if suffix_match(k, module)}
    except PatternError:
        return None
    if len(set(hits.values())) < 2:
        return None
    return ", ".join(f"{k!r}: {v:g}" for k, v in hits.items())
