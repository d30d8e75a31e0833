"""What the search entry points share: refusing unknown keyword options, and progress bars."""
from __future__ import annotations

import difflib
import sys
from typing import Any, Iterable, Mapping

from omnic.core.errors import SearchError


def refuse_unknown(what: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Raise a :class:`SearchError` naming each unknown option and the valid names closest to it.

    A misspelled option (``population`` written ``populaton``) would otherwise be a raw
    ``TypeError`` from a dataclass constructor, or worse, be ignored.

    Args:
        what: The function the options were given to, for the message.
        given: The option names the user passed.
        valid: Every name that function accepts.

    Raises:
        SearchError: Some name in ``given`` is not in ``valid``.
    """
    valid = sorted(set(valid))
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        hints.append(f"{name!r} (did you mean {' or '.join(repr(c) for c in close)}?)" if close else repr(name))
    raise SearchError(f"unknown {what} option(s): {', '.join(hints)}; valid options: {', '.join(valid)}")


def progress_wanted(progress: bool | None) -> bool:
    """``progress`` itself, or (None, the default) whether stderr is a terminal: a person watching
    a 95 s training run sees it move, while logs and pipes stay clean."""
    if progress is not None:
        return bool(progress)
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(progress: bool | None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr (disabled, so every call on it is a no-op, unless progress is wanted).

    Args:
        progress: True, False, or None for "when stderr is a terminal".
        **kwargs: Passed to ``tqdm`` (``total``, ``desc``, ``unit``...).
    """
    from tqdm.auto import tqdm

    # sys.stderr is read now, not at import: a redirected stderr gets the bar
    return tqdm(file=sys.stderr, disable=not progress_wanted(progress), dynamic_ncols=True, **kwargs)


def short(record: Mapping[str, Any]) -> str:
    """A round's record in a few words for the bar's postfix (numbers to 4 significant digits)."""
    parts = []
    for k, v in record.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        elif isinstance(v, (int, str)):
            parts.append(f"{k}={v}")
    return " ".join(parts)[:120]
