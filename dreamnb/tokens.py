"""Token rarity check: is the trigger word a new name to the model, or something it already knows?

DreamBooth teaches the model a new subject under a trigger word ("photo of squidarth person").
If that word is made of pieces the model has seen countless times ("Sid Shanker" becomes
`sid`, `shan`, `ker`), training mostly nudges what those pieces already mean and the subject
is learned poorly. A word the model has barely seen is a blank name it can fill quickly.

Stable Diffusion's CLIP tokenizer is byte-level BPE: its merges are learned most-frequent first,
so a token's id is a rough frequency rank (low id = common, ids near the end = rare strings).
A token ending in `</w>` ends a word; a text that is a single `</w>` token is a whole word the
tokenizer learned as such. The check below reads only those two facts, plus a short list of
popular trigger words known to collide with something, and (when the text encoder is at hand)
the common words nearest to the text in the encoder's input-embedding space.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

BUNDLED_TOKENIZER_DIR = Path(__file__).parent / "data" / "clip-tokenizer"

WORD_END = "</w>"  # CLIP's end-of-word marker on a BPE token

# CLIP's vocabulary starts with 256 single bytes and the same 256 bytes with `</w>`: single
# characters, the most frequent pieces of all.
CHARACTER_TOKEN_COUNT = 512

# Ids below this are the ~19,500 most frequent merges: everyday words, common names and word
# pieces ("dog" 1929, "person" 2533, "sid" 15119, "christianity" 20000). The model has strong
# meanings for them, so a trigger word made only of these is generic.
COMMON_ID_LIMIT = 20_000

# Ids from here up are the last ~9,400 merges, the rarest fifth of the vocabulary ("ohwx" 47993,
# "olis" 49397). The model has seen these strings rarely and attached little meaning to them,
# which is what a trigger word needs. Between the two limits a whole-word token is a real word
# the model knows moderately well ("darth" 23164, "vader" 21908): a collision.
RARE_ID_MIN = 40_000

# One or two rare pieces are quick to learn and easy to type; more pieces spread the new meaning
# over several tokens, each of which also appears in other words.
MAX_GOOD_PIECES = 2

# A word-ending piece this long that is also a real word is reported as a collision ("darth" at
# the end of "squidarth"); shorter endings ("ker", "ing") are suffixes, not concepts.
COLLISION_MIN_LETTERS = 4

# Popular trigger words that are one rare token but are known to collide with a concept in
# Stable Diffusion. Rank cannot see this, so it is written down, with the reason in plain words.
KNOWN_COLLISIONS = {
    "sks": (
        '"sks" is a popular DreamBooth token, but Stable Diffusion already links it to the SKS '
        "rifle, so guns can show up in your pictures."
    ),
}

# Rare single CLIP tokens (ids 40,000+) that are not words: mined from the vocabulary with the
# filters below, then every string that a word-frequency list (wordfreq, 17 languages) knows as a
# word was dropped, and so were word fragments and hashtags that still carry a concept
# ("onnaise" as in mayonnaise, "adelrey" as in Lana Del Rey, "teamgb", "drwho"). "ohwx" and its
# kin (weather-hashtag endings) are the trigger words the DreamBooth community settled on.
CURATED_SUGGESTIONS = (
    "ohwx", "gawx", "mowx", "wiwx", "ilwx", "delavin", "rizio", "anagh", "onimo", "adero",
    "regui", "akaif", "utpol", "tairp", "scoll", "wildoz", "enhall", "kirstel", "vingne", "shwar",
)

# When the curated list is not enough (another vocabulary), suggestions are mined: one rare
# whole-word token of 4 to 7 letters (long enough not to read as an abbreviation, short enough
# to type in every prompt) that looks sayable and not like an English word.
SUGGEST_MIN_LETTERS = 4
SUGGEST_MAX_LETTERS = 7
VOWELS = frozenset("aeiouy")
# Endings that mark an inflected English word ("snuggles", "bumping", "falsely"): real words.
ENGLISH_ENDINGS = ("ing", "ed", "ly", "ers", "ies", "tion", "ness", "ment", "able", "ful", "less", "ous")

VERDICTS = ("good", "risky", "generic")


@dataclass
class TokenPiece:
    """One BPE token of the checked text."""

    text: str  # as the user would read it, without the `</w>` marker
    id: int  # BPE id: a frequency rank, low = common
    common: bool  # the model has seen it very often (a single character or id < COMMON_ID_LIMIT)
    rarity: str  # "character", "common", "uncommon" or "rare"
    ends_word: bool  # the token carries `</w>`: it is the end of a word (or a whole word)


@dataclass
class TokenReport:
    """What the tokenizer makes of a trigger word, and whether it is a good one."""

    text: str
    pieces: list[TokenPiece]
    n_tokens: int
    verdict: str  # "good", "risky" or "generic"
    reasons: list[str]  # plain sentences for a user without ML background
    collisions: list[str] = field(default_factory=list)  # words the model already knows inside the text
    nearest_words: list[str] = field(default_factory=list)  # empty when no text encoder was given
    suggestions: list[str] = field(default_factory=list)  # rare single-token alternatives

    def to_dict(self) -> dict:
        return asdict(self)


def load_tokenizer(source: str | Path | None = None):
    """Load a CLIPTokenizer: the bundled SD 1.x one, a tokenizer folder, or a diffusers model folder.

    A single-file checkpoint (.safetensors/.ckpt) carries no tokenizer; SD 1.x and 2.x both use the
    CLIP BPE vocabulary bundled here, so that is what it gets.
    """
    from transformers import CLIPTokenizer

    if source is None:
        return CLIPTokenizer.from_pretrained(BUNDLED_TOKENIZER_DIR)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in (".safetensors", ".ckpt"):
        log.info("%s has no tokenizer inside; using the bundled CLIP tokenizer", path)
        return CLIPTokenizer.from_pretrained(BUNDLED_TOKENIZER_DIR)
    if path.is_dir():
        for folder in (path, path / "tokenizer"):
            if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                return CLIPTokenizer.from_pretrained(folder)
        raise UserError(
            f"No tokenizer found in {path}: pass a folder with vocab.json and merges.txt, "
            "or a diffusers model folder with a tokenizer/ subfolder."
        )
    if path.exists():
        raise UserError(f"{path} is not a tokenizer folder, a diffusers model folder or a .safetensors/.ckpt file.")
    # Not on disk: treat it as a Hugging Face Hub model id (needs the network or the local cache).
    try:
        return CLIPTokenizer.from_pretrained(str(source), subfolder="tokenizer")
    except (OSError, ValueError) as error:
        raise UserError(
            f"Could not load a tokenizer from {source!r} (not a local folder, and the Hub could not "
            f"provide it: {error}); pass --tokenizer with a local folder instead."
        ) from error


def check_token(text: str, tokenizer, text_encoder=None, *, tokenizer_2=None, n_suggestions: int = 5, seed: int = 0) -> TokenReport:
    """Say how the model's tokenizer splits `text` and whether it makes a good trigger word.

    Verdicts: "generic" (only common pieces: the model already means something by them),
    "risky" (a known collision, a real word inside, or too many pieces), "good" (one or two
    rare pieces). Suggestions are filled in when the verdict is not good.

    `tokenizer_2` is SDXL's second tokenizer (OpenCLIP bigG's; the second of `BaseModel.tokenizers`): the trigger word
    reaches both text encoders, so it is checked with both. SDXL's two tokenizers share CLIP's vocabulary and
    merges (only the padding differs), so they split every text alike and one check speaks for both; were
    their vocabularies different, each would be checked and the worse verdict kept.
    """
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(tokenizer_2, (str, Path)):
        tokenizer_2 = load_tokenizer(tokenizer_2)
    if tokenizer_2 is not None:
        return _check_with_both(text, tokenizer, tokenizer_2, text_encoder, n_suggestions=n_suggestions, seed=seed)
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"The token to check must be a non-empty word such as 'ohwx', not {text!r}.")
    text = text.strip()
    pieces = _pieces(text, tokenizer)
    if not pieces:
        raise UserError(f"The tokenizer turns {text!r} into nothing; use letters, e.g. 'ohwx'.")
    words = _group_into_words(pieces)
    collisions = _collisions(words)
    verdict, reasons = _verdict(text, pieces, words, collisions)

    nearest = nearest_words(text, tokenizer, text_encoder) if text_encoder is not None else []
    if nearest:
        reasons.append(
            "In the model's own word space it sits closest to: " + ", ".join(nearest) + "."
        )
    suggestions = []
    if verdict != "good" and n_suggestions > 0:
        suggestions = suggest_tokens(tokenizer, n=n_suggestions, seed=seed, exclude=(text,))
    return TokenReport(
        text=text,
        pieces=pieces,
        n_tokens=len(pieces),
        verdict=verdict,
        reasons=reasons,
        collisions=collisions,
        nearest_words=nearest,
        suggestions=suggestions,
    )


def _check_with_both(text: str, tokenizer, tokenizer_2, text_encoder, *, n_suggestions: int, seed: int) -> TokenReport:
    """SDXL: check `text` with both tokenizers, once when they split it alike; the worse verdict otherwise."""
    first = check_token(text, tokenizer, text_encoder, n_suggestions=n_suggestions, seed=seed)
    if _same_vocabulary(tokenizer, tokenizer_2) and tokenizer.tokenize(text) == tokenizer_2.tokenize(text):
        first.reasons.append("SDXL's two text encoders share this vocabulary, so both read it the same way.")
        return first
    second = check_token(text, tokenizer_2, None, n_suggestions=n_suggestions, seed=seed)
    worse = second if VERDICTS.index(second.verdict) > VERDICTS.index(first.verdict) else first
    if worse is second:
        second.reasons = [f"With SDXL's second tokenizer: {reason}" for reason in second.reasons]
        second.nearest_words = first.nearest_words
    worse.collisions = list(dict.fromkeys(first.collisions + second.collisions))
    # A suggestion must be one rare token for both text encoders.
    other = tokenizer_2 if worse is first else tokenizer
    worse.suggestions = [word for word in worse.suggestions if _is_one_rare_token(other, word)]
    return worse


def _same_vocabulary(tokenizer, tokenizer_2) -> bool:
    return tokenizer is tokenizer_2 or tokenizer.get_vocab() == tokenizer_2.get_vocab()


def _is_one_rare_token(tokenizer, word: str) -> bool:
    token = word + WORD_END
    return RARE_ID_MIN <= tokenizer.get_vocab().get(token, -1) < _first_special_id(tokenizer) and tokenizer.tokenize(word) == [token]


def suggest_tokens(tokenizer, n: int = 5, seed: int = 0, exclude=()) -> list[str]:
    """Pick `n` rare trigger words that are not real words, each one token with this tokenizer.

    Every suggestion is checked here with `tokenizer`: it must stay ONE token when typed alone, with
    an id in the rarest part of the vocabulary. They come first from CURATED_SUGGESTIONS (rare CLIP
    tokens known not to be words in any common language); if the tokenizer is not CLIP's and too
    few of those pass, more are mined from its own rarest whole-word tokens with heuristics (a
    weaker filter: it can let a rare real name through). The same seed gives the same suggestions.
    """
    if n < 1:
        raise UserError(f"The number of suggestions must be at least 1, not {n}.")
    vocab = tokenizer.get_vocab()
    excluded = {str(word).strip().lower() for word in exclude} | set(KNOWN_COLLISIONS)
    special_start = _first_special_id(tokenizer)

    def is_one_rare_token(word: str) -> bool:
        token = word + WORD_END
        return (
            word not in excluded
            and RARE_ID_MIN <= vocab.get(token, -1) < special_start
            and tokenizer.tokenize(word) == [token]
        )

    rng = random.Random(seed)
    curated = [word for word in CURATED_SUGGESTIONS if is_one_rare_token(word)]
    rng.shuffle(curated)
    chosen = curated[:n]
    if len(chosen) < n:
        chosen += _mine_rare_tokens(tokenizer, vocab, n - len(chosen), rng, is_one_rare_token, set(chosen))
    if len(chosen) < n:
        log.warning("only %d rare token suggestions found (asked for %d)", len(chosen), n)
    return chosen


def _mine_rare_tokens(tokenizer, vocab, n, rng, is_one_rare_token, taken) -> list[str]:
    """Rare, sayable whole-word tokens that do not look like English words (fallback for other vocabularies)."""
    candidates = sorted(
        (token_id, token[: -len(WORD_END)])
        for token, token_id in vocab.items()
        if token.endswith(WORD_END) and token_id >= RARE_ID_MIN and _looks_pronounceable(token[: -len(WORD_END)])
    )
    rng.shuffle(candidates)
    common_words = _common_words(vocab)
    found: list[str] = []
    for _, word in candidates:
        if word in taken or _has_english_form(word, vocab) or _one_typo_from(word, common_words):
            continue
        if _is_compound(word, common_words) or not is_one_rare_token(word):
            continue
        found.append(word)
        if len(found) == n:
            break
    return found


def nearest_words(token_text: str, tokenizer, text_encoder, k: int = 5) -> list[str]:
    """The `k` common words whose input embeddings are closest (cosine) to `token_text`'s.

    A text of several pieces is represented by the mean of its pieces' embeddings. This is the
    space the text encoder starts from, so a collision ("sks" near a rifle) shows up here.
    """
    import torch

    pieces = _pieces(token_text, tokenizer)
    if not pieces:
        raise UserError(f"The tokenizer turns {token_text!r} into nothing, so it has no embedding.")
    table = text_encoder.get_input_embeddings().weight.detach().float()
    query = table[[piece.id for piece in pieces]].mean(dim=0)

    own_ids = {piece.id for piece in pieces}
    word_ids = [
        token_id
        for token, token_id in tokenizer.get_vocab().items()
        if token_id not in own_ids and _is_common_word_token(token, token_id)
    ]
    word_ids.sort()
    similarity = torch.nn.functional.cosine_similarity(table[word_ids], query.unsqueeze(0), dim=1)
    best = similarity.topk(min(k, len(word_ids))).indices.tolist()
    id_to_token = tokenizer.convert_ids_to_tokens([word_ids[i] for i in best])
    return [token[: -len(WORD_END)] for token in id_to_token]


# --- helpers -------------------------------------------------------------------------------


def _pieces(text: str, tokenizer) -> list[TokenPiece]:
    tokens = tokenizer.tokenize(text)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    return [
        TokenPiece(
            text=tokenizer.convert_tokens_to_string([token]).replace(WORD_END, "").strip(),
            id=token_id,
            common=_rarity(token_id) in ("character", "common"),
            rarity=_rarity(token_id),
            ends_word=token.endswith(WORD_END),
        )
        for token, token_id in zip(tokens, ids)
    ]


def _rarity(token_id: int) -> str:
    if token_id < CHARACTER_TOKEN_COUNT:
        return "character"
    if token_id < COMMON_ID_LIMIT:
        return "common"
    if token_id < RARE_ID_MIN:
        return "uncommon"
    return "rare"


def _group_into_words(pieces: list[TokenPiece]) -> list[list[TokenPiece]]:
    """Split pieces into the words they spell: a piece with `</w>` closes a word."""
    words, current = [], []
    for piece in pieces:
        current.append(piece)
        if piece.ends_word:
            words.append(current)
            current = []
    if current:
        words.append(current)
    return words


def _collisions(words: list[list[TokenPiece]]) -> list[str]:
    """Words the model already knows inside the text.

    A whole word that is one non-rare token is a known word ("dog", "sid"). The last piece of a
    longer word is also a word when it is long enough ("darth" in "squidarth", which tokenizes as
    squ + i + darth): it is the same token as the word typed alone.
    """
    found = []
    for word in words:
        last = word[-1]
        known = last.ends_word and CHARACTER_TOKEN_COUNT <= last.id < RARE_ID_MIN
        if known and (len(word) == 1 or len(last.text) >= COLLISION_MIN_LETTERS):
            if last.text not in found:
                found.append(last.text)
    return found


def _verdict(text, pieces, words, collisions) -> tuple[str, list[str]]:
    n = len(pieces)
    listed = ", ".join(piece.text for piece in pieces)
    key = text.lower()
    if key in KNOWN_COLLISIONS:
        return "risky", [KNOWN_COLLISIONS[key]]

    if all(piece.common for piece in pieces):
        if n == 1 and len(words) == 1:
            reason = (
                f'"{text}" is a common word the model already knows well, so training would change '
                f"what it means instead of learning a new name."
            )
        else:
            reason = (
                f'"{text}" becomes {n} common pieces ({listed}) that the model has seen countless '
                f"times, so training blends your subject into what they already mean instead of "
                f"learning a new name."
            )
        return "generic", [reason]

    if all(piece.rarity == "rare" for piece in pieces) and n <= MAX_GOOD_PIECES:
        share = 100 * min(piece.id for piece in pieces) / _vocab_end(pieces)
        what = "one rare token" if n == 1 else f"{n} rare pieces ({listed})"
        return "good", [
            f'"{text}" is {what}, rarer than about {share:.0f}% of the model\'s vocabulary, so the '
            f"model has little meaning attached to it and can learn your subject quickly."
        ]

    # Everything else is usable but has a weak spot; say each one.
    # "squidarth" lands here (squ + i + darth): the blog it came from got good results because
    # the three-piece combination is unusual, but "darth" is the same token as the word typed
    # alone (Darth Vader), so some of that can leak in; one rare token is the safer choice.
    reasons = []
    for word in collisions:
        reasons.append(f'It contains "{word}", a word the model already knows, so some of that meaning can leak in.')
    if n > MAX_GOOD_PIECES:
        reasons.append(
            f"It is split into {n} pieces ({listed}); a name of one or two rare pieces is learned "
            f"faster and is easier to use in prompts."
        )
    common = [piece.text for piece in pieces if piece.common]
    if common:
        reasons.append(
            f"Some of its pieces are common ({', '.join(common)}), and the model already has "
            f"strong meanings for them."
        )
    if not reasons:  # e.g. one whole word of middling rank that the collision rule skipped
        reasons.append(f'"{text}" is not rare enough to be a blank name for the model.')
    return "risky", reasons


def _vocab_end(pieces) -> int:
    # The share is only a friendly figure; CLIP's ordinary tokens end where the specials begin.
    return max(49_406, max(piece.id for piece in pieces) + 1)


def _first_special_id(tokenizer) -> int:
    special = [i for i in tokenizer.all_special_ids if i >= CHARACTER_TOKEN_COUNT]
    return min(special) if special else len(tokenizer.get_vocab())


def _is_common_word_token(token: str, token_id: int) -> bool:
    """A whole word of 3+ letters among the common merges: something a user would recognise."""
    return (
        CHARACTER_TOKEN_COUNT <= token_id < COMMON_ID_LIMIT
        and token.endswith(WORD_END)
        and re.fullmatch(r"[a-z]{3,}", token[: -len(WORD_END)]) is not None
    )


def _common_words(vocab: dict) -> set[str]:
    return {token[: -len(WORD_END)] for token, token_id in vocab.items() if _is_common_word_token(token, token_id)}


def _looks_pronounceable(word: str) -> bool:
    """Letters only, 4-7 long, with vowels, no cluster of 3 consonants or 3 vowels ("nmwx" is out)."""
    if not (SUGGEST_MIN_LETTERS <= len(word) <= SUGGEST_MAX_LETTERS) or not re.fullmatch(r"[a-z]+", word):
        return False
    pattern = "".join("v" if letter in VOWELS else "c" for letter in word)
    return "v" in pattern and "ccc" not in pattern and "vvv" not in pattern and not re.search(r"(.)\1\1", word)


def _has_english_form(word: str, vocab: dict) -> bool:
    """True when the word looks like a real English word: an inflected ending or inflected siblings."""
    if word.endswith(ENGLISH_ENDINGS):
        return True
    related = [word + suffix for suffix in ("s", "es", "ed", "d", "ing", "er", "y", "ly")]
    for suffix in ("s", "es", "d", "er", "y"):  # a form of another token ("pebbles" -> "pebble")
        if word.endswith(suffix):
            related += [word[: -len(suffix)], word[: -len(suffix)] + "e"]
    if word.endswith("e"):
        related.append(word[:-1] + "ing")
    return any(other != word and other + WORD_END in vocab for other in related)


def _is_compound(word: str, common_words: set[str]) -> bool:
    """True for two common words glued together, as in hashtags ("soproud", "openday")."""
    return any(word[:i] in common_words and word[i:] in common_words for i in range(2, len(word) - 1))


def _one_typo_from(word: str, common_words: set[str]) -> bool:
    """True when one deleted, changed or added letter turns `word` into a common word."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    edits = {left + right[1:] for left, right in splits if right}
    edits |= {left + c + right[1:] for left, right in splits if right for c in letters if c != right[0]}
    edits |= {left + c + right for left, right in splits for c in letters}
    return not edits.isdisjoint(common_words)
