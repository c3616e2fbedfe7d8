"""Text a member chose (an input name, a workload word, a process name), made safe to print on root's terminal.

A file name or a journal field may hold ESC sequences that a terminal obeys (clear the screen, retitle the window,
rewrite what the operator reads) or a newline that forges a line of a listing. Every table and plain-text line
the commands print goes through here; JSON needs nothing (json.dumps escapes control characters itself).
"""

# C0 controls, DEL, C1 controls, and the bidirectional overrides and isolates (they reorder what is shown).
_BIDI = (0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069)
_FIELD = {c: f"\\x{c:02x}" for c in list(range(0x20)) + list(range(0x7F, 0xA0))}
_FIELD.update({c: f"\\u{c:04x}" for c in _BIDI})
_FIELD.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})
_BLOCK = dict(_FIELD)
del _BLOCK[0x0A]  # a block of lines keeps its newlines


def _surrogates(text):
    # Bytes that are not UTF-8 arrive as surrogate escapes (U+DC80..U+DCFF): shown as the bytes they stand for.
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else
                   f"\\u{ord(c):04x}" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def field(value):
    """One value (a table cell, a name in a sentence): every control character escaped, newlines too."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text  # the common case, in C
    return _surrogates(text.translate(_FIELD))


def block(text):
    """A whole text of lines about to be printed: every control character but the newline escaped."""
    if text.isprintable():
        return text
    return _surrogates(text.translate(_BLOCK))
