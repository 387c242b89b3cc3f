"""How untrusted names are shown to people: on a terminal, in figures and in HTML.

Tensor names come from checkpoint headers, which anyone can write. A name may hold ANSI escape
sequences or other control characters (which would drive the terminal), lone UTF-16 surrogates such
as ``"\\ud800"`` (legal in a JSON header, but not encodable as UTF-8), or 200,000 characters (which
make matplotlib lay out text for minutes). :func:`display_name` turns any of them into a short,
printable string; the results files keep the name as it is.
"""

from __future__ import annotations

#: Default longest name shown in full; longer ones keep their start and end around an ellipsis.
MAX_NAME = 120


def printable(text: str) -> str:
    """``text`` with every character that cannot be printed safely written as an escape.

    Control characters (C0, DEL, C1: ``ESC``, ``BEL``, ``CR``…), lone surrogates, format and
    unassigned characters (categories ``C*``) and separators other than the space become ``\\xNN`` / ``\\uNNNN`` escapes, as
    Python's ``repr`` writes them; everything else, non-ASCII letters included, is kept.

    >>> printable("layer.\\x1b[31mred\\x1b[0m")
    'layer.\\\\x1b[31mred\\\\x1b[0m'
    >>> printable("q_proj.\\ud800")
    'q_proj.\\\\ud800'
    >>> printable("Gewichte.größe")
    'Gewichte.größe'
    """
    if text.isprintable():  # the common case: nothing to do
        return text
    # str.isprintable is False for categories C* (control, format, surrogate, private, unassigned)
    # and for separators other than the space
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)  # '\x1b', '\ud800'


def shorten(text: str, limit: int = MAX_NAME) -> str:
    """``text`` cut to at most ``limit`` characters, keeping its start and its end (the end of a
    tensor name says which matrix it is) around ``…``.

    >>> shorten("model.layers.0." + "x" * 50 + ".q_proj.weight", 30)
    'model.layers…xxx.q_proj.weight'
    """
    if limit < 5:
        raise ValueError(f"limit must be at least 5. Got {limit!r} instead.")
    if len(text) <= limit:
        return text
    tail = (limit - 1) * 3 // 5
    head = limit - 1 - tail
    return f"{text[:head]}…{text[-tail:]}"


def display_name(name: object, limit: int | None = MAX_NAME) -> str:
    """A name fit to print: :func:`printable`, then :func:`shorten` to ``limit`` characters (None:
    any length). Escaping for HTML or terminal markup is still the caller's job.

    >>> display_name("a\\x07b")
    'a\\\\x07b'
    """
    text = str(name)
    if limit is not None and len(text) > 4 * limit:  # do not scan 200,000 characters to show 120
        text = text[: 2 * limit] + text[-2 * limit :]
    text = printable(text)
    return text if limit is None else shorten(text, limit)


def as_typed(value: object) -> str:
    r"""An option's value (a regex, a layer range) in single quotes as the user typed it, control characters escaped
    (:func:`display_name`): ``repr`` doubled a regex's backslashes, and ``'a\\.b'`` copied back is another pattern.

    >>> print(as_typed(r"a\.b"))
    'a\.b'
    """
    return f"'{display_name(value, None)}'"  # whole: a pattern is at most 512 characters (config.MAX_PATTERN_CHARS)


def safe_text(text: str) -> str:
    """``text`` with lone surrogates replaced by their ``\\udXXX`` escape, so that it encodes as
    UTF-8 (a report or a terminal line); all other characters are kept.

    >>> safe_text("a\\ud800b")
    'a\\\\ud800b'
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


__all__ = ["MAX_NAME", "as_typed", "display_name", "printable", "safe_text", "shorten"]


def tau_percent(tau: float | str) -> str:
    """An energy threshold τ as a percentage with every digit it has (``0.995`` → ``"99.5%"``,
    ``0.9`` → ``"90%"``): a whole-percent format showed τ = 0.995 as "100%", a different rank.

    >>> tau_percent(0.995), tau_percent("0.9"), tau_percent(0.899), tau_percent(0.9999999)
    ('99.5%', '90%', '89.9%', '99.99999%')
    """
    return f"{round(float(tau) * 100, 10):.12g}%"


def range_text(bounds: tuple[float, float] | None) -> str:
    """``(lowest, highest)`` as ``"2–8"``, one value as ``"8"``, None as ``"–"`` (a LoRA r over layers
    with ``rank_pattern``: its median, 5 for ranks 2 and 8, is a rank no matrix has).

    >>> range_text((2, 8)), range_text((8, 8)), range_text(None)
    ('2–8', '8', '–')
    """
    if bounds is None:
        return "–"
    return "–".join(dict.fromkeys(f"{x:g}" for x in bounds))


def fmt_bytes(n: float) -> str:
    """A size in bytes as people read it.

    >>> fmt_bytes(300), fmt_bytes(576_000_000), fmt_bytes(3 << 40)
    ('300 B', '549.3 MiB', '3.0 TiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 checkpoint"``, ``"3 checkpoints"``: a count in words (``plural``: when it is not ``noun + "s"``).

    >>> counted(1, "checkpoint"), counted(0, "checkpoint"), counted(2, "matrix", "matrices")
    ('1 checkpoint', '0 checkpoints', '2 matrices')
    """
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def matrices(n: int) -> str:
    """``"1 matrix"``, ``"3 matrices"``: a count of matrices in words.

    >>> matrices(1), matrices(0)
    ('1 matrix', '0 matrices')
    """
    return counted(n, "matrix", "matrices")


def oversized_words(found: tuple[float, bool]) -> str:
    """The warning's words for :func:`spectra.metrics.oversized_update`'s ``(median, all_one)``."""
    med, one = found
    if one:
        return ("‖ΔW‖/‖W_base‖ is 1 on every changed matrix, as when the tuned weights are all zero (ΔW = −W_base): "
                "a preallocated or incompletely written checkpoint?")
    return f"the median ‖ΔW‖/‖W_base‖ is {med:.2f}, larger than the base weights themselves: is it a fine-tune of this base?"
