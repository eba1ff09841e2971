"""Semantic IDs as itemic tokens: ``<|sid_begin|><s_a_x><s_b_y><s_c_z><s_d_w><|sid_end|>``.

A SID is a tuple of ints, one per level (residual levels, then the collision level).
Level ``i`` uses the letter ``"abcdefgh"[i]``; tokens are level-specific, as in the paper.

    >>> sid_to_text((1, 2, 3, 0))
    '<|sid_begin|><s_a_1><s_b_2><s_c_3><s_d_0><|sid_end|>'
    >>> parse_sids("buy <|sid_begin|><s_a_1><s_b_2><s_c_3><s_d_0><|sid_end|> now")
    [(1, 2, 3, 0)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

SID_BEGIN = "<|sid_begin|>"
SID_END = "<|sid_end|>"
LEVEL_LETTERS = "abcdefgh"
_TOKEN_RE = re.compile(r"<s_([a-h])_(\d+)>")
_SID_RE = re.compile(re.escape(SID_BEGIN) + r"((?:<s_[a-h]_\d+>)+)" + re.escape(SID_END))


def level_sizes(sid_cfg) -> list[int]:
    """Codes per level for a ``SidCfg``: residual levels then the collision level."""
    return [sid_cfg.codebook_size] * sid_cfg.levels + [sid_cfg.collision_size]


def sid_token(level: int, code: int) -> str:
    """Token string of one code, e.g. ``sid_token(1, 7) == '<s_b_7>'``."""
    if not 0 <= level < len(LEVEL_LETTERS):
        raise ValueError(f"SID level {level} out of range 0..{len(LEVEL_LETTERS) - 1}")
    if code < 0:
        raise ValueError(f"SID code must be >= 0, got {code}")
    return f"<s_{LEVEL_LETTERS[level]}_{code}>"


def sid_to_text(sid: Sequence[int]) -> str:
    """Full item string with begin/end markers."""
    return SID_BEGIN + "".join(sid_token(i, int(c)) for i, c in enumerate(sid)) + SID_END


def parse_sids(text: str) -> list[tuple[int, ...]]:
    """Every well-formed SID in ``text`` (levels must run a, b, c, ... in order)."""
    out = []
    for m in _SID_RE.finditer(text):
        toks = _TOKEN_RE.findall(m.group(1))
        if all(letter == LEVEL_LETTERS[i] for i, (letter, _) in enumerate(toks)):
            out.append(tuple(int(code) for _, code in toks))
    return out


def vocab_tokens(sizes: Sequence[int]) -> list[str]:
    """All new tokens for the vocabulary: the two markers, then every level's codes."""
    toks = [SID_BEGIN, SID_END]
    for level, n in enumerate(sizes):
        toks.extend(sid_token(level, c) for c in range(n))
    return toks


@dataclass(frozen=True)
class SidVocab:
    """Token ids of the SID vocabulary inside one tokenizer (score and constrain on ids).

    ``level_ids[l][c]`` is the token id of code ``c`` at level ``l``.
    """

    begin_id: int
    end_id: int
    level_ids: tuple[tuple[int, ...], ...]

    @classmethod
    def from_tokenizer(cls, tokenizer, sizes: Sequence[int]) -> SidVocab:
        def tid(tok: str) -> int:
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(
                    f"tokenizer has no token {tok!r}: expand the vocabulary first "
                    "(onerec_prod.model.vocab.expand_vocab)"
                )
            return int(i)

        levels = tuple(tuple(tid(sid_token(l, c)) for c in range(n)) for l, n in enumerate(sizes))
        return cls(tid(SID_BEGIN), tid(SID_END), levels)

    @property
    def num_levels(self) -> int:
        return len(self.level_ids)

    def encode(self, sid: Sequence[int]) -> list[int]:
        """Token ids of ``<|sid_begin|> codes... <|sid_end|>``."""
        if len(sid) != self.num_levels:
            raise ValueError(f"SID {tuple(sid)} has {len(sid)} levels, expected {self.num_levels}")
        return [self.begin_id] + [self.level_ids[l][c] for l, c in enumerate(sid)] + [self.end_id]

    def code_of(self, level: int, token_id: int) -> int | None:
        """Code of ``token_id`` at ``level``, or None if it is not a level-``level`` token."""
        ids = self.level_ids[level]
        lo = ids[0]
        c = token_id - lo
        if 0 <= c < len(ids) and ids[c] == token_id:
            return c
        try:
            return ids.index(token_id)
        except ValueError:
            return None

    def decode_codes(self, token_ids: Sequence[int]) -> tuple[int | None, ...]:
        """Codes read level by level from ids that follow ``<|sid_begin|>`` (None = wrong token)."""
        out = []
        for level in range(self.num_levels):
            if level >= len(token_ids):
                break
            out.append(self.code_of(level, int(token_ids[level])))
        return tuple(out)
