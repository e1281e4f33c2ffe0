"""The byte-level alphabet of GPT-2/CLIP BPE tokenizers, for the tiny tokenizers built offline."""


def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable character table: printable bytes map to themselves, the
    rest to characters above 255."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
