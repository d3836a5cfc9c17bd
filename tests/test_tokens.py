"""Token check against the real CLIP tokenizer bundled in dreamnb/data/clip-tokenizer."""
import json

import pytest
import torch

from dreamnb import tokens
from dreamnb.tokens import check_token, load_tokenizer, nearest_words, suggest_tokens


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def text_encoder():
    from dreamnb.tiny import tiny_pipeline

    return tiny_pipeline("sd1", seed=0).text_encoder


def token_id(tokenizer, word):
    return tokenizer.get_vocab()[word + "</w>"]


def test_bundled_tokenizer_is_the_real_clip_vocabulary(tokenizer):
    # Figures from the tokenizer's README, checked there against OpenAI's CLIP tokenizer.
    assert len(tokenizer.get_vocab()) == 49408
    assert tokenizer("a photo of", add_special_tokens=False).input_ids == [320, 1125, 539]


def test_sid_shanker_is_generic(tokenizer):
    report = check_token("Sid Shanker", tokenizer)
    assert [piece.text for piece in report.pieces] == ["sid", "shan", "ker"]
    assert report.n_tokens == 3
    assert all(piece.common for piece in report.pieces)
    assert report.verdict == "generic"
    assert "common" in report.reasons[0] and "sid, shan, ker" in report.reasons[0]
    assert "sid" in report.collisions  # typed as a whole word and one common token: a known name
    assert "ker" not in report.collisions  # just the end of "shanker"


@pytest.mark.parametrize("word", ["dog", "person", "Person"])
def test_common_word_is_generic(tokenizer, word):
    report = check_token(word, tokenizer)
    assert report.verdict == "generic"
    assert report.n_tokens == 1 and report.pieces[0].common
    assert report.collisions == [word.lower()]
    assert "common word" in report.reasons[0]


def test_sks_is_one_rare_token_but_risky_because_of_the_rifle(tokenizer):
    report = check_token("sks", tokenizer)
    assert [piece.id for piece in report.pieces] == [48136]
    assert report.pieces[0].rarity == "rare"  # rank alone would call it good
    assert report.verdict == "risky"
    assert any("rifle" in reason for reason in report.reasons)
    assert "sks" not in report.suggestions and len(report.suggestions) == 5


def test_squidarth_is_risky_because_it_ends_in_darth(tokenizer):
    report = check_token("squidarth", tokenizer)
    assert [piece.text for piece in report.pieces] == ["squ", "i", "darth"]
    assert report.verdict == "risky"
    assert report.collisions == ["darth"]
    assert any('"darth"' in reason for reason in report.reasons)
    assert any("3 pieces" in reason for reason in report.reasons)


def test_two_rare_pieces_are_good_and_a_rare_piece_with_a_common_one_is_not(tokenizer):
    assert check_token("ohwx olis", tokenizer).verdict == "good"
    mixed = check_token("ohwx2", tokenizer)
    assert mixed.verdict == "risky"
    assert any("common (2)" in reason for reason in mixed.reasons)


def test_a_suggested_token_checks_good(tokenizer):
    for word in suggest_tokens(tokenizer, n=5, seed=3):
        report = check_token(word, tokenizer)
        assert report.verdict == "good", (word, report.reasons)
        assert report.n_tokens == 1 and report.collisions == []
        assert report.suggestions == []  # nothing to replace


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_token_is_refused_with_a_clear_message(tokenizer, text):
    with pytest.raises(ValueError, match="non-empty word"):
        check_token(text, tokenizer)


def assert_one_rare_token(tokenizer, word):
    assert tokenizer.tokenize(word) == [word + "</w>"], word
    assert token_id(tokenizer, word) >= tokens.RARE_ID_MIN, word


def test_suggestions_are_distinct_rare_single_tokens_and_fixed_by_the_seed(tokenizer):
    first = suggest_tokens(tokenizer, n=6, seed=0)
    assert len(first) == len(set(first)) == 6
    for word in first:
        assert_one_rare_token(tokenizer, word)  # so never a common whole word (id < COMMON_ID_LIMIT)
        assert word.isalpha() and word.islower()
    assert suggest_tokens(tokenizer, n=6, seed=0) == first
    assert set(suggest_tokens(tokenizer, n=6, seed=1)) != set(first)


def test_suggestions_leave_out_excluded_words_and_known_collisions(tokenizer):
    exclude = tokens.CURATED_SUGGESTIONS[:10]
    for seed in range(5):
        found = suggest_tokens(tokenizer, n=5, seed=seed, exclude=exclude)
        assert not set(found) & set(exclude)
        assert "sks" not in found


def test_suggestions_fall_back_to_mining_the_vocabulary(tokenizer):
    mined = suggest_tokens(tokenizer, n=5, seed=0, exclude=tokens.CURATED_SUGGESTIONS)
    assert len(mined) == len(set(mined)) == 5
    assert not set(mined) & set(tokens.CURATED_SUGGESTIONS)
    common_words = tokens._common_words(tokenizer.get_vocab())
    for word in mined:
        assert_one_rare_token(tokenizer, word)
        assert tokens._looks_pronounceable(word)
        assert word not in common_words


def test_curated_suggestions_hold_with_the_real_tokenizer(tokenizer):
    for word in tokens.CURATED_SUGGESTIONS:
        assert_one_rare_token(tokenizer, word)


def test_nearest_words_finds_the_word_a_token_was_made_to_collide_with(tokenizer, text_encoder):
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        original = table[token_id(tokenizer, "ohwx")].clone()
        try:
            for target in ("rifle", "banana"):
                noise = 0.01 * torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0))
                table[token_id(tokenizer, "ohwx")] = table[token_id(tokenizer, target)] + noise
                nearest = nearest_words("ohwx", tokenizer, text_encoder, k=5)
                assert nearest[0] == target
                assert len(nearest) == 5 and "ohwx" not in nearest

            report = check_token("ohwx", tokenizer, text_encoder)
            assert report.nearest_words[0] == "banana"
            assert any("banana" in reason for reason in report.reasons)
        finally:
            table[token_id(tokenizer, "ohwx")] = original


def test_nearest_words_are_common_whole_words(tokenizer, text_encoder):
    nearest = nearest_words("sks", tokenizer, text_encoder, k=8)
    assert len(nearest) == 8 and "sks" not in nearest
    for word in nearest:
        assert word.isalpha()
        assert token_id(tokenizer, word) < tokens.COMMON_ID_LIMIT


def test_report_without_text_encoder_has_no_nearest_words_and_is_json_ready(tokenizer):
    report = check_token("Sid Shanker", tokenizer, n_suggestions=3)
    data = json.loads(json.dumps(report.to_dict()))
    assert report.nearest_words == [] and data["nearest_words"] == []
    assert data["verdict"] == "generic" and data["n_tokens"] == 3
    assert data["pieces"][0] == {"text": "sid", "id": 15119, "common": True, "rarity": "common", "ends_word": True}
    assert len(data["suggestions"]) == 3


def test_load_tokenizer_from_a_diffusers_model_folder_and_a_plain_folder(tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tokens.BUNDLED_TOKENIZER_DIR, model / "tokenizer")
    (model / "model_index.json").write_text("{}")
    for source in (model, model / "tokenizer", str(model)):
        assert load_tokenizer(source).tokenize("sks") == ["sks</w>"]


def test_load_tokenizer_refuses_a_folder_without_tokenizer_files(tmp_path):
    with pytest.raises(ValueError, match="No tokenizer found"):
        load_tokenizer(tmp_path)
